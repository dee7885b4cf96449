"""The reference model behind one interface: ``logps(batch) -> (N,)`` per-sequence log-probs, no grad.

Strategies (picked from the config, as TRL does; see ``ReferenceConfig``):

- ``EngineReference``: a DeepSpeed inference engine beside the policy: ZeRO-3 sharded (optionally
  with parameters offloaded to CPU) or stage 0, holding ``ref_model`` or the policy's initial
  weights (loaded again, sharded at construction: never a full copy per rank under ZeRO-3);
- ``ModuleReference``: a bitsandbytes 8/4-bit model, a plain module on every rank;
- ``AdapterReference``: the policy itself with its LoRA adapter disabled (or a named adapter active);
- precomputed (:mod:`dspref.precompute`): values computed in one pass before training, read back
  per batch, so no reference model is held during training.

Every strategy scores with the same :mod:`dspref.logps` forward as the policy.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

import torch

log = logging.getLogger("dspref")


class EngineReference:
    def __init__(self, engine, description: str):
        self.engine = engine
        self.description = description

    def logps(self, batch: dict) -> torch.Tensor:
        return self.engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           completion_mask=batch["completion_mask"])["logps"]

    def generation_model(self, *, gather: bool):
        from dspref.engine import generation_model

        return generation_model(self.engine, gather=gather)

    def close(self) -> None:
        """Free the engine (once this object is dropped): used after a precompute pass."""
        self.engine.close()


class ModuleReference:
    def __init__(self, scorer, device, description: str):
        self.scorer = scorer.eval()
        self.device = device
        self.description = description

    def logps(self, batch: dict) -> torch.Tensor:
        with torch.no_grad():
            return self.scorer(**{k: batch[k].to(self.device) for k in ("input_ids", "attention_mask",
                                                                        "completion_mask")})["logps"]

    @contextmanager
    def generation_model(self, *, gather: bool):
        """A whole model on every rank: nothing to gather, no collectives."""
        with torch.no_grad():
            yield self.scorer.model, False


class AdapterReference:
    """The LoRA policy with its adapter switched off (or ``ref_adapter_name`` active) for the call.

    It runs through the policy's own engine, so under ZeRO-3 the base weights are gathered by the
    same hooks, and costs no second copy of the model.
    """

    def __init__(self, policy_engine, *, model_adapter_name: str | None, ref_adapter_name: str | None):
        self.policy = policy_engine
        self.model_adapter_name = model_adapter_name or "default"
        self.ref_adapter_name = ref_adapter_name
        self.description = (f"adapter '{ref_adapter_name}'" if ref_adapter_name else "policy with adapter disabled")

    @contextmanager
    def _reference_weights(self):
        model = self.policy.model
        if self.ref_adapter_name:
            model.set_adapter(self.ref_adapter_name)
            try:
                yield
            finally:
                model.set_adapter(self.model_adapter_name)
        else:
            with model.disable_adapter():
                yield

    @contextmanager
    def generation_model(self, *, gather: bool):
        from dspref.engine import generation_model

        with generation_model(self.policy, gather=gather) as handle, self._reference_weights():
            yield handle

    def logps(self, batch: dict) -> torch.Tensor:
        with torch.no_grad(), self._reference_weights():
            return self.policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               completion_mask=batch["completion_mask"], router_aux=False)["logps"].detach()


def build_reference(cfg, *, policy_engine, policy_ds: dict, ref_ds_user: dict | None):
    """The live reference the options select (precompute runs one of these for its pass)."""
    from dspref import engine as eng
    from dspref.config import pack_one_row, pack_tokens
    from dspref.dsconfig import reference_ds_config
    from dspref.logps import SequenceScorer

    if cfg.peft_config and not cfg.ref_model:
        return AdapterReference(policy_engine, model_adapter_name=cfg.model_adapter_name,
                                ref_adapter_name=cfg.ref_adapter_name)

    def scorer(model):  # the reference scores exactly as the policy does (padding-free or not)
        if pack_tokens(cfg):
            from dspref.attention import use_packed_attention

            use_packed_attention(model)
        return SequenceScorer(model, cfg.logits_chunk_size, pack_tokens=pack_tokens(cfg), one_row=pack_one_row(cfg))

    path = cfg.ref_model or cfg.model_name_or_path
    random_init = cfg.random_init and not cfg.ref_model  # the policy's initial weights: same config, same seed
    if cfg.ref_load_in_8bit or cfg.ref_load_in_4bit:
        model = _load_quantized(cfg, path, random_init)
        return ModuleReference(scorer(model), eng.device(),
                               f"{'8' if cfg.ref_load_in_8bit else '4'}-bit bitsandbytes ({path})")
    ds = reference_ds_config(policy_ds, ref_ds=ref_ds_user, zero_stage_override=cfg.ref_zero_stage,
                             offload=cfg.ref_offload)
    model = eng.load_model(path, kind="causal-lm", ds_config=ds, random_init=random_init,
                           init_kwargs=cfg.ref_model_init_kwargs, trust_remote_code=cfg.trust_remote_code,
                           seed=cfg.seed)
    eng.prepare_model(model, gradient_checkpointing=False, disable_dropout=True)
    if random_init:
        eng.copy_parameters(policy_engine.model, model)  # exactly the policy's initial weights
    stage = ds["zero_optimization"]["stage"]
    where = "offloaded to CPU" if "offload_param" in ds["zero_optimization"] else ("sharded" if stage == 3 else "whole per rank")
    return EngineReference(eng.InferenceEngine(scorer(model), ds),
                           f"ZeRO-{stage} inference engine, {where} ({'policy initial weights' if not cfg.ref_model else path})")


def _load_quantized(cfg, path: str, random_init: bool):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if random_init:
        raise ValueError("a quantized reference is loaded from weights on disk, and random_init has none: "
                         "give ref_model (a saved model folder) or drop ref_load_in_8bit/4bit")
    try:
        import bitsandbytes  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the machine
        raise ValueError(f"ref_load_in_8bit/4bit needs bitsandbytes, which cannot run here ({e})") from None
    kwargs = dict(cfg.ref_model_init_kwargs or {})
    kwargs.setdefault("quantization_config", BitsAndBytesConfig(load_in_8bit=cfg.ref_load_in_8bit,
                                                                load_in_4bit=cfg.ref_load_in_4bit))
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **kwargs)
    return model.eval()
