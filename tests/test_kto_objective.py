"""KTOObjective on hand-made scores: the KL point z0, its clamping, and the per-class metrics."""

from __future__ import annotations

import math

import pytest
import torch

from dspref import engine as eng
from dspref.objectives.unpaired import KTOObjective


class Fixed:
    """A policy (callable) or reference (.logps) that returns fixed per-row log-probs.

    The batch's ``input_ids`` are (N, 1) row numbers, so a call on some of the rows (KTO scores its KL
    rows in a forward of their own) gets those rows' values; ``calls`` records (rows, grad enabled).
    """

    def __init__(self, logps):
        self.values = torch.tensor(logps, dtype=torch.float32)
        self.calls = []

    def __call__(self, input_ids, attention_mask, completion_mask, **options):
        rows = input_ids[:, 0]
        self.calls.append((rows.tolist(), torch.is_grad_enabled()))
        n = rows.numel()
        return {"logps": self.values[rows].clone(), "token_counts": torch.full((n,), 2), "logits_sum": torch.zeros(n)}

    def logps(self, batch):
        return self.values[batch["input_ids"][:, 0]].clone()


def sig(x):
    return 1 / (1 + math.exp(-x))


@pytest.fixture(scope="module", autouse=True)
def process_group():
    eng.init_distributed()  # one rank, gloo: the objective all-reduces the KL estimate


def run(policy, reference, labels, loss_type="kto"):
    objective = KTOObjective(beta=0.5, loss_type=loss_type, desirable_weight=2.0, undesirable_weight=1.0,
                             max_length=None)
    objective.reference = Fixed(reference)
    n = len(policy)
    batch = {"input_ids": torch.arange(n).reshape(n, 1), "attention_mask": torch.ones(n, 1, dtype=torch.long),
             "completion_mask": torch.ones(n, 1, dtype=torch.long), "label": torch.tensor(labels)}
    scorer = Fixed(policy)
    loss, metrics = objective.compute(scorer, batch, train=True)
    b = len(labels)
    if loss_type == "kto":  # completions with gradient, then the KL rows in a forward without
        assert scorer.calls == [(list(range(b)), True), (list(range(b, n)), False)]
    else:
        assert scorer.calls == [(list(range(n)), True)]
    return loss, metrics


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


def test_kl_rows_without_gradient_give_the_joint_forwards_loss_and_gradients():
    """A real model: scoring the KL rows apart, without gradient, changes neither the loss nor a gradient."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from dspref.data.unpaired import UnpairedCollator
    from dspref.logps import SequenceScorer
    from dspref.losses import kto_loss

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(Qwen2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=64,
        vocab_size=50, pad_token_id=0))
    scorer = SequenceScorer(model, chunk_size=8)
    rows = [{"prompt_ids": [3, 4, 5], "completion_ids": [6, 7], "label": True},
            {"prompt_ids": [8, 9], "completion_ids": [10, 11, 12, 13], "label": False},
            {"prompt_ids": [14], "completion_ids": [15, 16, 17], "label": True}]
    batch = UnpairedCollator(0, with_kl=True, max_length=None)(rows)
    ref = torch.tensor([-9.0, -12.0, -10.0, -20.0, -11.0, -14.0])

    class Reference:
        def logps(self, batch):
            return ref

    objective = KTOObjective(beta=0.1, loss_type="kto", desirable_weight=1.0, undesirable_weight=1.5, max_length=None)
    objective.reference = Reference()
    loss, _ = objective.compute(scorer, batch, train=True)
    loss.backward()
    split = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    joint = scorer(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])["logps"]
    kl = (joint[3:].detach() - ref[3:]).mean().clamp(min=0)
    losses, _, _ = kto_loss(joint[:3], ref[:3], batch["label"], kl=kl, beta=0.1, loss_type="kto",
                            desirable_weight=1.0, undesirable_weight=1.5)
    losses.mean().backward()
    assert loss.item() == pytest.approx(losses.mean().item(), abs=1e-6)
    for name, param in model.named_parameters():
        torch.testing.assert_close(split[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)
