"""SlicedAdamW: torch's AdamW update, a slice at a time; bitwise the same parameters and states."""

from __future__ import annotations

import pytest
import torch

from dspref.optim import SlicedAdamW, sliced_adamw_from_ds_block


def _params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(1000, generator=g)), torch.nn.Parameter(torch.randn(7, 13, generator=g)),
            torch.nn.Parameter(torch.randn(3, 5, generator=g).t())]  # the last one not contiguous


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_sliced_adamw_equals_torch_adamw_bitwise(weight_decay):
    ours, theirs = _params(), _params()
    kw = dict(lr=3e-2, betas=(0.8, 0.95), eps=1e-6, weight_decay=weight_decay)
    a = SlicedAdamW(ours, slice_elements=97, **kw)  # 1000 elements: 11 slices, the last one short
    b = torch.optim.AdamW(theirs, foreach=False, **kw)
    g = torch.Generator().manual_seed(1)
    for _ in range(5):
        for p, q in zip(ours, theirs):
            grad = torch.randn(p.shape, generator=g)
            p.grad, q.grad = grad.clone(), grad.clone()
        a.step()
        b.step()
    for p, q in zip(ours, theirs):
        assert torch.equal(p, q)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(a.state[p][key], b.state[q][key]), key
    assert ours[0].sub(_params()[0]).abs().max() > 0.05  # five steps really moved the parameters


def test_sliced_adamw_state_loads_into_torch_adamw_and_back():
    ours = _params()
    a = SlicedAdamW(ours, lr=1e-2)
    for p in ours:
        p.grad = torch.ones_like(p)
    a.step()
    b = torch.optim.AdamW(_params(), lr=1e-2)
    b.load_state_dict(a.state_dict())
    c = SlicedAdamW(_params(), lr=1e-2)
    c.load_state_dict(b.state_dict())
    assert torch.equal(c.state_dict()["state"][0]["exp_avg_sq"], a.state[ours[0]]["exp_avg_sq"])


def test_only_torch_adamw_blocks_are_replaced():
    params = _params()
    block = {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.99], "eps": 1e-8, "weight_decay": 0.0,
                                         "torch_adam": True}}
    opt = sliced_adamw_from_ds_block({"optimizer": block}, params)
    assert isinstance(opt, SlicedAdamW) and opt.param_groups[0]["betas"] == (0.9, 0.99)
    adam = {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True}}
    assert isinstance(sliced_adamw_from_ds_block({"optimizer": adam}, params), SlicedAdamW)
    for other in ({"type": "AdamW", "params": {"lr": 1e-3}},  # FusedAdam (GPU)
                  {"type": "Adam", "params": {"lr": 1e-3, "torch_adam": True, "adam_w_mode": False}},  # plain Adam
                  {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True, "amsgrad": True}},
                  {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True, "foreach": True}},
                  {"type": "Lamb", "params": {"lr": 1e-3}}):
        assert sliced_adamw_from_ds_block({"optimizer": other}, params) is None, other
    assert sliced_adamw_from_ds_block({}, params) is None
