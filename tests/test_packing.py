"""Padding-free batches (``padding_free``) and length-grouped batching (``group_by_length``).

Packed and padded batches must give the same per-sequence log-probs (1e-5, fp32), the same
gradients and the same loss for every method; the 2-rank ZeRO-3 runs at the end check that the
packed forward also works under sharding with the same losses as padded batches.
"""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import DEMO_MODEL, base_args, run_many
from dspref import engine as eng
from dspref.logps import RewardScorer, SequenceScorer, pack_rows, score_sequences


@pytest.fixture(scope="module", autouse=True)
def process_group():
    eng.init_distributed()  # one rank, gloo: the objectives all-reduce


def _qwen2(attn="sdpa", **kw):
    from transformers import Qwen2Config

    return Qwen2Config(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                       intermediate_size=128, vocab_size=300, tie_word_embeddings=True, attn_implementation=attn,
                       pad_token_id=0, **kw)


def _causal(config):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def _batch(lengths, prompts, width=None, seed=1, vocab=300):
    """A right-padded (N, T) batch: row i has ``lengths[i]`` tokens, the first ``prompts[i]`` of them prompt."""
    g = torch.Generator().manual_seed(seed)
    width = width or max(lengths)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=g)
    attention = torch.zeros_like(ids)
    completion = torch.zeros_like(ids)
    for i, (n, p) in enumerate(zip(lengths, prompts)):
        attention[i, :n] = 1
        completion[i, p:n] = 1
        ids[i, n:] = 0
    return ids, attention, completion


# --------------------------------------------------------------------------- packing itself
def test_pack_rows_bins_positions_and_index():
    _, attention, _ = _batch([40, 12, 25, 7, 33, 18], [1] * 6)
    packed = pack_rows(attention, 48)
    # first-fit decreasing, capacity 48: [40, 7], [33, 12], [25, 18]
    assert packed.position_ids.shape == (3, 47)
    assert sorted(packed.row_of[0].unique().tolist()) == [0, 3]
    assert sorted(packed.row_of[1][packed.row_of[1] >= 0].unique().tolist()) == [1, 4]
    # every real token is placed exactly once, padding nowhere
    flat = packed.flat[attention.bool()]
    assert flat.unique().numel() == int(attention.sum()) and (packed.flat[~attention.bool()] == -1).all()
    # positions restart at 0 for each sequence; row 0 (40 tokens) then row 3 (7) in bin 0
    assert packed.position_ids[0].tolist() == list(range(40)) + list(range(7))
    # the tail of a bin is a sequence of its own: bin 1 holds 45 tokens of 47
    assert packed.position_ids[1, 45:].tolist() == [0, 1] and (packed.row_of[1, 45:] == -1).all()
    # a row longer than the bin size gets a bin of its own (never split)
    assert pack_rows(attention, 16).position_ids.shape[1] == 40
    # deterministic
    again = pack_rows(attention, 48)
    assert torch.equal(again.flat, packed.flat) and torch.equal(again.position_ids, packed.position_ids)


