"""KTO (arXiv 2402.01306) and BCO (arXiv 2404.04656): unpaired (prompt, completion, label) methods.

Both compare the policy with a frozen reference on each completion. KTO's reference point z0 is
the policy/reference KL estimated on mismatched pairs (each prompt with another row's completion
in the same micro-batch), scored in the same forward as the completions. BCO shifts the reward by
δ, a running mean of rewards over all ranks, updated before each training micro-batch's loss.
"""

from __future__ import annotations

import torch

from dspref import engine as eng
from dspref.losses import bco_loss, kto_loss
from dspref.objectives import Metrics, Stateless, scalar_metric

# Per-class means are pooled over ranks and micro-batches (weighted by count), as the issue asks;
# counts are totals of the logging window.
_CLASS_METRICS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "logits/chosen",
                  "logits/rejected")
_REDUCTIONS = {**{name: "pooled" for name in _CLASS_METRICS}, "count/chosen": "total", "count/rejected": "total"}


def class_metrics(rewards, policy_logps, logits_sum, token_counts, desirable) -> Metrics:
    """``rewards/*``, ``logps/*``, ``logits/*`` of each class as (sum, count); ``count/*`` as totals."""
    out: Metrics = {}
    for name, mask in (("chosen", desirable), ("rejected", ~desirable)):
        n = mask.sum().float()
        out[f"rewards/{name}"] = (rewards[mask].detach().float().sum(), n)
        out[f"logps/{name}"] = (policy_logps[mask].detach().float().sum(), n)
        out[f"logits/{name}"] = (logits_sum[mask].float().sum(), token_counts[mask].sum().float())
        out[f"count/{name}"] = (n, torch.ones(()))
    return out


class _Unpaired(Stateless):
    needs_reference = True
    model_kind = "causal-lm"
    data_kind = "unpaired"
    headline_metrics = ("rewards/margins", "rewards/chosen", "rewards/rejected")
    metric_reductions = _REDUCTIONS
    derived_metrics = {"rewards/margins": ("rewards/chosen", "rewards/rejected")}
    with_kl = False

    def __init__(self, *, beta: float, max_length: int | None):
        self.beta = beta
        self.max_length = max_length
        self.reference = None  # set by run.py once the policy engine exists

    def collator(self, pad_token_id: int):
        from dspref.data.unpaired import UnpairedCollator

        return UnpairedCollator(pad_token_id, with_kl=self.with_kl, max_length=self.max_length)

    def _score(self, policy, batch):
        """Policy scores (with grad) and reference log-probs (no grad) of every row of the batch."""
        scores = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        completion_mask=batch["completion_mask"])
        ref = self.reference.logps(batch).to(scores["logps"].device).float()
        return scores, ref


class KTOObjective(_Unpaired):
    """``mean_B(w·L_KTO)``; z0 = clamp(mean over ranks of the micro-batch KL estimate, 0), no gradient."""

    def __init__(self, *, beta, loss_type, desirable_weight, undesirable_weight, max_length):
        super().__init__(beta=beta, max_length=max_length)
        self.loss_type = loss_type
        self.with_kl = loss_type == "kto"
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight

    def compute(self, policy, batch: dict, *, train: bool):
        desirable = batch["label"].to(torch.bool)  # (B,)
        b = desirable.numel()
        scores, ref = self._score(policy, batch)  # (N,) with N = 2B when KL rows follow the completions
        logps = scores["logps"]
        kl = torch.zeros((), device=logps.device)
        if self.with_kl:
            local = (logps[b:].detach() - ref[b:]).mean()
            world = torch.distributed.get_world_size()
            kl = (eng.all_reduce_sum(local.cpu().reshape(1)) / world).clamp(min=0).to(logps.device)[0]
        desirable = desirable.to(logps.device)
        losses, rewards, _ = kto_loss(logps[:b], ref[:b], desirable, kl=kl, beta=self.beta, loss_type=self.loss_type,
                                      desirable_weight=self.desirable_weight,
                                      undesirable_weight=self.undesirable_weight)
        metrics = class_metrics(rewards, logps[:b], scores["logits_sum"][:b], scores["token_counts"][:b], desirable)
        metrics["kl"] = scalar_metric(kl)
        return losses.mean(), metrics


class BCOObjective(_Unpaired):
    """``mean_B(L_BCO)`` with the running reward mean δ (updated before the loss in training only)."""

    def __init__(self, *, beta, max_length):
        super().__init__(beta=beta, max_length=max_length)
        from dspref.udm import RunningMoments

        self.running = RunningMoments()

    def compute(self, policy, batch: dict, *, train: bool):
        desirable = batch["label"].to(torch.bool)
        scores, ref = self._score(policy, batch)
        logps = scores["logps"]
        desirable = desirable.to(logps.device)
        if train:
            rewards = self.beta * (logps.detach() - ref)
            self.running.update(rewards.double().cpu(), reduce_sum=eng.all_reduce_sum)
        delta = self.running.mean
        losses, rewards = bco_loss(logps, ref, desirable, beta=self.beta, delta=delta)
        metrics = class_metrics(rewards, logps, scores["logits_sum"], scores["token_counts"], desirable)
        metrics["delta"] = scalar_metric(torch.tensor(float(delta)))
        return losses.mean(), metrics

    def state_dict(self) -> dict:
        return {"running": self.running.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "running" in state:
            self.running.load_state_dict(state["running"])
