"""KTOObjective on hand-made scores: the KL point z0, its clamping, and the per-class metrics."""

from __future__ import annotations

import math

import pytest
import torch

from dspref import engine as eng
from dspref.objectives.unpaired import KTOObjective


class Fixed:
    """A policy (callable) or reference (.logps) that returns fixed per-row log-probs."""

    def __init__(self, logps):
        self.values = torch.tensor(logps, dtype=torch.float32)

    def __call__(self, **batch):
        n = self.values.numel()
        return {"logps": self.values.clone(), "token_counts": torch.full((n,), 2), "logits_sum": torch.zeros(n)}

    def logps(self, batch):
        return self.values.clone()


def sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module", autouse=True)
def process_group():
    eng.init_distributed()  # one rank, gloo: the objective all-reduces the KL estimate


def run(policy, reference, labels, loss_type="kto"):
    objective = KTOObjective(beta=0.5, loss_type=loss_type, desirable_weight=2.0, undesirable_weight=1.0,
                             max_length=None)
    objective.reference = Fixed(reference)
    batch = {"input_ids": None, "attention_mask": None, "completion_mask": None, "label": torch.tensor(labels)}
    return objective.compute(Fixed(policy), batch, train=True)


def test_kl_point_from_mismatched_rows_and_loss_by_hand():
    # rows: [completions (3) ; KL rows (3)]; r = π − ref = [1, −2, 0.5]; KL rows' ratios = [0.3, 0.1, 0.2] -> z0 = 0.2
    loss, metrics = run([-1.0, -4.0, -2.5, -3.3, -3.9, -2.8], [-2.0, -2.0, -3.0, -3.6, -4.0, -3.0],
                        [True, False, True])
    z0 = 0.2
    expected = [2.0 * (1 - sig(0.5 * (1.0 - z0))), 1 - sig(0.5 * (z0 + 2.0)), 2.0 * (1 - sig(0.5 * (0.5 - z0)))]
    assert loss.item() == pytest.approx(sum(expected) / 3, abs=1e-6)  # mean over the count B, weights inside
    assert metrics["kl"][0].item() == pytest.approx(z0, abs=1e-6)
    assert metrics["rewards/chosen"][0].item() == pytest.approx(0.5 * (1.0 + 0.5), abs=1e-6)
    assert metrics["rewards/chosen"][1].item() == 2 and metrics["count/rejected"][0].item() == 1


def test_negative_kl_estimate_is_clamped_to_zero():
    loss, metrics = run([-1.0, -3.0, -5.0, -5.0], [-1.0, -3.0, -4.0, -4.0], [True, False])  # KL ratios −1, −1
    assert metrics["kl"][0].item() == 0.0
    assert loss.item() == pytest.approx((2.0 * (1 - sig(0.0)) + (1 - sig(0.0))) / 2, abs=1e-6)


def test_apo_zero_unpaired_has_no_kl_rows():
    loss, metrics = run([-1.0, -4.0], [-2.0, -2.0], [True, False], loss_type="apo_zero_unpaired")
    # desirable: 1 − σ(β r) with r = 1 ; undesirable: σ(β r) with r = −2 ; class weights 2 and 1
    assert loss.item() == pytest.approx((2.0 * (1 - sig(0.5)) + sig(-1.0)) / 2, abs=1e-6)
    assert metrics["kl"][0].item() == 0.0
