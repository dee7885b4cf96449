"""The DeepSpeed JSON as the single source of truth: fill its "auto" values, refuse contradictions.

DeepSpeed itself does not understand ``"auto"``: the HF Trainer fills it, and without the Trainer
DeepSpeed silently ignores it or fails deep inside ``deepspeed.initialize``. dspref fills every
``"auto"`` from the run config, and for each pair of settings that exists in both places
(JSON key <-> dspref option) applies one rule:

* JSON ``"auto"`` (or the key absent)  -> the JSON takes the dspref value;
* JSON concrete, dspref option set by the user (recipe/CLI) and different -> :class:`DSConfigError`;
* JSON concrete, dspref option left at its default -> the JSON wins and ``cfg`` is updated.

Two concrete JSON values that pin the same option to different values are an error too.
Any ``"auto"`` that dspref cannot fill is an error naming its dotted key path.

Pure Python on purpose (no deepspeed import): it is unit-tested without a GPU and runs before
the heavy imports. Scheduler parameter names follow deepspeed/runtime/lr_schedules.py (0.19.8).
"""

from __future__ import annotations

import copy
import json
import math
import os
from typing import Any, Iterator, Optional

__all__ = ["DSConfigError", "load_ds_config", "resolve_ds_config", "zero_stage", "num_warmup_steps"]

# DeepSpeed prints its own step log every steps_per_print steps; dspref logs itself.
QUIET_STEPS_PER_PRINT = 2**31 - 1

# dspref lr_scheduler_type -> DeepSpeed scheduler, and the lr_scheduler_types each scheduler can serve.
SCHEDULER_FOR_TYPE = {"linear": "WarmupDecayLR", "cosine": "WarmupCosineLR", "constant": "WarmupLR",
                      "constant_with_warmup": "WarmupLR"}
TYPES_FOR_SCHEDULER = {"WarmupDecayLR": ("linear",), "WarmupCosineLR": ("cosine",),
                       "WarmupLR": ("constant_with_warmup", "constant")}
# Constructor parameters (besides the optimizer) of each scheduler: DeepSpeed passes scheduler.params
# as keyword arguments, so anything else is a TypeError inside deepspeed.initialize.
SCHEDULER_PARAMS = {
    "WarmupLR": {"warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type", "last_batch_iteration"},
    "WarmupDecayLR": {"total_num_steps", "warmup_min_lr", "warmup_max_lr", "warmup_num_steps", "warmup_type",
                      "last_batch_iteration"},
    "WarmupCosineLR": {"total_num_steps", "warmup_min_ratio", "warmup_num_steps", "cos_min_ratio", "warmup_type",
                       "last_batch_iteration"},
}
ADAM_TYPES = ("adam", "adamw")
# ZeRO sizes the HF integration derives from the model's hidden size, and how.
HIDDEN_SIZE_KEYS = {
    "reduce_bucket_size": lambda h: h * h,
    "stage3_prefetch_bucket_size": lambda h: int(0.9 * h * h),
    "stage3_param_persistence_threshold": lambda h: 10 * h,
}

# Scheduler params that need the run's step count (left alone while it is not known yet).
STEP_COUNT_PATHS = ("scheduler.params.warmup_num_steps", "scheduler.params.total_num_steps")

_MISSING = object()


class DSConfigError(ValueError):
    """The DeepSpeed JSON is missing, malformed, contradicts the run config, or keeps an "auto"."""


def load_ds_config(path: Optional[str]) -> dict:
    """Read a DeepSpeed JSON file into a dict (errors name the file and, for bad JSON, the line/column)."""
    if not path:
        raise DSConfigError("no DeepSpeed config given; pass --ds_config ds_configs/zero3.json")
    if not os.path.isfile(path):
        raise DSConfigError(f"DeepSpeed config not found: {path}; pass --ds_config ds_configs/zero3.json")
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DSConfigError(f"invalid JSON in {path} at line {exc.lineno}, column {exc.colno}: {exc.msg}") from None
    if not isinstance(data, dict):
        raise DSConfigError(f"{path} must hold a JSON object at the top level, got {type(data).__name__}")
    return data


