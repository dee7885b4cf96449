"""The only module that imports deepspeed.

Everything else holds an :class:`Engine`: forward (per-sequence scores), backward, step,
checkpoint save/load and a consolidated state dict for export. Process-group set-up and
model construction (sharded at birth under ZeRO-3) live here too, because both need
DeepSpeed's objects.
"""

from __future__ import annotations

import logging
import math
import os
import socket
from contextlib import contextmanager

import torch
from torch import nn

log = logging.getLogger("dspref.engine")


# --------------------------------------------------------------------------- process group
def init_distributed() -> tuple[int, int, int]:
    """Join (or create) the process group; returns ``(rank, local_rank, world_size)``.

    Under ``deepspeed``/``torchrun`` the launcher sets RANK, WORLD_SIZE, MASTER_*; under plain
    ``python`` we set single-process defaults first so DeepSpeed never tries MPI discovery.
    CPU runs use gloo, CUDA runs nccl.
    """
    if "RANK" not in os.environ:
        os.environ.setdefault("RANK", "0")
        os.environ.setdefault("LOCAL_RANK", "0")
        os.environ.setdefault("WORLD_SIZE", "1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if not torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        if backend == "gloo":
            _unlink_shm_buffer()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
    return torch.distributed.get_rank(), local_rank, torch.distributed.get_world_size()


def _unlink_shm_buffer() -> None:
    """Remove this rank's name for DeepSpeed's CPU all-reduce buffer from /dev/shm.

    On CPU, DeepSpeed's shm comm op creates a 66 MB shared-memory buffer per rank, named after the
    master address and port, maps every rank's buffer during ``init_distributed``, and never removes
    the names: each run leaves 66 MB per rank of RAM-backed /dev/shm behind (a test suite that starts
    a hundred runs filled 18 GB). Once all ranks have mapped every buffer (the barrier), the names
    are no longer needed; the mappings live on until the processes exit.
    """
    torch.distributed.barrier()
    name = (f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_{os.environ.get('MASTER_ADDR')}_"
            f"{os.environ.get('MASTER_PORT')}_{torch.distributed.get_rank()}")
    try:
        os.unlink(name)
    except OSError:  # another naming, or no shm op on this build: nothing to clean
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def device() -> torch.device:
    """The accelerator this rank computes on (CPU when there is none)."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


# --------------------------------------------------------------------------- model construction
@contextmanager
def zero3_construction(ds_config: dict):
    """Models built inside are partitioned at construction under ZeRO-3 (never whole on a rank).

    transformers' ``HfDeepSpeedConfig`` is process-wide (a weak reference): it is alive only
    inside this block, so a later ``from_pretrained`` (export check, a stage-0 reference) is not
    partitioned by accident.
    """
    if ds_config.get("zero_optimization", {}).get("stage", 0) != 3:
        yield
        return
    from transformers.integrations import HfDeepSpeedConfig

    hf_ds = HfDeepSpeedConfig(ds_config)
    try:
        yield
    finally:
        del hf_ds


MODEL_KINDS = ("causal-lm", "sequence-classification")


def load_model(path: str, *, kind: str, ds_config: dict, random_init: bool, init_kwargs: dict | None,
               trust_remote_code: bool, seed: int, pad_token_id: int | None = None) -> nn.Module:
    """Load a causal LM or a one-label sequence classifier (the reward model's head is new when
    ``path`` holds a causal LM). With ``random_init`` build it from ``config.json`` with seeded
    random weights. Under ZeRO-3 it is partitioned as it is built.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    # A reward model has one output; the head reads the score at the last non-pad token.
    overrides = {"num_labels": 1, "pad_token_id": pad_token_id} if kind == "sequence-classification" else {}
    torch.manual_seed(seed)
    with zero3_construction(ds_config):
        if random_init:
            config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, **overrides)
            return auto.from_config(config, trust_remote_code=trust_remote_code, **(init_kwargs or {}))
        return auto.from_pretrained(path, trust_remote_code=trust_remote_code, **overrides, **(init_kwargs or {}))


