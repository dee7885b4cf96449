"""Preference losses as pure functions of log-probabilities.

No model, no config object and no ``torch.distributed`` in here: every function takes
tensors and scalars and returns per-example losses (shape ``(B,)``) so that objectives
decide how to reduce them and tests can check them against hand-worked numbers.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CPO_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "simpo")


def cpo_loss(
    chosen_logps: torch.Tensor,
    rejected_logps: torch.Tensor,
    *,
    beta: float,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    simpo_gamma: float = 0.5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference-free preference loss of CPO (arXiv 2401.08417) and SimPO (arXiv 2405.14734).

    With ``Δ = π_c − π_r`` (summed log-probs for sigmoid/hinge, length-averaged for ipo/simpo;
    the caller chooses), per example:

    - sigmoid: ``−logσ(βΔ)(1 − ε) − logσ(−βΔ) ε``   (ε = label_smoothing, conservative DPO)
    - simpo:   the same with ``Δ − γ/β``, i.e. ``−logσ(βΔ − γ)`` when ε = 0 (SimPO eq. 6)
    - hinge:   ``relu(1 − βΔ)``                      (SLiC)
    - ipo:     ``(Δ − 1/(2β))²``                     (IPO eq. 17)

    Returns ``(losses, chosen_rewards, rejected_rewards)``, each ``(B,)``; the rewards are
    ``β·π`` and detached (they are metrics, never part of the gradient).
    """
    delta = chosen_logps - rejected_logps  # (B,)
    if loss_type == "sigmoid":
        losses = _smoothed_logsigmoid_loss(beta * delta, label_smoothing)
    elif loss_type == "simpo":
        losses = _smoothed_logsigmoid_loss(beta * (delta - simpo_gamma / beta), label_smoothing)
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * delta)
    elif loss_type == "ipo":
        losses = (delta - 1.0 / (2.0 * beta)) ** 2
    else:
        raise ValueError(f"unknown CPO loss_type {loss_type!r}; expected one of {', '.join(CPO_LOSS_TYPES)}")
    chosen_rewards = beta * chosen_logps.detach()
    rejected_rewards = beta * rejected_logps.detach()
    return losses, chosen_rewards, rejected_rewards


