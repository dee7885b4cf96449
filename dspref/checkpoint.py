"""Checkpoints that are complete or absent, exact resume, and the Hugging Face export.

Layout of ``output_dir``::

    checkpoint-<step>/deepspeed/...        DeepSpeed's model/optimizer/scheduler shards
    checkpoint-<step>/dspref_state.json    step, data position, objective state
    checkpoint-<step>/rng_state_<rank>.pt  RNG states of each rank (tensors; loaded weights_only)
    checkpoint-<step>/objective_tensors.pt the method's tensor state, if any (BCO's UDM classifier)
    latest                                 name of the newest complete checkpoint (written last)

A checkpoint is written into ``.tmp-checkpoint-<step>`` and renamed into place only when every
rank has finished, so an interrupted or failed save never leaves a half-written
``checkpoint-<step>`` and never touches the previous one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil

import numpy as np
import torch

from dspref import engine as eng

log = logging.getLogger("dspref")

DS_TAG = "deepspeed"
STATE_FILE = "dspref_state.json"
TENSORS_FILE = "objective_tensors.pt"
LATEST = "latest"
_CKPT_RE = re.compile(r"^checkpoint-(\d+)$")


class CheckpointError(RuntimeError):
    pass


def save_checkpoint(engine, output_dir: str, step: int, state: dict, *, save_total_limit: int | None,
                    tensors: dict | None = None) -> str:
    """Write ``checkpoint-<step>`` atomically on all ranks; returns its path.

    ``state`` (JSON) and ``tensors`` (e.g. BCO's UDM classifier; loaded with weights_only=True)
    are the run's own state beside DeepSpeed's, written by rank 0.
    """
    rank = torch.distributed.get_rank()
    final = os.path.join(output_dir, f"checkpoint-{step}")
    tmp = os.path.join(output_dir, f".tmp-checkpoint-{step}")
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    eng.barrier()
    failed = torch.zeros(1)
    error = None
    try:
        engine.save(tmp, DS_TAG, client_state={"dspref_step": step})
        torch.save(_rng_state(), os.path.join(tmp, f"rng_state_{rank}.pt"))
        if rank == 0:
            if tensors:
                torch.save(tensors, os.path.join(tmp, TENSORS_FILE))
            write_json(os.path.join(tmp, STATE_FILE), state)
    except Exception as e:  # disk full, permissions, ...: clean up, keep the previous checkpoint
        failed[0], error = 1, e
    if eng.all_reduce_max(failed).item():
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(output_dir)
        kept = f"the previous checkpoint {previous} is intact" if previous else "no earlier checkpoint exists"
        reason = error or "another rank failed to write its part"
        raise CheckpointError(f"saving checkpoint-{step} failed ({reason}); nothing was half-written and {kept}")
    if rank == 0:
        _move_into_place(tmp, final)
        _write_text(os.path.join(output_dir, LATEST), f"checkpoint-{step}\n")
        _rotate(output_dir, save_total_limit)
    eng.barrier()
    return final


def _move_into_place(tmp: str, final: str) -> None:
    """Rename ``tmp`` to ``final``; an existing ``final`` (same step saved again) is replaced last."""
    if os.path.exists(final):
        old = final + ".old"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _rotate(output_dir: str, limit: int | None) -> None:
    if not limit or limit <= 0:
        return
    for path in list_checkpoints(output_dir)[:-limit]:
        shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(output_dir: str) -> list[str]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        m = _CKPT_RE.match(name)
        if m and os.path.exists(os.path.join(output_dir, name, STATE_FILE)):
            found.append((int(m.group(1)), os.path.join(output_dir, name)))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str) -> str | None:
    """The checkpoint named by ``latest`` (or the newest complete one if the marker is missing)."""
    marker = os.path.join(output_dir, LATEST)
    if os.path.exists(marker):
        with open(marker, encoding="utf-8") as f:
            path = os.path.join(output_dir, f.read().strip())
        if os.path.exists(os.path.join(path, STATE_FILE)):
            return path
    found = list_checkpoints(output_dir)
    return found[-1] if found else None


def resolve_resume(output_dir: str, spec: str | None) -> str | None:
    """``latest`` -> newest checkpoint in ``output_dir`` (None if there is none); a path -> itself."""
    if not spec:
        return None
    if spec == "latest":
        return latest_checkpoint(output_dir)
    if not os.path.exists(os.path.join(spec, STATE_FILE)):
        raise CheckpointError(f"resume_from_checkpoint={spec}: not a dspref checkpoint (no {STATE_FILE} in it)")
    return spec


def check_world_size(path: str, world_size: int) -> None:
    """Refuse, before any model is built, to resume a checkpoint written by another number of ranks.

    Each rank's ZeRO shards (and its place in the data order) belong to that rank count; DeepSpeed
    cannot re-partition ZeRO-3 optimizer shards on load.
    """
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        saved = json.load(f).get("world_size")
    if saved is None or saved == world_size:
        return
    raise CheckpointError(
        f"{path} was written by {saved} ranks and this run has {world_size}: ZeRO shards and the data order "
        f"belong to the rank count. Resume with {saved} ranks, or start a new run from its weights: "
        f"dspref export-checkpoint {path} MODEL_DIR, then --model_name_or_path MODEL_DIR (the optimizer state "
        f"and the schedule start afresh)")


def load_checkpoint(engine, path: str) -> tuple[dict, dict]:
    """Restore engine and RNG states; return the dspref state and tensors of checkpoint ``path``."""
    engine.load(path, DS_TAG)
    state, tensors = read_state(path)
    rng_path = os.path.join(path, f"rng_state_{torch.distributed.get_rank()}.pt")
    if os.path.exists(rng_path):
        _set_rng_state(torch.load(rng_path, weights_only=True))
    else:
        log.warning("%s has no RNG state for this rank (world size changed?); RNG not restored", path)
    return state, tensors


def read_state(path: str) -> tuple[dict, dict]:
    """The dspref state (step, data position, objective state) and objective tensors of checkpoint ``path``."""
    with open(os.path.join(path, STATE_FILE), encoding="utf-8") as f:
        state = json.load(f)
    tensors_path = os.path.join(path, TENSORS_FILE)
    tensors = torch.load(tensors_path, weights_only=True) if os.path.exists(tensors_path) else {}
    return state, tensors


def load_weights(engine, path: str) -> None:
    """Put checkpoint ``path``'s model weights into ``engine`` (a frozen one too), whatever the number of
    ranks or the ZeRO stage that saved it and the ZeRO stage ``engine`` runs. Optimizer state is not read."""
    state = eng.checkpoint_state_dict(path, DS_TAG)
    try:
        eng.load_full_state_dict(engine.ds.module, state)
    except KeyError as e:
        raise CheckpointError(f"{path} does not hold this model's weights: {e.args[0]}") from None


def _rng_state() -> dict:
    py_version, py_state, py_gauss = random.getstate()
    np_state = np.random.get_state()
    state = {
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_version": py_version,
        "python_gauss": py_gauss,
        "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64)),
        "numpy_pos": int(np_state[2]),
        "numpy_has_gauss": int(np_state[3]),
        "numpy_gauss": float(np_state[4]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate((state["python_version"], tuple(state["python"].tolist()), state["python_gauss"]))
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), state["numpy_pos"],
                         state["numpy_has_gauss"], state["numpy_gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_json(path: str, obj: dict) -> None:
    """JSON via a temporary file and ``os.replace``: readers never see a partial file."""
    _write_text(path, json.dumps(obj, indent=2, allow_nan=False) + "\n")


def _write_text(path: str, text: str) -> None:
    """Write via a temporary file and ``os.replace`` so readers never see a partial file."""
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def export_model(engine, tokenizer, output_dir: str, *, merge_adapter: bool = False) -> None:
    """Save the trained model in Hugging Face format (safetensors) into ``output_dir``.

    Under ZeRO-3 the shards are consolidated first (every rank takes part). A LoRA policy is saved
    as its adapter (``PeftModel.from_pretrained`` loads it), or with ``merge_adapter`` as the base
    model with the adapter merged in. Files are written to a temporary folder and moved in one by
    one, so a failed export leaves no truncated weights.
    """
    state = engine.full_state_dict()  # collective under ZeRO-3
    if torch.distributed.get_rank() == 0:
        save_pretrained(engine.model, state, tokenizer, output_dir, merge_adapter=merge_adapter)
    eng.barrier()


def save_pretrained(model, state: dict, tokenizer, output_dir: str, *, merge_adapter: bool) -> None:
    """``model`` with ``state`` (its whole state dict) and ``tokenizer`` into ``output_dir``, atomically per file."""
    os.makedirs(output_dir, exist_ok=True)
    tmp = os.path.join(output_dir, ".tmp-export")
    shutil.rmtree(tmp, ignore_errors=True)
    if merge_adapter and _is_peft(model):
        merged_copy(model, state).save_pretrained(tmp, safe_serialization=True)
    else:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    os.rmdir(tmp)


def export_checkpoint(path: str, output_dir: str) -> str:
    """A checkpoint's weights as a Hugging Face model (or LoRA adapter), in one process, for any rank count.

    The ZeRO shards are merged on the CPU with DeepSpeed's own reader; the model is rebuilt from the
    run's saved ``dspref_config.yaml`` (beside the checkpoint), so a run can start from a checkpoint
    written by another number of ranks. Returns the model folder.
    """
    from dspref.config import parse_args
    from dspref.objectives import build_objective
    from dspref.run import _read_model_config, build_policy, load_tokenizer

    recipe = os.path.join(os.path.dirname(os.path.abspath(path)), "dspref_config.yaml")
    if not os.path.exists(os.path.join(path, STATE_FILE)):
        raise CheckpointError(f"{path} is not a dspref checkpoint (no {STATE_FILE} in it)")
    if not os.path.exists(recipe):
        raise CheckpointError(f"{recipe} is missing: the run's config is needed to rebuild the model")
    cfg, _ = parse_args(["--config", recipe])
    cfg.random_init = True  # the architecture only: every weight comes from the checkpoint
    objective = build_objective(cfg)
    tokenizer = load_tokenizer(cfg)
    pad_id = cfg.padding_value if cfg.padding_value is not None else tokenizer.pad_token_id
    scorer = build_policy(cfg, objective, _read_model_config(cfg, objective.model_kind), {}, pad_id)
    state = eng.checkpoint_state_dict(path, DS_TAG)  # the scorer's own keys ("model." + the model's)
    scorer.load_state_dict(state, strict=True)
    save_pretrained(scorer.model, {k.removeprefix("model."): v for k, v in state.items()}, tokenizer, output_dir,
                    merge_adapter=cfg.merge_peft_adapter)
    return output_dir


def _is_peft(model) -> bool:
    return hasattr(model, "peft_config") and hasattr(model, "merge_and_unload")


def merged_copy(peft_model, state: dict):
    """A plain (unsharded, CPU) copy of ``peft_model`` with ``state`` loaded and its adapter merged in."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    base_config = peft_model.get_base_model().config
    lora = peft_model.peft_config[peft_model.active_adapter]
    auto = AutoModelForSequenceClassification if lora.task_type == "SEQ_CLS" else AutoModelForCausalLM
    fresh = get_peft_model(auto.from_config(base_config), lora, autocast_adapter_dtype=False)
    fresh.load_state_dict(state)
    return fresh.merge_and_unload()
