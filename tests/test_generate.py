"""generate-during-eval: 2 ranks, ZeRO-3, under the deepspeed launcher (CPU, gloo).

One launch (tests/dist/run_views.py) runs every case; each rank records the table it holds after
the all-gather, so the test can check that both ranks see the same table and that rank 0 wrote
it once. The checks are about behaviour, not that something was printed:

- training is untouched: a run with generation logs exactly the losses of a run without it;
- gathering the whole model once and generating layer by layer (``synced_gpus``) give the same
  greedy completions;
- where the reference holds the policy's initial weights, policy and reference generate the same
  text before the first update, and only the policy's text changes afterwards;
- reward modeling logs the sampled eval pairs, split at their implicit prompt, with the model's scores.
"""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch

from conftest import base_args, launch

pytestmark = pytest.mark.slow
LORA = "{r: 4, lora_alpha: 8, target_modules: all-linear}"
N_PROMPTS = 3
EVAL_STEPS = [0, 2, 4]


@pytest.fixture(scope="module")
def gen_runs(tmp_path_factory, small_data, saved_base):
    tmp = tmp_path_factory.mktemp("gen")
    train, evals = small_data
    common = dict(ds_config="zero3.json", max_steps=4, eval_steps=2, learning_rate="5e-3", gradient_checkpointing="true",
                  generation_num_prompts=N_PROMPTS, generation_max_new_tokens=6)
    greedy = dict(generate_during_eval="true", generation_temperature=0)

    def args(name, **kw):
        return [str(x) for x in base_args(tmp / name, train, evals, **{**common, **kw})]

    specs = {
        "cpo_plain": args("cpo_plain"),
        "cpo_gathered": args("cpo_gathered", **greedy),
        "cpo_layerwise": args("cpo_layerwise", **greedy, ds3_gather_for_generation="false"),
        "kto_sharded_ref_layerwise": args("kto", method="kto", **greedy, ds3_gather_for_generation="false"),
        "kto_lora": args("kto_lora", method="kto", model_name_or_path=saved_base, random_init="false",
                         peft_config=LORA, **greedy),
        "cpo_lora": args("cpo_lora", model_name_or_path=saved_base, random_init="false", peft_config=LORA, **greedy),
        "bco_precomputed_sampled": args("bco", method="bco", precompute_ref_log_probs="true",
                                        generate_during_eval="true", generation_temperature="0.8",
                                        generation_top_p="0.9"),
        "reward": args("reward", method="reward", generate_during_eval="true"),
    }
    views = tmp / "views"
    views.mkdir()
    spec_file, result = tmp / "specs.json", tmp / "result.json"
    spec_file.write_text(json.dumps(specs))
    proc = launch(["tests/dist/run_views.py", str(result), str(spec_file), str(views)], nprocs=2, timeout=900,
                  env={"DSPREF_CACHE": str(tmp / "cache")})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    runs = json.loads(result.read_text())
    for name in specs:
        assert "error" not in runs[name], (name, runs[name])
    tables = {name: _generations(_out(specs[name])) for name in specs}
    rank_views = [[json.loads(line) for line in (views / f"rank{r}.jsonl").read_text().splitlines()] for r in (0, 1)]
    return runs, tables, rank_views, evals, {name: _out(a) for name, a in specs.items()}


def _out(args):
    return args[args.index("--output_dir") + 1]


def _generations(output_dir) -> list[dict] | None:
    from pathlib import Path

    path = Path(output_dir) / "generations.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else None


def _bare(text: str) -> str:
    """Text without spaces (the demo tokenizer decodes "sort:" as "sort :")."""
    return "".join(text.split())


def _by_step(rows):
    out = {}
    for row in rows:
        out.setdefault(row["step"], []).append(row)
    return out


def _losses(run):
    return [(r["step"], r["loss"]) for r in run["rows"] if "loss" in r]


def test_generation_does_not_change_training(gen_runs):
    runs, tables, _, _, _ = gen_runs
    plain = _losses(runs["cpo_plain"])
    assert len(plain) == 4
    assert _losses(runs["cpo_gathered"]) == plain
    assert _losses(runs["cpo_layerwise"]) == plain
    assert tables["cpo_plain"] is None  # off by default: no file


