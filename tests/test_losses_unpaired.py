"""KTO and BCO losses against hand-worked numbers (math module, formulas written out)."""

import math

import pytest
import torch

from dspref.losses import bco_loss, kto_loss


def sig(x):
    return 1.0 / (1.0 + math.exp(-x))


def softplus_neg(x):  # −logσ(x) = log(1 + e^{−x})
    return math.log1p(math.exp(-x))


POLICY = torch.tensor([-1.0, -2.0, -3.0, -0.5], dtype=torch.float64)
REFERENCE = torch.tensor([-1.5, -1.0, -3.0, -1.5], dtype=torch.float64)
# r = LP_θ − LP_ref = [0.5, −1.0, 0.0, 1.0]
DESIRABLE = torch.tensor([True, False, False, True])
BETA = 0.5
# β·r = [0.25, −0.5, 0.0, 0.5]


# ---------------------------------------------------------------- KTO


def test_kto_hand_values_in_row_order():
    losses, rewards, weights = kto_loss(POLICY, REFERENCE, DESIRABLE, kl=torch.tensor(0.2, dtype=torch.float64), beta=BETA)
    # z0 = 0.2
    # row 0 (D): 1 − σ(β(r − z0)) = 1 − σ(0.5·0.3) = 1 − σ(0.15) = 0.462570155
    # row 1 (U): 1 − σ(β(z0 − r)) = 1 − σ(0.5·1.2) = 1 − σ(0.6)  = 0.354343694
    # row 2 (U): 1 − σ(0.5·0.2) = 1 − σ(0.1)                     = 0.475020813
    # row 3 (D): 1 − σ(0.5·0.8) = 1 − σ(0.4)                     = 0.401312340
    assert losses.tolist() == pytest.approx([0.4625701547, 0.3543436938, 0.4750208125, 0.4013123399], abs=1e-9)
    assert losses.tolist() == pytest.approx([1 - sig(0.15), 1 - sig(0.6), 1 - sig(0.1), 1 - sig(0.4)], abs=1e-12)
    assert rewards.tolist() == pytest.approx([0.25, -0.5, 0.0, 0.5])  # β·r
    assert weights.tolist() == [1.0, 1.0, 1.0, 1.0]


def test_kto_class_weights_and_trl_mean():
    losses, _, weights = kto_loss(
        POLICY, REFERENCE, DESIRABLE, kl=0.2, beta=BETA, desirable_weight=1.33, undesirable_weight=0.5
    )
    # λ_D = 1.33 on rows 0, 3 ; λ_U = 0.5 on rows 1, 2
    expect = [1.33 * (1 - sig(0.15)), 0.5 * (1 - sig(0.6)), 0.5 * (1 - sig(0.1)), 1.33 * (1 - sig(0.4))]
    assert losses.tolist() == pytest.approx(expect, abs=1e-12)
    assert weights.tolist() == [1.33, 0.5, 0.5, 1.33]
    # TRL: cat(λ_D·[D rows], λ_U·[U rows]).nanmean() — a count mean over B = 4, not Σλ
    trl = (expect[0] + expect[3] + expect[1] + expect[2]) / 4
    assert losses.mean().item() == pytest.approx(trl, abs=1e-12)


def test_kto_z0_shifts_both_classes():
    # z0 = 0: D row 0: 1 − σ(0.25) ; U row 1: 1 − σ(β(0 − (−1))) = 1 − σ(0.5)
    losses, _, _ = kto_loss(POLICY, REFERENCE, DESIRABLE, kl=torch.tensor(0.0, dtype=torch.float64), beta=BETA)
    assert losses[:2].tolist() == pytest.approx([1 - sig(0.25), 1 - sig(0.5)], abs=1e-12)
    # kto_loss uses kl as given: clamping at 0 is the caller's job, so a negative kl is applied as is
    # (z0 = −0.2: row 0: 1 − σ(0.5·0.7) = 1 − σ(0.35))
    losses, _, _ = kto_loss(POLICY, REFERENCE, DESIRABLE, kl=torch.tensor(-0.2, dtype=torch.float64), beta=BETA)
    assert losses[0].item() == pytest.approx(1 - sig(0.35), abs=1e-12)


