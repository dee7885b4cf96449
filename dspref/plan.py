"""``dspref plan``: will policy + reference + optimizer fit, and with which ZeRO stage, offload and reference?

Reads only the model's config (never its weights), counts the parameters exactly by building the
model on PyTorch's ``meta`` device, and estimates the per-GPU and per-host memory of every
candidate setup: ZeRO stage, optimizer / parameter offload, reference strategy, gradient
checkpointing and chunked log-probs. Candidates are ranked "fits first, then fastest"; the chosen
one can be written as a DeepSpeed JSON that ``dspref train`` accepts.

The memory model (per rank, ``P`` policy parameters, ``T`` trainable ones, ``a`` bytes per element
of the training dtype, ``W`` data-parallel ranks) follows DeepSpeed 0.19's allocations:

- model states as in the ZeRO paper (Rajbhandari et al. 2020, §3: 2 + 2 + 12 bytes per parameter
  in mixed precision, partitioned over ``W`` by stage), plus the buffers DeepSpeed really keeps:
  ZeRO-2's gradient buckets (``reduce_bucket_size`` x 2 with ``overlap_comm``) and the fp32 copy
  of the gradient partition made at the optimizer step; ZeRO-3's fp32 gradient buffer, its
  gathered parameters (up to ``stage3_max_live_parameters``) and its reduce bucket;
- the reference per strategy; activations of the scoring forward; the logits (one chunk of
  ``logits_chunk_size`` positions, or the whole ``[N, T, V]`` as TRL materialises it).

``total = params + grads + optim + ref + max(activations + logits + buffers, step)``: the ZeRO
buffers of forward/backward and the activations are freed before the optimizer step makes its fp32
gradient copy (and, on CPU, torch AdamW its temporaries).
Every constant below names where it comes from. Pure Python until a model config is read.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import re
import sys
from dataclasses import dataclass, field
from typing import Optional

from dspref.dsconfig import HIDDEN_SIZE_KEYS, QUIET_STEPS_PER_PRINT

__all__ = [
    "GiB", "PlanError", "PlanInputs", "LoraSpec", "ModelShape", "Setup", "Estimate", "PRESETS", "REFERENCE_STRATEGIES",
    "parse_memory", "load_model_config", "model_shape", "estimate", "candidates", "plan", "ds_config_for",
    "recipe_options", "format_table", "run_plan", "main",
]

GiB = 2**30

# --------------------------------------------------------------------------- constants
# Bytes per element.
FP32 = 4
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
# Adam's two moments in fp32 (torch.optim.AdamW, DeepSpeed FusedAdam and DeepSpeedCPUAdam alike).
ADAM_STATE_BYTES = 8
# bitsandbytes storage of a quantized nn.Linear weight: int8 is one byte per weight (plus a per-row
# fp32 scale, ignored); NF4 packs two weights per byte plus one fp32 absmax per block of 64
# (transformers' BitsAndBytesConfig default bnb_4bit_quant_storage/blocksize, no double quant).
INT8_BYTES = 1.0
NF4_BYTES = 0.5 + FP32 / 64

# DeepSpeed settings of the shipped JSONs (ds_configs/zero2.json, zero3.json, zero3_offload.json);
# tests/test_plan.py checks that the JSONs this module writes keep the shipped zero blocks.
ZERO2_BLOCK = {"stage": 2, "overlap_comm": True, "contiguous_gradients": True, "allgather_partitions": True,
               "allgather_bucket_size": 200000000, "reduce_scatter": True, "reduce_bucket_size": 200000000}
ZERO3_BLOCK = {"stage": 3, "overlap_comm": True, "contiguous_gradients": True, "reduce_bucket_size": "auto",
               "stage3_prefetch_bucket_size": "auto", "stage3_param_persistence_threshold": "auto",
               "stage3_max_live_parameters": 1000000000, "stage3_max_reuse_distance": 1000000000,
               "sub_group_size": 1000000000, "stage3_gather_16bit_weights_on_model_save": True}
OFFLOAD_CPU = {"device": "cpu", "pin_memory": True}
# Bucket of engine.allreduce_gradients below ZeRO-2 (deepspeed/runtime/engine.py MEMORY_OPT_ALLREDUCE_SIZE).
ALLREDUCE_BUCKET_ELEMENTS = 500_000_000
# fp32 temporaries of one torch AdamW update (see _adamw_temporaries).
TORCH_ADAMW_TEMPORARIES = 2
# "auto" ZeRO-3 buckets are filled from the hidden size h by dspref.dsconfig.HIDDEN_SIZE_KEYS (as the
# HF integration does): reduce_bucket_size = h², stage3_prefetch_bucket_size = 0.9·h².

# Host side. DeepSpeed's own estimators (estimate_zero2/zero3_model_states_mem_needs) multiply the
# CPU memory of offloaded states by additional_buffer_factor=1.5 for pinned-buffer and allocator
# overheads; we apply the same factor to everything pinned in host memory.
HOST_PINNED_FACTOR = 1.5
# Resident memory of one training process before any model is built (CUDA torch, deepspeed,
# transformers and datasets imported, CUDA context host side). An assumption, typical of CUDA
# builds; the CPU check measures its CPU-build counterpart and subtracts it.
HOST_RUNTIME_PER_PROCESS = 3 * GiB

# GPU side, not counted by torch.cuda.max_memory_allocated: the CUDA context and NCCL buffers
# (about 0.5-1 GiB context + NCCL channels on H100-class GPUs), and the caching allocator's
# reserved-but-unallocated memory (fragmentation), taken as a fraction of the allocated peak.
CUDA_CONTEXT_BYTES = 1.5 * GiB
ALLOCATOR_MARGIN = 0.10

# Sequences one example puts through the scoring forward (policy and reference alike): CPO and
# reward score chosen + rejected; KTO (loss_type kto) each completion plus its mismatched KL row;
# BCO the completion only.
SEQS_PER_EXAMPLE = {"cpo": 2, "reward": 2, "kto": 2, "bco": 1}
NEEDS_REFERENCE = {"cpo": False, "reward": False, "kto": True, "bco": True}
METHODS = tuple(sorted(SEQS_PER_EXAMPLE))

# Reference strategies (dspref/reference.py), from cheapest per step to dearest. "replicated" is
# the stage-0 engine dspref uses beside a ZeRO-0/1/2 policy; "sharded" the ZeRO-3 engine.
REFERENCE_STRATEGIES = ("precomputed", "adapter-disabled", "replicated", "sharded", "4bit", "8bit", "offloaded")
# Per-step cost rank (lower is faster), used only for ordering: precomputed costs nothing per
# step (one pass before training); the adapter-disabled policy and a whole copy run a plain
# forward; sharded adds ZeRO-3 all-gathers; bitsandbytes kernels dequantize on the fly (slower than
# bf16 matmuls); offloaded streams every weight over PCIe each step.
REFERENCE_COST = {"precomputed": 0, "adapter-disabled": 1, "replicated": 1, "sharded": 2, "4bit": 3, "8bit": 3,
                  "offloaded": 4}
OFFLOADS = ("none", "optimizer", "optimizer+params")


class PlanError(ValueError):
    """Bad input to the planner (model, method, sizes, strategy); reported as one line, exit status 2."""


# --------------------------------------------------------------------------- memory sizes
_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": GiB, "gb": 10**9, "gib": GiB, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_memory(text: str, what: str = "memory size") -> int:
    """``"80GiB"`` -> bytes. GiB/TiB/MiB are binary, GB/TB/MB decimal, a bare G/T/M binary."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) <= 0:
        raise PlanError(f"cannot parse {what} {text!r}; write a positive number and a unit, e.g. 80GiB, 80GB, "
                        f"1TiB, 512MiB")
    return int(float(match.group(1)) * _UNITS[unit])


