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