def apply_peft(model: nn.Module, peft_config: dict, *, kind: str, adapter_name: str | None = None,
               ref_adapter: tuple[str, str] | None = None) -> nn.Module:
    """Wrap ``model`` with a trainable LoRA adapter (base weights frozen).

    Adapters are kept in the base model's dtype (``autocast_adapter_dtype=False``): ZeRO-3's
    all-gather fails on a mix of fp32 adapters and a bf16 base (DeepSpeed issue 8072). For a
    sequence classifier the task type SEQ_CLS makes the score head trainable and saved.
    """
    from peft import LoraConfig, get_peft_model

    task_type = "CAUSAL_LM" if kind == "causal-lm" else "SEQ_CLS"
    lora = LoraConfig(task_type=task_type, **peft_config)
    name = adapter_name or "default"
    model = get_peft_model(model, lora, adapter_name=name, autocast_adapter_dtype=False)
    if ref_adapter is not None:  # (name, folder): a frozen second adapter the reference switches to
        ref_name, ref_path = ref_adapter
        model.load_adapter(ref_path, adapter_name=ref_name, is_trainable=False, autocast_adapter_dtype=False)
        model.set_adapter(name)
        for n, p in model.named_parameters():
            if f".{ref_name}." in n:
                p.requires_grad_(False)
    return model


def prepare_model(model: nn.Module, *, gradient_checkpointing: bool, disable_dropout: bool) -> None:
    """Training switches applied before DeepSpeed wraps the model."""
    if disable_dropout:
        for module in model.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
            if isinstance(getattr(module, "attention_dropout", None), float):
                module.attention_dropout = 0.0
    if gradient_checkpointing:
        set_checkpointing(model, True)
        model.config.use_cache = False


def set_checkpointing(model: nn.Module, on: bool) -> None:
    """Gradient (activation) checkpointing on or off; non-reentrant, which works with ZeRO-3's
    partitioned parameters and with frozen inputs. transformers >= 5.2x names it
    ``activation_checkpointing_*`` (the ``gradient_checkpointing_*`` names warn)."""
    if on:
        enable = getattr(model, "activation_checkpointing_enable", None)
        if enable is not None:
            enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        (getattr(model, "activation_checkpointing_disable", None) or model.gradient_checkpointing_disable)()


def is_checkpointing(model: nn.Module) -> bool:
    flag = getattr(type(model), "is_activation_checkpointing", None)
    return bool(model.is_activation_checkpointing if flag is not None else
                getattr(model, "is_gradient_checkpointing", False))


# --------------------------------------------------------------------------- MoE under ZeRO-3
def moe_leaf_classes(model: nn.Module) -> list[type]:
    """Classes of the MoE blocks whose experts are separate modules (an ``experts`` ``ModuleList``).

    A token may skip such an expert, so ranks would disagree on which experts' parameters they
    gather (ZeRO-3 then hangs in the collectives: DeepSpeed PR 4966). Fused experts (one module
    with 3-D weights, as transformers' Mixtral / Qwen-MoE implement them) are gathered whole on
    every call and need nothing.
    """
    classes: list[type] = []
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if isinstance(experts, nn.ModuleList) and len(experts) > 1 and type(module) not in classes:
            classes.append(type(module))
    return classes


def mark_moe_leaf_modules(model: nn.Module, ds_config: dict) -> list[str]:
    """Under ZeRO-3, make each MoE block with per-expert modules a ZeRO-3 leaf (its parameters are
    gathered together whenever the block runs, whichever experts its tokens pick). Must run before
    ``deepspeed.initialize``. Returns the marked class names (empty below stage 3 or for dense models)."""
    if int(ds_config.get("zero_optimization", {}).get("stage", 0)) != 3:
        return []
    classes = moe_leaf_classes(model)
    if not classes:
        return []
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, classes)
    names = [c.__name__ for c in classes]
    log.info("ZeRO-3 leaf modules (MoE blocks with per-expert modules): %s", ", ".join(names))
    return names