def format_gib(n_bytes: float) -> str:
    return f"{n_bytes / GiB:.1f}"


def format_size(n_bytes: float) -> str:
    """``80.0 GiB``, ``2.0 TiB``: a memory size as the user would write it."""
    return f"{n_bytes / 2**40:.1f} TiB" if n_bytes >= 2**40 else f"{n_bytes / GiB:.1f} GiB"


# --------------------------------------------------------------------------- presets
def _llama(h, i, layers, heads, kv, vocab, *, rope_theta=10000.0, max_pos=4096, eps=1e-5):
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": h, "intermediate_size": i,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
            "vocab_size": vocab, "max_position_embeddings": max_pos, "rms_norm_eps": eps, "rope_theta": rope_theta,
            "tie_word_embeddings": False, "hidden_act": "silu"}


def _qwen2(h, i, layers, heads, kv, vocab, *, tied, max_pos=32768):
    return {"model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"], "hidden_size": h, "intermediate_size": i,
            "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv,
            "vocab_size": vocab, "max_position_embeddings": max_pos, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "tie_word_embeddings": tied, "hidden_act": "silu"}


# Published shapes (each model's config.json on the Hugging Face hub), so that plans, tests and
# the README need no download.
PRESETS: dict[str, dict] = {
    "llama-2-7b": _llama(4096, 11008, 32, 32, 32, 32000),
    "llama-2-13b": _llama(5120, 13824, 40, 40, 40, 32000),
    "llama-2-70b": _llama(8192, 28672, 80, 64, 8, 32000),
    "llama-3-8b": _llama(4096, 14336, 32, 32, 8, 128256, rope_theta=500000.0, max_pos=8192),
    "llama-3-70b": _llama(8192, 28672, 80, 64, 8, 128256, rope_theta=500000.0, max_pos=8192),
    "qwen2-0.5b": _qwen2(896, 4864, 24, 14, 2, 151936, tied=True),
    "qwen2.5-3b": _qwen2(2048, 11008, 36, 16, 2, 151936, tied=True),
    "qwen2.5-7b": _qwen2(3584, 18944, 28, 28, 4, 152064, tied=False),
    "mixtral-8x7b": {"model_type": "mixtral", "architectures": ["MixtralForCausalLM"], "hidden_size": 4096,
                     "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
                     "num_key_value_heads": 8, "vocab_size": 32000, "max_position_embeddings": 32768,
                     "num_local_experts": 8, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
                     "rope_theta": 1000000.0, "tie_word_embeddings": False},
}


def load_model_config(name_or_path: str):
    """A transformers config from a preset name, a model folder, a config.json file or a hub name."""
    from transformers import AutoConfig

    if name_or_path in PRESETS:
        values = dict(PRESETS[name_or_path])
        return AutoConfig.for_model(values.pop("model_type"), **values)
    path = os.path.expanduser(name_or_path)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise PlanError(f"--model {name_or_path}: a folder without config.json; give a model folder, a "
                            f"config.json file, a preset ({', '.join(PRESETS)}) or a hub name")
        path = os.path.join(path, "config.json")
    if os.path.isfile(path):
        return _config_from_file(path)
    if os.path.isabs(path) or name_or_path.startswith((".", "~")) or name_or_path.count("/") > 1:
        raise PlanError(f"--model {name_or_path}: no such file or folder")
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PlanError(f"--model {name_or_path}: not a preset ({', '.join(PRESETS)}), a local path or a readable "
                        f"hub config: {reason}") from None


def _config_from_file(path: str):
    from transformers import AutoConfig

    try:
        with open(path, encoding="utf-8") as fh:
            values = json.load(fh)
    except (OSError, json.JSONDecodeError) as e:
        raise PlanError(f"--model {path}: cannot read it as JSON ({e})") from None
    if not isinstance(values, dict) or "model_type" not in values:
        raise PlanError(f"--model {path}: a model config needs a \"model_type\" key")
    values = dict(values)
    try:
        return AutoConfig.for_model(values.pop("model_type"), **values)
    except (KeyError, ValueError) as e:
        raise PlanError(f"--model {path}: {str(e).strip().splitlines()[0]}") from None


