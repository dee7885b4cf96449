"""dspref.dsconfig: "auto" filling, JSON-vs-recipe reconciliation, contradictions and leftovers."""

import copy
import json
import os

import pytest

from dspref.config import CPOConfig
from dspref.dsconfig import (QUIET_STEPS_PER_PRINT, DSConfigError, load_ds_config, num_warmup_steps,
                             resolve_ds_config, zero_stage)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHIPPED = ["zero2", "zero3", "zero3_offload"]
SRC = "ds_configs/x.json"


def shipped(name):
    return load_ds_config(os.path.join(REPO, "ds_configs", f"{name}.json"))


def make_cfg(**kw):
    kw.setdefault("model_name_or_path", "m")
    kw.setdefault("ds_config", SRC)
    return CPOConfig(**kw)


def resolve(ds, cfg=None, explicit=(), **kw):
    cfg = cfg or make_cfg()
    kw.setdefault("world_size", 1)
    kw.setdefault("num_training_steps", 100)
    kw.setdefault("on_cpu", False)
    return resolve_ds_config(ds, cfg, set(explicit), **kw)


def error_of(ds, cfg=None, explicit=(), **kw):
    with pytest.raises(DSConfigError) as info:
        resolve(ds, cfg, explicit, **kw)
    return str(info.value)


def auto_paths(node, path=""):
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in auto_paths(v, f"{path}.{k}")]
    if isinstance(node, list):
        return [p for i, v in enumerate(node) for p in auto_paths(v, f"{path}[{i}]")]
    return [path] if node == "auto" else []


# --- shipped configs ------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_configs_are_fully_filled_from_the_config(name):
    cfg = make_cfg(per_device_train_batch_size=4, gradient_accumulation_steps=2, learning_rate=2e-5,
                   adam_beta1=0.8, adam_beta2=0.95, adam_epsilon=1e-6, weight_decay=0.01, max_grad_norm=0.5,
                   warmup_ratio=0.1, bf16=True)
    raw = shipped(name)
    assert auto_paths(raw)  # the shipped files do rely on "auto"
    ds = resolve(raw, cfg, world_size=2, num_training_steps=50, hidden_size=64)
    assert auto_paths(ds) == []
    assert ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 4 * 2 * 2
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"] == {"enabled": True} and ds["fp16"] == {"enabled": False}
    assert ds["optimizer"] == {"type": "AdamW", "params": {
        "lr": 2e-5, "betas": [0.8, 0.95], "eps": 1e-6, "weight_decay": 0.01}}
    # No scheduler block: dspref builds HF's exact schedule from lr_scheduler_type (DeepSpeed's
    # WarmupDecayLR spends the first two steps at warmup_min_lr).
    assert "scheduler" not in ds
    assert ds["steps_per_print"] == QUIET_STEPS_PER_PRINT and ds["wall_clock_breakdown"] is False
    json.dumps(ds)  # still plain JSON


def test_shipped_zero_blocks():
    z2, z3, off = (resolve(shipped(n), hidden_size=64)["zero_optimization"] for n in SHIPPED)
    assert z2["stage"] == 2 and z2["overlap_comm"] and z2["contiguous_gradients"]
    assert z3["stage"] == 3 and z3["stage3_gather_16bit_weights_on_model_save"] is True
    assert (z3["reduce_bucket_size"], z3["stage3_prefetch_bucket_size"],
            z3["stage3_param_persistence_threshold"]) == (64 * 64, int(0.9 * 64 * 64), 640)
    assert off["offload_optimizer"] == {"device": "cpu", "pin_memory": True}
    assert off["offload_param"] == {"device": "cpu", "pin_memory": True}
    assert zero_stage(resolve(shipped("zero3"), hidden_size=8)) == 3


def test_shipped_precision_auto_means_fp32_unless_asked():
    cfg = make_cfg()
    ds = resolve(shipped("zero2"), cfg)
    assert ds["bf16"]["enabled"] is False and ds["fp16"]["enabled"] is False
    assert cfg.bf16 is False and cfg.fp16 is False


