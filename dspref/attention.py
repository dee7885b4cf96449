"""Per-sequence attention for padding-free batches under ``sdpa`` (``attn_implementation: sdpa``).

A packed row holds several sequences. transformers' sdpa path attends over the whole row with a
block-diagonal causal mask: correct, but it costs (row length)² per row, and the masked-out blocks
are computed anyway. ``dspref_sdpa`` instead cuts each packed row at the positions where
``position_ids`` restart and runs causal sdpa on each sequence alone, Σ (sequence length)² in all:
what flash-attention's variable-length kernel does on GPU. Every other call (unpacked batches,
generation with a KV cache) goes to transformers' own sdpa function unchanged, so a model switched
to it behaves exactly as under ``sdpa`` everywhere else.

The scorer marks a packed forward with the keyword ``dspref_packed``, which transformers passes
down to the attention function (also on the recompute of gradient checkpointing, which replays the
layer's keyword arguments): ``True`` (sequences start where ``position_ids`` restart), or the
packing's segment list when rows share a prompt (:func:`dspref.logps.shared_prompts`): the prompt
is packed once and each completion attends to it and to itself, so the prompt's tokens go through
the model once for CPO's chosen and rejected rows and for KTO's completion and KL rows.
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
    if isinstance(dspref_packed, list):  # shared prompts: per bin, (start, end, prefix_start, prefix_end)
        layout = dspref_packed
    else:
        layout = [[(s, e, -1, -1) for s, e in zip(starts, starts[1:] + [length])]
                  for starts in sequence_starts(position_ids.expand(query.shape[0], -1))]
    rows = []
    for b, segments in enumerate(layout):
        pieces = [_segment(query[b:b + 1], key[b:b + 1], value[b:b + 1], *segment, dropout=dropout, scale=scaling,
                           gqa=groups > 1)
                  for segment in segments]
        rows.append(torch.cat(pieces, dim=2) if len(pieces) > 1 else pieces[0])
    out = torch.cat(rows, dim=0) if len(rows) > 1 else rows[0]
    return out.transpose(1, 2).contiguous(), None


def _segment(query, key, value, start: int, end: int, prefix_start: int, prefix_end: int, *, dropout, scale, gqa):
    """Causal attention of positions start..end-1 over themselves and, when given, a shared prefix before them."""
    q, k, v = query[:, :, start:end], key[:, :, start:end], value[:, :, start:end]
    if prefix_start < 0:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, scale=scale, enable_gqa=gqa)
    n, p = end - start, prefix_end - prefix_start
    k = torch.cat([key[:, :, prefix_start:prefix_end], k], dim=2)
    v = torch.cat([value[:, :, prefix_start:prefix_end], v], dim=2)
    mask = torch.ones(n, p + n, dtype=torch.bool, device=q.device).tril(diagonal=p)  # all of the prefix, causal after
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale, enable_gqa=gqa)


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