# --------------------------------------------------------------------------- engine
class Engine:
    """A DeepSpeed training engine around a :class:`~dspref.logps.SequenceScorer`."""

    def __init__(self, scorer: nn.Module, ds_config: dict, *, optimizer_factory=None, scheduler_factory=None):
        import deepspeed

        from dspref.optim import sliced_adamw_from_ds_block

        trainable = [p for p in scorer.parameters() if p.requires_grad]
        optimizer = None
        init_config = ds_config
        if "optimizer" not in ds_config and optimizer_factory is not None:
            optimizer = optimizer_factory(trainable)
        else:
            # torch's AdamW (the CPU choice, see dsconfig) built by dspref with a sliced update:
            # the same result without two temporaries the size of the whole flat partition.
            optimizer = sliced_adamw_from_ds_block(ds_config, trainable)
            if optimizer is not None:
                init_config = {k: v for k, v in ds_config.items() if k != "optimizer"}
        scheduler = None
        if "scheduler" not in ds_config and scheduler_factory is not None:
            scheduler = scheduler_factory
        mark_moe_leaf_modules(scorer, ds_config)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=scorer,
            model_parameters=trainable,
            optimizer=optimizer,
            lr_scheduler=scheduler,
            config=init_config,
        )
        self.ds_config = ds_config
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))

    # the policy as the objective sees it: batch tensors in, per-sequence scores out
    def __call__(self, **tensors):
        dev = self.ds.device
        return self.ds(**{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()})

    @property
    def model(self) -> nn.Module:
        """The wrapped Hugging Face model."""
        return self.ds.module.model

    def train(self, mode: bool = True) -> None:
        self.ds.train(mode)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed scales by 1/gradient_accumulation_steps itself: never divide here.
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()

    def is_gradient_accumulation_boundary(self) -> bool:
        return self.ds.is_gradient_accumulation_boundary()

    @property
    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    @property
    def grad_norm(self) -> float | None:
        norm = self.ds.get_global_grad_norm()
        if norm is None:
            return None
        norm = float(norm)
        return norm if math.isfinite(norm) else None

    def save(self, save_dir: str, tag: str, client_state: dict) -> None:
        """DeepSpeed checkpoint of model, optimizer, scheduler (all ranks write their shards)."""
        self.ds.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)

    def load(self, load_dir: str, tag: str) -> dict:
        path, client_state = self.ds.load_checkpoint(load_dir, tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{tag}' in {load_dir}")
        return client_state or {}

    def full_state_dict(self) -> dict | None:
        """The whole model's state dict on rank 0 (``None`` elsewhere), consolidated from ZeRO-3 shards.

        Keys are the Hugging Face model's own (the scorer's ``model.`` prefix removed).
        """
        if self.zero_stage == 3:
            state = self.ds._zero3_consolidated_16bit_state_dict()
        else:
            state = self.ds.module.state_dict() if torch.distributed.get_rank() == 0 else None
        if state is None:
            return None
        return {k.removeprefix("model."): v.detach().cpu() for k, v in state.items()}


class InferenceEngine:
    """A DeepSpeed engine without an optimizer: the reference model, frozen, in eval mode.

    Stage 3 shards its parameters (optionally offloaded to CPU memory); stage 0 keeps a whole copy
    per rank. Every call runs under ``torch.no_grad``.
    """

    def __init__(self, scorer: nn.Module, ds_config: dict):
        import deepspeed

        for p in scorer.parameters():
            p.requires_grad_(False)
        mark_moe_leaf_modules(scorer, ds_config)
        self.ds = deepspeed.initialize(model=scorer, config=ds_config)[0]
        self.ds.eval()
        self.zero_stage = int(ds_config.get("zero_optimization", {}).get("stage", 0))

    def __call__(self, **tensors):
        dev = self.ds.device
        with torch.no_grad():
            return self.ds(**{k: v.to(dev) if isinstance(v, torch.Tensor) else v for k, v in tensors.items()})

    @property
    def model(self) -> nn.Module:
        """The wrapped Hugging Face model."""
        return self.ds.module.model

    def train(self, mode: bool = True) -> None:
        """A frozen engine stays in eval mode (``eval_mode`` may still call this, as for a policy)."""

    def close(self) -> None:
        """Let the engine and its model be freed once the caller drops it (after a precompute pass).

        Two module-level references in DeepSpeed keep a ZeRO-3 engine alive for the life of the process
        (found by walking ``gc.get_referrers`` from the engine): its top module, pushed on
        ``FWD_MODULE_STACK`` at init and never popped, and the parameter coordinator's class-wide
        ``lru_cache`` on ``__params_to_release``, keyed by (coordinator, submodule) after any forward.
        Through the modules' hook closures either one holds the whole engine and its model.
        """
        release_zero3_module(self.ds.module)
        self.ds = None


def release_zero3_module(module: nn.Module) -> None:
    """Drop DeepSpeed's module-level references to ``module`` (see :meth:`InferenceEngine.close`).

    The coordinator cache is cleared whole (it is shared by every engine); the policy's entries are
    simply recomputed on its next step.
    """
    try:
        from deepspeed.runtime.zero import parameter_offload
        from deepspeed.runtime.zero.partitioned_param_coordinator import PartitionedParameterCoordinator
    except ImportError:  # pragma: no cover - DeepSpeed moved them: nothing we can release
        return
    stack = parameter_offload.FWD_MODULE_STACK
    stack[:] = [m for m in stack if m is not module]
    fn = getattr(PartitionedParameterCoordinator, "_PartitionedParameterCoordinator__params_to_release", None)
    for _ in range(4):  # the lru_cache sits under DeepSpeed's instrument_w_nvtx wrapper
        if fn is None or hasattr(fn, "cache_clear"):
            break
        inner = getattr(fn, "__wrapped__", None)
        if inner is None:
            cells = [c.cell_contents for c in (getattr(fn, "__closure__", None) or ()) if callable(c.cell_contents)]
            inner = cells[0] if cells else None
        fn = inner
    if hasattr(fn, "cache_clear"):
        fn.cache_clear()


def checkpoint_state_dict(checkpoint_dir: str, tag: str) -> dict:
    """The whole module's fp32 state dict from a DeepSpeed checkpoint saved by any number of ranks.

    ZeRO-1/2/3 shards are consolidated by DeepSpeed's ``zero_to_fp32`` (frozen parameters included), on
    the CPU, without a process group; a ZeRO-0 checkpoint holds the module whole. Keys are those of
    the module the engine wrapped (the scorer's ``model.`` prefix included).
    """
    import contextlib
    import glob
    import io

    folder = os.path.join(checkpoint_dir, tag)
    whole = os.path.join(folder, "mp_rank_00_model_states.pt")
    if not glob.glob(os.path.join(folder, "*optim_states.pt")) and os.path.isfile(whole):  # ZeRO-0
        module = torch.load(whole, map_location="cpu", weights_only=False)["module"]
        return {k: v.float() if v.is_floating_point() else v for k, v in module.items()}
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    with contextlib.redirect_stdout(io.StringIO()):  # it prints its progress
        return get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=tag)