@pytest.mark.parametrize("family, attn", [("qwen2", "sdpa"), ("qwen2", "eager"), ("llama-demo", "sdpa")])
@pytest.mark.parametrize("bin_tokens", [40, 64, 4096])
def test_packed_logps_and_gradients_equal_padded(family, attn, bin_tokens):
    if family == "qwen2":
        model, vocab = _causal(_qwen2(attn)), 300
    else:
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(DEMO_MODEL)
        config._attn_implementation = attn
        model, vocab = _causal(config), config.vocab_size
    ids, attention, completion = _batch([40, 12, 25, 7, 33, 18], [10, 3, 8, 2, 20, 5], vocab=vocab)

    def run(pack):
        model.zero_grad()
        out = score_sequences(model, ids, attention, completion, chunk_size=16, pack_tokens=pack)
        (out["logps"] * torch.linspace(0.5, 1.5, 6)).sum().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return out, grads

    padded, padded_grads = run(None)
    packed, packed_grads = run(bin_tokens)
    torch.testing.assert_close(packed["logps"], padded["logps"], atol=1e-5, rtol=0)
    assert torch.equal(packed["token_counts"], padded["token_counts"])
    torch.testing.assert_close(packed["logits_sum"], padded["logits_sum"], atol=1e-4, rtol=0)
    assert padded_grads.keys() == packed_grads.keys()
    for name, grad in padded_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_packing_is_really_block_diagonal():
    """Counter-check: packed rows with positions that do *not* restart let sequences see each other,
    and the log-probs move far from the padded ones (so the equality above is not vacuous)."""
    import dspref.logps as logps

    model = _causal(_qwen2())
    ids, attention, completion = _batch([30, 20, 12], [5, 5, 5])
    padded = score_sequences(model, ids, attention, completion)["logps"]
    real = logps.pack_rows(attention, 64)
    leaky = logps.PackedRows(flat=real.flat, row_of=real.row_of,
                             position_ids=torch.arange(real.position_ids.shape[1]).expand_as(real.position_ids))
    original = logps.pack_rows
    logps.pack_rows = lambda mask, n, groups=None: leaky
    try:
        wrong = score_sequences(model, ids, attention, completion, pack_tokens=64)["logps"]
    finally:
        logps.pack_rows = original
    assert (wrong - padded).abs().max() > 1e-2


def test_per_sequence_attention_equals_masked_row_and_is_used():
    """``dspref_sdpa`` (one causal sdpa per packed sequence) gives the masked row's log-probs and gradients,
    also through gradient checkpointing's recompute; unpacked calls and generation fall back to sdpa."""
    import dspref.attention as attention
    from transformers import AttentionInterface

    model = _causal(_qwen2())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    ids, attention_mask, completion = _batch([40, 12, 25, 7, 33, 18], [10, 3, 8, 2, 20, 5])

    def run():
        model.zero_grad()
        out = score_sequences(model, ids, attention_mask, completion, chunk_size=16, pack_tokens=64)["logps"]
        out.sum().backward()
        return out.detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    masked, masked_grad = run()
    assert attention.use_packed_attention(model) and model.config._attn_implementation == "dspref_sdpa"
    calls = []

    def counting(*args, **kwargs):
        calls.append(bool(kwargs.get("dspref_packed")))
        return attention.packed_sdpa_forward(*args, **kwargs)

    AttentionInterface.register("dspref_sdpa", counting)
    try:
        per_sequence, per_sequence_grad = run()
        assert calls == [True] * 4  # 2 layers, forward and recompute
        torch.testing.assert_close(per_sequence, masked, atol=1e-5, rtol=0)
        torch.testing.assert_close(per_sequence_grad, masked_grad, atol=1e-5, rtol=1e-4)
        calls.clear()
        model.eval()
        prompt = torch.randint(1, 300, (2, 5), generator=torch.Generator().manual_seed(4))
        with torch.no_grad():
            switched = model.generate(prompt, max_new_tokens=4, do_sample=False)
        assert calls and not any(calls)  # generation never takes the packed path
    finally:
        AttentionInterface.register("dspref_sdpa", attention.packed_sdpa_forward)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        assert torch.equal(model.generate(prompt, max_new_tokens=4, do_sample=False), switched)
    assert not attention.use_packed_attention(_causal(_qwen2("eager")))  # only sdpa is switched