# --------------------------------------------------------------------------- the model's shape
@dataclass(frozen=True)
class LoraSpec:
    r: int
    target_modules: tuple[str, ...] = ("all-linear",)


@dataclass(frozen=True)
class ModelShape:
    """Exact parameter counts (from a ``meta``-device build) and the sizes activations depend on."""

    name: str
    architecture: str
    kind: str  # causal-lm | sequence-classification
    params: int  # distinct parameters, tied embeddings once, every MoE expert, LoRA adapters included
    trainable: int  # all of them, or with LoRA the adapters (+ a reward model's score head)
    base_params: int  # without LoRA adapters: what a separate reference model holds
    largest_param: int  # the biggest single tensor (ZeRO-3 gathers at least this much at once)
    largest_layer: int  # parameters of the biggest decoder layer
    linear_params: int  # in nn.Linear modules except the output head: what bitsandbytes quantizes
    head_params: int  # the output head (lm_head, or a reward model's score)
    hidden_size: int
    kv_size: int  # num_key_value_heads x head_dim
    mlp_width: int  # MLP intermediate width one token goes through (top-k experts + shared ones for MoE)
    num_layers: int
    vocab_size: int
    experts_per_token: int  # 0 for a dense model


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _mlp_width(text) -> tuple[int, int]:
    """(intermediate width per token, experts per token or 0) for dense and MoE configs."""
    experts = next((getattr(text, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                    if getattr(text, k, None)), None)
    top_k = getattr(text, "num_experts_per_tok", None)
    if experts and top_k:
        per_expert = getattr(text, "moe_intermediate_size", None) or text.intermediate_size
        shared = getattr(text, "shared_expert_intermediate_size", None) or 0
        return top_k * per_expert + shared, top_k
    return text.intermediate_size, 0


def _build_on_meta(config, kind: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = copy.deepcopy(config)
    if kind == "sequence-classification":
        config.num_labels = 1
    auto = AutoModelForCausalLM if kind == "causal-lm" else AutoModelForSequenceClassification
    try:
        with torch.device("meta"):
            return auto.from_config(config, trust_remote_code=False)
    except (ValueError, KeyError) as e:
        raise PlanError(f"cannot build a {kind} model from this config: {str(e).strip().splitlines()[0]}") from None


def _head_module(model, kind: str):
    from torch import nn

    if kind == "causal-lm":
        return model.get_output_embeddings()
    return next(m for _, m in model.named_children() if isinstance(m, nn.Linear))


def _decoder_layers(model):
    """The decoder's layer list: a ModuleList child of the base model (``model.layers``), so that an
    MoE block's list of experts is never taken for it."""
    from torch import nn

    base = getattr(model, model.base_model_prefix, model)
    lists = [m for _, m in base.named_children() if isinstance(m, nn.ModuleList)]
    lists = lists or [m for m in base.modules() if isinstance(m, nn.ModuleList)]
    return max(lists, key=len) if lists else []


def _lora_targets(model, head, spec: LoraSpec) -> list:
    """The nn.Linear modules a LoraConfig with ``spec.target_modules`` adapts (peft's matching rule:
    "all-linear" is every Linear but the output head; a name matches itself or a ``.name`` suffix)."""
    from torch import nn

    found = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or module is head:
            continue
        if "all-linear" in spec.target_modules or any(name == t or name.endswith("." + t)
                                                      for t in spec.target_modules):
            found.append(module)
    if not found:
        raise PlanError(f"--lora-target-modules {','.join(spec.target_modules)} matches no Linear layer of this "
                        f"model")
    return found


def model_shape(config, *, kind: str = "causal-lm", lora: Optional[LoraSpec] = None, name: str = "") -> ModelShape:
    """Count parameters exactly by building the model on the ``meta`` device (no memory, no weights)."""
    from torch import nn

    model = _build_on_meta(config, kind)
    head = _head_module(model, kind)
    base = sum(p.numel() for p in model.parameters())  # parameters() yields a tied weight once
    linear = sum(p.numel() for m in model.modules() if isinstance(m, nn.Linear) and m is not head
                 for p in m.parameters(recurse=False))
    head_params = sum(p.numel() for p in head.parameters())
    layers = _decoder_layers(model)
    trainable, params = base, base
    if lora is not None:
        adapters = sum(lora.r * (m.in_features + m.out_features) for m in _lora_targets(model, head, lora))
        # A reward model's new score head is trained too (peft's SEQ_CLS modules_to_save: a copy).
        extra_head = head_params if kind == "sequence-classification" else 0
        trainable, params = adapters + extra_head, base + adapters + extra_head
    text = _text_config(config)
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    width, top_k = _mlp_width(text)
    return ModelShape(
        name=name, architecture=type(model).__name__, kind=kind, params=params, trainable=trainable,
        base_params=base, largest_param=max(p.numel() for p in model.parameters()),
        largest_layer=max((sum(p.numel() for p in layer.parameters()) for layer in layers), default=0),
        linear_params=linear, head_params=head_params, hidden_size=text.hidden_size, kv_size=kv_heads * head_dim,
        mlp_width=width, num_layers=text.num_hidden_layers, vocab_size=text.vocab_size, experts_per_token=top_k)


# --------------------------------------------------------------------------- inputs and setups
@dataclass(frozen=True)
class PlanInputs:
    method: str
    gpus_per_node: int = 8
    nodes: int = 1
    gpu_mem: int = 80 * GiB
    host_mem: int = 1024 * GiB
    max_length: int = 1024
    micro_batch: int = 4
    dtype: str = "bf16"
    logits_chunk_size: int = 1024  # dspref's default (TrainConfig.logits_chunk_size)
    on_cpu: bool = False  # no GPU: "device" memory is host memory (dspref's CPU runs, the CPU check)

    @property
    def world_size(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def elem(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def sequences(self) -> int:
        return self.micro_batch * SEQS_PER_EXAMPLE[self.method]


@dataclass(frozen=True)
class Setup:
    zero_stage: int
    offload: str = "none"  # none | optimizer | optimizer+params
    reference: Optional[str] = None  # one of REFERENCE_STRATEGIES; None for methods without one
    gradient_checkpointing: bool = False
    chunked_logits: bool = True  # False: one chunk holding every position, as TRL's full logits

    def speed_key(self) -> tuple:
        """Lexicographic "fastest first": offload (PCIe + CPU Adam) costs most, then gradient
        checkpointing (one more forward, +1/3 compute), the reference's per-step cost, then ZeRO-3's
        parameter all-gathers. Full logits come after every chunked setup: dspref checkpoints each
        chunk either way, so one big chunk is never faster, only larger."""
        return (not self.chunked_logits, OFFLOADS.index(self.offload), self.gradient_checkpointing,
                REFERENCE_COST.get(self.reference, 0), self.zero_stage == 3)


@dataclass
class Estimate:
    """Bytes per GPU (``device``) by part, bytes per host, and whether the setup fits."""

    setup: Setup
    params: float = 0
    grads: float = 0
    optim: float = 0
    step: float = 0  # after backward: the step's fp32 gradient copy, allreduce buckets, CPU AdamW temporaries
    reference: float = 0
    activations: float = 0
    logits: float = 0
    buffers: float = 0  # ZeRO buffers of forward/backward: ZeRO-3's gathered parameters, gradient buckets
    host: float = 0
    host_parts: dict = field(default_factory=dict)
    prepass: float = 0  # precomputed reference: the peak of the pass before training
    fits: bool = False
    why_not: str = ""

    @property
    def training_peak(self) -> float:
        resident = self.params + self.grads + self.optim + self.reference
        return resident + max(self.activations + self.logits + self.buffers, self.step)

    @property
    def device(self) -> float:
        return max(self.training_peak, self.prepass)


# --------------------------------------------------------------------------- the estimate
def _activation_bytes_per_token_layer(shape: ModelShape, a: int) -> float:
    """Tensors one decoder layer saves for backward, per token (HF Llama/Qwen2/Mistral/Mixtral with
    sdpa or flash attention, no dropout; read off their modelling code):

    - two RMSNorms, each an fp32 copy of its input (4·h) and its normalised output (a·h);
    - attention: q and k after RoPE, v and the attention output (a·(2h + 2·kv)) kept by the
      attention kernel, and o_proj's input (a·h); no T² scores with flash / memory-efficient sdpa;
    - SwiGLU MLP: gate, silu(gate), up and their product (4·a·w, w the width one token goes
      through); MoE adds the token's copy sent to each of its experts (a·h·k).
    """
    h, kv, w = shape.hidden_size, shape.kv_size, shape.mlp_width
    return 2 * (FP32 * h + a * h) + a * (3 * h + 2 * kv) + 4 * a * w + a * h * shape.experts_per_token


def _activations(shape: ModelShape, inp: PlanInputs, setup: Setup) -> float:
    """Activation memory of one micro-batch at the start of backward (the peak)."""
    a, h = inp.elem, shape.hidden_size
    tokens = inp.sequences * inp.max_length  # padded to max_length: the worst case
    layer = _activation_bytes_per_token_layer(shape, a)
    if setup.gradient_checkpointing:
        # Each checkpointed layer keeps its input hidden state; backward recomputes one layer at a time.
        stored = shape.num_layers * a * h + layer
    else:
        stored = shape.num_layers * layer
    # Outside the layers: the final norm (4h + a·h), the completion positions' hidden states picked
    # for the head (a·h), and the gradient of the residual stream plus one branch in backward (2·a·h).
    outside = FP32 * h + 4 * a * h
    return tokens * (stored + outside)


def _logits(shape: ModelShape, inp: PlanInputs, setup: Setup, *, grad: bool = True) -> float:
    """The head's output in one chunk (dspref.logps) or all at once (TRL's [N, T, V] fp32 logits).

    Per element, both: the head's output (a) and its fp32 upcast (4; none when a is fp32). TRL's
    autograd log-softmax adds logsumexp's exp temporary (4) and, in backward, the fp32 gradient of
    the logits (4). dspref's ``TokenLogps`` adds neither: its logsumexp runs a block of rows at a time
    and its backward writes the gradient over the logits. ``grad=False``: a forward without gradient.
    """
    if shape.kind != "causal-lm":
        return 0.0  # a reward model's head has one output per position
    a = inp.elem
    positions = inp.sequences * (inp.max_length - 1)  # worst case: every position predicts a completion token
    rows = min(inp.logits_chunk_size, positions) if setup.chunked_logits else positions
    per_element = a + (FP32 if a != FP32 else 0)
    if not setup.chunked_logits:
        per_element += FP32 + (FP32 if grad else 0)
    return rows * shape.vocab_size * per_element


def _ipg_elements(inp: PlanInputs, trainable: int) -> int:
    """Elements of ZeRO-2's gradient buckets during backward (stage_1_and_2.py setup_buckets:
    reduce_bucket_size, two with overlap_comm). A GPU allocates them whole; on CPU only written pages
    are resident: gradients fill the first bucket before the second, and a single process keeps
    each parameter's own .grad and writes none (measured with benchmarks/plan_check.py)."""
    bucket, count = ZERO2_BLOCK["reduce_bucket_size"], 2 if ZERO2_BLOCK["overlap_comm"] else 1
    if not inp.on_cpu:
        return bucket * count
    return 0 if inp.world_size == 1 else min(trainable, bucket * count)


def _adamw_temporaries(inp: PlanInputs, largest_tensor: float) -> float:
    """On CPU dspref runs :class:`dspref.optim.SlicedAdamW` (torch's AdamW update, where dsconfig
    fills "torch_adam": true), whose ``exp_avg_sq.sqrt() / bias_correction2_sqrt`` are two fp32
    temporaries of one slice (at most ``SLICE_ELEMENTS``), not of the whole flat partition. On GPU
    DeepSpeed's FusedAdam updates in place."""
    from dspref.optim import SLICE_ELEMENTS

    return TORCH_ADAMW_TEMPORARIES * FP32 * min(largest_tensor, SLICE_ELEMENTS) if inp.on_cpu else 0.0


def _gathered(inp: PlanInputs, elements: float, from_host: bool) -> float:
    """Elements a ZeRO-3 all-gather allocates: none on a single rank whose partition is the whole
    parameter, used in place (measured: a one-process ZeRO-3 forward adds only its activations),
    unless the partition lives in host memory (offload_param) and must be copied to the GPU."""
    return 0.0 if inp.world_size == 1 and not from_host else elements


def _model_states(e: Estimate, shape: ModelShape, inp: PlanInputs) -> None:
    """params / grads / optim / step / buffers of the policy, per rank, and the host side of offload."""
    s, a, W = e.setup, inp.elem, inp.world_size
    P, T, h = shape.params, shape.trainable, shape.hidden_size
    mixed = a != FP32
    host = {}
    if s.zero_stage == 0:
        # No ZeRO: torch's AdamW on .grad (fp32), or DeepSpeed's fp16/bf16 optimizer wrapper with an
        # fp32 master copy and an fp32 gradient copy at the step (engine._do_optimizer_sanity_check).
        # After backward, engine.allreduce_gradients flattens the grads into buckets of up to
        # MEMORY_OPT_ALLREDUCE_SIZE elements (even on one rank); the step then adds its own copies.
        e.params, e.grads = a * P, a * T
        e.optim = (FP32 * mixed + ADAM_STATE_BYTES) * T
        e.step = max(a * min(T, ALLREDUCE_BUCKET_ELEMENTS),
                     FP32 * T * mixed + _adamw_temporaries(inp, shape.largest_param))
    elif s.zero_stage == 2:
        # stage_1_and_2.py: flat low-precision params (the model's params become views), the fp32
        # master partition is a clone even for fp32 params, grads_in_partition in the model dtype,
        # and step() converts the flat gradient partition to a new fp32 tensor (no copy when fp32).
        e.params = a * P
        e.buffers = a * _ipg_elements(inp, T)
        shard = T / W
        if s.offload == "none":
            e.grads, e.optim = a * shard, (FP32 + ADAM_STATE_BYTES) * shard
            e.step = FP32 * shard * mixed + _adamw_temporaries(inp, shard)
        else:  # master, Adam, fp32 grads and a low-precision staging copy in pinned host memory
            host["optimizer"] = (FP32 + ADAM_STATE_BYTES + FP32 + a) * shard
    else:
        # stage3.py: params partitioned; grads partitioned in the model dtype, plus the fp32 gradient
        # buffer of the largest sub-group made by initialize_optimizer_states (it stays); the fp32
        # partition is the master copy unless params are low precision; the step flattens each
        # sub-group's grads into a new fp32 tensor (_prepare_fp32_grad_for_sub_group).
        shard = T / W
        sub_group = min(shard, ZERO3_BLOCK["sub_group_size"])
        states = ((FP32 if mixed else 0) + ADAM_STATE_BYTES) * shard
        if s.offload == "none":
            e.grads, e.optim = a * shard + FP32 * sub_group, states
            e.step = FP32 * sub_group + _adamw_temporaries(inp, sub_group)
        else:
            host["optimizer"] = states + a * shard + FP32 * shard
        if s.offload == "optimizer+params":
            host["parameters"] = a * P / W
        else:
            e.params = a * P / W
        # Gathered params (up to stage3_max_live_parameters), the largest param's full gradient before
        # its reduce-scatter, and the reduce bucket (h²).
        live = min(P, max(ZERO3_BLOCK["stage3_max_live_parameters"], shape.largest_param))
        bucket = HIDDEN_SIZE_KEYS["reduce_bucket_size"](h)
        e.buffers = a * (_gathered(inp, live, s.offload == "optimizer+params") + shape.largest_param + bucket)
    e.host_parts.update({k: v * inp.gpus_per_node * HOST_PINNED_FACTOR for k, v in host.items()})


def _reference_bytes(shape: ModelShape, inp: PlanInputs, strategy: Optional[str]) -> tuple[float, float]:
    """(bytes per GPU, bytes per host) of the reference during training."""
    a, P = inp.elem, shape.base_params
    # A ZeRO-3 engine gathers one layer (and its prefetch bucket) while it runs.
    prefetch = HIDDEN_SIZE_KEYS["stage3_prefetch_bucket_size"](shape.hidden_size)
    layer = max(shape.largest_layer, shape.largest_param) + prefetch
    if strategy == "replicated":
        return a * P, 0.0
    if strategy == "sharded":
        return a * (P / inp.world_size + _gathered(inp, layer, False)), 0.0
    if strategy == "offloaded":
        return a * _gathered(inp, layer, True), a * P / inp.nodes * HOST_PINNED_FACTOR
    if strategy in ("8bit", "4bit"):
        per_weight = INT8_BYTES if strategy == "8bit" else NF4_BYTES
        return per_weight * shape.linear_params + a * (P - shape.linear_params), 0.0
    return 0.0, 0.0  # adapter-disabled, precomputed, none


def _default_live_reference(setup: Setup) -> str:
    """The reference dspref builds for the precompute pass: the default engine for the policy's stage."""
    return "sharded" if setup.zero_stage == 3 else "replicated"


def _prepass(e: Estimate, shape: ModelShape, inp: PlanInputs) -> float:
    """Peak of the precompute pass: it runs after the policy engine exists (dspref/run.py), so the
    policy's params and optimizer states sit beside a live default reference and a no-grad forward
    (one layer's tensors and one logits chunk). Adam's moments are created at the first step."""
    s = e.setup
    lora = shape.params != shape.base_params  # dspref scores a LoRA policy's reference with its adapter off
    ref_gpu, _ = _reference_bytes(shape, inp, "adapter-disabled" if lora else _default_live_reference(s))
    adam = ADAM_STATE_BYTES * shape.trainable / (inp.world_size if s.zero_stage else 1) if s.offload == "none" else 0
    states = e.params + e.grads + e.optim - adam
    forward = inp.sequences * inp.max_length * _activation_bytes_per_token_layer(shape, inp.elem)
    logits = _logits(shape, inp, s, grad=False)
    return states + e.buffers + ref_gpu + forward + logits


def _host(e: Estimate, shape: ModelShape, inp: PlanInputs) -> float:
    """Host memory per node: the processes' runtime, then the larger of model loading and the
    offloaded states. Below ZeRO-3 every process builds the whole model in host memory before
    DeepSpeed moves it (a·P each); ZeRO-3 builds it partitioned (zero.Init), one tensor at a time."""
    g, a = inp.gpus_per_node, inp.elem
    loading = g * a * (shape.params if e.setup.zero_stage < 3 else shape.largest_param)
    whole = ("replicated", "8bit", "4bit") + (("precomputed",) if e.setup.zero_stage < 3 else ())
    if e.setup.reference in whole and shape.params == shape.base_params:
        loading += g * a * shape.base_params  # the reference is loaded whole on every process too
    e.host_parts["runtime"] = g * HOST_RUNTIME_PER_PROCESS
    e.host_parts["loading"] = loading
    offloaded = sum(v for k, v in e.host_parts.items() if k not in ("runtime", "loading"))
    return e.host_parts["runtime"] + max(loading, offloaded)


def estimate(shape: ModelShape, inp: PlanInputs, setup: Setup) -> Estimate:
    """Memory of one setup: per-GPU parts, host total, fit."""
    e = Estimate(setup=setup)
    _model_states(e, shape, inp)
    e.reference, ref_host = _reference_bytes(shape, inp, setup.reference)
    if ref_host:
        e.host_parts["reference"] = ref_host
    e.activations = _activations(shape, inp, setup)
    e.logits = _logits(shape, inp, setup)
    if setup.reference == "precomputed":
        e.prepass = _prepass(e, shape, inp)
    if inp.on_cpu:
        # One host: the "device" parts are host memory, each process holds its own.
        e.host = inp.gpus_per_node * e.device + HOST_RUNTIME_PER_PROCESS * inp.gpus_per_node
        e.fits = e.host <= inp.host_mem
        e.why_not = "" if e.fits else "host"
        return e
    e.host = _host(e, shape, inp)
    gpu_ok = e.device * (1 + ALLOCATOR_MARGIN) + CUDA_CONTEXT_BYTES <= inp.gpu_mem
    host_ok = e.host <= inp.host_mem
    e.fits = gpu_ok and host_ok
    e.why_not = "+".join(name for name, ok in (("GPU", gpu_ok), ("host", host_ok)) if not ok)
    return e


# --------------------------------------------------------------------------- candidates
def _reference_options(inp: PlanInputs, forced: Optional[str], lora: bool) -> tuple:
    if not NEEDS_REFERENCE[inp.method]:
        if forced:
            raise PlanError(f"method '{inp.method}' uses no reference model; drop --ref-strategy")
        return (None,)
    if forced:
        if forced == "adapter-disabled" and not lora:
            raise PlanError("reference strategy 'adapter-disabled' needs a LoRA policy (--lora R): without an "
                            "adapter there is nothing to switch off")
        return (forced,)
    if lora:  # the base weights are the reference: switching the adapter off costs no memory
        return ("adapter-disabled", "precomputed")
    return tuple(r for r in REFERENCE_STRATEGIES if r != "adapter-disabled")


def candidates(shape: ModelShape, inp: PlanInputs, *, reference: Optional[str] = None,
               zero_stages: tuple[int, ...] = (0, 2, 3), lora: bool = False) -> list[Setup]:
    """Every setup worth comparing (offload needs ZeRO; parameter offload needs ZeRO-3; no offload on CPU)."""
    refs = _reference_options(inp, reference, lora)
    chunking = (True, False) if shape.kind == "causal-lm" else (True,)
    out = []
    for stage in zero_stages:
        offloads = ("none",) if stage == 0 or inp.on_cpu else OFFLOADS[:2] if stage == 2 else OFFLOADS
        for offload in offloads:
            for ref in refs:
                for gc in (False, True):
                    for chunked in chunking:
                        out.append(Setup(stage, offload, ref, gc, chunked))
    return out


def plan(shape: ModelShape, inp: PlanInputs, **kwargs) -> list[Estimate]:
    """All candidates estimated and ranked: fitting ones first, fastest first, then least GPU memory;
    the others after them, nearest to fitting (least GPU memory) first."""
    _check_inputs(inp)
    found = [estimate(shape, inp, s) for s in candidates(shape, inp, **kwargs)]
    return sorted(found, key=lambda e: (not e.fits, e.setup.speed_key() if e.fits else (), e.device, e.host))


def _check_inputs(inp: PlanInputs) -> None:
    if inp.method not in METHODS:
        raise PlanError(f"unknown method {inp.method!r}; choose one of: {', '.join(METHODS)}")
    for name in ("gpus_per_node", "nodes", "micro_batch", "logits_chunk_size"):
        if getattr(inp, name) < 1:
            raise PlanError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(inp, name)}")
    if inp.max_length < 2:
        raise PlanError(f"--max-length must be >= 2, got {inp.max_length}")
    if inp.method == "kto" and inp.micro_batch < 2:
        raise PlanError("method kto (loss_type kto) needs --micro-batch >= 2: its KL term pairs each prompt with "
                        "another row's completion in the same micro-batch")
    if inp.dtype not in DTYPE_BYTES:
        raise PlanError(f"--dtype must be one of {', '.join(DTYPE_BYTES)}, got {inp.dtype!r}")


# --------------------------------------------------------------------------- outputs
def ds_config_for(setup: Setup, inp: PlanInputs) -> dict:
    """The DeepSpeed JSON of a setup: the shipped zero blocks, the planned micro-batch and precision,
    everything else "auto" for dspref to fill from the recipe (dspref.dsconfig.resolve_ds_config)."""
    if setup.zero_stage == 0:
        zero: dict = {"stage": 0}
    else:
        zero = copy.deepcopy(ZERO2_BLOCK if setup.zero_stage == 2 else ZERO3_BLOCK)
        if setup.offload != "none":
            zero["offload_optimizer"] = dict(OFFLOAD_CPU)
        if setup.offload == "optimizer+params":
            zero["offload_param"] = dict(OFFLOAD_CPU)
    return {
        "train_batch_size": "auto", "train_micro_batch_size_per_gpu": inp.micro_batch,
        "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
        "bf16": {"enabled": inp.dtype == "bf16"}, "fp16": {"enabled": inp.dtype == "fp16"},
        "optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                  "weight_decay": "auto"}},
        "zero_optimization": zero, "steps_per_print": QUIET_STEPS_PER_PRINT, "wall_clock_breakdown": False,
    }


def recipe_options(setup: Setup, inp: PlanInputs, lora: Optional[LoraSpec], model: str) -> dict:
    """The dspref options (YAML keys) that go with the setup's DeepSpeed JSON."""
    if model in PRESETS:
        model = f"<folder or hub name of {model}>"  # a preset is a shape, not weights
    opts: dict = {"per_device_train_batch_size": inp.micro_batch, "max_length": inp.max_length,
                  "gradient_checkpointing": setup.gradient_checkpointing,
                  "logits_chunk_size": inp.logits_chunk_size if setup.chunked_logits
                  else inp.sequences * (inp.max_length - 1)}
    if lora is not None:
        opts["peft_config"] = {"r": lora.r, "lora_alpha": 2 * lora.r,
                               "target_modules": "all-linear" if "all-linear" in lora.target_modules
                               else list(lora.target_modules)}
    ref = setup.reference
    if ref == "precomputed":
        opts["precompute_ref_log_probs"] = True
    elif ref == "offloaded":
        opts["ref_offload"] = True
    elif ref in ("8bit", "4bit"):
        opts[f"ref_load_in_{ref}"] = True
        opts["ref_model"] = model  # quantized from weights on disk
    elif ref == "sharded" and setup.zero_stage != 3:
        opts["ref_zero_stage"] = 3
    elif ref == "replicated" and setup.zero_stage == 3:
        opts["ref_zero_stage"] = 0
    if lora is not None and ref in ("replicated", "sharded", "offloaded"):
        opts["ref_model"] = model  # with peft_config and no ref_model dspref uses the adapter-disabled policy
    return opts


_COLUMNS = ("params", "grads", "optim", "step", "ref", "act", "logits", "buf")


def _setup_cells(s: Setup, shape: ModelShape, inp: PlanInputs) -> list[str]:
    logits = "-" if shape.kind != "causal-lm" else (f"chunk{inp.logits_chunk_size}" if s.chunked_logits else "full")
    return [str(s.zero_stage), s.offload, s.reference or "-", "on" if s.gradient_checkpointing else "off", logits]


def format_table(ranked: list[Estimate], shape: ModelShape, inp: PlanInputs, top: int = 12) -> str:
    """The ranked candidates as a fixed-width table (GiB), the best marked with ``*``."""
    shown = ranked if top <= 0 else ranked[:top]
    head = ["#", "zero", "offload", "reference", "gc", "logits", *_COLUMNS, "GPU", "host/node", "fits"]
    rows = []
    for i, e in enumerate(shown, 1):
        parts = [e.params, e.grads, e.optim, e.step, e.reference, e.activations, e.logits, e.buffers]
        gpu = format_gib(e.device) + ("^" if e.prepass > e.training_peak else "")
        fits = "yes" if e.fits else f"no ({e.why_not})"
        mark = "*" if i == 1 and e.fits else " "
        rows.append([f"{mark}{i}", *_setup_cells(e.setup, shape, inp), *map(format_gib, parts), gpu,
                     format_gib(e.host), fits])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *rows)]
    numeric = range(6, len(head) - 1)
    lines = ["  ".join(str(c).rjust(w) if j in numeric else str(c).ljust(w) for j, (c, w) in enumerate(zip(r, widths)))
             for r in [head, *rows]]
    if top > 0 and len(ranked) > top:
        lines.append(f"... {len(ranked) - top} more candidates (--top 0 lists all)")
    return "\n".join(line.rstrip() for line in lines)


def _header(shape: ModelShape, inp: PlanInputs, lora: Optional[LoraSpec]) -> list[str]:
    billions = lambda n: f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.1f} M"  # noqa: E731
    trainable = f"{billions(shape.trainable)} trainable" + (f" (LoRA r={lora.r})" if lora else "")
    ref = "needs a reference" if NEEDS_REFERENCE[inp.method] else "no reference"
    where = (f"CPU: {inp.gpus_per_node} process(es) on one host, device memory is host memory" if inp.on_cpu else
             f"{inp.nodes} node(s) x {inp.gpus_per_node} GPUs of {format_size(inp.gpu_mem)}, "
             f"{format_size(inp.host_mem)} host memory per node")
    budget = (f"host <= {format_size(inp.host_mem)}" if inp.on_cpu else
              f"GPU x {1 + ALLOCATOR_MARGIN:.2f} + {format_size(CUDA_CONTEXT_BYTES)} CUDA context <= "
              f"{format_size(inp.gpu_mem)}, and host/node <= {format_size(inp.host_mem)}")
    return [
        f"dspref plan: {shape.name} ({shape.architecture}, {billions(shape.params)} parameters, {trainable}); "
        f"method {inp.method} ({ref}); {where}",
        f"micro-batch {inp.micro_batch} x {SEQS_PER_EXAMPLE[inp.method]} sequences x {inp.max_length} tokens per "
        f"GPU, {inp.dtype}, AdamW; activations of padded rows (padding_free packs the same tokens "
        f"without the padding: never more)",
        "GiB per GPU; GPU = params + grads + optim + ref + max(act + logits + buf, step)"
        " (^: the precompute pass before training is the peak); logits 'full' = one chunk of every position, "
        "as TRL's [N, T, V] logits",
        f"fits when {budget}",
        "",
    ]