def test_zero3_buckets_without_hidden_size_are_refused():
    message = error_of(shipped("zero3"), make_cfg(ds_config="ds_configs/zero3.json"))
    assert message == (
        "\"auto\" that dspref cannot fill in ds_configs/zero3.json at "
        "zero_optimization.reduce_bucket_size (filled from the model's hidden_size, which was not given); "
        "zero_optimization.stage3_prefetch_bucket_size (filled from the model's hidden_size, which was not given); "
        "zero_optimization.stage3_param_persistence_threshold (filled from the model's hidden_size, which was not "
        "given); set a concrete value")


# --- the reconciliation rules ----------------------------------------------------------------------

def test_contradiction_with_explicit_option():
    ds = {"train_micro_batch_size_per_gpu": 4}
    assert error_of(ds, make_cfg(per_device_train_batch_size=8), {"per_device_train_batch_size"}) == (
        "per_device_train_batch_size=8 (recipe/CLI) contradicts train_micro_batch_size_per_gpu=4 in "
        "ds_configs/x.json; change one of them or set the JSON value to \"auto\"")


@pytest.mark.parametrize("ds,option,value,message", [
    ({"gradient_accumulation_steps": 4}, "gradient_accumulation_steps", 2,
     "gradient_accumulation_steps=2 (recipe/CLI) contradicts gradient_accumulation_steps=4"),
    ({"gradient_clipping": 0.0}, "max_grad_norm", 1.0,
     "max_grad_norm=1.0 (recipe/CLI) contradicts gradient_clipping=0.0"),
    ({"bf16": {"enabled": False}}, "bf16", True, "bf16=true (recipe/CLI) contradicts bf16.enabled=false"),
    ({"fp16": {"enabled": True}}, "fp16", False, "fp16=false (recipe/CLI) contradicts fp16.enabled=true"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}, "learning_rate", 2e-5,
     "learning_rate=2e-05 (recipe/CLI) contradicts optimizer.params.lr=1e-05"),
    ({"optimizer": {"type": "AdamW", "params": {"eps": 1e-6}}}, "adam_epsilon", 1e-8,
     "adam_epsilon=1e-08 (recipe/CLI) contradicts optimizer.params.eps=1e-06"),
    ({"optimizer": {"type": "AdamW", "params": {"weight_decay": 0.1}}}, "weight_decay", 0.0,
     "weight_decay=0.0 (recipe/CLI) contradicts optimizer.params.weight_decay=0.1"),
    ({"optimizer": {"type": "AdamW", "params": {"betas": [0.9, 0.95]}}}, "adam_beta2", 0.999,
     "adam_beta2=0.999 (recipe/CLI) contradicts optimizer.params.betas[1]=0.95"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 3e-6}}}, "learning_rate", 1e-6,
     "learning_rate=1e-06 (recipe/CLI) contradicts scheduler.params.warmup_max_lr=3e-06"),
])
def test_each_pair_refuses_contradictions(ds, option, value, message):
    cfg = make_cfg(**{option: value})
    assert error_of(ds, cfg, {option}).startswith(message + " in ds_configs/x.json; change one of them")


def test_json_wins_over_defaults_and_updates_cfg():
    ds = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 3, "gradient_clipping": 0.3,
          "bf16": {"enabled": True},
          "optimizer": {"type": "AdamW", "params": {"lr": 4e-5, "betas": [0.85, 0.9], "eps": 1e-7,
                                                    "weight_decay": 0.05}},
          "scheduler": {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 7}}}
    cfg = make_cfg()
    out = resolve(ds, cfg, world_size=4)
    assert (cfg.per_device_train_batch_size, cfg.gradient_accumulation_steps) == (2, 3)
    assert out["train_batch_size"] == 24
    assert (cfg.max_grad_norm, cfg.bf16, cfg.fp16) == (0.3, True, False)
    assert (cfg.learning_rate, cfg.adam_beta1, cfg.adam_beta2, cfg.adam_epsilon, cfg.weight_decay) == (
        4e-5, 0.85, 0.9, 1e-7, 0.05)
    assert (cfg.lr_scheduler_type, cfg.warmup_steps, num_warmup_steps(cfg, 100)) == ("cosine", 7, 7)


