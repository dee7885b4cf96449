"""One small objective per method, plugged into the one loop through :class:`Objective`.

An objective chooses the loss inputs from the policy's per-sequence scores, owns any state
the method carries (BCO's running δ, KTO's batch KL), and returns ``(loss, metrics)``.
Metrics are ``name -> (sum, count)`` pairs of 0-d tensors so that the loop can average them
over ranks and micro-batches exactly (a metric whose global count is 0 is left out, never NaN).
The set of names an objective returns must not depend on the batch's contents.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch

Metrics = dict[str, tuple[torch.Tensor, torch.Tensor]]


class Objective(Protocol):
    needs_reference: bool
    model_kind: str  # "causal-lm" or "sequence-classification": which model and scorer the run builds
    data_kind: str  # "paired", "reward" or "unpaired": which dataset builder prepares the rows
    headline_metrics: tuple[str, ...]  # the metrics a run's summary leads with
    router_aux_loss_coef: float  # weight of the policy's MoE router aux loss (set by run.py; 0 = off)
    metric_reductions: dict[str, str]  # name -> "pooled" | "total" (default: mean of micro-batch means)
    derived_metrics: dict[str, tuple[str, str]]  # name -> (a, b): logged as a − b when both are present
    state_metrics: tuple[str, ...]  # metrics that depend on the state saved with checkpoints (BCO's δ, UDM)

    def collator(self, pad_token_id: int) -> Callable[[list[dict]], dict]:
        """Rows of the tokenized dataset -> batch tensors."""

    def compute(self, policy, batch: dict, *, train: bool) -> tuple[torch.Tensor, Metrics]:
        """Loss of one micro-batch (mean over its examples) and its metrics."""

    def state_dict(self) -> dict:
        """JSON-serialisable state saved with checkpoints (empty if stateless)."""

    def load_state_dict(self, state: dict) -> None: ...

    def tensor_state(self) -> dict:
        """Tensors saved with checkpoints (loaded back with weights_only=True); empty if none."""

    def load_tensor_state(self, tensors: dict) -> None: ...

    def prepare(self, train_dataset) -> None:
        """One-time set-up on the training data before the first step (after a resume's state is loaded)."""


class Stateless:
    """Mixin for objectives that carry no state across steps."""

    router_aux_loss_coef: float = 0.0
    state_metrics: tuple[str, ...] = ()

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def tensor_state(self) -> dict:
        return {}

    def load_tensor_state(self, tensors: dict) -> None:
        pass

    def prepare(self, train_dataset) -> None:
        pass


def mean_metric(values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-example metric as ``(sum, count)``."""
    values = values.detach().float()
    return values.sum(), torch.tensor(float(values.numel()), device=values.device)


def scalar_metric(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A per-micro-batch scalar metric (averaged over ranks and micro-batches)."""
    return value.detach().float(), torch.ones((), device=value.device)


def add_router_aux(loss: torch.Tensor, scores: dict, coef: float, metrics: Metrics) -> torch.Tensor:
    """``loss + coef · aux_loss`` when the policy's scores carry an MoE router aux loss (metric ``aux_loss``).

    The one place every method adds it: the scorer computes ``aux_loss`` only for an MoE policy
    (never for a reference), so a dense model's loss and metrics are untouched.
    """
    aux = scores.get("aux_loss")
    if aux is None:
        return loss
    metrics["aux_loss"] = scalar_metric(aux)
    if coef:
        loss = loss + coef * aux.to(device=loss.device, dtype=loss.dtype)
    return loss


def build_objective(cfg) -> Objective:
    """The objective named by ``cfg.method`` with its options from ``cfg``."""
    if cfg.method == "cpo":
        from dspref.objectives.cpo import CPOObjective

        return CPOObjective(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                            simpo_gamma=cfg.simpo_gamma, cpo_alpha=cfg.cpo_alpha)
    if cfg.method == "reward":
        from dspref.objectives.reward import RewardObjective

        return RewardObjective(center_rewards_coefficient=cfg.center_rewards_coefficient)
    if cfg.method == "kto":
        from dspref.objectives.unpaired import KTOObjective

        return KTOObjective(beta=cfg.beta, loss_type=cfg.loss_type, desirable_weight=cfg.desirable_weight,
                            undesirable_weight=cfg.undesirable_weight, max_length=cfg.max_length)
    if cfg.method == "bco":
        from dspref.objectives.unpaired import BCOObjective

        return BCOObjective(beta=cfg.beta, max_length=cfg.max_length,
                            embedding_model_name_or_path=cfg.embedding_model_name_or_path,
                            prompt_sample_size=cfg.prompt_sample_size, min_density_ratio=cfg.min_density_ratio,
                            max_density_ratio=cfg.max_density_ratio, seed=cfg.seed)
    raise ValueError(f"method {cfg.method!r} has no objective yet")
