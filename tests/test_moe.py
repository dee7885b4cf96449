"""MoE router load-balancing aux loss (one mechanism for every method) and ZeRO-3 leaf modules.

In-process: the aux loss the scorer computes from the backbone's router logits is the model's own
``outputs.aux_loss``; padding and KTO's KL rows are left out; a coefficient of 0 removes it; dense
models get none. Under the deepspeed launcher (2 CPU ranks, ZeRO-3): a CPO run on a tiny Mixtral logs
``aux_loss``, and a model whose experts are separate modules, with every rank skipping some experts,
trains without hanging (its MoE block is made a ZeRO-3 leaf module).
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from conftest import DEMO_MODEL, ROOT, base_args, launch

sys.path.insert(0, str(ROOT / "tests" / "dist"))
import moe_list_model  # noqa: E402  (registers the per-expert test model with the Auto classes)

_TINY = dict(vocab_size=19, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=3, bos_token_id=1,
             eos_token_id=2)


def _mixtral(**kw):
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    return MixtralForCausalLM(MixtralConfig(**_TINY, num_local_experts=4, num_experts_per_tok=2, **kw)).eval()


def _qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen2MoeConfig(**_TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                         shared_expert_intermediate_size=24, decoder_sparse_step=1)
    return Qwen2MoeForCausalLM(cfg).eval()


def _qwen3_moe():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    cfg = Qwen3MoeConfig(**_TINY, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                         decoder_sparse_step=1)
    return Qwen3MoeForCausalLM(cfg).eval()


def _batch(n=4, t=9, pad_left=3):
    """Synthetic ids with row 0 left-padded (pad id 3), completions on the last 4 positions."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(4, 19, (n, t), generator=g)
    mask = torch.ones_like(ids)
    ids[0, :pad_left], mask[0, :pad_left] = 3, 0
    completion = torch.zeros_like(ids)
    completion[:, -4:] = 1
    return ids, mask, completion


@pytest.mark.parametrize("build", [_mixtral, _qwen2_moe, _qwen3_moe], ids=["mixtral", "qwen2_moe", "qwen3_moe"])
def test_scorer_aux_equals_model_aux_loss(build):
    from dspref.logps import SequenceScorer

    model = build()
    ids, mask, completion = _batch()
    own = model(input_ids=ids, attention_mask=mask, output_router_logits=True).aux_loss
    scores = SequenceScorer(model, chunk_size=5, router_aux=True)(ids, mask, completion)
    print(f"{type(model).__name__}: scorer aux {scores['aux_loss'].item():.8f} model aux {own.item():.8f} "
          f"|diff| {(scores['aux_loss'] - own.float()).abs().item():.3e}")
    assert scores["aux_loss"].dim() == 0
    torch.testing.assert_close(scores["aux_loss"], own.float(), rtol=1e-6, atol=1e-7)
    # the aux loss has a gradient into the routers
    scores["aux_loss"].backward()
    routers = [p for n, p in model.named_parameters() if "gate" in n and "proj" not in n and p.grad is not None]
    assert routers and any(p.grad.abs().sum() > 0 for p in routers)


def test_padding_is_excluded():
    from dspref.logps import SequenceScorer

    model = _mixtral()
    scorer = SequenceScorer(model, router_aux=True)
    ids, mask, completion = _batch()
    base = scorer(ids, mask, completion)["aux_loss"]
    other = ids.clone()
    other[0, :3] = torch.tensor([5, 11, 17])  # different ids at the padded positions
    torch.testing.assert_close(scorer(other, mask, completion)["aux_loss"], base, rtol=1e-6, atol=0)
    # ... whereas counting them (an all-ones mask) changes it
    assert not torch.allclose(scorer(other, torch.ones_like(mask), completion)["aux_loss"], base)


def test_kl_rows_are_excluded():
    from dspref.logps import SequenceScorer

    model = _mixtral()
    scorer = SequenceScorer(model, router_aux=True)
    ids, mask, completion = _batch(n=2)
    kl_ids, kl_mask, kl_completion = _batch(n=2, pad_left=0)
    kl_ids = (kl_ids * 7) % 15 + 4  # other content
    rows = torch.tensor([True, True, False, False])
    both = scorer(torch.cat([ids, kl_ids]), torch.cat([mask, kl_mask]), torch.cat([completion, kl_completion]),
                  aux_row_mask=rows)
    alone = scorer(ids, mask, completion)
    torch.testing.assert_close(both["aux_loss"], alone["aux_loss"], rtol=1e-6, atol=1e-7)