# --------------------------------------------------------------------------- command line
USAGE = "dspref plan --model NAME_OR_PATH --method {bco,cpo,kto,reward} [options]"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit status 2 (argparse would print the usage too)
        raise PlanError(message)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="dspref plan", usage=USAGE, description="Estimate whether a preference-alignment run fits, "
                "and with which ZeRO stage, offload and reference strategy. Reads only the model config.")
    p.add_argument("--model", required=True, help=f"a preset ({', '.join(PRESETS)}), a model folder, a "
                   "config.json file, or a hub name (only its config is read)")
    p.add_argument("--method", required=True, help=f"one of: {', '.join(METHODS)}")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpu-mem", default="80GiB", help="memory of one GPU, e.g. 80GiB, 24GB (default 80GiB)")
    p.add_argument("--host-mem", default="1TiB", help="CPU memory of one node (default 1TiB)")
    p.add_argument("--max-length", type=int, default=1024, help="tokens per sequence (dspref's max_length)")
    p.add_argument("--micro-batch", type=int, default=4, help="examples per GPU per micro-batch "
                   "(per_device_train_batch_size)")
    p.add_argument("--dtype", default="bf16", choices=tuple(DTYPE_BYTES))
    p.add_argument("--logits-chunk-size", type=int, default=1024)
    p.add_argument("--lora", type=int, metavar="R", help="train a LoRA adapter of rank R instead of all weights")
    p.add_argument("--lora-target-modules", default="all-linear", help="comma-separated module names, or all-linear")
    p.add_argument("--ref-strategy", choices=REFERENCE_STRATEGIES, help="consider only this reference strategy")
    p.add_argument("--zero-stage", type=int, choices=(0, 2, 3), help="consider only this ZeRO stage")
    p.add_argument("--cpu", action="store_true", help="plan a run without GPUs (device memory is host memory)")
    p.add_argument("--top", type=int, default=12, help="rows to print (0: all)")
    p.add_argument("--choose", type=int, default=1, metavar="N", help="the row --write-ds-config writes (default 1)")
    p.add_argument("--write-ds-config", metavar="PATH", help="write the chosen setup's DeepSpeed JSON here")
    return p