def test_explicit_option_equal_to_json_is_fine():
    cfg = make_cfg(per_device_train_batch_size=4)
    out = resolve({"train_micro_batch_size_per_gpu": 4}, cfg, {"per_device_train_batch_size"})
    assert out["train_micro_batch_size_per_gpu"] == 4


def test_two_json_values_for_one_option_must_agree():
    ds = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-5}},
          "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_max_lr": 2e-5}}}
    assert error_of(ds) == (
        "scheduler.params.warmup_max_lr=2e-05 contradicts optimizer.params.lr=1e-05 in ds_configs/x.json "
        "(both set learning_rate); make them equal or set one of them to \"auto\"")


def test_cfg_is_untouched_when_resolution_fails():
    cfg = make_cfg()
    before = copy.deepcopy(cfg)
    error_of({"train_micro_batch_size_per_gpu": 2, "zero_optimization": {"stage": "auto"}}, cfg)
    assert cfg == before


def test_input_dict_is_not_mutated():
    for name in SHIPPED:
        raw = shipped(name)
        snapshot = copy.deepcopy(raw)
        out = resolve(raw, on_cpu=True, hidden_size=32)
        assert raw == snapshot and out is not raw and out["optimizer"] is not raw["optimizer"]


def test_absent_keys_are_filled_like_auto():
    cfg = make_cfg(per_device_train_batch_size=3, gradient_accumulation_steps=2)
    out = resolve({}, cfg, world_size=2)
    assert out == {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2, "train_batch_size": 12,
                   "gradient_clipping": 1.0, "steps_per_print": QUIET_STEPS_PER_PRINT,
                   "wall_clock_breakdown": False}
    assert "optimizer" not in out and "scheduler" not in out  # dspref builds them itself


def test_bf16_requested_without_a_block_adds_one():
    cfg = make_cfg(bf16=True)
    out = resolve({}, cfg, {"bf16"})
    assert out["bf16"] == {"enabled": True} and "fp16" not in out and cfg.fp16 is False


def test_explicit_none_precision_takes_the_json():
    cfg = make_cfg(bf16=None)
    resolve({"bf16": {"enabled": True}}, cfg, {"bf16"})
    assert cfg.bf16 is True


def test_both_precisions_enabled_is_refused():
    assert error_of({"bf16": {"enabled": True}, "fp16": {"enabled": True}}) == (
        "bf16 and fp16 would both be enabled (from the options and ds_configs/x.json); enable at most one")


def test_json_type_errors():
    assert error_of({"train_micro_batch_size_per_gpu": "4"}) == (
        "train_micro_batch_size_per_gpu in ds_configs/x.json must be a positive integer, got \"4\"")
    assert error_of({"bf16": {"enabled": "yes"}}) == (
        "bf16.enabled in ds_configs/x.json must be true, false or \"auto\", got \"yes\"")
    assert error_of({"optimizer": {"type": "AdamW", "params": {"betas": [0.9]}}}) == (
        "optimizer.params.betas in ds_configs/x.json must be two numbers in [0, 1), got [0.9]")
    assert "bf16 in ds_configs/x.json must be a JSON object" in error_of({"bf16": True})


# --- train_batch_size ------------------------------------------------------------------------------

def test_train_batch_size_inconsistent():
    ds = {"train_batch_size": 64, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}
    assert error_of(ds, world_size=2) == (
        "train_batch_size=64 in ds_configs/x.json does not equal train_micro_batch_size_per_gpu x "
        "gradient_accumulation_steps x world_size = 8 x 2 x 2 = 32; set it to \"auto\" or change the factors")


def test_train_batch_size_consistent_or_derived():
    ds = {"train_batch_size": 32, "train_micro_batch_size_per_gpu": 8, "gradient_accumulation_steps": 2}
    assert resolve(ds, world_size=2)["train_batch_size"] == 32
    cfg = make_cfg(per_device_train_batch_size=4)
    out = resolve({"train_batch_size": 32}, cfg, {"per_device_train_batch_size"}, world_size=2)
    assert out["gradient_accumulation_steps"] == 4 and cfg.gradient_accumulation_steps == 4