def test_apo_zero_unpaired_ignores_kl():
    losses, rewards, _ = kto_loss(POLICY, REFERENCE, DESIRABLE, kl=None, beta=BETA, loss_type="apo_zero_unpaired")
    # D: 1 − σ(βr) ; U: σ(βr)
    # row 0: 1 − σ(0.25) = 0.437823499 ; row 1: σ(−0.5) = 0.377540669 ; row 2: σ(0) = 0.5 ; row 3: 1 − σ(0.5) = 0.377540669
    assert losses.tolist() == pytest.approx([0.4378234991, 0.3775406688, 0.5, 0.3775406688], abs=1e-9)
    same, _, _ = kto_loss(POLICY, REFERENCE, DESIRABLE, kl=torch.tensor(5.0), beta=BETA, loss_type="apo_zero_unpaired")
    assert torch.equal(same, losses)
    assert rewards.tolist() == pytest.approx([0.25, -0.5, 0.0, 0.5])


def test_kto_gradient_to_policy_not_kl_or_rewards():
    p = POLICY.clone().requires_grad_()
    kl = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    losses, rewards, weights = kto_loss(p, REFERENCE, DESIRABLE, kl=kl, beta=BETA, undesirable_weight=2.0)
    losses.sum().backward()
    # D: d/dLP [1 − σ(β(r − z0))] = −β σ(x)(1 − σ(x)), x = 0.15 → −0.5·0.248599007 = −0.124299503
    # U (λ_U = 2): d/dLP [1 − σ(β(z0 − r))] = +β σ(x)(1 − σ(x)), x = 0.6 → 2·0.5·0.228784240 = 0.228784240
    assert p.grad[0].item() == pytest.approx(-0.5 * sig(0.15) * (1 - sig(0.15)), abs=1e-12)
    assert p.grad[0].item() == pytest.approx(-0.1242995033, abs=1e-9)
    assert p.grad[1].item() == pytest.approx(0.2287842405, abs=1e-9)
    assert kl.grad is None  # z0 is a constant
    assert not rewards.requires_grad and not weights.requires_grad


def test_kto_errors_and_empty_batch():
    with pytest.raises(ValueError, match="unknown KTO loss_type 'sigmoid'"):
        kto_loss(POLICY, REFERENCE, DESIRABLE, kl=0.0, beta=BETA, loss_type="sigmoid")
    with pytest.raises(ValueError, match="needs the KL reference point"):
        kto_loss(POLICY, REFERENCE, DESIRABLE, kl=None, beta=BETA)
    empty = torch.zeros(0)
    losses, rewards, weights = kto_loss(empty, empty, torch.zeros(0, dtype=torch.bool), kl=0.0, beta=BETA)
    assert losses.shape == rewards.shape == weights.shape == (0,)


def test_kto_accepts_int_labels_and_float32():
    losses, _, _ = kto_loss(POLICY.float(), REFERENCE.float(), torch.tensor([1, 0, 0, 1]), kl=0.2, beta=BETA)
    assert losses.dtype == torch.float32
    assert losses.tolist() == pytest.approx([1 - sig(0.15), 1 - sig(0.6), 1 - sig(0.1), 1 - sig(0.4)], abs=1e-6)


# ---------------------------------------------------------------- BCO


def test_bco_hand_values():
    losses, rewards = bco_loss(POLICY, REFERENCE, DESIRABLE, beta=BETA, delta=0.1)
    # r = β(LP_θ − LP_ref) = [0.25, −0.5, 0.0, 0.5], δ = 0.1
    # row 0 (D): −logσ(r − δ)    = −logσ(0.15)  = log(1 + e^{−0.15}) = 0.620957048
    # row 1 (U): −logσ(−(r − δ)) = −logσ(0.6)   = log(1 + e^{−0.6})  = 0.437487950
    # row 2 (U): −logσ(−(0 − 0.1)) = −logσ(0.1) = log(1 + e^{−0.1})  = 0.644396660
    # row 3 (D): −logσ(0.4)                     = log(1 + e^{−0.4})  = 0.513015252
    assert losses.tolist() == pytest.approx([0.6209570478, 0.4374879505, 0.6443966601, 0.5130152524], abs=1e-9)
    assert losses.tolist() == pytest.approx(
        [softplus_neg(0.15), softplus_neg(0.6), softplus_neg(0.1), softplus_neg(0.4)], abs=1e-12
    )
    assert rewards.tolist() == pytest.approx([0.25, -0.5, 0.0, 0.5])
    assert not rewards.requires_grad