def test_kto_objective_passes_only_its_completion_rows(monkeypatch):
    from dspref.logps import SequenceScorer
    from dspref.objectives.unpaired import KTOObjective

    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: 1)
    model = _mixtral()
    scorer = SequenceScorer(model, router_aux=True)
    ids, mask, completion = _batch(n=4)
    batch = {"input_ids": ids, "attention_mask": mask, "completion_mask": completion,
             "label": torch.tensor([1, 0])}

    class ZeroReference:
        def logps(self, b):
            return torch.zeros(b["input_ids"].shape[0])

    obj = KTOObjective(beta=0.1, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.0, max_length=None)
    obj.reference = ZeroReference()
    obj.router_aux_loss_coef = 0.5
    loss, metrics = obj.compute(scorer, batch, train=True)
    expected = scorer(ids[:2], mask[:2], completion[:2])["aux_loss"]  # the first B rows only
    torch.testing.assert_close(metrics["aux_loss"][0], expected.detach(), rtol=1e-6, atol=1e-7)
    obj.router_aux_loss_coef = 0.0
    loss0, metrics0 = obj.compute(scorer, batch, train=True)
    torch.testing.assert_close(loss, loss0 + 0.5 * metrics["aux_loss"][0], rtol=1e-5, atol=1e-6)


def test_bco_and_reward_objectives_add_it():
    from transformers import MixtralConfig, MixtralForSequenceClassification

    from dspref.logps import RewardScorer, SequenceScorer
    from dspref.objectives.reward import RewardObjective
    from dspref.objectives.unpaired import BCOObjective

    ids, mask, completion = _batch()

    class ZeroReference:
        def logps(self, b):
            return torch.zeros(b["input_ids"].shape[0])

    bco = BCOObjective(beta=0.1, max_length=None)
    bco.reference, bco.router_aux_loss_coef = ZeroReference(), 0.5
    batch = {"input_ids": ids, "attention_mask": mask, "completion_mask": completion,
             "label": torch.tensor([1, 0, 1, 0])}
    model = _mixtral()
    _, metrics = bco.compute(SequenceScorer(model, router_aux=True), batch, train=False)
    torch.testing.assert_close(metrics["aux_loss"][0], SequenceScorer(model, router_aux=True)(
        ids, mask, completion)["aux_loss"].detach())

    torch.manual_seed(0)
    clf = MixtralForSequenceClassification(MixtralConfig(**_TINY, num_local_experts=4, num_experts_per_tok=2,
                                                         num_labels=1)).eval()
    reward = RewardObjective(center_rewards_coefficient=None)
    reward.router_aux_loss_coef = 0.5
    loss, metrics = reward.compute(RewardScorer(clf, router_aux=True), {"input_ids": ids, "attention_mask": mask},
                                   train=True)
    loss0, metrics0 = reward.compute(RewardScorer(clf), {"input_ids": ids, "attention_mask": mask}, train=True)
    assert "aux_loss" not in metrics0
    torch.testing.assert_close(loss, loss0 + 0.5 * metrics["aux_loss"][0])


def test_coefficient_and_dense_models():
    from transformers import AutoConfig, AutoModelForCausalLM

    from dspref.logps import SequenceScorer, moe_aux_spec, resolve_router_aux_coef
    from dspref.objectives.cpo import CPOObjective

    model = _mixtral(router_aux_loss_coef=0.02)
    assert resolve_router_aux_coef(None, model.config) == pytest.approx(0.02)  # the model config's own
    assert resolve_router_aux_coef(0.3, model) == pytest.approx(0.3)
    assert resolve_router_aux_coef(0.0, model.config) == 0.0
    del model.config.router_aux_loss_coef
    assert resolve_router_aux_coef(None, model.config) == pytest.approx(0.001)  # TRL's default

    ids, mask, completion = _batch()
    batch = {"input_ids": ids, "attention_mask": mask, "completion_mask": completion}
    obj = CPOObjective(beta=0.1, loss_type="sigmoid", label_smoothing=0.0, simpo_gamma=0.5, cpo_alpha=1.0)
    scorer = SequenceScorer(model, router_aux=True)
    obj.router_aux_loss_coef = 0.25
    loss, metrics = obj.compute(scorer, batch, train=True)
    aux = metrics["aux_loss"][0]
    obj.router_aux_loss_coef = 0.0  # coefficient 0: nothing added
    loss0, _ = obj.compute(scorer, batch, train=True)
    torch.testing.assert_close(loss, loss0 + 0.25 * aux)
    plain_loss, plain_metrics = obj.compute(SequenceScorer(model), batch, train=True)  # router_aux off
    assert "aux_loss" not in plain_metrics
    torch.testing.assert_close(plain_loss, loss0)

    dense = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(DEMO_MODEL))
    assert moe_aux_spec(dense) is None and resolve_router_aux_coef(None, dense.config) == 0.0
    assert "aux_loss" not in SequenceScorer(dense, router_aux=True)(ids, mask, completion)


