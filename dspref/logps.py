"""The one scoring forward: a causal LM -> per-sequence log-probs of the completion tokens.

Used by the policy, the reference, precompute and eval alike. It never builds the
``[batch, seq, vocab]`` float32 logits: the backbone gives the last hidden states, only the
positions that predict completion tokens are kept, and the output embedding is applied to
them in chunks, each chunk wrapped in a non-reentrant activation checkpoint so that its
logits are freed right after the ``gather − logsumexp`` and recomputed in backward.

Under ZeRO-3 the output embedding is sharded. Calling the ``lm_head`` *module* per chunk (not
reading ``lm_head.weight``) lets ZeRO's forward hooks gather and release the weight (TRL
issue 3368 is what happens otherwise). Every such call is a collective, so all ranks must
make the same number of calls: the chunk count is agreed with an all-reduce (MAX) and ranks
with fewer completion tokens run zero-weighted filler chunks.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.checkpoint import checkpoint


class SequenceScorer(nn.Module):
    """Wraps a causal LM so that ``forward`` returns per-sequence completion scores.

    DeepSpeed engines wrap this module, so the whole scoring runs inside
    ``engine.forward`` (ZeRO-3's hooks see every submodule call). Returns a dict:

    - ``logps``        (N,) summed log-probs of the completion tokens
    - ``token_counts`` (N,) number of completion tokens
    - ``logits_sum``   (N,) Σ over completion positions of the vocab-mean logit (detached; for metrics)
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size

    def forward(self, input_ids, attention_mask, completion_mask, position_ids=None):
        return score_sequences(
            self.model, input_ids, attention_mask, completion_mask,
            chunk_size=self.chunk_size, position_ids=position_ids,
        )


def score_sequences(model, input_ids, attention_mask, completion_mask, *, chunk_size=1024, position_ids=None):
    """Per-sequence summed completion log-probs of ``model`` without full logits (see module doc)."""
    backbone, head = model.get_decoder(), model.get_output_embeddings()
    hidden = backbone(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False,
    ).last_hidden_state  # (N, T, H)
    # Position t predicts token t+1: keep only the positions whose target is a completion token.
    target_mask = completion_mask[:, 1:].bool()  # (N, T-1)
    states = hidden[:, :-1][target_mask]  # (M, H)
    targets = input_ids[:, 1:][target_mask]  # (M,)
    seq_index = target_mask.nonzero()[:, 0]  # (M,) which sequence each position belongs to
    softcap = getattr(model.config, "final_logit_softcapping", None)

    # Filler chunks read a zero row tied to the hidden states: their backward must finish before
    # the backbone's (autograd waits for every consumer of `hidden`), so every rank makes its
    # head calls in the same order relative to the layers' parameter gathers.
    anchor = hidden[:1, 0] * 0  # (1, H)
    token_logps, token_logit_means, filler = _chunked_token_logps(head, states, targets, chunk_size, softcap, anchor)
    n = input_ids.shape[0]
    logps = hidden.new_zeros(n, dtype=torch.float32).index_add(0, seq_index, token_logps)
    logps = logps + filler  # exact zero; keeps filler chunks (if any) in the backward graph
    logits_sum = hidden.new_zeros(n, dtype=torch.float32).index_add(0, seq_index, token_logit_means)
    token_counts = target_mask.sum(dim=1)
    return {"logps": logps, "token_counts": token_counts, "logits_sum": logits_sum}


def _chunked_token_logps(head, states, targets, chunk_size, softcap, anchor):
    """Log-prob of each target token from its hidden state, ``chunk_size`` positions at a time.

    Returns ``token_logps (M,)`` float32, ``token_logit_means (M,)`` float32 detached, and a
    zero scalar tied to the filler chunks' outputs (0 when there are none).
    """
    n_positions = states.shape[0]
    n_chunks = _agreed_chunk_count(n_positions, chunk_size)
    logps, means = [], []
    filler = states.new_zeros((), dtype=torch.float32)
    for i in range(n_chunks):
        h = states[i * chunk_size:(i + 1) * chunk_size]  # (m, H)
        t = targets[i * chunk_size:(i + 1) * chunk_size]  # (m,)
        is_filler = h.shape[0] == 0
        if is_filler:
            # This rank ran out of positions but must still call the head (a ZeRO-3 collective,
            # in forward and in the checkpoint's recompute); weight 0 keeps it in the graph.
            h, t = anchor, targets.new_zeros(1)
        if torch.is_grad_enabled():
            lp, mean = checkpoint(_head_logps, head, h, t, softcap, use_reentrant=False)
        else:
            lp, mean = _head_logps(head, h, t, softcap)
        if is_filler:
            filler = filler + lp.sum() * 0
        else:
            logps.append(lp)
            means.append(mean)
    if not logps:
        empty = states.new_zeros(0, dtype=torch.float32)
        return empty, empty, filler
    return torch.cat(logps), torch.cat(means).detach(), filler


def _head_logps(head, h, targets, softcap):
    """``log_softmax(head(h))[targets]`` in float32, plus each row's mean logit. h: (m, H)."""
    logits = head(h).float()  # (m, V): the only logits that exist, one chunk at a time
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    return picked - torch.logsumexp(logits, dim=1), logits.mean(dim=1)


def _agreed_chunk_count(n_positions: int, chunk_size: int) -> int:
    """Number of head calls this forward makes: the max over ranks, so collectives line up."""
    count = math.ceil(n_positions / chunk_size)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([count], dtype=torch.long)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        count = int(t.item())
    return max(count, 1)


class RewardScorer(nn.Module):
    """Wraps a one-label sequence classifier: ``forward`` returns ``{"rewards": (N,) float32}``.

    The score is the head's output at the last non-pad token of each sequence, found the way
    transformers' ``*ForSequenceClassification`` heads do (the rightmost position whose id is not
    ``config.pad_token_id``), so left and right padding give the same score. When the pad token
    is the EOS token (a tokenizer without a pad token), the appended EOS counts as padding and the
    score is read at the token before it, exactly as in TRL.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (N, 1)
        return {"rewards": logits.squeeze(-1).float()}


def make_scorer(model: nn.Module, kind: str, chunk_size: int) -> nn.Module:
    """The scoring module an engine wraps: completion log-probs (causal LM) or rewards (classifier)."""
    if kind == "causal-lm":
        return SequenceScorer(model, chunk_size)
    if kind == "sequence-classification":
        return RewardScorer(model)
    raise ValueError(f"unknown model kind {kind!r}")
