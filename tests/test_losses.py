"""Loss library against hand-worked numbers (math module, formulas written out)."""

import math

import pytest
import torch

from dspref.losses import cpo_loss, token_mean_nll


def log1pexp(x):  # -logσ(x) = log(1 + e^-x), so -logσ(-x) = log1pexp(x)
    return math.log1p(math.exp(x))


CHOSEN = torch.tensor([-1.0, -4.0], dtype=torch.float64)
REJECTED = torch.tensor([-3.0, -2.5], dtype=torch.float64)
# Δ = π_c − π_r = [2.0, −1.5]


def test_sigmoid_matches_hand_values():
    losses, rc, rr = cpo_loss(CHOSEN, REJECTED, beta=0.1, loss_type="sigmoid")
    # −logσ(0.1·2) = log(1 + e^{−0.2}) = 0.598138869; −logσ(0.1·(−1.5)) = log(1 + e^{0.15}) = 0.770957047
    assert losses.tolist() == pytest.approx([0.5981388693, 0.7709570473], abs=1e-9)
    assert rc.tolist() == pytest.approx([-0.1, -0.4])
    assert rr.tolist() == pytest.approx([-0.3, -0.25])


def test_sigmoid_label_smoothing():
    losses, _, _ = cpo_loss(CHOSEN, REJECTED, beta=0.1, loss_type="sigmoid", label_smoothing=0.2)
    expect = [0.8 * log1pexp(-0.2) + 0.2 * log1pexp(0.2), 0.8 * log1pexp(0.15) + 0.2 * log1pexp(-0.15)]
    assert losses.tolist() == pytest.approx(expect, abs=1e-12)
    assert expect[0] == pytest.approx(0.8 * 0.5981388693 + 0.2 * 0.7981388693, abs=1e-9)


def test_simpo_shifts_margin_by_gamma():
    # SimPO: −logσ(βΔ − γ) with γ = 0.5: −logσ(0.2 − 0.5) = log(1 + e^{0.3}) = 0.854355244
    losses, _, _ = cpo_loss(CHOSEN, REJECTED, beta=0.1, loss_type="simpo", simpo_gamma=0.5)
    assert losses.tolist() == pytest.approx([0.8543552444, log1pexp(0.65)], abs=1e-9)


def test_hinge():
    # relu(1 − βΔ): 1 − 0.2 = 0.8 ; 1 + 0.15 = 1.15 ; a large margin gives 0
    losses, _, _ = cpo_loss(CHOSEN, REJECTED, beta=0.1, loss_type="hinge")
    assert losses.tolist() == pytest.approx([0.8, 1.15])
    big, _, _ = cpo_loss(torch.tensor([0.0]), torch.tensor([-20.0]), beta=0.1, loss_type="hinge")
    assert big.item() == 0.0


def test_ipo():
    # (Δ − 1/(2β))² with β = 0.1: (2 − 5)² = 9 ; (−1.5 − 5)² = 42.25
    losses, _, _ = cpo_loss(CHOSEN, REJECTED, beta=0.1, loss_type="ipo")
    assert losses.tolist() == pytest.approx([9.0, 42.25])


def test_unknown_loss_type():
    with pytest.raises(ValueError, match="unknown CPO loss_type 'dpo'; expected one of sigmoid, hinge, ipo, simpo"):
        cpo_loss(CHOSEN, REJECTED, beta=0.1, loss_type="dpo")


def test_gradient_flows_to_logps_not_rewards():
    c = CHOSEN.clone().requires_grad_()
    losses, rc, _ = cpo_loss(c, REJECTED, beta=0.1, loss_type="sigmoid")
    losses.sum().backward()
    # d/dπ_c of −logσ(βΔ) = −β(1 − σ(βΔ)) ; σ(0.2) = 0.549833997
    assert c.grad[0].item() == pytest.approx(-0.1 * (1 - 0.549833997), abs=1e-9)
    assert not rc.requires_grad


def test_token_mean_nll_is_token_weighted():
    # sums −6 over 3 tokens and −2 over 1 token: token mean = 8/4 = 2 (a mean of sequence means would be 2.0 too;
    # use unequal per-token values: −9 over 3 tokens, −1 over 1 -> 10/4 = 2.5, sequence-mean would be 2.0)
    assert token_mean_nll(torch.tensor([-9.0, -1.0]), torch.tensor([3, 1])).item() == pytest.approx(2.5)


def test_reward_loss_plain_margin_and_centering():
    from dspref.losses import reward_loss

    rc, rr = torch.tensor([1.0, -0.5], dtype=torch.float64), torch.tensor([0.5, 0.5], dtype=torch.float64)
    # −logσ(0.5) = log(1 + e^{−0.5}) = 0.474076984 ; −logσ(−1) = log(1 + e) = 1.313261687
    assert reward_loss(rc, rr).tolist() == pytest.approx([0.4740769842, 1.3132616875], abs=1e-9)
    # margin m = [1, 0]: −logσ(0.5 − 1) = log(1 + e^{0.5}) = 0.974076984
    m = torch.tensor([1.0, 0.0], dtype=torch.float64)
    assert reward_loss(rc, rr, margin=m).tolist() == pytest.approx([0.9740769842, 1.3132616875], abs=1e-9)
    # centering c = 0.01: + 0.01·(1.5)² = 0.0225 ; + 0.01·0² = 0
    out = reward_loss(rc, rr, center_rewards_coefficient=0.01)
    assert out.tolist() == pytest.approx([0.4740769842 + 0.0225, 1.3132616875], abs=1e-9)
    # TRL's form: mean(−logσ(Δ)) + c·mean((r_c + r_r)²) equals the mean of the per-pair losses
    trl = (0.4740769842 + 1.3132616875) / 2 + 0.01 * (1.5 ** 2 + 0.0) / 2
    assert out.mean().item() == pytest.approx(trl, abs=1e-9)
