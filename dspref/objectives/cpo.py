"""CPO (arXiv 2401.08417) and SimPO / CPO-SimPO (arXiv 2405.14734): reference-free, paired."""

from __future__ import annotations

import torch

from dspref.losses import cpo_loss, token_mean_nll
from dspref.objectives import Metrics, Stateless, add_router_aux, mean_metric, scalar_metric

# ipo and simpo compare length-averaged log-probs; sigmoid and hinge compare sums (TRL's rule).
_AVERAGED = ("ipo", "simpo")


class CPOObjective(Stateless):
    """``mean_B(L_pref) + cpo_alpha · NLL(chosen)`` from one forward over [chosen; rejected]."""

    needs_reference = False
    headline_metrics = ("rewards/accuracies", "rewards/margins")  # shown in the end-of-run summary
    metric_reductions: dict = {}  # every metric: mean over micro-batches of the all-rank mean
    derived_metrics: dict = {}
    model_kind = "causal-lm"
    data_kind = "paired"

    def __init__(self, *, beta: float, loss_type: str, label_smoothing: float, simpo_gamma: float,
                 cpo_alpha: float):
        self.beta = beta
        self.loss_type = loss_type
        self.label_smoothing = label_smoothing
        self.simpo_gamma = simpo_gamma
        self.cpo_alpha = cpo_alpha

    def collator(self, pad_token_id: int):
        from dspref.data.collate import PairedCollator

        return PairedCollator(pad_token_id)

    def compute(self, policy, batch: dict, *, train: bool) -> tuple[torch.Tensor, Metrics]:
        scores = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        completion_mask=batch["completion_mask"])
        logps, counts = scores["logps"], scores["token_counts"]  # (2B,), (2B,)
        if self.loss_type in _AVERAGED:
            pi = logps / counts.clamp(min=1)
        else:
            pi = logps
        chosen, rejected = pi.chunk(2)  # (B,) each: the collator stacks [chosen; rejected]
        losses, chosen_rewards, rejected_rewards = cpo_loss(
            chosen, rejected, beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, simpo_gamma=self.simpo_gamma,
        )
        chosen_logps_sum, _ = logps.chunk(2)
        chosen_counts, rejected_counts = counts.chunk(2)
        nll = token_mean_nll(chosen_logps_sum, chosen_counts)
        loss = losses.mean()
        if self.cpo_alpha != 0:
            loss = loss + self.cpo_alpha * nll

        logits_chosen, logits_rejected = scores["logits_sum"].chunk(2)
        metrics = {
            "rewards/chosen": mean_metric(chosen_rewards),
            "rewards/rejected": mean_metric(rejected_rewards),
            "rewards/accuracies": mean_metric((chosen_rewards > rejected_rewards).float()),
            "rewards/margins": mean_metric(chosen_rewards - rejected_rewards),
            "logps/chosen": mean_metric(chosen),
            "logps/rejected": mean_metric(rejected),
            # token-weighted mean over completion positions of the vocab-mean logit
            "logits/chosen": (logits_chosen.sum(), chosen_counts.sum().float()),
            "logits/rejected": (logits_rejected.sum(), rejected_counts.sum().float()),
            "nll_loss": scalar_metric(nll),
        }
        return add_router_aux(loss, scores, self.router_aux_loss_coef, metrics), metrics