def test_bco_udm_weights_touch_undesirable_rows_only():
    # entries at desirable rows (7.0, 9.0) are ignored: desirable weight is exactly 1
    w = torch.tensor([7.0, 0.5, 2.0, 9.0], dtype=torch.float64)
    losses, _ = bco_loss(POLICY, REFERENCE, DESIRABLE, beta=BETA, delta=0.1, udm_weights=w)
    # [1·0.620957048, 0.5·0.437487950, 2·0.644396660, 1·0.513015252]
    expect = [0.6209570478, 0.5 * 0.4374879505, 2 * 0.6443966601, 0.5130152524]
    assert losses.tolist() == pytest.approx(expect, abs=1e-9)
    # TRL: cat(1·L_c, w_r·L_r).nanmean() over B = 4
    assert losses.mean().item() == pytest.approx(sum(expect) / 4, abs=1e-9)
    with pytest.raises(ValueError, match="udm_weights has shape"):
        bco_loss(POLICY, REFERENCE, DESIRABLE, beta=BETA, delta=0.1, udm_weights=w[:2])


def test_bco_delta_as_tensor_and_float32_weights():
    losses, _ = bco_loss(POLICY, REFERENCE, DESIRABLE, beta=BETA, delta=torch.tensor(0.1))
    assert losses[0].item() == pytest.approx(softplus_neg(0.15), abs=1e-7)
    # udm weights are cast to the losses' dtype (the classifier returns float64)
    f32, _ = bco_loss(POLICY.float(), REFERENCE.float(), DESIRABLE, beta=BETA, delta=0.1,
                      udm_weights=torch.ones(4, dtype=torch.float64))
    assert f32.dtype == torch.float32


def test_bco_gradient_flows_through_reward():
    p = POLICY.clone().requires_grad_()
    w = torch.tensor([1.0, 0.5, 1.0, 1.0], dtype=torch.float64)
    losses, rewards = bco_loss(p, REFERENCE, DESIRABLE, beta=BETA, delta=0.1, udm_weights=w)
    losses.sum().backward()
    # D: d/dLP [−logσ(r − δ)] = −β(1 − σ(r − δ)) = −0.5(1 − σ(0.15)) = −0.231285077
    # U: d/dLP [w·−logσ(−(r − δ))] = w·β·σ(r − δ) = 0.5·0.5·σ(−0.6) = 0.25·0.354343694 = 0.088585923
    # U (row 2, w = 1): 0.5·σ(−0.1) = 0.237510406 ; D (row 3): −0.5(1 − σ(0.4)) = −0.200656170
    assert p.grad.tolist() == pytest.approx([-0.2312850773, 0.0885859234, 0.2375104063, -0.2006561699], abs=1e-9)
    assert not rewards.requires_grad


def test_bco_with_running_mean_delta():
    # TRL's order: the running mean is updated with this batch's rewards before the loss.
    from dspref.udm import RunningMoments

    running = RunningMoments()
    beta_r = BETA * (POLICY - REFERENCE)  # [0.25, −0.5, 0.0, 0.5], mean 0.0625
    running.update(beta_r)
    assert running.mean == pytest.approx(0.0625, abs=1e-15)
    losses, _ = bco_loss(POLICY, REFERENCE, DESIRABLE, beta=BETA, delta=running.mean)
    # row 0: −logσ(0.25 − 0.0625) = log(1 + e^{−0.1875})
    assert losses[0].item() == pytest.approx(softplus_neg(0.1875), abs=1e-12)