def _inputs(args) -> PlanInputs:
    return PlanInputs(method=args.method, gpus_per_node=args.gpus_per_node, nodes=args.nodes,
                      gpu_mem=parse_memory(args.gpu_mem, "--gpu-mem"), host_mem=parse_memory(args.host_mem, "--host-mem"),
                      max_length=args.max_length, micro_batch=args.micro_batch, dtype=args.dtype,
                      logits_chunk_size=args.logits_chunk_size, on_cpu=args.cpu)


def _lora(args) -> Optional[LoraSpec]:
    if args.lora is None:
        return None
    if args.lora < 1:
        raise PlanError(f"--lora must be a rank >= 1, got {args.lora}")
    targets = tuple(t.strip() for t in args.lora_target_modules.split(",") if t.strip())
    return LoraSpec(args.lora, targets or ("all-linear",))


@functools.lru_cache(maxsize=16)
def _preset_shape(name: str, kind: str, lora: Optional[LoraSpec]) -> ModelShape:
    """Presets never change within a process: build each one on the meta device once."""
    return model_shape(load_model_config(name), kind=kind, lora=lora, name=name)


def run_plan(argv: list[str]) -> tuple[list[Estimate], str]:
    """Parse ``argv``, plan, and return (ranked estimates, the text to print); writes the JSON if asked."""
    args = _parser().parse_args(argv)
    inp, lora = _inputs(args), _lora(args)
    _check_inputs(inp)
    _reference_options(inp, args.ref_strategy, lora is not None)  # bad combinations before any model work
    kind = "sequence-classification" if inp.method == "reward" else "causal-lm"
    if args.model in PRESETS:
        shape = _preset_shape(args.model, kind, lora)
    else:
        shape = model_shape(load_model_config(args.model), kind=kind, lora=lora, name=args.model)
    stages = (args.zero_stage,) if args.zero_stage is not None else (0, 2, 3)
    ranked = plan(shape, inp, reference=args.ref_strategy, zero_stages=stages, lora=lora is not None)
    lines = _header(shape, inp, lora) + [format_table(ranked, shape, inp, args.top), ""]
    fitting = sum(e.fits for e in ranked)
    lines.append(f"{fitting} of {len(ranked)} candidates fit.")
    if not 1 <= args.choose <= len(ranked):
        raise PlanError(f"--choose must be between 1 and {len(ranked)}, got {args.choose}")
    chosen = ranked[args.choose - 1]
    options = recipe_options(chosen.setup, inp, lora, args.model)
    lines.append(f"#{args.choose}: recipe options " + json.dumps(options))
    if args.write_ds_config:
        if not chosen.fits:
            raise PlanError(f"candidate #{args.choose} does not fit; nothing written to {args.write_ds_config}")
        _write_json(args.write_ds_config, ds_config_for(chosen.setup, inp))
        lines.append(f"wrote {args.write_ds_config}: dspref train --ds_config {args.write_ds_config} with the "
                     f"options above")
    return ranked, "\n".join(lines)


def _write_json(path: str, data: dict) -> None:
    from dspref.config import _atomic_write_text

    try:
        _atomic_write_text(path, json.dumps(data, indent=2) + "\n")
    except OSError as e:
        raise PlanError(f"cannot write {path}: {e.strerror or e}") from None


def main(argv: list[str]) -> int:
    """``dspref plan ...``: 0 with the table printed, 2 with one ``dspref: error:`` line for bad input."""
    if argv and argv[0] in ("-h", "--help"):
        _parser().print_help()
        return 0
    try:
        _, text = run_plan(argv)
    except PlanError as e:
        print(f"dspref: error: {e}", file=sys.stderr)
        return 2
    print(text)
    return 0
