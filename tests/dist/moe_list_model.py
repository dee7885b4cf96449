"""A tiny MoE causal LM whose experts are separate modules (a ``ModuleList``), for the ZeRO-3 leaf-module tests.

transformers' own Mixtral / Qwen-MoE fuse their experts into one module with 3-D weights; older and
remote-code MoE models (DeepSeek-V2, early Mixtral) keep one module per expert, which a token may skip.
This model is the Mixtral architecture with each sparse block replaced by a top-1 router over a
``ModuleList`` of expert MLPs. With ``rank_disjoint_experts`` the block routes, on rank r of a
process group of W ranks, only to the experts with ``index % W == r``: every rank skips some experts
on every step, the case that hangs ZeRO-3 unless the block is a leaf module.

Importing this module registers ``model_type = "dspref-list-moe"`` with the Auto classes.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig
from transformers.models.mixtral import modeling_mixtral as mm
from transformers.utils.output_capturing import OutputRecorder


class ListMoeConfig(MixtralConfig):
    model_type = "dspref-list-moe"

    def __init__(self, rank_disjoint_experts: bool = False, **kwargs):
        self.rank_disjoint_experts = rank_disjoint_experts
        super().__init__(**kwargs)


class ListMoeRouter(nn.Linear):
    """``hidden (T, H) -> (router_logits (T, E),)``; recorded as the model's router logits."""

    def forward(self, hidden_states):
        return (super().forward(hidden_states),)


class ListMoeMLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.up = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.down(nn.functional.silu(self.up(x)))


class ListMoeBlock(nn.Module):
    """Top-1 routing over a ``ModuleList`` of experts: an expert no token picks is never called."""

    def __init__(self, config):
        super().__init__()
        self.num_experts = config.num_local_experts
        self.rank_disjoint = config.rank_disjoint_experts
        self.gate = ListMoeRouter(config.hidden_size, self.num_experts, bias=False)
        self.experts = nn.ModuleList(ListMoeMLP(config) for _ in range(self.num_experts))

    def forward(self, hidden_states):
        b, t, h = hidden_states.shape
        x = hidden_states.reshape(-1, h)
        (logits,) = self.gate(x)
        probs = logits.float().softmax(-1)
        choose = probs
        if self.rank_disjoint and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
            allowed = (torch.arange(self.num_experts, device=x.device) % world) == rank
            choose = probs.masked_fill(~allowed, -1.0)
        weight, index = choose.max(dim=-1)
        out = torch.zeros_like(x)
        for e in index.unique().tolist():  # only the experts some token picked
            rows = (index == e).nonzero().squeeze(1)
            out.index_add_(0, rows, self.experts[e](x[rows]) * weight[rows, None].to(x.dtype))
        return out.reshape(b, t, h)


class ListMoeModel(mm.MixtralModel):
    config_class = ListMoeConfig
    _can_record_outputs = {**mm.MixtralPreTrainedModel._can_record_outputs,
                           "router_logits": OutputRecorder(ListMoeRouter, index=0)}

    def __init__(self, config):
        super().__init__(config)
        for layer in self.layers:
            layer.mlp = ListMoeBlock(config)


class ListMoeForCausalLM(mm.MixtralForCausalLM):
    config_class = ListMoeConfig
    _can_record_outputs = ListMoeModel._can_record_outputs

    def __init__(self, config):
        super().__init__(config)
        self.model = ListMoeModel(config)


def load_balancing_loss_func(*args, **kwargs):  # the model family's aux loss (Mixtral's)
    return mm.load_balancing_loss_func(*args, **kwargs)


AutoConfig.register("dspref-list-moe", ListMoeConfig, exist_ok=True)
AutoModelForCausalLM.register(ListMoeConfig, ListMoeForCausalLM, exist_ok=True)