def load_full_state_dict(module: nn.Module, state: dict) -> None:
    """Copy a whole state dict into ``module``, whose parameters may be ZeRO-3 partitioned.

    One parameter at a time (gathered, written on rank 0, re-partitioned on exit); values are cast to
    each parameter's dtype. Every tensor of ``module.state_dict()`` must be in ``state``.
    """
    import deepspeed

    missing = [n for n in module.state_dict() if n not in state]  # parameters and persistent buffers
    if missing:
        raise KeyError(f"{len(missing)} of the model's tensors are not in the checkpoint (first: {missing[0]})")
    rank = torch.distributed.get_rank()
    for name, param in module.named_parameters():
        partitioned = hasattr(param, "ds_id")
        with deepspeed.zero.GatheredParameters([param], modifier_rank=0 if partitioned else None):
            if not partitioned or rank == 0:  # a partitioned one is broadcast from rank 0 on exit
                with torch.no_grad():
                    param.data.copy_(state[name].to(param.dtype))
    for name, buffer in module.named_buffers():
        if name in state:  # non-persistent buffers (rotary tables) are rebuilt by the model, never saved
            with torch.no_grad():
                buffer.copy_(state[name].to(buffer.dtype))


def copy_parameters(src: nn.Module, dst: nn.Module) -> None:
    """Copy ``src``'s parameters into ``dst`` (same architecture), either of them ZeRO-3 partitioned.

    One parameter at a time, so at most one whole tensor exists at once. Used to give a reference
    the policy's exact initial weights when they come from ``random_init`` (a ZeRO-3 and a plain
    construction draw their random numbers differently).
    """
    import deepspeed

    rank = torch.distributed.get_rank()
    for (name, p_src), (_, p_dst) in zip(src.named_parameters(), dst.named_parameters(), strict=True):
        partitioned = hasattr(p_dst, "ds_id")
        with deepspeed.zero.GatheredParameters([p_src], modifier_rank=None), \
                deepspeed.zero.GatheredParameters([p_dst], modifier_rank=0 if partitioned else None):
            if not partitioned or rank == 0:  # a partitioned one is broadcast from rank 0 on exit
                with torch.no_grad():
                    p_dst.data.copy_(p_src.data.to(p_dst.dtype))


