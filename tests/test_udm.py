"""BCO's running reward mean and UDM density-ratio classifier (dspref.udm)."""

import json
import threading

import pytest
import torch

from dspref.udm import DensityRatioClassifier, RunningMoments, sample_prompt_indices

# ---------------------------------------------------------------- RunningMoments


def test_running_moments_initial_state():
    rm = RunningMoments()
    assert rm.state_dict() == {"mean": 0.0, "var": 1.0, "count": 1e-24}


def test_running_moments_two_updates_by_hand():
    rm = RunningMoments()
    rm.update(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    # batch: N = 4, m = 12/4 = 3, v = (4 + 1 + 0 + 9)/4 = 3.5
    # d = 3 − 0 = 3 ; tot = 1e-24 + 4 = 4 (in float64)
    # mean = 0 + 3·4/4 = 3 ; var = (1·1e-24 + 9·1e-24·4/4 + 3.5·4)/4 = 3.5 ; count = 4
    assert rm.mean == pytest.approx(3.0, abs=1e-15)
    assert rm.var == pytest.approx(3.5, abs=1e-15)
    assert rm.count == 4.0
    rm.update(torch.tensor([0.0, 4.0]))
    # batch: N = 2, m = 2, v = (4 + 4)/2 = 4
    # d = 2 − 3 = −1 ; tot = 6
    # mean = 3 + (−1)·2/6 = 8/3 = 2.666666667
    # var = (3.5·4 + (−1)²·4·2/6 + 4·2)/6 = (14 + 4/3 + 8)/6 = 35/9 = 3.888888889
    assert rm.mean == pytest.approx(8 / 3, abs=1e-14)
    assert rm.var == pytest.approx(35 / 9, abs=1e-14)
    assert rm.count == 6.0
    # = the pooled statistics of [1, 2, 3, 6, 0, 4]: mean 16/6, biased var 66/6 − (16/6)² = 35/9
    allx = torch.tensor([1.0, 2.0, 3.0, 6.0, 0.0, 4.0], dtype=torch.float64)
    var, mean = torch.var_mean(allx, unbiased=False)
    assert rm.mean == pytest.approx(mean.item(), abs=1e-14) and rm.var == pytest.approx(var.item(), abs=1e-14)


def test_running_moments_first_update_is_batch_mean_and_ignores_grad():
    x = torch.tensor([0.25, -0.5, 0.0, 0.5], requires_grad=True)
    rm = RunningMoments()
    rm.update(x * 1.0)  # a tensor with a graph: update detaches
    assert rm.mean == pytest.approx(0.0625, abs=1e-7)


class _TwoRankSum:
    """A two-thread stand-in for an all-reduce: each "rank" passes its tensor, both get the sum.

    ``in_place=True`` mimics ``torch.distributed.all_reduce`` (sums into the argument, returns None).
    """

    def __init__(self, in_place: bool = False):
        self.barrier = threading.Barrier(2, timeout=20)  # a mismatched call count fails, not hangs
        self.slots: list = [None, None]
        self.calls = [0, 0]
        self.in_place = in_place

    def for_rank(self, rank: int):
        def reduce_sum(t: torch.Tensor):
            assert t.dtype == torch.float64
            self.calls[rank] += 1
            self.slots[rank] = t.clone()
            self.barrier.wait()
            total = self.slots[0] + self.slots[1]
            self.barrier.wait()  # both have read before the next call overwrites the slots
            if self.in_place:
                t.copy_(total)
                return None
            return total

        return reduce_sum


def _run_two_ranks(batches_per_rank, in_place=False):
    fake = _TwoRankSum(in_place=in_place)
    states = [RunningMoments(), RunningMoments()]
    errors = []

    def worker(rank):
        try:
            for batch in batches_per_rank[rank]:
                states[rank].update(batch, reduce_sum=fake.for_rank(rank))
        except BaseException as e:  # pragma: no cover - surfaced below
            errors.append(e)
            fake.barrier.abort()

    threads = [threading.Thread(target=worker, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors
    return states, fake


@pytest.mark.parametrize("in_place", [False, True])
def test_running_moments_two_rank_update_equals_concatenation(in_place):
    a1, b1 = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([0.7, 0.1])
    a2, b2 = torch.tensor([1.5]), torch.zeros(0)  # rank 1 is empty on the second step
    states, fake = _run_two_ranks([[a1, a2], [b1, b2]], in_place=in_place)
    single = RunningMoments()
    single.update(torch.cat([a1, b1]))
    single.update(torch.cat([a2, b2]))
    for st in states:
        assert st.mean == pytest.approx(single.mean, abs=1e-12)
        assert st.var == pytest.approx(single.var, abs=1e-12)
        assert st.count == single.count == 6.0
    assert fake.calls == [4, 4]  # two reduce calls per update on every rank, the empty one included


def test_running_moments_globally_empty_update_is_a_no_op():
    rm = RunningMoments()
    rm.update(torch.tensor([1.0, 3.0]))
    before = rm.state_dict()
    calls = []

    def reduce_sum(t):
        calls.append(t.clone())
        return t

    rm.update(torch.zeros(0), reduce_sum=reduce_sum)
    assert rm.state_dict() == before
    assert len(calls) == 1  # the count is global, so every rank stops after the first call


def test_running_moments_state_round_trip_json():
    rm = RunningMoments()
    rm.update(torch.tensor([1.0, 2.0, 3.0, 6.0]))
    text = json.dumps(rm.state_dict())
    other = RunningMoments()
    other.load_state_dict(json.loads(text))
    assert other.state_dict() == rm.state_dict()
    rm.update(torch.tensor([0.0, 4.0]))
    other.update(torch.tensor([0.0, 4.0]))
    assert other.state_dict() == rm.state_dict()
    # TRL's running.json also has "std" (and may store ints): extra keys are ignored
    trl = RunningMoments()
    trl.load_state_dict({"count": 4, "mean": 3.0, "std": 2.16, "var": 3.5})
    assert trl.state_dict() == {"mean": 3.0, "var": 3.5, "count": 4.0}


# ---------------------------------------------------------------- DensityRatioClassifier

# A small fixed, imbalanced (7 desirable / 5 undesirable), not separable dataset.
SK_X = [
    [0.8, -0.3, 1.2], [1.1, 0.4, 0.3], [0.2, -1.0, 0.9], [1.5, 0.1, -0.2], [0.6, 0.7, 1.0],
    [-0.1, -0.4, 0.5], [0.9, -0.8, -0.6],
    [-0.7, 0.5, -0.9], [-1.2, -0.2, 0.4], [0.3, 1.1, -1.3], [-0.5, 0.9, 0.2], [-1.0, -0.6, -0.1],
]
SK_Y = [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]
# Computed once in a throwaway environment (scikit-learn 1.9.1, numpy 2.4.6, scipy 1.17.1; not a
# dependency of dspref) with float64 inputs:
#   LogisticRegression(class_weight="balanced", tol=1e-12, max_iter=10000).fit(X, y)   -> the optimum
SK_COEF_CONVERGED = [1.434973170099, -0.619738450022, 0.810465874901]
SK_INTERCEPT_CONVERGED = -0.038213546952989626
#   LogisticRegression(class_weight="balanced").fit(X, y)   (defaults: tol=1e-4; it stopped after 4 lbfgs
#   iterations, ~7e-4 short of the optimum, so the defaults are matched only to that precision)
SK_COEF_DEFAULT = [1.43463685807, -0.619192524071, 0.810665868945]
SK_INTERCEPT_DEFAULT = -0.038879116743690545
#   without class_weight the coefficients are [1.42054451, -0.61597125, 0.80700192]: balancing moves them ~1e-2


def _fit_sk_data():
    return DensityRatioClassifier().fit(torch.tensor(SK_X), torch.tensor(SK_Y))


def test_classifier_matches_sklearn_balanced_logistic_regression():
    clf = _fit_sk_data()
    assert clf.coef.tolist() == pytest.approx(SK_COEF_CONVERGED, abs=1e-6)
    assert clf.intercept.item() == pytest.approx(SK_INTERCEPT_CONVERGED, abs=1e-6)
    assert clf.coef.tolist() == pytest.approx(SK_COEF_DEFAULT, abs=1e-3)
    assert clf.intercept.item() == pytest.approx(SK_INTERCEPT_DEFAULT, abs=1e-3)
    # predict_proba(X[:3])[:, 1] of the converged sklearn fit
    p = clf.prob_desirable(torch.tensor(SK_X[:3]))
    assert p.dtype == torch.float64
    assert p.tolist() == pytest.approx([0.906212792, 0.822809807, 0.831730115], abs=1e-7)


def test_classifier_labels_may_be_bool():
    clf = DensityRatioClassifier().fit(torch.tensor(SK_X), torch.tensor(SK_Y, dtype=torch.bool))
    assert clf.coef.tolist() == pytest.approx(SK_COEF_CONVERGED, abs=1e-6)


def test_classifier_separates_synthetic_data():
    g = torch.Generator().manual_seed(0)
    n_d, n_u, dim = 140, 60, 6
    shift = torch.tensor([2.0, -1.5, 0.0, 0.0, 1.0, 0.0])
    e_d = torch.randn(n_d, dim, generator=g) + shift / 2
    e_u = torch.randn(n_u, dim, generator=g) - shift / 2
    emb = torch.cat([e_d, e_u])
    labels = torch.cat([torch.ones(n_d), torch.zeros(n_u)]).bool()
    clf = DensityRatioClassifier().fit(emb, labels)
    pred = clf.prob_desirable(emb) > 0.5
    acc_d = pred[:n_d].float().mean().item()
    acc_u = (~pred[n_d:]).float().mean().item()
    assert acc_d > 0.85 and acc_u > 0.85  # balanced weights: the minority class is recalled too
    # density weights: high for desirable-looking prompts, low for undesirable-looking ones
    w = clf.density_weights(emb)
    assert w[:n_d].mean() > 3 * w[n_d:].mean()
    assert w.min() >= 0.5 and w.max() <= 10.0


def test_classifier_rejects_single_class_and_unfitted_use():
    with pytest.raises(ValueError, match="both desirable and undesirable"):
        DensityRatioClassifier().fit(torch.randn(4, 2), torch.ones(4))
    with pytest.raises(RuntimeError, match="not fitted"):
        DensityRatioClassifier().prob_desirable(torch.randn(2, 2))


def _one_feature_classifier():
    # coef = [1], intercept = 0: p = σ(e), so the density ratio p/(1 − p) = e^{e}
    clf = DensityRatioClassifier()
    clf.load_state_dict({"coef": torch.tensor([1.0]), "intercept": torch.tensor(0.0)})
    return clf


def test_density_weights_clamping():
    clf = _one_feature_classifier()
    emb = torch.log(torch.tensor([[0.1], [2.0], [100.0]], dtype=torch.float64))
    # ratio p/(1 − p + 1e-8) = [0.1, 2.0, 100.0] (up to the 1e-8) -> clamp to [0.5, 10]
    w = clf.density_weights(emb)
    assert w.tolist() == pytest.approx([0.5, 2.0, 10.0], abs=1e-6)
    # p = 2/3: 2/3 / (1/3 + 1e-8) = 2 − 6e-8 (the 1e-8 is TRL's)
    assert w[1].item() == pytest.approx(2.0 - 6e-8, abs=1e-12)
    w = clf.density_weights(emb, min_ratio=0.05, max_ratio=50.0)
    assert w.tolist() == pytest.approx([0.1, 2.0, 50.0], abs=1e-6)


def test_classifier_state_round_trip(tmp_path):
    clf = _fit_sk_data()
    state = clf.state_dict()
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    path = tmp_path / "udm_classifier.pt"
    torch.save(state, path)
    loaded = DensityRatioClassifier()
    loaded.load_state_dict(torch.load(path, weights_only=True))
    emb = torch.tensor(SK_X)
    assert torch.equal(loaded.prob_desirable(emb), clf.prob_desirable(emb))
    assert loaded.C == 1.0


# ---------------------------------------------------------------- sample_prompt_indices


def test_sample_prompt_indices_deterministic_with_replacement():
    a = sample_prompt_indices(10, 10, seed=0)
    assert a == sample_prompt_indices(10, 10, seed=0)
    assert a != sample_prompt_indices(10, 10, seed=1)
    assert len(a) == 10 and all(0 <= i < 10 for i in a)
    assert len(set(a)) < len(a)  # drawn with replacement (as TRL's np.random.choice): repeats occur
    assert len(sample_prompt_indices(1000, 16, seed=3)) == 16  # min(n_rows, sample_size)
    assert len(sample_prompt_indices(3, 16, seed=3)) == 3
    assert sample_prompt_indices(0, 16, seed=3) == []
    # independent of the global RNG
    torch.manual_seed(123)
    b = sample_prompt_indices(10, 10, seed=0)
    torch.manual_seed(456)
    assert b == a == sample_prompt_indices(10, 10, seed=0)
    with pytest.raises(ValueError):
        sample_prompt_indices(-1, 4, seed=0)