def _smoothed_logsigmoid_loss(logits: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """``−logσ(x)(1 − ε) − logσ(−x) ε``: a binary cross-entropy with label noise ε."""
    return -F.logsigmoid(logits) * (1.0 - label_smoothing) - F.logsigmoid(-logits) * label_smoothing


def token_mean_nll(chosen_logps_sum: torch.Tensor, chosen_token_counts: torch.Tensor) -> torch.Tensor:
    """Behaviour-cloning term of CPO: negative log-likelihood averaged over *all* chosen tokens.

    ``−Σ_i Σ_t ℓ_it / Σ_i T_i`` over the micro-batch: a token-level mean, as
    ``nn.CrossEntropyLoss`` on the flattened chosen labels computes it in TRL (not a mean of
    per-sequence means). Inputs are per-sequence sums ``(B,)`` and token counts ``(B,)``.
    """
    return -chosen_logps_sum.sum() / chosen_token_counts.sum().clamp(min=1)


def reward_loss(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    *,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Bradley-Terry reward-model loss, per pair ``(B,)``.

    ``−logσ(r_c − r_r − m)`` with an optional per-pair margin ``m`` (Llama 2, arXiv 2307.09288,
    eq. 2), plus ``c·(r_c + r_r)²`` when a centering coefficient ``c`` is set (Eisenstein et
    al., arXiv 2312.09244), whose batch mean is TRL's ``c·mean((r_c + r_r)²)``.
    """
    diff = chosen_rewards - rejected_rewards
    if margin is not None:
        diff = diff - margin
    losses = -F.logsigmoid(diff)
    if center_rewards_coefficient:
        losses = losses + center_rewards_coefficient * (chosen_rewards + rejected_rewards) ** 2
    return losses


KTO_LOSS_TYPES = ("kto", "apo_zero_unpaired")


def kto_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    kl: torch.Tensor | float | None,
    beta: float,
    loss_type: str = "kto",
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpaired KTO loss (arXiv 2402.01306 eq. 7) and unpaired APO-zero (arXiv 2408.06266 eq. 7).

    With ``r = LP_θ(y|x) − LP_ref(y|x)`` (summed completion log-probs) and the reference point
    ``z0 = kl`` (the caller's clamped, rank-averaged, detached KL estimate), per row:

    - kto, desirable:                 ``1 − σ(β(r − z0))``
    - kto, undesirable:               ``1 − σ(β(z0 − r))``
    - apo_zero_unpaired, desirable:   ``1 − σ(βr)``       (``kl`` is ignored)
    - apo_zero_unpaired, undesirable: ``σ(βr)``

    each multiplied by its class weight ``λ_D`` (desirable_weight) or ``λ_U`` (undesirable_weight).
    The rows stay in their input order (TRL concatenates the desirable block first); the plain
    mean over all ``B`` rows equals TRL's ``nanmean`` over the count ``B`` (not a weighted mean).

    ``desirable`` is a ``(B,)`` bool (or 0/1) tensor. ``kl`` is detached here; clamping it at 0
    and averaging it over ranks is the caller's job. Returns ``(losses, rewards, weights)``, each
    ``(B,)``: the weighted losses, the rewards ``β·r`` (detached) and the per-row class weight.
    """
    if loss_type not in KTO_LOSS_TYPES:
        raise ValueError(f"unknown KTO loss_type {loss_type!r}; expected one of {', '.join(KTO_LOSS_TYPES)}")
    desirable = desirable.to(device=policy_logps.device, dtype=torch.bool)
    logratios = policy_logps - reference_logps  # (B,)
    if loss_type == "kto":
        if kl is None:
            raise ValueError("kto_loss with loss_type='kto' needs the KL reference point `kl`")
        z0 = torch.as_tensor(kl, dtype=logratios.dtype, device=logratios.device).detach()
        desirable_losses = 1 - torch.sigmoid(beta * (logratios - z0))
        undesirable_losses = 1 - torch.sigmoid(beta * (z0 - logratios))
    else:
        desirable_losses = 1 - torch.sigmoid(beta * logratios)
        undesirable_losses = torch.sigmoid(beta * logratios)
    weights = torch.where(
        desirable, torch.full_like(logratios, desirable_weight), torch.full_like(logratios, undesirable_weight)
    ).detach()
    losses = weights * torch.where(desirable, desirable_losses, undesirable_losses)
    rewards = beta * logratios.detach()
    return losses, rewards, weights


def bco_loss(
    policy_logps: torch.Tensor,
    reference_logps: torch.Tensor,
    desirable: torch.Tensor,
    *,
    beta: float,
    delta: float | torch.Tensor,
    udm_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Binary Classifier Optimization loss (arXiv 2404.04656), per row ``(B,)``.

    With the implicit reward ``r = β(LP_θ(y|x) − LP_ref(y|x))`` (gradient flows through ``r``) and
    the running reward mean ``δ`` (a constant; the caller updates it with this batch's rewards
    *before* calling, as TRL does in training):

    - desirable:   ``−logσ(r − δ)``
    - undesirable: ``−logσ(−(r − δ))``, times ``w`` when ``udm_weights`` is given

    ``udm_weights`` is ``(B,)`` in row order (the clamped density ratio ``p/(1 − p)`` of
    Underlying Distribution Matching, see ``dspref.udm``); only its undesirable entries are used,
    the desirable rows keep weight exactly 1 (their entries are ignored). Rows stay in input order
    (TRL puts the desirable block first); the plain mean equals TRL's ``nanmean``.

    Returns ``(losses, rewards)``, each ``(B,)``; the rewards are detached.
    """
    desirable = desirable.to(device=policy_logps.device, dtype=torch.bool)
    rewards = beta * (policy_logps - reference_logps)  # (B,), keeps the graph
    delta = torch.as_tensor(delta, dtype=rewards.dtype, device=rewards.device).detach()
    centred = rewards - delta
    losses = torch.where(desirable, -F.logsigmoid(centred), -F.logsigmoid(-centred))
    if udm_weights is not None:
        udm_weights = udm_weights.detach().to(device=losses.device, dtype=losses.dtype)
        if udm_weights.shape != losses.shape:
            raise ValueError(f"udm_weights has shape {tuple(udm_weights.shape)}; expected {tuple(losses.shape)}")
        losses = losses * torch.where(desirable, torch.ones_like(udm_weights), udm_weights)
    return losses, rewards.detach()