# --- leftovers and files ------------------------------------------------------------------------------

def test_leftover_auto_names_its_dotted_path():
    ds = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "auto"}}}
    assert error_of(ds) == (
        "\"auto\" that dspref cannot fill in ds_configs/x.json at zero_optimization.offload_optimizer.device; "
        "set a concrete value")
    ds = {"flops_profiler": {"enabled": False, "ranks": [0, "auto"]}, "amp": {"enabled": "AUTO"}}
    assert error_of(ds) == (
        "\"auto\" that dspref cannot fill in ds_configs/x.json at flops_profiler.ranks[1]; amp.enabled; "
        "set a concrete value")


def test_leftover_in_unknown_scheduler_and_source_fallback():
    ds = {"scheduler": {"type": "OneCycle", "params": {"cycle_max_lr": "auto"}}}
    assert error_of(ds, make_cfg(ds_config=None)) == (
        "\"auto\" that dspref cannot fill in the DeepSpeed config at scheduler.params.cycle_max_lr; "
        "set a concrete value")


def test_load_missing_and_invalid_files(tmp_path):
    missing = str(tmp_path / "nope.json")
    with pytest.raises(DSConfigError) as info:
        load_ds_config(missing)
    assert str(info.value) == f"DeepSpeed config not found: {missing}; pass --ds_config ds_configs/zero3.json"
    with pytest.raises(DSConfigError, match=r"^no DeepSpeed config given; pass --ds_config"):
        load_ds_config(None)
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "train_batch_size": 8,\n  "bf16": {"enabled": true,}\n}\n')
    with pytest.raises(DSConfigError) as info:
        load_ds_config(str(bad))
    assert str(info.value).startswith(f"invalid JSON in {bad} at line 3, column ")
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    with pytest.raises(DSConfigError, match="must hold a JSON object at the top level, got list"):
        load_ds_config(str(listed))


# --- scheduler ------------------------------------------------------------------------------------

def test_warmup_type_defaults_to_linear_and_log_is_kept():
    out = resolve({"scheduler": {"type": "WarmupDecayLR", "params": {}}})
    assert out["scheduler"]["params"]["warmup_type"] == "linear"
    out = resolve({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "auto"}}})
    assert out["scheduler"]["params"]["warmup_type"] == "linear"
    out = resolve({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "log"}}})
    assert out["scheduler"]["params"]["warmup_type"] == "log"
    assert error_of({"scheduler": {"type": "WarmupLR", "params": {"warmup_type": "exp"}}}) == (
        "scheduler.params.warmup_type in ds_configs/x.json must be \"linear\" or \"log\", got \"exp\"")


@pytest.mark.parametrize("kind,expected", [
    ("linear", {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 10, "total_num_steps": 100,
                                                    "warmup_type": "linear", "warmup_max_lr": 1e-6,
                                                    "warmup_min_lr": 0.0}}),
    ("cosine", {"type": "WarmupCosineLR", "params": {"warmup_num_steps": 10, "total_num_steps": 100,
                                                     "warmup_type": "linear", "warmup_min_ratio": 0.0,
                                                     "cos_min_ratio": 0.0001}}),
    ("constant_with_warmup", {"type": "WarmupLR", "params": {"warmup_num_steps": 10, "warmup_type": "linear",
                                                             "warmup_max_lr": 1e-6, "warmup_min_lr": 0.0}}),
])
def test_auto_scheduler_type_follows_lr_scheduler_type(kind, expected):
    out = resolve({"scheduler": {"type": "auto"}}, make_cfg(lr_scheduler_type=kind, warmup_steps=10))
    assert out["scheduler"] == expected