def test_table_written_once_per_eval(gen_runs):
    _, tables, _, evals, _ = gen_runs
    from dspref.generate import sample_rows

    prompts = [json.loads(line)["prompt"] for line in evals.read_text().splitlines()]
    for name in ("cpo_gathered", "cpo_layerwise", "kto_sharded_ref_layerwise", "kto_lora", "bco_precomputed_sampled"):
        rows = tables[name]
        # KTO/BCO evaluate the paired file as unpaired rows (each pair gives two), so they sample from 2n rows
        n_rows = len(prompts) * (1 if name.startswith("cpo") else 2)
        expected = sample_rows(n_rows, N_PROMPTS, seed=7)
        assert Counter((r["step"], r["row"]) for r in rows) == Counter(
            {(s, i): 1 for s in EVAL_STEPS for i in expected}), name
        for r in rows:
            assert _bare(r["prompt"]) in [_bare(p) for p in prompts], (name, r)
            if name.startswith("cpo"):  # the sampled eval row's own prompt
                assert _bare(r["prompt"]) == _bare(prompts[r["row"]]), (name, r)
        assert all(isinstance(r["policy"], str) for r in rows)


def test_every_rank_sees_the_same_table(gen_runs):
    _, tables, rank_views, _, _ = gen_runs
    assert rank_views[0] == rank_views[1]
    n_tables = 7 * len(EVAL_STEPS)  # seven runs generate, three evals each
    assert len(rank_views[0]) == n_tables
    written = [row for name in ("cpo_gathered", "cpo_layerwise", "kto_sharded_ref_layerwise", "kto_lora", "cpo_lora",
                                "bco_precomputed_sampled", "reward") for row in tables[name]]
    seen = [{k: v for k, v in row.items()} for table in rank_views[0] for row in table]
    assert [{k: v for k, v in row.items() if k != "step"} for row in written] == seen


def test_gathered_and_layerwise_generation_agree(gen_runs):
    _, tables, _, _, _ = gen_runs
    assert tables["cpo_gathered"] == tables["cpo_layerwise"]
    assert "reference" not in tables["cpo_gathered"][0]  # CPO holds no reference


@pytest.mark.parametrize("name", ["kto_sharded_ref_layerwise", "kto_lora"])
def test_reference_generates_beside_policy(gen_runs, name):
    _, tables, _, _, _ = gen_runs
    steps = _by_step(tables[name])
    # before the first update the reference holds the policy's weights (LoRA's B starts at 0):
    # the same prompts, the same random stream, the same text
    assert [r["policy"] for r in steps[0]] == [r["reference"] for r in steps[0]]
    # greedy: the reference (a second engine, or the adapter switched off) is frozen; the policy moves
    for s in EVAL_STEPS[1:]:
        assert [r["reference"] for r in steps[s]] == [r["reference"] for r in steps[0]]
    assert [r["policy"] for r in steps[4]] != [r["policy"] for r in steps[0]]


def test_precomputed_reference_has_no_model_to_generate_from(gen_runs):
    _, tables, _, _, _ = gen_runs
    rows = tables["bco_precomputed_sampled"]
    assert all("reference" not in r for r in rows)
    # sampled (temperature 0.8, top_p 0.9), not greedy: one stream per (seed, step, rank), so the same
    # prompt gets different text at different evals even where greedy decoding of a barely-trained
    # model repeats itself
    steps = _by_step(rows)
    assert [r["policy"] for r in steps[0]] != [r["policy"] for r in steps[2]]


def test_reward_table_has_scores_of_each_side(gen_runs):
    _, tables, _, evals, _ = gen_runs
    pairs = [json.loads(line) for line in evals.read_text().splitlines()]
    rows = tables["reward"]
    assert len(rows) == N_PROMPTS * len(EVAL_STEPS)
    for r in rows:
        pair = pairs[r["row"]]
        # implicit prompt: the common prefix of the two sequences, then each side's own ending
        assert _bare(r["prompt"] + r["chosen"]) == _bare(pair["prompt"] + pair["chosen"])
        assert _bare(r["prompt"] + r["rejected"]) == _bare(pair["prompt"] + pair["rejected"])
        assert torch.isfinite(torch.tensor([r["score_chosen"], r["score_rejected"]])).all()
    steps = _by_step(rows)
    assert [r["score_chosen"] for r in steps[4]] != [r["score_chosen"] for r in steps[0]]  # the model trained


