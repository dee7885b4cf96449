"""The fit planner (`dspref plan`): exact parameter counts, ZeRO arithmetic, fit verdicts, ranking,
the DeepSpeed JSON it writes, and bad input. Models are tiny configs or built on the meta device."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from dataclasses import replace

import pytest
import torch
from conftest import DEMO_MODEL, DS_CONFIGS, ROOT

from dspref import plan as P
from dspref.plan import GiB, LoraSpec, ModelShape, PlanError, PlanInputs, Setup

TINY = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=101, max_position_embeddings=64)


def tiny_config(model_type: str, **extra):
    from transformers import AutoConfig

    return AutoConfig.for_model(model_type, **{**TINY, **extra})


def real_count(model) -> int:
    return sum(p.numel() for p in model.parameters())


# --------------------------------------------------------------------------- exact counts
@pytest.mark.parametrize("model_type, extra", [
    ("llama", {"tie_word_embeddings": False}),
    ("qwen2", {"tie_word_embeddings": True}),
    ("mixtral", {"num_local_experts": 4, "num_experts_per_tok": 2}),
    ("qwen2_moe", {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                   "shared_expert_intermediate_size": 48}),
])
def test_parameter_count_equals_the_real_model(model_type, extra):
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type, **extra)
    shape = P.model_shape(config)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    assert shape.params == shape.trainable == shape.base_params == real_count(model)
    assert shape.largest_param == max(p.numel() for p in model.parameters())
    assert shape.head_params == model.get_output_embeddings().weight.numel()
    if extra.get("tie_word_embeddings"):  # the tied output embedding is counted once: the backbone holds it
        assert shape.params == real_count(model.model)


def test_moe_shape_counts_every_expert_and_routes_top_k():
    shape = P.model_shape(tiny_config("qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=48))
    dense = P.model_shape(tiny_config("qwen2_moe", num_experts=1, num_experts_per_tok=1, moe_intermediate_size=32,
                                      shared_expert_intermediate_size=48))
    assert shape.experts_per_token == 2 and shape.mlp_width == 2 * 32 + 48
    assert shape.params - dense.params == 2 * 3 * 3 * 64 * 32 + 2 * 3 * 64  # 3 more experts x 2 layers, wider routers


def test_reward_model_count_and_lora_counts_match_peft():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = tiny_config("llama")
    reward = P.model_shape(config, kind="sequence-classification")
    config.num_labels = 1
    assert reward.params == real_count(AutoModelForSequenceClassification.from_config(config))
    for kind, auto, task, targets in [("causal-lm", AutoModelForCausalLM, "CAUSAL_LM", ("all-linear",)),
                                      ("causal-lm", AutoModelForCausalLM, "CAUSAL_LM", ("q_proj", "v_proj")),
                                      ("sequence-classification", AutoModelForSequenceClassification, "SEQ_CLS",
                                       ("all-linear",))]:
        shape = P.model_shape(config, kind=kind, lora=LoraSpec(8, targets))
        peft_model = get_peft_model(auto.from_config(config),
                                    LoraConfig(task_type=task, r=8, target_modules=list(targets)[0]
                                               if targets == ("all-linear",) else list(targets)))
        assert shape.trainable == sum(p.numel() for p in peft_model.parameters() if p.requires_grad), (kind, targets)
        assert shape.params == real_count(peft_model), (kind, targets)


def test_presets_have_the_published_sizes():
    assert P.model_shape(P.load_model_config("llama-2-7b")).params == 6_738_415_616
    assert P.model_shape(P.load_model_config("qwen2-0.5b")).params == 494_032_768


# --------------------------------------------------------------------------- ZeRO arithmetic
SHAPE = ModelShape(name="round", architecture="X", kind="causal-lm", params=10**9, trainable=10**9,
                   base_params=10**9, largest_param=10**8, largest_layer=5 * 10**7, linear_params=8 * 10**8,
                   head_params=10**8, hidden_size=1000, kv_size=1000, mlp_width=4000, num_layers=16,
                   vocab_size=50000, experts_per_token=0)
EIGHT = PlanInputs(method="cpo", gpus_per_node=8, nodes=1, max_length=512, micro_batch=1)


def test_zero_stage_arithmetic_by_hand():
    z0 = P.estimate(SHAPE, EIGHT, Setup(0))
    # bf16 params and grads 2+2 B, fp32 master + Adam 12 B, fp32 grad copy at the step 4 B
    assert (z0.params, z0.grads, z0.optim, z0.step, z0.buffers) == (2e9, 2e9, 12e9, 4e9, 0)
    z2 = P.estimate(SHAPE, EIGHT, Setup(2))
    # grads and optimizer states over 8 ranks; two 2e8-element bf16 buckets during backward
    assert (z2.params, z2.grads, z2.optim, z2.step, z2.buffers) == (2e9, 0.25e9, 1.5e9, 0.5e9, 0.8e9)
    z3 = P.estimate(SHAPE, EIGHT, Setup(3))
    # params sharded too; an fp32 gradient buffer of the partition; 1e9 gathered (max live params), the
    # largest param's gradient (1e8) and an h² reduce bucket, all bf16
    assert (z3.params, z3.grads, z3.optim, z3.step) == (0.25e9, 0.25e9 + 0.5e9, 1.5e9, 0.5e9)
    assert z3.buffers == 2 * (1e9 + 1e8 + 1e6)
    off = P.estimate(SHAPE, EIGHT, Setup(3, "optimizer"))
    assert (off.params, off.grads, off.optim, off.step) == (0.25e9, 0, 0, 0)
    # per node: 8 ranks x (12 + 2 + 4) B x 1e9/8, pinned (x1.5)
    assert off.host_parts["optimizer"] == pytest.approx(18e9 * 1.5)
    both = P.estimate(SHAPE, EIGHT, Setup(3, "optimizer+params"))
    assert both.params == 0 and both.host_parts["parameters"] == pytest.approx(2e9 * 1.5)
    states = [e.params + e.grads + e.optim for e in (z0, z2, z3, off, both)]
    assert states == sorted(states, reverse=True)


def test_peak_is_backward_or_step_whichever_is_larger():
    e = P.estimate(SHAPE, EIGHT, Setup(2))
    assert e.device == e.params + e.grads + e.optim + e.reference + max(e.activations + e.logits + e.buffers, e.step)
    assert e.activations > e.step  # so the backward peak counts here
    one_token = P.estimate(SHAPE, replace(EIGHT, max_length=2), Setup(0))  # no buckets, a 4 B/param step copy
    assert one_token.device == one_token.params + one_token.grads + one_token.optim + one_token.step


def test_activations_and_logits():
    full = P.estimate(SHAPE, EIGHT, Setup(2))
    gc = P.estimate(SHAPE, EIGHT, Setup(2, gradient_checkpointing=True))
    assert gc.activations < full.activations / 5
    tokens = 2 * 512
    # bf16 layer: 2 norms (4h + 2h), attention 2(3h + 2kv), MLP 4·2·w
    layer = 2 * (4 * 1000 + 2 * 1000) + 2 * (3 * 1000 + 2 * 1000) + 8 * 4000
    assert full.activations == tokens * (16 * layer + 4 * 1000 + 8 * 1000)
    assert gc.activations == tokens * (16 * 2 * 1000 + layer + 4 * 1000 + 8 * 1000)
    # chunked: 1024 positions x vocab x (2 + 4) B (bf16 output, fp32 upcast; the gradient is written
    # over it); full: every position (8 sequences x 511) x (2 + 4 + 4 + 4) B (+ exp temporary, gradient)
    four = replace(EIGHT, micro_batch=4)
    assert P.estimate(SHAPE, four, Setup(2)).logits == 1024 * 50000 * 6
    assert P.estimate(SHAPE, four, Setup(2, chunked_logits=False)).logits == 8 * 511 * 50000 * 14


def test_lora_lowers_grads_and_optimizer_states():
    full = P.model_shape(tiny_config("llama"))
    lora = P.model_shape(tiny_config("llama"), lora=LoraSpec(4))
    inp = replace(EIGHT, micro_batch=2)
    for stage in (0, 2, 3):
        f, lo = P.estimate(full, inp, Setup(stage)), P.estimate(lora, inp, Setup(stage))
        assert lo.grads < f.grads and lo.optim < f.optim, stage
        assert lo.params > f.params  # the adapters add parameters


def test_reference_strategies_are_ordered():
    inp = PlanInputs(method="kto", gpus_per_node=8, max_length=512, micro_batch=2)
    ref = {r: P.estimate(SHAPE, inp, Setup(3, reference=r)).reference for r in P.REFERENCE_STRATEGIES}
    assert ref["precomputed"] == ref["adapter-disabled"] == 0
    assert 0 < ref["offloaded"] < ref["sharded"] < ref["4bit"] < ref["8bit"] < ref["replicated"] == 2e9
    # 4-bit: NF4 (0.5 B + an fp32 absmax per 64) for Linear weights, bf16 for the rest
    assert ref["4bit"] == pytest.approx(0.5625 * 8e8 + 2 * 2e8)
    offloaded = P.estimate(SHAPE, inp, Setup(3, reference="offloaded"))
    assert offloaded.host_parts["reference"] == pytest.approx(2e9 * 1.5)
    pre = P.estimate(SHAPE, inp, Setup(3, reference="precomputed"))
    assert pre.prepass > 0 and pre.device == max(pre.training_peak, pre.prepass)
    ranked = [e.setup.reference for e in P.plan(SHAPE, inp, zero_stages=(3,))
              if e.setup.offload == "none" and not e.setup.gradient_checkpointing and e.setup.chunked_logits]
    assert ranked == ["precomputed", "replicated", "sharded", "4bit", "8bit", "offloaded"]


def test_small_model_fits_and_70b_on_one_24gb_gpu_does_not():
    qwen = P.model_shape(P.load_model_config("qwen2-0.5b"), name="qwen2-0.5b")
    ranked = P.plan(qwen, PlanInputs(method="kto", gpus_per_node=8, max_length=1024, micro_batch=4))
    assert ranked[0].fits and ranked[0].setup.offload == "none" and not ranked[0].setup.gradient_checkpointing
    big = P.model_shape(P.load_model_config("llama-3-70b"))
    one = PlanInputs(method="cpo", gpus_per_node=1, nodes=1, gpu_mem=P.parse_memory("24GB"),
                     host_mem=P.parse_memory("512GiB"), max_length=1024, micro_batch=1)
    assert not any(e.fits for e in P.plan(big, one))


def test_fit_rule_uses_the_cuda_margin():
    e = P.estimate(SHAPE, EIGHT, Setup(3))
    exact = e.device * (1 + P.ALLOCATOR_MARGIN) + P.CUDA_CONTEXT_BYTES
    assert P.estimate(SHAPE, replace(EIGHT, gpu_mem=int(exact) + 1), Setup(3)).fits
    tight = P.estimate(SHAPE, replace(EIGHT, gpu_mem=int(exact) - 1), Setup(3))
    assert not tight.fits and tight.why_not == "GPU"


def test_ranking_puts_fitting_then_faster_setups_first():
    ranked = P.plan(SHAPE, replace(EIGHT, gpu_mem=40 * GiB))
    fits = [e.fits for e in ranked]
    assert fits == sorted(fits, reverse=True) and fits[0]
    keys = [e.setup.speed_key() for e in ranked if e.fits]
    assert keys == sorted(keys)


# --------------------------------------------------------------------------- DeepSpeed JSON
@pytest.mark.parametrize("setup, shipped", [(Setup(2), "zero2.json"), (Setup(3), "zero3.json"),
                                            (Setup(3, "optimizer+params"), "zero3_offload.json")])
def test_written_zero_blocks_are_the_shipped_ones(setup, shipped):
    ours = P.ds_config_for(setup, EIGHT)
    theirs = json.loads((DS_CONFIGS / shipped).read_text())
    assert ours["zero_optimization"] == theirs["zero_optimization"]
    assert set(ours) == set(theirs)


def test_write_ds_config_is_accepted_by_dspref(tmp_path, capsys):
    from dspref.config import parse_args
    from dspref.dsconfig import load_ds_config, resolve_ds_config

    out = tmp_path / "ds.json"
    code = P.main(["--model", str(DEMO_MODEL), "--method", "kto", "--gpus-per-node", "2", "--gpu-mem", "8GiB",
                   "--host-mem", "64GiB", "--max-length", "64", "--micro-batch", "4", "--write-ds-config", str(out)])
    text = capsys.readouterr().out
    assert code == 0 and f"wrote {out}" in text
    options = json.loads(text.split("#1: recipe options ")[1].splitlines()[0])
    argv = ["--method", "kto", "--model_name_or_path", str(DEMO_MODEL), "--ds_config", str(out),
            "--max_prompt_length", "32"]
    for key, value in options.items():
        argv += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value).lower()]
    cfg, explicit = parse_args(argv)
    ds = resolve_ds_config(load_ds_config(str(out)), cfg, explicit, world_size=2, num_training_steps=10, on_cpu=True,
                           hidden_size=64)
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["train_batch_size"] == 8
    assert ds["zero_optimization"]["stage"] in (0, 2, 3) and ds["bf16"]["enabled"] is True


# --------------------------------------------------------------------------- CLI and bad input
def test_cli_prints_the_table_with_the_best_marked(capsys):
    assert P.main(["--model", "qwen2-0.5b", "--method", "cpo", "--gpus-per-node", "8", "--top", "3"]) == 0
    out = capsys.readouterr().out
    assert "qwen2-0.5b (Qwen2ForCausalLM, 0.49 B parameters, 0.49 B trainable); method cpo" in out
    lines = out.splitlines()
    first = next(line for line in lines if line.startswith("*1"))
    assert first.rstrip().endswith("yes")
    assert "more candidates (--top 0 lists all)" in out


@pytest.mark.parametrize("argv, message", [
    (["--model", "{empty}", "--method", "cpo"],
     "--model {empty}: a folder without config.json; give a model folder, a config.json file, a preset "
     "(llama-2-7b, llama-2-13b, llama-2-70b, llama-3-8b, llama-3-70b, qwen2-0.5b, qwen2.5-3b, qwen2.5-7b, "
     "mixtral-8x7b) or a hub name"),
    (["--model", "llama-2-7b", "--method", "cpo", "--gpu-mem", "80 GB-ish"],
     "cannot parse --gpu-mem '80 GB-ish'; write a positive number and a unit, e.g. 80GiB, 80GB, 1TiB, 512MiB"),
    (["--model", "llama-2-7b", "--method", "kto", "--ref-strategy", "adapter-disabled"],
     "reference strategy 'adapter-disabled' needs a LoRA policy (--lora R): without an adapter there is nothing "
     "to switch off"),
    (["--model", "llama-2-7b", "--method", "dpo"], "unknown method 'dpo'; choose one of: bco, cpo, kto, reward"),
    (["--model", "llama-2-7b", "--method", "cpo", "--ref-strategy", "sharded"],
     "method 'cpo' uses no reference model; drop --ref-strategy"),
])
def test_bad_input_is_one_line_and_status_2(argv, message, tmp_path, capsys):
    argv = [a.replace("{empty}", str(tmp_path)) for a in argv]
    assert P.main(argv) == 2
    err = capsys.readouterr().err
    assert err == f"dspref: error: {message.replace('{empty}', str(tmp_path))}\n"


def test_console_script_dispatches_plan(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dspref.cli", "plan", "--model", str(tmp_path), "--method", "cpo"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"dspref: error: --model {tmp_path}: a folder without config.json; "
                                                "give a model folder, a config.json file, a preset (llama-2-7b, "
                                                "llama-2-13b, llama-2-70b, llama-3-8b, llama-3-70b, qwen2-0.5b, "
                                                "qwen2.5-3b, qwen2.5-7b, mixtral-8x7b) or a hub name"]


@pytest.mark.parametrize("text, expected", [("80GiB", 80 * GiB), ("80GB", 80 * 10**9), ("1TiB", 2**40),
                                            ("512 MiB", 512 * 2**20), ("1.5T", int(1.5 * 2**40))])
def test_memory_sizes(text, expected):
    assert P.parse_memory(text) == expected


@pytest.mark.parametrize("text", ["80 GB-ish", "", "-3GiB", "80XB", "0GiB"])
def test_bad_memory_sizes(text):
    with pytest.raises(PlanError, match="cannot parse"):
        P.parse_memory(text)


def test_readme_plans_are_the_planners_output():
    """The "Will it fit?" section pastes real `dspref plan` output; regenerate it when the model changes."""
    readme = (ROOT / "README.md").read_text()
    blocks = [b for b in re.findall(r"```text\n(.*?)```", readme, flags=re.S) if b.startswith("$ dspref plan ")]
    assert len(blocks) == 6
    for block in blocks:
        command, expected = block.split("\n", 1)
        _, actual = P.run_plan(shlex.split(command)[3:])
        assert actual.strip() == expected.strip(), command