def test_no_warmup_gives_the_smallest_warmup_deepspeed_accepts():
    cfg = make_cfg(lr_scheduler_type="constant")
    out = resolve({"scheduler": {"type": "auto"}}, cfg)
    # DeepSpeed rejects warmup_num_steps=0; starting at the peak keeps a constant schedule constant.
    assert out["scheduler"]["params"] == {"warmup_num_steps": 1, "warmup_type": "linear", "warmup_max_lr": 1e-6,
                                          "warmup_min_lr": 1e-6}
    out = resolve({"scheduler": {"type": "WarmupCosineLR"}}, make_cfg(lr_scheduler_type="cosine"))
    assert out["scheduler"]["params"]["warmup_min_ratio"] == 1.0
    out = resolve({"scheduler": {"type": "WarmupDecayLR"}})
    assert out["scheduler"]["params"]["warmup_min_lr"] == 0.0 and out["scheduler"]["params"]["warmup_num_steps"] == 1


def test_scheduler_type_contradiction_and_json_win():
    ds = {"scheduler": {"type": "WarmupDecayLR"}}
    assert error_of(ds, make_cfg(lr_scheduler_type="cosine"), {"lr_scheduler_type"}) == (
        "lr_scheduler_type=\"cosine\" (recipe/CLI) contradicts scheduler.type=\"WarmupDecayLR\" in ds_configs/x.json "
        "(a linear schedule); change one of them or set the JSON value to \"auto\"")
    cfg = make_cfg(lr_scheduler_type="cosine")
    resolve(ds, cfg)
    assert cfg.lr_scheduler_type == "linear"
    cfg = make_cfg(lr_scheduler_type="constant")
    resolve({"scheduler": {"type": "WarmupLR"}}, cfg, {"lr_scheduler_type"})
    assert cfg.lr_scheduler_type == "constant"  # WarmupLR serves both constant schedules
    assert error_of({"scheduler": {"type": "OneCycle", "params": {}}}, make_cfg(lr_scheduler_type="linear"),
                    {"lr_scheduler_type"}).startswith("lr_scheduler_type=\"linear\" (recipe/CLI) cannot be expressed")


def test_scheduler_params_it_does_not_take_are_refused():
    ds = {"scheduler": {"type": "WarmupCosineLR", "params": {"warmup_max_lr": "auto"}}}
    assert error_of(ds) == (
        "scheduler.params.warmup_max_lr in ds_configs/x.json is not a parameter of WarmupCosineLR (it takes "
        "cos_min_ratio, last_batch_iteration, total_num_steps, warmup_min_ratio, warmup_num_steps, warmup_type)")
    assert "total_num_steps in ds_configs/x.json is not a parameter of WarmupLR" in error_of(
        {"scheduler": {"type": "WarmupLR", "params": {"total_num_steps": 5}}})


def test_warmup_steps_reconciliation():
    ds = {"scheduler": {"type": "WarmupDecayLR", "params": {"warmup_num_steps": 20}}}
    assert error_of(ds, make_cfg(warmup_ratio=0.1), {"warmup_ratio"}) == (
        "warmup_steps=0, warmup_ratio=0.1 (recipe/CLI) give 10 warmup steps, which contradicts "
        "scheduler.params.warmup_num_steps=20 in ds_configs/x.json; change one of them or set the JSON value to "
        "\"auto\"")
    cfg = make_cfg()
    resolve(ds, cfg)
    assert cfg.warmup_steps == 20
    out = resolve(ds, make_cfg(warmup_steps=20), {"warmup_steps"})
    assert out["scheduler"]["params"]["warmup_num_steps"] == 20


