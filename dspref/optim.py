"""AdamW for CPU training: torch's update, a slice of each tensor at a time.

Under ZeRO the optimizer sees one flat fp32 partition per parameter group, and torch's
single-tensor AdamW builds ``exp_avg_sq.sqrt() / bias_correction2_sqrt`` for the whole of it: two
temporaries the size of every trainable parameter, on top of the states, at each step. On a GPU
DeepSpeed's FusedAdam updates in place; on CPU (where dspref asks DeepSpeed for torch's AdamW,
``torch_adam``) :class:`SlicedAdamW` applies the same elementwise update to slices of at most
``slice_elements`` elements, so the temporaries are one slice's. The arithmetic is torch's, op for
op, so the result is bitwise the same (``tests/test_optim.py``), and the state (``step``,
``exp_avg``, ``exp_avg_sq``) has torch's keys and layout, so checkpoints load either way.
"""

from __future__ import annotations

from typing import Optional

import torch

SLICE_ELEMENTS = 2 ** 20  # 4 MiB of fp32 per temporary


class SlicedAdamW(torch.optim.AdamW):
    """``torch.optim.AdamW`` (no amsgrad, no maximize) whose update runs slice by slice."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, *,
                 slice_elements: int = SLICE_ELEMENTS):
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, foreach=False)
        self.slice_elements = int(slice_elements)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group.get("amsgrad") or group.get("maximize"):
                raise ValueError("SlicedAdamW: amsgrad and maximize are not supported; use torch.optim.AdamW")
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError("SlicedAdamW does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0, dtype=torch.float32)
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] += 1
                _update(p, p.grad, state["exp_avg"], state["exp_avg_sq"], step=float(state["step"]),
                        lr=_value(group["lr"]), beta1=beta1, beta2=beta2, eps=group["eps"],
                        weight_decay=group["weight_decay"], slice_elements=self.slice_elements)
        return loss


def _value(x) -> float:
    return float(x.item()) if isinstance(x, torch.Tensor) else float(x)


def _update(param, grad, exp_avg, exp_avg_sq, *, step: float, lr: float, beta1: float, beta2: float, eps: float,
            weight_decay: float, slice_elements: int) -> None:
    """torch's ``_single_tensor_adamw`` (decoupled weight decay, no amsgrad), slice by slice."""
    bias_correction1 = 1 - beta1 ** step
    bias_correction2 = 1 - beta2 ** step
    step_size = lr / bias_correction1
    bias_correction2_sqrt = bias_correction2 ** 0.5
    views = _flat_views(param, grad, exp_avg, exp_avg_sq)
    if views is None:  # not one contiguous block each: update the tensors whole
        views = [(param, grad, exp_avg, exp_avg_sq)]
        slice_elements = max(param.numel(), 1)
    for x, g, m, v in views:
        for start in range(0, max(x.numel(), 1), slice_elements):
            xs, gs, ms, vs = (t[start:start + slice_elements] for t in (x, g, m, v))
            xs.mul_(1 - lr * weight_decay)
            ms.lerp_(gs, 1 - beta1)
            vs.mul_(beta2).addcmul_(gs, gs, value=1 - beta2)
            denom = (vs.sqrt() / bias_correction2_sqrt).add_(eps)
            xs.addcdiv_(ms, denom, value=-step_size)


def _flat_views(*tensors) -> Optional[list]:
    """1-D views of same-shaped contiguous tensors (the update is elementwise), or None."""
    if not all(t.is_contiguous() and t.shape == tensors[0].shape for t in tensors):
        return None
    return [tuple(t.view(-1) for t in tensors)]


def sliced_adamw_from_ds_block(ds_config: dict, params) -> Optional[SlicedAdamW]:
    """The :class:`SlicedAdamW` that replaces DeepSpeed's ``torch_adam`` AdamW for this JSON, or None.

    Only for a block DeepSpeed would turn into ``torch.optim.AdamW`` with nothing but lr, betas, eps
    and weight_decay (``torch_adam: true``; type AdamW, or Adam in its default AdamW mode). Any
    other block (FusedAdam, CPU-offload Adam, foreach, amsgrad, another optimizer) is left to DeepSpeed.
    """
    block = ds_config.get("optimizer")
    if not isinstance(block, dict) or not isinstance(block.get("type"), str):
        return None
    kind = block["type"].lower()
    opts = dict(block.get("params") or {})
    if kind not in ("adam", "adamw") or opts.pop("torch_adam", False) is not True:
        return None
    adam_w_mode = opts.pop("adam_w_mode", True)
    if not (kind == "adamw" or adam_w_mode is True) or opts.pop("foreach", None) not in (None, False):
        return None
    if not set(opts) <= {"lr", "betas", "eps", "weight_decay"}:
        return None
    betas = tuple(opts.get("betas", (0.9, 0.999)))
    if any(isinstance(v, str) for v in (opts.get("lr"), opts.get("eps"), opts.get("weight_decay"), *betas)):
        return None  # an "auto" left in: DeepSpeed would refuse it with its own message
    return SlicedAdamW(params, lr=opts.get("lr", 1e-3), betas=betas, eps=opts.get("eps", 1e-8),
                       weight_decay=opts.get("weight_decay", 1e-2))