# --------------------------------------------------------------------------- generation
@contextmanager
def generation_model(engine, *, gather: bool):
    """The Hugging Face model inside ``engine`` (an :class:`Engine` or :class:`InferenceEngine`), ready
    to ``generate``: eval mode, no grad, gradient checkpointing off and the KV cache on. Yields
    ``(model, synced_gpus)``; everything is restored on exit.

    Under ZeRO-3 with ``gather`` the whole model is gathered once and DeepSpeed's per-module hooks are
    lifted for the call (each decoding step would otherwise gather and release every layer again), so
    ranks generate independently. Without ``gather`` the hooks gather layer by layer as in training
    (for models too large to hold whole on one device); every forward is then a collective, so ranks
    must step together: ``synced_gpus`` is true when there is more than one rank.
    """
    ds = engine.ds
    model = ds.module.model
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    was_training = ds.training
    checkpointing = is_checkpointing(base)
    use_cache = getattr(base.config, "use_cache", None)
    zero3 = int(getattr(engine, "zero_stage", 0)) == 3
    ds.eval()
    if checkpointing:
        set_checkpointing(base, False)
    base.config.use_cache = True
    try:
        with torch.no_grad():
            if zero3 and gather:
                with _whole_model(ds):
                    yield model, False
            else:
                yield model, zero3 and torch.distributed.get_world_size() > 1
    finally:
        base.config.use_cache = use_cache
        if checkpointing:
            set_checkpointing(base, True)
        ds.train(was_training)


@contextmanager
def _whole_model(ds):
    """ZeRO-3: every parameter gathered, and the engine's module hooks off, for the block."""
    import deepspeed

    offload = getattr(ds.optimizer, "parameter_offload", ds.optimizer)  # stage-3 optimizer, or the
    with deepspeed.zero.GatheredParameters(list(ds.module.parameters())):  # offload object of an inference engine
        for hook in offload.forward_hooks + offload.backward_hooks:
            hook.remove()
        offload.forward_hooks, offload.backward_hooks = [], []
        try:
            yield
        finally:
            offload._register_deepspeed_module(offload.module)


@contextmanager
def eval_mode(engine: Engine):
    """``engine`` in eval mode without grad, back in train mode afterwards."""
    engine.train(False)
    try:
        with torch.no_grad():
            yield
    finally:
        engine.train(True)


def barrier() -> None:
    if torch.distributed.is_initialized():
        torch.distributed.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (on the backend's device), returned on the caller's device."""
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return t
    dev = device()
    out = t.to(dev)
    torch.distributed.all_reduce(out)
    return out.to(t.device)


def all_reduce_max(t: torch.Tensor) -> torch.Tensor:
    if not torch.distributed.is_initialized() or torch.distributed.get_world_size() == 1:
        return t
    out = t.to(device())
    torch.distributed.all_reduce(out, op=torch.distributed.ReduceOp.MAX)
    return out.to(t.device)


__all__ = [
    "Engine", "InferenceEngine", "checkpoint_state_dict", "load_full_state_dict", "copy_parameters", "init_distributed", "load_model", "apply_peft", "prepare_model", "zero3_construction",
    "eval_mode", "generation_model", "barrier", "mark_moe_leaf_modules", "moe_leaf_classes", "all_reduce_sum", "all_reduce_max", "device",
]