def test_reward_scorer_aux():
    from transformers import MixtralConfig, MixtralForSequenceClassification
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    from dspref.logps import RewardScorer

    torch.manual_seed(0)
    clf = MixtralForSequenceClassification(MixtralConfig(**_TINY, num_local_experts=4, num_experts_per_tok=2,
                                                         num_labels=1)).eval()
    ids, mask, _ = _batch()
    out = RewardScorer(clf, router_aux=True)(ids, mask)
    base = clf.model(input_ids=ids, attention_mask=mask, output_router_logits=True)
    expected = load_balancing_loss_func(base.router_logits, 4, 2, mask)
    torch.testing.assert_close(out["aux_loss"], expected.float())
    torch.testing.assert_close(out["rewards"], RewardScorer(clf)(ids, mask)["rewards"])
    assert "aux_loss" not in RewardScorer(clf)(ids, mask)


def test_leaf_module_detection():
    from dspref.engine import mark_moe_leaf_modules, moe_leaf_classes

    assert moe_leaf_classes(_mixtral()) == []  # fused 3-D experts: gathered whole anyway
    cfg = moe_list_model.ListMoeConfig(**_TINY, num_local_experts=4, num_experts_per_tok=1)
    model = moe_list_model.ListMoeForCausalLM(cfg)
    assert moe_leaf_classes(model) == [moe_list_model.ListMoeBlock]
    assert mark_moe_leaf_modules(model, {"zero_optimization": {"stage": 2}}) == []
    assert mark_moe_leaf_modules(model, {"zero_optimization": {"stage": 3}}) == ["ListMoeBlock"]
    assert all(getattr(m, "_z3_leaf", False) for m in model.modules() if isinstance(m, moe_list_model.ListMoeBlock))


# --------------------------------------------------------------------------- 2 ranks, ZeRO-3
def _model_dir(path: Path, config) -> Path:
    config.save_pretrained(path)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(DEMO_MODEL / name, path / name)
    return path


def test_zero3_two_ranks(tmp_path, small_data):
    from transformers import MixtralConfig

    train, evals = small_data
    mixtral = _model_dir(tmp_path / "mixtral", MixtralConfig(**_TINY, num_local_experts=4, num_experts_per_tok=2))
    listed = _model_dir(tmp_path / "listmoe", moe_list_model.ListMoeConfig(
        **_TINY, num_local_experts=4, num_experts_per_tok=1, rank_disjoint_experts=True))
    common = dict(ds_config="zero3.json", max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=1)
    lora = "{r: 4, lora_alpha: 8, target_modules: [q_proj, v_proj, up, down]}"
    specs = {
        "mixtral_cpo": base_args(tmp_path / "out_mixtral", train, model_name_or_path=mixtral, **common),
        "list_moe_cpo": base_args(tmp_path / "out_list", train, model_name_or_path=listed, **common),
        "mixtral_bco": base_args(tmp_path / "out_bco", train, model_name_or_path=mixtral, method="bco", **common),
        "mixtral_reward": base_args(tmp_path / "out_reward", train, model_name_or_path=mixtral, method="reward",
                                    **common),
        # everything at once: per-expert modules whose experts some rank never uses, LoRA (adapter-disabled
        # reference), gradient checkpointing, and generation during eval, gathered and layer by layer
        "list_moe_kto_lora_gc_generate": base_args(
            tmp_path / "out_kto", train, evals, model_name_or_path=listed, method="kto", peft_config=lora,
            gradient_checkpointing="true", generate_during_eval="true", generation_max_new_tokens=4,
            generation_num_prompts=3, **common),
        "list_moe_kto_lora_gc_generate_layerwise": base_args(
            tmp_path / "out_kto2", train, evals, model_name_or_path=listed, method="kto", peft_config=lora,
            gradient_checkpointing="true", generate_during_eval="true", generation_max_new_tokens=4,
            generation_num_prompts=3, ds3_gather_for_generation="false", **common),
    }
    spec_file, result = tmp_path / "specs.json", tmp_path / "result.json"
    spec_file.write_text(json.dumps(specs))
    proc = launch(["tests/dist/run_moe.py", str(result), str(spec_file)], nprocs=2, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = json.loads(result.read_text())
    for name in specs:
        assert "error" not in runs[name], runs[name]
        rows = [r for r in runs[name]["rows"] if "loss" in r]
        assert [r["step"] for r in rows] == [1, 2], rows
        assert all(r["aux_loss"] > 0 for r in rows), rows
    assert "ZeRO-3 leaf modules (MoE blocks with per-expert modules): ListMoeBlock" in proc.stdout + proc.stderr
    for out in ("out_kto", "out_kto2"):
        table = [json.loads(line) for line in (tmp_path / out / "generations.jsonl").read_text().splitlines()]
        assert sorted({r["step"] for r in table}) == [0, 2] and len(table) == 6, table
        assert all({"prompt", "policy", "reference"} <= set(r) for r in table)
        assert (tmp_path / out / "adapter_config.json").exists()  # the LoRA adapter was exported