@pytest.mark.parametrize("kind", ["paired", "unpaired_kl"])
def test_shared_prompts_are_packed_once_with_the_same_logps(kind):
    """CPO's chosen/rejected rows and KTO's completion/KL rows share a prompt: with dspref_sdpa it is packed
    once and every completion attends to it; log-probs and gradients equal the padded batch's."""
    import dspref.attention as attention
    from dspref.data.collate import PairedCollator
    from dspref.data.unpaired import UnpairedCollator
    from dspref.logps import shared_prompts

    rows = _paired_rows()
    if kind == "paired":
        batch = PairedCollator(0)(rows)
    else:
        batch = UnpairedCollator(0, with_kl=True)([{"prompt_ids": r["prompt_ids"], "completion_ids": r["chosen_ids"],
                                                    "label": True} for r in rows])
    ids, mask, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    groups = shared_prompts(ids, mask, completion)
    assert sorted(sorted(rows_) for rows_, _ in groups) == [[i, i + 4] for i in range(4)]
    model = _causal(_qwen2())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    weights = torch.linspace(0.5, 1.5, ids.shape[0])

    def run(pack):
        model.zero_grad()
        out = score_sequences(model, ids, mask, completion, chunk_size=16, pack_tokens=pack)
        (out["logps"] * weights).sum().backward()
        return out["logps"].detach(), torch.cat([p.grad.flatten() for p in model.parameters()])

    padded, padded_grad = run(None)
    assert attention.use_packed_attention(model)
    shared, shared_grad = run(64)
    torch.testing.assert_close(shared, padded, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared_grad, padded_grad, atol=1e-5, rtol=1e-4)
    packed = pack_rows(mask, 64, groups)
    prompt_tokens = sum(p for _, p in groups)
    assert int((packed.row_of >= 0).sum()) == int(mask.sum()) - prompt_tokens  # each prompt once


def test_reward_pairs_share_their_prompt_with_the_same_rewards():
    """A reward batch [chosen; rejected]: each pair's common prefix is packed once (dspref_sdpa), the
    rewards and gradients equal the padded batch's, also where one side ends right after the prefix."""
    import dspref.attention as attention
    from transformers import AutoModelForSequenceClassification

    from dspref.data.reward import RewardCollator
    from dspref.logps import paired_prefixes

    rows = _paired_rows()
    rows = [{"chosen_ids": r["prompt_ids"] + r["chosen_ids"], "rejected_ids": r["prompt_ids"] + r["rejected_ids"]}
            for r in rows]
    rows[1]["rejected_ids"] = rows[1]["chosen_ids"][:5]  # a strict prefix of its chosen side
    batch = RewardCollator(0)(rows)
    ids, mask = batch["input_ids"], batch["attention_mask"]
    groups = paired_prefixes(ids, mask)
    assert ([1, 5], 4) in groups and len(groups) == 4
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(_qwen2(num_labels=1))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()

    def run(pack):
        model.zero_grad()
        rewards = RewardScorer(model, pack_tokens=pack)(ids, mask)["rewards"]
        (rewards * torch.linspace(0.5, 1.5, 8)).sum().backward()
        return rewards.detach(), torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    padded, padded_grad = run(None)
    assert attention.use_packed_attention(model)
    shared, shared_grad = run(48)
    torch.testing.assert_close(shared, padded, atol=1e-5, rtol=0)
    torch.testing.assert_close(shared_grad, padded_grad, atol=1e-5, rtol=1e-4)


# --------------------------------------------------------------------------- every method's loss
def _paired_rows(n=4, seed=3):
    g = torch.Generator().manual_seed(seed)

    def seq(lo, hi):
        return torch.randint(1, 300, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [{"prompt_ids": seq(3, 20), "chosen_ids": seq(2, 25) + [2], "rejected_ids": seq(2, 25) + [2]}
            for _ in range(n)]


class _Reference:
    """A frozen copy of the policy's initial model, scored with the same packing setting."""

    def __init__(self, model, pack):
        self.scorer = SequenceScorer(copy.deepcopy(model).eval(), 16, pack_tokens=pack)

    def logps(self, batch):
        with torch.no_grad():
            return self.scorer(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               completion_mask=batch["completion_mask"])["logps"]


def _objective_losses(method, **options):
    """(loss, metrics) of one micro-batch, padded and packed, from the same initial model."""
    from dspref.objectives import build_objective
    from dspref.config import parse_args

    cfg, _ = parse_args(["--method", method, "--model_name_or_path", "x", "--train_file", "x",
                         "--output_dir", "x", *sum(([f"--{k}", str(v)] for k, v in options.items()), [])])
    rows = _paired_rows()
    if method in ("kto", "bco"):
        rows = [{"prompt_ids": r["prompt_ids"], "completion_ids": r["chosen_ids" if i % 2 else "rejected_ids"],
                 "label": bool(i % 2)} for i, r in enumerate(rows)]
    results = []
    for pack in (None, 32):
        objective = build_objective(cfg)
        if method == "reward":
            from transformers import AutoModelForSequenceClassification

            torch.manual_seed(0)
            model = AutoModelForSequenceClassification.from_config(_qwen2(num_labels=1)).eval()
            policy = RewardScorer(model, pack_tokens=pack)
        else:
            model = _causal(_qwen2())
            policy = SequenceScorer(model, 16, pack_tokens=pack)
            if objective.needs_reference:
                objective.reference = _Reference(model, pack)
        batch = objective.collator(0)(rows)
        loss, metrics = objective.compute(policy, batch, train=True)
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])
        results.append((loss.detach(), {k: v[0] for k, v in metrics.items()}, grad))
    return results