def zero_stage(ds: dict) -> int:
    """The ZeRO stage of a (resolved) DeepSpeed config; 0 when there is no zero_optimization block."""
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    if isinstance(stage, bool) or not isinstance(stage, int) or stage not in (0, 1, 2, 3):
        raise DSConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {json.dumps(stage)}")
    return stage


def num_warmup_steps(cfg: Any, num_training_steps: int) -> int:
    """``warmup_steps`` if > 0, else ``ceil(warmup_ratio * num_training_steps)`` (as in transformers)."""
    return _warmup(cfg.warmup_steps, cfg.warmup_ratio, num_training_steps)


def _warmup(warmup_steps: int, warmup_ratio: float, num_training_steps: int) -> int:
    return warmup_steps if warmup_steps > 0 else math.ceil(warmup_ratio * num_training_steps)


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value.strip().lower() == "auto"


def _fmt(value: Any) -> str:
    """Values in messages as JSON spells them (true, [0.9, 0.999], 1e-06)."""
    return json.dumps(value)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9, abs_tol=0.0)
    return a == b


# How a concrete JSON value for each kind of option is checked before it may update cfg.
_KINDS = {
    "posint": ("a positive integer", lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "nonneg": ("a number >= 0", lambda v: _is_number(v) and v >= 0),
    "prob": ("a number in [0, 1)", lambda v: _is_number(v) and 0 <= v < 1),
    "positive": ("a number > 0", lambda v: _is_number(v) and v > 0),
    "number": ("a number", lambda v: _is_number(v)),
    "bool": ("true, false or \"auto\"", lambda v: isinstance(v, bool)),
}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _Resolver:
    """Fills one copy of a DeepSpeed config; cfg changes are collected and applied only on success."""

    def __init__(self, ds: dict, cfg: Any, explicit: set[str], source: str) -> None:
        self.ds, self.cfg, self.explicit, self.source = ds, cfg, explicit, source
        self.updates: dict[str, Any] = {}
        self.pinned: dict[str, str] = {}  # option -> JSON path whose concrete value fixed it

    def value(self, name: str) -> Any:
        return self.updates.get(name, getattr(self.cfg, name))

    def is_explicit(self, name: str) -> bool:
        # An explicit None (e.g. `bf16: null`) means "take it from the JSON", so it cannot contradict.
        return name in self.explicit and getattr(self.cfg, name) is not None

    def check_kind(self, raw: Any, kind: str, path: str) -> Any:
        words, ok = _KINDS[kind]
        if not ok(raw):
            raise DSConfigError(f"{path} in {self.source} must be {words}, got {_fmt(raw)}")
        return raw

    def reconcile(self, node: dict, key: str, path: str, name: str, kind: str, fill_absent: bool = True) -> None:
        """Make ``node[key]`` (at dotted ``path``) and option ``name`` agree."""
        raw = node.get(key, _MISSING)
        if raw is _MISSING and not fill_absent:
            return
        if raw is _MISSING or _is_auto(raw):
            node[key] = self.value(name)
            return
        self.accept(name, self.check_kind(raw, kind, path), path)

    def accept(self, name: str, json_value: Any, path: str) -> None:
        """A concrete JSON value for option ``name``: agree, win, or contradict."""
        current = self.value(name)
        if current is not None and _same(current, json_value):
            self.pinned.setdefault(name, path)
            return
        if self.is_explicit(name):
            raise DSConfigError(
                f"{name}={_fmt(current)} (recipe/CLI) contradicts {path}={_fmt(json_value)} in {self.source}; "
                "change one of them or set the JSON value to \"auto\"")
        if name in self.pinned:
            raise DSConfigError(
                f"{path}={_fmt(json_value)} contradicts {self.pinned[name]}={_fmt(current)} in {self.source} "
                f"(both set {name}); make them equal or set one of them to \"auto\"")
        self.updates[name] = json_value
        self.pinned[name] = path

    def block(self, key: str) -> Optional[dict]:
        node = self.ds.get(key)
        if node is not None and not isinstance(node, dict):
            raise DSConfigError(f"{key} in {self.source} must be a JSON object, got {_fmt(node)}")
        return node


def resolve_ds_config(ds: dict, cfg: Any, explicit: set[str], *, world_size: int,
                      num_training_steps: Optional[int], on_cpu: bool, hidden_size: Optional[int] = None) -> dict:
    """A new DeepSpeed config with every "auto" filled and checked against ``cfg``.

    ``explicit`` holds the option names the user set (recipe or CLI); concrete JSON values win over
    the other options, which are then updated on ``cfg`` (only if the whole resolution succeeds).
    ``hidden_size`` (the model's) fills the ZeRO bucket sizes left "auto", as the HF integration does.
    ``num_training_steps=None`` means "not known yet" (a first pass that only settles batch sizes, which
    the step count depends on): the scheduler's warmup_num_steps and total_num_steps are then left as
    they are. The input dict is never modified.
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise DSConfigError(f"world_size must be a positive integer, got {world_size!r}")
    if num_training_steps is not None and (isinstance(num_training_steps, bool)
                                           or not isinstance(num_training_steps, int) or num_training_steps < 1):
        raise DSConfigError(f"num_training_steps must be a positive integer or None, got {num_training_steps!r}")
    source = getattr(cfg, "ds_config", None) or "the DeepSpeed config"
    r = _Resolver(copy.deepcopy(ds), cfg, set(explicit), source)
    _resolve_batch(r, world_size)
    r.reconcile(r.ds, "gradient_clipping", "gradient_clipping", "max_grad_norm", "nonneg")
    _resolve_precision(r)
    _resolve_optimizer(r, on_cpu)
    _resolve_scheduler(r, num_training_steps)
    _resolve_zero(r, hidden_size)
    _resolve_logging(r)
    pending = () if num_training_steps is not None else STEP_COUNT_PATHS
    _refuse_leftover_auto(r.ds, source, pending)
    for name, value in r.updates.items():
        setattr(cfg, name, value)
    return r.ds


def _resolve_batch(r: _Resolver, world_size: int) -> None:
    ds = r.ds
    r.reconcile(ds, "train_micro_batch_size_per_gpu", "train_micro_batch_size_per_gpu",
                "per_device_train_batch_size", "posint")
    total = ds.get("train_batch_size", _MISSING)
    if total is not _MISSING and not _is_auto(total):
        r.check_kind(total, "posint", "train_batch_size")
        # DeepSpeed's own rule: with a fixed global batch and no accumulation given anywhere, derive it.
        per_step = r.value("per_device_train_batch_size") * world_size
        if ("gradient_accumulation_steps" not in ds and not r.is_explicit("gradient_accumulation_steps")
                and total % per_step == 0):
            r.accept("gradient_accumulation_steps", total // per_step, "train_batch_size")
    r.reconcile(ds, "gradient_accumulation_steps", "gradient_accumulation_steps",
                "gradient_accumulation_steps", "posint")
    micro, accum = r.value("per_device_train_batch_size"), r.value("gradient_accumulation_steps")
    product = micro * accum * world_size
    if total is _MISSING or _is_auto(total):
        ds["train_batch_size"] = product
    elif total != product:
        raise DSConfigError(
            f"train_batch_size={total} in {r.source} does not equal train_micro_batch_size_per_gpu x "
            f"gradient_accumulation_steps x world_size = {micro} x {accum} x {world_size} = {product}; "
            "set it to \"auto\" or change the factors")


def _resolve_precision(r: _Resolver) -> None:
    """bf16.enabled <-> bf16 and fp16.enabled <-> fp16; "auto" follows the option (None -> off)."""
    for name, keys in (("bf16", ("bf16", "bfloat16")), ("fp16", ("fp16",))):
        key = next((k for k in keys if k in r.ds), None)
        node = r.block(key) if key else None
        if node is None:
            # No block: DeepSpeed keeps this precision off unless the user asked for it.
            if r.value(name):
                r.ds[name] = {"enabled": True}
            else:
                r.updates[name] = False
            continue
        raw = node.get("enabled", _MISSING)
        if raw is _MISSING or _is_auto(raw):
            node["enabled"] = bool(r.value(name))
            r.updates[name] = node["enabled"]
        else:
            r.accept(name, r.check_kind(raw, "bool", f"{key}.enabled"), f"{key}.enabled")
    if r.value("bf16") and r.value("fp16"):
        raise DSConfigError(f"bf16 and fp16 would both be enabled (from the options and {r.source}); "
                            "enable at most one")


def _resolve_optimizer(r: _Resolver, on_cpu: bool) -> None:
    """optimizer.params <-> learning_rate, adam betas/epsilon, weight_decay. No block: dspref builds AdamW."""
    opt = r.block("optimizer")
    if opt is None:
        return
    if opt.get("type", _MISSING) is _MISSING or _is_auto(opt.get("type")):
        opt["type"] = "AdamW"
    if not isinstance(opt["type"], str):
        raise DSConfigError(f"optimizer.type in {r.source} must be a string, got {_fmt(opt['type'])}")
    params = opt.setdefault("params", {})
    if not isinstance(params, dict):
        raise DSConfigError(f"optimizer.params in {r.source} must be a JSON object, got {_fmt(params)}")
    is_adam = opt["type"].lower() in ADAM_TYPES
    r.reconcile(params, "lr", "optimizer.params.lr", "learning_rate", "nonneg")
    # Absent Adam params would take the optimizer's own defaults (torch AdamW: weight_decay 0.01).
    r.reconcile(params, "eps", "optimizer.params.eps", "adam_epsilon", "positive", fill_absent=is_adam)
    r.reconcile(params, "weight_decay", "optimizer.params.weight_decay", "weight_decay", "nonneg",
                fill_absent=is_adam)
    _resolve_betas(r, params, fill_absent=is_adam)
    if on_cpu and is_adam and "torch_adam" not in params and not _optimizer_offloaded(r.ds):
        # FusedAdam needs CUDA kernels; torch's AdamW runs anywhere. Offloaded optimizers must stay
        # DeepSpeedCPUAdam, which is what DeepSpeed picks there without torch_adam.
        params["torch_adam"] = True
        r.ds["zero_allow_untested_optimizer"] = True


def _resolve_betas(r: _Resolver, params: dict, fill_absent: bool) -> None:
    raw = params.get("betas", _MISSING)
    if raw is _MISSING and not fill_absent:
        return
    if raw is _MISSING or _is_auto(raw):
        params["betas"] = [r.value("adam_beta1"), r.value("adam_beta2")]
        return
    if not (isinstance(raw, list) and len(raw) == 2 and all(_is_number(b) and 0 <= b < 1 for b in raw)):
        raise DSConfigError(f"optimizer.params.betas in {r.source} must be two numbers in [0, 1), got {_fmt(raw)}")
    r.accept("adam_beta1", raw[0], "optimizer.params.betas[0]")
    r.accept("adam_beta2", raw[1], "optimizer.params.betas[1]")


def _optimizer_offloaded(ds: dict) -> bool:
    offload = ((ds.get("zero_optimization") or {}).get("offload_optimizer") or {})
    return isinstance(offload, dict) and str(offload.get("device", "none")).lower() in ("cpu", "nvme")


def _resolve_scheduler(r: _Resolver, num_training_steps: Optional[int]) -> None:
    """scheduler.type <-> lr_scheduler_type, then its params. No block: dspref builds the schedule."""
    sched = r.block("scheduler")
    if sched is None:
        return
    kind = sched.get("type", _MISSING)
    if kind is _MISSING or _is_auto(kind):
        kind = sched["type"] = SCHEDULER_FOR_TYPE[r.value("lr_scheduler_type")]
    elif kind in TYPES_FOR_SCHEDULER:
        if r.value("lr_scheduler_type") not in TYPES_FOR_SCHEDULER[kind]:
            if r.is_explicit("lr_scheduler_type"):
                raise DSConfigError(
                    f"lr_scheduler_type={_fmt(r.value('lr_scheduler_type'))} (recipe/CLI) contradicts "
                    f"scheduler.type={_fmt(kind)} in {r.source} (a {TYPES_FOR_SCHEDULER[kind][0]} schedule); "
                    "change one of them or set the JSON value to \"auto\"")
            r.updates["lr_scheduler_type"] = TYPES_FOR_SCHEDULER[kind][0]
    else:
        if r.is_explicit("lr_scheduler_type"):
            raise DSConfigError(
                f"lr_scheduler_type={_fmt(r.value('lr_scheduler_type'))} (recipe/CLI) cannot be expressed by "
                f"scheduler.type={_fmt(kind)} in {r.source}; drop one of them or set scheduler.type to \"auto\"")
        return  # another DeepSpeed/torch scheduler: used as written (any "auto" in it is refused later)
    params = sched.setdefault("params", {})
    if not isinstance(params, dict):
        raise DSConfigError(f"scheduler.params in {r.source} must be a JSON object, got {_fmt(params)}")
    unknown = sorted(set(params) - SCHEDULER_PARAMS[kind])
    if unknown:
        raise DSConfigError(f"scheduler.params.{unknown[0]} in {r.source} is not a parameter of {kind} "
                            f"(it takes {', '.join(sorted(SCHEDULER_PARAMS[kind]))})")
    _fill_scheduler_params(r, kind, params, num_training_steps)


def _fill_scheduler_params(r: _Resolver, kind: str, params: dict, num_training_steps: Optional[int]) -> None:
    def fill(key: str, value: Any, check: Optional[str]) -> None:
        raw = params.get(key, _MISSING)
        if raw is _MISSING or _is_auto(raw):
            params[key] = value
        elif check is not None:
            r.check_kind(raw, check, f"scheduler.params.{key}")

    if num_training_steps is not None:
        _resolve_warmup_steps(r, params, num_training_steps)
        if kind != "WarmupLR":
            _resolve_total_steps(r, params, num_training_steps)
    # DeepSpeed warms up along a log curve unless told otherwise; transformers (and dspref) warm up linearly.
    fill("warmup_type", "linear", None)
    if params["warmup_type"] not in ("linear", "log"):
        raise DSConfigError(f"scheduler.params.warmup_type in {r.source} must be \"linear\" or \"log\", "
                            f"got {_fmt(params['warmup_type'])}")
    # DeepSpeed always warms up (over >= 2 steps). Without a requested warmup, start that ramp at the
    # peak where the schedule allows it (WarmupDecayLR cannot: its decay is scaled by max - min).
    no_warmup = r.value("warmup_steps") == 0 and r.value("warmup_ratio") == 0
    if kind == "WarmupCosineLR":
        # The peak lr of WarmupCosineLR is the optimizer's lr; these are fractions of it.
        fill("warmup_min_ratio", 1.0 if no_warmup else 0.0, "nonneg")
        fill("cos_min_ratio", 0.0001, "nonneg")
    else:
        r.reconcile(params, "warmup_max_lr", "scheduler.params.warmup_max_lr", "learning_rate", "nonneg")
        flat = kind == "WarmupLR" and no_warmup
        fill("warmup_min_lr", r.value("learning_rate") if flat else 0.0, "nonneg")


def _resolve_warmup_steps(r: _Resolver, params: dict, num_training_steps: int) -> None:
    # DeepSpeed rejects warmup_num_steps <= 0 (and warms up over at least 2 steps anyway), so a run
    # without warmup gets the smallest value it accepts.
    wanted = max(1, _warmup(r.value("warmup_steps"), r.value("warmup_ratio"), num_training_steps))
    raw = params.get("warmup_num_steps", _MISSING)
    if raw is _MISSING or _is_auto(raw):
        params["warmup_num_steps"] = wanted
        return
    value = r.check_kind(raw, "posint", "scheduler.params.warmup_num_steps")
    if value == wanted:
        return
    if r.is_explicit("warmup_steps") or r.is_explicit("warmup_ratio"):
        raise DSConfigError(
            f"warmup_steps={r.value('warmup_steps')}, warmup_ratio={r.value('warmup_ratio')} (recipe/CLI) give "
            f"{wanted} warmup steps, which contradicts scheduler.params.warmup_num_steps={value} in {r.source}; "
            "change one of them or set the JSON value to \"auto\"")
    r.updates["warmup_steps"] = value


def _resolve_total_steps(r: _Resolver, params: dict, num_training_steps: int) -> None:
    raw = params.get("total_num_steps", _MISSING)
    if raw is _MISSING or _is_auto(raw):
        params["total_num_steps"] = num_training_steps
        return
    # The run length comes from the data, num_train_epochs and max_steps; a fixed number here would
    # silently stretch or cut the schedule.
    if r.check_kind(raw, "posint", "scheduler.params.total_num_steps") != num_training_steps:
        raise DSConfigError(
            f"scheduler.params.total_num_steps={raw} in {r.source} contradicts the {num_training_steps} optimizer "
            "steps of this run (from max_steps / num_train_epochs); set it to \"auto\"")


def _resolve_zero(r: _Resolver, hidden_size: Optional[int]) -> None:
    zero = r.block("zero_optimization")
    if zero is None or not hidden_size:
        return
    for key, size in HIDDEN_SIZE_KEYS.items():
        if _is_auto(zero.get(key)):
            zero[key] = size(hidden_size)


def _resolve_logging(r: _Resolver) -> None:
    if r.ds.get("steps_per_print", _MISSING) is _MISSING or _is_auto(r.ds["steps_per_print"]):
        r.ds["steps_per_print"] = QUIET_STEPS_PER_PRINT
    if r.ds.get("wall_clock_breakdown", _MISSING) is _MISSING or _is_auto(r.ds["wall_clock_breakdown"]):
        r.ds["wall_clock_breakdown"] = False


def _auto_paths(node: Any, path: str = "") -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _auto_paths(value, f"{path}.{key}" if path else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _auto_paths(value, f"{path}[{i}]")
    elif _is_auto(node):
        yield path


def _refuse_leftover_auto(ds: dict, source: str, pending: tuple[str, ...] = ()) -> None:
    paths = [p for p in _auto_paths(ds) if p not in pending]
    if not paths:
        return
    described = [p + (" (filled from the model's hidden_size, which was not given)"
                      if p.rsplit(".", 1)[-1] in HIDDEN_SIZE_KEYS else "") for p in paths]
    raise DSConfigError(f"\"auto\" that dspref cannot fill in {source} at {'; '.join(described)}; "
                        "set a concrete value")


# --------------------------------------------------------------------------- reference engine
# Keys a ZeRO-3 inference engine keeps from the policy's block; optimizer offload and
# gradient-only settings mean nothing without an optimizer.
_REF_ZERO3_KEYS = ("stage3_prefetch_bucket_size", "stage3_param_persistence_threshold", "stage3_max_live_parameters",
                   "stage3_max_reuse_distance", "reduce_bucket_size", "sub_group_size")


def reference_ds_config(policy_ds: dict, *, ref_ds: Optional[dict] = None, ref_source: str = "ref_ds_config",
                        zero_stage_override: Optional[int] = None, offload: bool = False) -> dict:
    """The DeepSpeed config of the reference's inference engine (no optimizer, no scheduler).

    From ``ref_ds`` (the user's ``ref_ds_config``) when given, else derived from the resolved
    policy config: a ZeRO-3 policy gets a ZeRO-3 reference (sharded), a ZeRO-0/1/2 policy a stage-0
    one (DeepSpeed refuses stages 1 and 2 without an optimizer); ``zero_stage_override`` (0 or 3)
    and ``offload`` (parameters in CPU memory, which implies ZeRO-3) change that. Batch sizes and
    precision always follow the policy, so both engines see the same micro-batches.
    """
    keep = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size", "bf16", "fp16",
            "steps_per_print", "wall_clock_breakdown")
    out = {k: copy.deepcopy(policy_ds[k]) for k in keep if k in policy_ds}
    if ref_ds is not None:
        user = copy.deepcopy(ref_ds)
        user.pop("optimizer", None)
        user.pop("scheduler", None)
        _refuse_leftover_auto(user, ref_source)
        stage = zero_stage(user)
        if stage in (1, 2):
            raise DSConfigError(f"zero_optimization.stage={stage} in {ref_source}: DeepSpeed needs an optimizer for "
                                f"stages 1 and 2; a reference engine has none. Use stage 0 or 3")
        return {**user, **{k: v for k, v in out.items() if k not in user}}
    policy_zero = policy_ds.get("zero_optimization", {})
    stage = zero_stage_override if zero_stage_override is not None else (3 if zero_stage(policy_ds) == 3 else 0)
    if offload:
        stage = 3
    zero: dict = {"stage": stage}
    if stage == 3:
        zero.update({k: policy_zero[k] for k in _REF_ZERO3_KEYS if k in policy_zero})
        if offload:
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    out["zero_optimization"] = zero
    return out
