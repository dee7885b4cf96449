"""Reward modeling: a Bradley-Terry loss on a one-label sequence classifier (TRL's RewardTrainer)."""

from __future__ import annotations

import torch

from dspref.losses import reward_loss
from dspref.objectives import Metrics, Stateless, add_router_aux, mean_metric


class RewardObjective(Stateless):
    """``mean_B(−logσ(r_c − r_r − margin)) [+ c·mean_B((r_c + r_r)²)]`` from one forward over [chosen; rejected]."""

    needs_reference = False
    headline_metrics = ("accuracy", "margin")  # shown in the end-of-run summary
    metric_reductions: dict = {}  # every metric: mean over micro-batches of the all-rank mean
    derived_metrics: dict = {}
    model_kind = "sequence-classification"
    data_kind = "reward"

    def __init__(self, *, center_rewards_coefficient: float | None):
        self.center_rewards_coefficient = center_rewards_coefficient

    def collator(self, pad_token_id: int):
        from dspref.data.reward import RewardCollator

        return RewardCollator(pad_token_id)

    def compute(self, policy, batch: dict, *, train: bool) -> tuple[torch.Tensor, Metrics]:
        scores = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        rewards = scores["rewards"]  # (2B,)
        chosen, rejected = rewards.chunk(2)  # (B,) each: the collator stacks [chosen; rejected]
        margin = batch.get("margin")
        if margin is not None:
            margin = margin.to(chosen.device, chosen.dtype)
        losses = reward_loss(chosen, rejected, margin=margin,
                             center_rewards_coefficient=self.center_rewards_coefficient)
        metrics = {
            "accuracy": mean_metric((chosen > rejected).float()),
            "margin": mean_metric(chosen - rejected),  # the margin column is not subtracted (as TRL)
            "rewards/chosen": mean_metric(chosen),
            "rewards/rejected": mean_metric(rejected),
        }
        return add_router_aux(losses.mean(), scores, self.router_aux_loss_coef, metrics), metrics