def test_sample_rows_and_share():
    from dspref.generate import sample_rows, share

    rows = sample_rows(50, 4, seed=3)
    assert rows == sample_rows(50, 4, seed=3) and rows == sorted(rows) and len(set(rows)) == 4
    assert rows != sample_rows(50, 4, seed=4)
    assert sample_rows(3, 10, seed=0) == [0, 1, 2]  # fewer rows than asked: all of them
    assert share(5, 0, 2) == ([0, 2, 4], True) and share(5, 1, 2) == ([1, 3], True)
    assert share(1, 1, 2) == ([0], False)  # nothing to do: a filler that joins the collectives


def test_cpo_lora_trains_the_adapter_only_and_exports_it(gen_runs, saved_base):
    """CPO with LoRA under ZeRO-3 and gradient checkpointing: the loss goes down, the exported adapter
    loads with ``PeftModel.from_pretrained`` on the untouched base, and its B matrices have moved off 0."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    runs, tables, _, _, outs = gen_runs
    losses = [loss for _, loss in _losses(runs["cpo_lora"])]
    assert losses[-1] < losses[0], losses
    saved = load_file(f"{outs['cpo_lora']}/adapter_model.safetensors")
    assert saved and all("lora_" in k for k in saved)  # the adapter alone, no base weights
    assert any(v.abs().max() > 0 for k, v in saved.items() if "lora_B" in k)
    base = AutoModelForCausalLM.from_pretrained(saved_base)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(saved_base), outs["cpo_lora"]).eval()
    ids = torch.tensor([[1, 5, 6, 7, 8, 9]])
    with torch.no_grad():
        tuned, plain = model(input_ids=ids).logits, base(input_ids=ids).logits
        with model.disable_adapter():  # the base underneath is exactly the saved one: frozen during training
            torch.testing.assert_close(model(input_ids=ids).logits, plain)
    assert (tuned - plain).abs().max() > 1e-4
    steps = _by_step(tables["cpo_lora"])
    assert [r["policy"] for r in steps[4]] != [r["policy"] for r in steps[0]]  # generation saw the adapter


def test_generation_model_gathers_once_and_restores_everything(tmp_path, small_data):
    """In process, one rank, ZeRO-3 with gradient checkpointing: inside ``generation_model`` every
    parameter is whole, DeepSpeed's module hooks are off, checkpointing is off and the KV cache on;
    afterwards parameters are partitioned again, the hooks are back, and so are the training switches."""
    from dspref import engine as eng
    from dspref.config import parse_args
    from dspref.run import train

    cfg, explicit = parse_args(base_args(tmp_path / "out", small_data[0], ds_config="zero3.json", max_steps=1,
                                         gradient_checkpointing="true"))
    engine = train(cfg, explicit).engine
    model, offload = engine.model, engine.ds.optimizer.parameter_offload
    params = [p for p in model.parameters() if not p.ds_persist]  # small ones stay whole (persistence threshold)
    n_hooks = len(offload.forward_hooks)
    assert params
    assert n_hooks > 0 and all(p.data.numel() == 0 for p in params)  # partitioned (one rank still shards)
    assert eng.is_checkpointing(model) and model.config.use_cache is False
    with eng.generation_model(engine, gather=True) as (inner, synced):
        assert inner is model and synced is False
        assert all(p.data.numel() == p.ds_numel for p in params)
        assert offload.forward_hooks == [] and offload.backward_hooks == []
        assert not eng.is_checkpointing(model) and model.config.use_cache is True and not model.training
        out = model.generate(input_ids=torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False, pad_token_id=3)
        assert out.shape == (1, 6) or out[0, -1].item() == 2  # three new tokens, or stopped at EOS
    assert all(p.data.numel() == 0 for p in params)
    assert len(offload.forward_hooks) == n_hooks
    assert eng.is_checkpointing(model) and model.config.use_cache is False and model.training
    with eng.generation_model(engine, gather=False) as (_, synced):  # layer by layer: hooks stay on
        assert synced is False  # one rank: nothing to keep in step with
        assert len(offload.forward_hooks) == n_hooks and all(p.data.numel() == 0 for p in params)