@pytest.mark.parametrize("method, options", [
    ("cpo", {"loss_type": "sigmoid"}), ("cpo", {"loss_type": "simpo", "cpo_alpha": 0.5}),
    ("kto", {"loss_type": "kto"}), ("kto", {"loss_type": "apo_zero_unpaired"}), ("bco", {}), ("reward", {}),
])
def test_every_method_same_loss_and_gradient_packed(method, options):
    (loss_a, metrics_a, grad_a), (loss_b, metrics_b, grad_b) = _objective_losses(method, **options)
    assert loss_a.item() == pytest.approx(loss_b.item(), abs=1e-5)
    assert metrics_a.keys() == metrics_b.keys()
    for key, value in metrics_a.items():
        assert metrics_b[key].item() == pytest.approx(value.item(), abs=1e-4), key
    torch.testing.assert_close(grad_b, grad_a, atol=1e-5, rtol=1e-4)


def test_reward_packed_reads_the_same_position_when_pad_is_eos():
    """Pad = EOS (a tokenizer without a pad token): the appended EOS is skipped, as transformers does."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(_qwen2(num_labels=1)).eval()
    model.config.pad_token_id = 2
    ids, attention, _ = _batch([9, 14, 5, 12], [1] * 4)
    for i, n in enumerate([9, 14, 5, 12]):
        ids[i, n - 1] = 2  # EOS appended, and it is the pad id
        ids[i, n:] = 2
    padded = RewardScorer(model)(ids, attention)["rewards"]
    packed = RewardScorer(model, pack_tokens=20)(ids, attention)["rewards"]
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=0)


def test_moe_aux_loss_same_packed():
    from transformers import MixtralConfig

    config = MixtralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=300, num_local_experts=4, num_experts_per_tok=2,
                           pad_token_id=0)
    model = _causal(config)
    ids, attention, completion = _batch([30, 20, 12, 25], [5, 5, 5, 5])
    keep = torch.tensor([True, True, False, True])  # a KL row stays out of the aux loss
    a = score_sequences(model, ids, attention, completion, router_aux=True, aux_row_mask=keep)
    b = score_sequences(model, ids, attention, completion, router_aux=True, aux_row_mask=keep, pack_tokens=40)
    torch.testing.assert_close(b["logps"], a["logps"], atol=1e-5, rtol=0)
    assert b["aux_loss"].item() == pytest.approx(a["aux_loss"].item(), abs=1e-6)
    full = score_sequences(model, ids, attention, completion, router_aux=True, pack_tokens=40)["aux_loss"]
    assert full.item() != pytest.approx(b["aux_loss"].item(), abs=1e-6)  # the row mask is applied


def test_reward_without_a_score_head_is_refused():
    from transformers import BertConfig, BertForSequenceClassification

    model = BertForSequenceClassification(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                     intermediate_size=64, vocab_size=100, num_labels=1))
    with pytest.raises(ValueError, match="padding_free: BertForSequenceClassification has no base model \\+ "
                                         "`score` head .* set padding_free: false for this model"):
        RewardScorer(model, pack_tokens=64)


def test_bin_size_option():
    from dspref.config import ConfigError, pack_tokens, parse_args

    common = ["--method", "cpo", "--model_name_or_path", "x", "--train_file", "x", "--output_dir", "x"]
    assert pack_tokens(parse_args(common)[0]) is None
    assert pack_tokens(parse_args(common + ["--padding_free", "true", "--max_length", "600"])[0]) == 600
    assert pack_tokens(parse_args(common + ["--padding_free", "true", "--padding_free_bin_size", "96"])[0]) == 96
    with pytest.raises(ConfigError, match="padding_free_bin_size must be >= 1, got 0"):
        parse_args(common + ["--padding_free", "true", "--padding_free_bin_size", "0"])


def test_one_row_per_micro_batch_where_attention_is_per_sequence(monkeypatch):
    """No bin size given: dspref_sdpa packs a micro-batch into one row (no padded tails), with the same
    log-probs; eager attention (a dense row mask) keeps bins of max_length; a given size is kept."""
    from dspref import logps as L
    from dspref.attention import use_packed_attention
    from dspref.config import pack_one_row, parse_args

    common = ["--method", "cpo", "--model_name_or_path", "x", "--train_file", "x", "--output_dir", "x"]
    assert pack_one_row(parse_args(common + ["--padding_free", "true"])[0]) is True
    assert pack_one_row(parse_args(common + ["--padding_free", "true", "--padding_free_bin_size", "96"])[0]) is False
    assert pack_one_row(parse_args(common)[0]) is False

    widths = []
    pack = L.pack_rows
    monkeypatch.setattr(L, "pack_rows", lambda *a, **k: widths.append(pack(*a, **k).position_ids.shape) or pack(*a, **k))
    ids, attention, completion = _batch([40, 12, 25, 7, 33, 18], [10, 3, 8, 2, 20, 5])
    per_sequence, eager = _causal(_qwen2("sdpa")), _causal(_qwen2("eager"))
    assert use_packed_attention(per_sequence)
    padded = score_sequences(eager, ids, attention, completion)["logps"]
    one = score_sequences(per_sequence, ids, attention, completion, pack_tokens=40, one_row=True)["logps"]
    bounded = score_sequences(eager, ids, attention, completion, pack_tokens=40, one_row=True)["logps"]
    given = score_sequences(per_sequence, ids, attention, completion, pack_tokens=40, one_row=False)["logps"]
    assert widths[0] == (1, 135)  # every real token in one row, no tail
    assert widths[1][0] > 1 and widths[1][1] == 40 and widths[2] == widths[1]
    for out in (one, bounded, given):
        torch.testing.assert_close(out, padded, atol=1e-5, rtol=1e-6)  # sdpa vs eager rounding at |logp| ~170
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    classifier = AutoModelForSequenceClassification.from_config(_qwen2(num_labels=1)).eval()
    padded_rewards = RewardScorer(classifier)(ids, attention)["rewards"]
    assert use_packed_attention(classifier)
    one_rewards = RewardScorer(classifier, pack_tokens=40, one_row=True)(ids, attention)["rewards"]
    assert widths[-1][0] == 1  # one row (a pair sharing a leading token packs it once)
    torch.testing.assert_close(one_rewards, padded_rewards, atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- batching order and counts
def test_group_by_length_same_rows_sorted_within_groups():
    from dspref.loop import MEGA_BATCH, train_order

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(10, 500, (1000,), generator=g).tolist()
    for rank in (0, 1):
        plain = train_order(1000, epoch=1, seed=5, rank=rank, world_size=2, micro_batch=4)
        grouped = train_order(1000, epoch=1, seed=5, rank=rank, world_size=2, micro_batch=4, lengths=lengths)
        assert len(grouped) == len(plain) == 125
        assert sorted(sum(grouped, [])) == sorted(sum(plain, []))  # the same rows, each once
        assert grouped == train_order(1000, epoch=1, seed=5, rank=rank, world_size=2, micro_batch=4,
                                      lengths=lengths)  # a pure function of (seed, epoch, rank): resumable
        for start in range(0, 125, MEGA_BATCH):
            group = [lengths[r] for batch in grouped[start:start + MEGA_BATCH] for r in batch]
            assert group == sorted(group, reverse=True)

    def waste(order):
        return sum(len(b) * max(lengths[r] for r in b) - sum(lengths[r] for r in b) for b in order)

    assert waste(grouped) < waste(plain) / 5  # padding mostly gone


def test_row_lengths_of_each_data_kind():
    from datasets import Dataset

    from dspref.loop import row_lengths

    paired = Dataset.from_list([{"prompt_ids": [1] * 3, "chosen_ids": [1] * 5, "rejected_ids": [1] * 7}])
    unpaired = Dataset.from_list([{"prompt_ids": [1] * 3, "completion_ids": [1] * 4, "label": True}])
    reward = Dataset.from_list([{"chosen_ids": [1] * 6, "rejected_ids": [1] * 2}])
    assert row_lengths(paired) == [10] and row_lengths(unpaired) == [7] and row_lengths(reward) == [6]


def test_tokens_per_second_counts_trained_rows_only():
    from dspref.data.unpaired import UnpairedCollator
    from dspref.loop import trained_tokens

    rows = [{"prompt_ids": [5] * 3, "completion_ids": [6] * n, "label": True} for n in (2, 4, 6)]
    with_kl = UnpairedCollator(0, with_kl=True)(rows)
    assert with_kl["input_ids"].shape[0] == 6  # KL rows follow the completions
    assert trained_tokens(with_kl) == 9 + 12 == trained_tokens(UnpairedCollator(0, with_kl=False)(rows))


# --------------------------------------------------------------------------- ZeRO-3, 2 ranks
@pytest.fixture(scope="module")
def zero3_runs(tmp_path_factory, small_data):
    tmp = tmp_path_factory.mktemp("packing")
    train, evals = small_data

    def args(name, method, **kw):
        opts = {"ds_config": "zero3.json", "max_steps": 5, "learning_rate": "3e-3", **kw}
        return base_args(tmp / name, train, evals, method=method, **opts)

    specs = {
        "cpo_padded": args("a", "cpo", gradient_checkpointing="true"),
        "cpo_packed": args("b", "cpo", gradient_checkpointing="true", padding_free="true",
                           padding_free_bin_size="48"),
        "kto_padded": args("c", "kto"),
        "kto_packed": args("d", "kto", padding_free="true", padding_free_bin_size="64"),
        "kto_packed_grouped_precomputed": args("e", "kto", padding_free="true", group_by_length="true",
                                               precompute_ref_log_probs="true"),
        # Adam's first steps move every weight by ~lr whatever the gradient's size, so a 1e-7 difference in a
        # near-zero gradient of the random classifier head grows ~40x per step at lr 3e-3: a smaller lr here.
        "reward_padded": args("f", "reward", learning_rate="3e-4"),
        "reward_packed": args("g", "reward", padding_free="true", learning_rate="3e-4"),
    }
    return run_many(tmp, specs)


def _rows(run):
    assert "error" not in run, run.get("trace")
    return run["rows"]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["cpo", "kto", "reward"])
def test_zero3_packed_run_equals_padded_run(zero3_runs, method):
    padded, packed = _rows(zero3_runs[f"{method}_padded"]), _rows(zero3_runs[f"{method}_packed"])
    assert [r["step"] for r in padded] == [r["step"] for r in packed]
    compared = 0
    for x, y in zip(padded, packed):
        for key in ("loss", "eval_loss", "rewards/chosen", "rewards/margins", "kl", "accuracy", "grad_norm"):
            if key in x:
                assert y[key] == pytest.approx(x[key], abs=2e-4, rel=1e-3), (method, key, x["step"])
                compared += 1
    assert compared > 10
    train = [r for r in packed if "loss" in r]
    assert train[-1]["tokens_per_second"] > 0


@pytest.mark.slow
def test_zero3_grouped_precomputed_kto_trains(zero3_runs):
    rows = [r for r in _rows(zero3_runs["kto_packed_grouped_precomputed"]) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0]["rewards/chosen"] == pytest.approx(0.0, abs=1e-5)  # reference = the initial policy
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-5)
    assert any(abs(r["rewards/margins"]) > 1e-4 for r in rows[1:])