def test_total_num_steps_must_match_the_run():
    ds = {"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 1000}}}
    assert error_of(ds, num_training_steps=300) == (
        "scheduler.params.total_num_steps=1000 in ds_configs/x.json contradicts the 300 optimizer steps of this "
        "run (from max_steps / num_train_epochs); set it to \"auto\"")
    assert resolve(ds, num_training_steps=1000)["scheduler"]["params"]["total_num_steps"] == 1000


def test_num_warmup_steps():
    assert num_warmup_steps(make_cfg(warmup_steps=7, warmup_ratio=0.5), 100) == 7
    assert num_warmup_steps(make_cfg(warmup_ratio=0.05), 30) == 2  # ceil(1.5)
    assert num_warmup_steps(make_cfg(), 100) == 0


# --- optimizer on CPU -------------------------------------------------------------------------------

def test_torch_adam_on_cpu():
    out = resolve(shipped("zero2"), on_cpu=True)
    assert out["optimizer"]["params"]["torch_adam"] is True
    assert out["zero_allow_untested_optimizer"] is True
    out = resolve({"optimizer": {"type": "Adam", "params": {}}}, on_cpu=True)
    assert out["optimizer"]["params"]["torch_adam"] is True


def test_no_torch_adam_on_gpu_or_when_given_or_not_adam():
    out = resolve(shipped("zero2"), on_cpu=False)
    assert "torch_adam" not in out["optimizer"]["params"] and "zero_allow_untested_optimizer" not in out
    out = resolve({"optimizer": {"type": "AdamW", "params": {"torch_adam": False}}}, on_cpu=True)
    assert out["optimizer"]["params"]["torch_adam"] is False and "zero_allow_untested_optimizer" not in out
    out = resolve({"optimizer": {"type": "Lion", "params": {"lr": "auto"}}}, on_cpu=True)
    assert out["optimizer"]["params"] == {"lr": 1e-6}  # non-Adam: only lr is filled when absent


def test_offloaded_optimizer_keeps_deepspeed_cpu_adam():
    out = resolve(shipped("zero3_offload"), on_cpu=True, hidden_size=16)
    assert "torch_adam" not in out["optimizer"]["params"] and "zero_allow_untested_optimizer" not in out


def test_optimizer_type_auto_and_absent_params():
    out = resolve({"optimizer": {"type": "auto"}}, make_cfg(weight_decay=0.1, learning_rate=3e-6))
    assert out["optimizer"] == {"type": "AdamW", "params": {"lr": 3e-6, "eps": 1e-8, "weight_decay": 0.1,
                                                            "betas": [0.9, 0.999]}}


# --- misc ----------------------------------------------------------------------------------------------

def test_logging_keys():
    out = resolve({"steps_per_print": 5, "wall_clock_breakdown": True})
    assert (out["steps_per_print"], out["wall_clock_breakdown"]) == (5, True)
    out = resolve({"steps_per_print": "auto", "wall_clock_breakdown": "auto"})
    assert (out["steps_per_print"], out["wall_clock_breakdown"]) == (QUIET_STEPS_PER_PRINT, False)


def test_zero_stage():
    assert zero_stage({}) == 0
    assert zero_stage({"zero_optimization": {"stage": 2}}) == 2
    with pytest.raises(DSConfigError, match="zero_optimization.stage must be 0, 1, 2 or 3, got \"auto\""):
        zero_stage({"zero_optimization": {"stage": "auto"}})


def test_bad_arguments():
    with pytest.raises(DSConfigError, match="world_size must be a positive integer"):
        resolve({}, world_size=0)
    with pytest.raises(DSConfigError, match="num_training_steps must be a positive integer or None"):
        resolve({}, num_training_steps=0)


def test_first_pass_without_step_count_settles_batch_only():
    ds = shipped("zero2")
    ds["train_micro_batch_size_per_gpu"] = 2
    ds["scheduler"] = {"type": "WarmupDecayLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                           "warmup_num_steps": 20, "total_num_steps": "auto"}}
    cfg = make_cfg(warmup_ratio=0.1)
    first = resolve(ds, cfg, {"warmup_ratio"}, num_training_steps=None)
    assert cfg.per_device_train_batch_size == 2 and first["train_batch_size"] == 2
    assert first["scheduler"]["params"]["total_num_steps"] == "auto"  # left for the second pass
    second = resolve(ds, cfg, {"warmup_ratio"}, num_training_steps=200)  # 10% of 200 = the JSON's 20
    assert auto_paths(second) == [] and second["scheduler"]["params"]["total_num_steps"] == 200
    # Other leftovers are still refused in the first pass.
    assert "zero_optimization.reduce_bucket_size" in error_of(shipped("zero3"), num_training_steps=None)
