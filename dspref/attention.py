"""Per-sequence attention for padding-free batches under ``sdpa`` (``attn_implementation: sdpa``).

A packed row holds several sequences. transformers' sdpa path attends over the whole row with a
block-diagonal causal mask: correct, but it costs (row length)² per row, and the masked-out blocks
are computed anyway. ``dspref_sdpa`` instead cuts each packed row at the positions where
``position_ids`` restart and runs causal sdpa on each sequence alone, Σ (sequence length)² in all:
what flash-attention's variable-length kernel does on GPU. Every other call (unpacked batches,
generation with a KV cache) goes to transformers' own sdpa function unchanged, so a model switched
to it behaves exactly as under ``sdpa`` everywhere else.

The scorer marks a packed forward with the keyword ``dspref_packed=True``, which transformers
passes down to the attention function (also on the recompute of gradient checkpointing, which
replays the layer's keyword arguments).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

NAME = "dspref_sdpa"


def packed_sdpa_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                        is_causal=None, dspref_packed: bool = False, **kwargs):
    """query (B, Hq, L, D), key/value (B, Hkv, L, D) -> (B, L, Hq, D), None."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    position_ids = kwargs.get("position_ids")
    if not dspref_packed or position_ids is None or query.shape[2] != key.shape[2] or query.shape[2] < 2:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    groups = getattr(module, "num_key_value_groups", 1)
    length = query.shape[2]
    position_ids = position_ids.expand(query.shape[0], -1)
    rows = []
    for b, starts in enumerate(sequence_starts(position_ids)):
        bounds = starts + [length]
        pieces = [F.scaled_dot_product_attention(query[b:b + 1, :, s:e], key[b:b + 1, :, s:e], value[b:b + 1, :, s:e],
                                                 dropout_p=dropout, is_causal=True, scale=scaling,
                                                 enable_gqa=groups > 1)
                  for s, e in zip(bounds[:-1], bounds[1:])]
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def sequence_starts(position_ids: torch.Tensor) -> list[list[int]]:
    """Per row of ``position_ids`` (B, L): the offsets where a sequence starts (position 0; offset 0 always)."""
    starts = []
    for row in (position_ids == 0).cpu():
        found = row.nonzero().flatten().tolist()
        starts.append(found if found and found[0] == 0 else [0] + found)
    return starts


def register() -> None:
    """Make ``dspref_sdpa`` a name transformers knows (attention and mask functions); idempotent."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, packed_sdpa_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)


def use_packed_attention(model) -> bool:
    """Switch a model that attends with ``sdpa`` to ``dspref_sdpa`` (for padding-free training).

    Returns whether it was switched; eager, flash-attention (already variable-length) and other
    implementations are left as they are: packed rows stay correct there through the mask.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "_attn_implementation", None) != "sdpa":
        return False
    register()
    model.set_attn_implementation(NAME)
    return True
