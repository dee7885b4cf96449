"""The one scoring forward: a causal LM -> per-sequence log-probs of the completion tokens.

Used by the policy, the reference, precompute and eval alike. It never builds the
``[batch, seq, vocab]`` float32 logits: the backbone gives the last hidden states, only the
positions that predict completion tokens are kept, and the output embedding is applied to
them in chunks. When there is more than one chunk, each is wrapped in a non-reentrant activation
checkpoint, so that its logits are freed right after the ``gather − logsumexp`` and recomputed in
backward; a single chunk keeps its logits (one head matmul fewer, the same peak memory). The
log-softmax itself is one autograd function (:class:`TokenLogps`) whose backward turns the kept
logits into their gradient in place: a chunk costs its logits once, not the logits plus the
softmax, gradient and scatter buffers that autograd's ``logsumexp``/``gather`` backward allocate.

Under ZeRO-3 the output embedding is sharded. Calling the ``lm_head`` *module* per chunk (not
reading ``lm_head.weight``) lets ZeRO's forward hooks gather and release the weight (TRL
issue 3368 is what happens otherwise). Every such call is a collective, so all ranks must
make the same number of calls: the chunk count is agreed with an all-reduce (MAX) and ranks
with fewer completion tokens run zero-weighted filler chunks.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Callable, Optional

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
    - ``aux_loss``     0-d MoE router load-balancing loss; only with ``router_aux=True`` on an MoE model

    ``router_aux`` is for the policy only: a reference scorer never computes an aux loss.
    ``aux_row_mask`` (N,) bool in ``forward`` keeps rows out of the aux loss (KTO's KL rows).
    """

    def __init__(self, model: nn.Module, chunk_size: int = 1024, *, router_aux: bool = False,
                 pack_tokens: Optional[int] = None, one_row: bool = False):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.router_aux = router_aux
        self.pack_tokens = pack_tokens  # padding-free: bin size in tokens (see pack_rows); None = padded rows
        self.one_row = one_row  # padding-free: one row per micro-batch where attention is per sequence

    def forward(self, input_ids, attention_mask, completion_mask, position_ids=None, aux_row_mask=None,
                router_aux=None):
        # router_aux=False lets a caller borrow the policy's scorer without the aux loss (the
        # adapter-disabled reference); None keeps the scorer's own setting.
        return score_sequences(
            self.model, input_ids, attention_mask, completion_mask,
            chunk_size=self.chunk_size, position_ids=position_ids,
            router_aux=self.router_aux if router_aux is None else router_aux, aux_row_mask=aux_row_mask,
            pack_tokens=self.pack_tokens, one_row=self.one_row,
        )


def score_sequences(model, input_ids, attention_mask, completion_mask, *, chunk_size=1024, position_ids=None,
                    router_aux=False, aux_row_mask=None, pack_tokens=None, one_row=False):
    """Per-sequence summed completion log-probs of ``model`` without full logits (see module doc).

    With ``router_aux`` and an MoE model (see :func:`moe_aux_spec`) the backbone also returns its
    router logits and the result carries ``aux_loss``, the family's load-balancing loss over the
    non-padding tokens of the rows ``aux_row_mask`` keeps (all rows when it is None).

    ``pack_tokens`` (padding-free): the rows' real tokens are packed into bins of at most that many
    tokens (:func:`pack_rows`) and the backbone runs on the bins, with ``position_ids`` restarting at
    each sequence and no attention mask, so that transformers attends within each sequence only
    (block-diagonal causal mask for sdpa/eager; variable-length kernels for flash-attention). The
    result is indexed by the original rows, as without packing. ``one_row``: see :func:`bin_tokens`.
    """
    backbone, head = model.get_decoder(), model.get_output_embeddings()
    spec = moe_aux_spec(model) if router_aux else None
    extra = {"output_router_logits": True} if spec is not None else {}
    # Position t predicts token t+1: keep only the positions whose target is a completion token.
    target_mask = completion_mask[:, 1:].bool()  # (N, T-1)
    packed = None
    if pack_tokens:
        # The shared-prompt layout needs dspref's per-sequence attention; the MoE aux loss counts every
        # row's prompt tokens, so it keeps one copy per row.
        share = spec is None and _attention_of(model) == "dspref_sdpa"
        groups = shared_prompts(input_ids, attention_mask, completion_mask) if share else None
        packed = pack_rows(attention_mask, bin_tokens(model, pack_tokens, one_row), groups or None)
    if packed is None:
        out = backbone(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False, **extra,
        )
        hidden = out.last_hidden_state  # (N, T, H)
        states = hidden[:, :-1][target_mask]  # (M, H)
        aux_mask = attention_mask
    else:
        out = backbone(input_ids=packed.gather(input_ids), attention_mask=None, position_ids=packed.position_ids,
                       use_cache=False, dspref_packed=packed.segments or True, **extra)  # see dspref.attention
        hidden = out.last_hidden_state  # (bins, L, H)
        states = packed.states(hidden, target_mask)  # (M, H), the same rows in the same order as above
        aux_mask = packed.token_mask(aux_row_mask)
        aux_row_mask = None  # folded into aux_mask
    targets = input_ids[:, 1:][target_mask]  # (M,)
    seq_index = target_mask.nonzero()[:, 0]  # (M,) which sequence each position belongs to
    softcap = getattr(model.config, "final_logit_softcapping", None)

    # Filler chunks read a zero row tied to the hidden states: their backward must finish before
    # the backbone's (autograd waits for every consumer of `hidden`), so every rank makes its
    # head calls in the same order relative to the layers' parameter gathers.
    anchor = hidden[0, :1] * 0  # (1, H)
    token_logps, token_logit_means, filler = _chunked_token_logps(head, states, targets, chunk_size, softcap, anchor)
    n = input_ids.shape[0]
    logps = hidden.new_zeros(n, dtype=torch.float32).index_add(0, seq_index, token_logps)
    logps = logps + filler  # exact zero; keeps filler chunks (if any) in the backward graph
    logits_sum = hidden.new_zeros(n, dtype=torch.float32).index_add(0, seq_index, token_logit_means)
    token_counts = target_mask.sum(dim=1)
    result = {"logps": logps, "token_counts": token_counts, "logits_sum": logits_sum}
    if spec is not None:
        result["aux_loss"] = spec.loss(out.router_logits, aux_mask, aux_row_mask)
    return result


# Attention implementations that attend within each packed sequence (no dense row mask).
PER_SEQUENCE_ATTENTION = ("dspref_sdpa", "flash_attention_2", "flash_attention_3")


def bin_tokens(model, pack_tokens: int, one_row: bool) -> int:
    """The packed-row capacity for ``model``: bins are bounded (``pack_tokens``) because attention over a
    row under a dense block-diagonal mask costs the row's length squared. A model that attends per
    sequence does not pay that, so with ``one_row`` its micro-batch is packed into a single row: no
    bin is padded up to the fullest one."""
    if one_row and _attention_of(model) in PER_SEQUENCE_ATTENTION:
        return 1 << 62
    return pack_tokens


def _attention_of(model) -> Optional[str]:
    """The attention implementation the (possibly PEFT-wrapped) model runs with."""
    return getattr(getattr(_hf_model(model), "config", None), "_attn_implementation", None)


@dataclass(frozen=True)
class PackedRows:
    """Where each real token of a padded ``(N, T)`` batch sits in the packed ``(bins, L)`` batch.

    ``flat`` (N, T) long: index into the flattened bins of each real token, −1 on padding.
    ``position_ids`` (bins, L): 0, 1, … within each sequence; the unused tail of a bin counts as one
    more sequence of its own (its outputs are never read). ``row_of`` (bins, L): the source row of
    each packed token, −1 on the tail.
    """

    flat: torch.Tensor
    position_ids: torch.Tensor
    row_of: torch.Tensor
    segments: Optional[list] = None  # with shared prefixes: per bin, (start, end, prefix_start, prefix_end)

    def gather(self, values: torch.Tensor, fill=0) -> torch.Tensor:
        """``values`` (N, T) laid out as the bins (bins, L); ``fill`` in the tails."""
        out = values.new_full((self.row_of.numel(),), fill)
        real = self.flat >= 0
        out[self.flat[real]] = values[real]
        return out.view_as(self.row_of)

    def states(self, hidden: torch.Tensor, target_mask: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(M, H)`` of the positions predicting the targets ``target_mask`` (N, T-1) keeps."""
        index = self.flat[:, :-1][target_mask]
        if (index < 0).any():  # a target whose predecessor is padding: left padding with an empty prompt
            raise ValueError("padding_free: a completion token follows a padding token; pad on the right")
        return hidden.reshape(-1, hidden.shape[-1])[index]

    def token_mask(self, row_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """(bins, L) long: 1 on real tokens of the rows ``row_mask`` keeps (all rows when None)."""
        keep = self.row_of >= 0
        if row_mask is not None:
            keep = keep & row_mask.to(keep.device)[self.row_of.clamp(min=0)]
        return keep.long()

    def index_of(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat packed index of token ``positions[i]`` of row ``rows[i]``."""
        return self.flat[rows, positions]


def pack_rows(attention_mask: torch.Tensor, bin_tokens: int, prefix_groups: Optional[list] = None) -> PackedRows:
    """Pack the rows' real tokens (``attention_mask`` 1; contiguous in each row) into bins.

    ``prefix_groups`` (optional, see :func:`shared_prompts`): ``[(rows, prefix_length), ...]``, rows whose
    first ``prefix_length`` real tokens are identical. Such a group is laid out once as the prefix
    followed by each row's remaining tokens (positions continuing from the prefix), and the result's
    ``segments`` tell :mod:`dspref.attention` that each of those parts attends to the prefix and to
    itself: the shared prompt is computed once. Rows in no group are groups of their own.

    First-fit decreasing: groups longest first, each into the first bin with room for it, bins of
    ``max(bin_tokens, longest group)`` tokens; a group is never split. ``L`` is the fullest bin's fill.
    The order inside a bin follows the batch order, so the packing is deterministic.
    Attention over a bin costs ~L² with a dense block-diagonal mask, which is why bins are bounded
    (per-sequence attention, ``dspref_sdpa`` or flash-attention's variable-length kernel, does not pay it).
    """
    mask = attention_mask.bool().cpu()
    lengths = mask.sum(dim=1).tolist()
    grouped = {row for rows, _ in (prefix_groups or []) for row in rows}
    groups = [(list(rows), int(p)) for rows, p in (prefix_groups or [])]
    groups += [([row], 0) for row in range(len(lengths)) if row not in grouped]
    groups.sort(key=lambda g: min(g[0]))
    sizes = [p + sum(lengths[r] - p for r in rows) for rows, p in groups]
    capacity = max([int(bin_tokens)] + sizes)
    fills: list[int] = []
    members: list[list[int]] = []
    for g in sorted(range(len(groups)), key=lambda g: (-sizes[g], g)):
        for b, fill in enumerate(fills):
            if fill + sizes[g] <= capacity:
                fills[b] += sizes[g]
                members[b].append(g)
                break
        else:
            fills.append(sizes[g])
            members.append([g])
    width = max(fills) if fills else 1
    n_rows, n_cols = mask.shape
    flat = torch.full((n_rows, n_cols), -1, dtype=torch.long)
    position_ids = torch.zeros(len(fills), width, dtype=torch.long)
    row_of = torch.full((len(fills), width), -1, dtype=torch.long)
    segments: list[list[tuple[int, int, int, int]]] = []  # per bin: (start, end, prefix_start, prefix_end)
    columns = torch.arange(n_cols)
    for b, in_bin in enumerate(members):
        offset, bin_segments = 0, []
        for g in sorted(in_bin):
            rows, p = groups[g]
            if p:
                position_ids[b, offset:offset + p] = torch.arange(p)
                row_of[b, offset:offset + p] = rows[0]
                bin_segments.append((offset, offset + p, -1, -1))
                prefix = (offset, offset + p)
                offset += p
            for row in rows:
                cols = columns[mask[row]]
                n = lengths[row] - p
                if p:
                    flat[row, cols[:p]] = b * width + prefix[0] + torch.arange(p)
                flat[row, cols[p:]] = b * width + offset + torch.arange(n)
                position_ids[b, offset:offset + n] = torch.arange(p, p + n)
                row_of[b, offset:offset + n] = row
                bin_segments.append((offset, offset + n, *(prefix if p else (-1, -1))))
                offset += n
        position_ids[b, offset:] = torch.arange(width - offset)
        if offset < width:
            bin_segments.append((offset, width, -1, -1))
        segments.append(bin_segments)
    device = attention_mask.device
    return PackedRows(flat=flat.to(device), position_ids=position_ids.to(device), row_of=row_of.to(device),
                      segments=segments if prefix_groups else None)


def shared_prompts(input_ids: torch.Tensor, attention_mask: torch.Tensor, completion_mask: torch.Tensor) -> list:
    """Groups of rows with the same prompt: ``[(rows, prompt_length), ...]`` for :func:`pack_rows`.

    CPO's chosen and rejected rows share their prompt, and so do KTO's completion and KL rows; the
    prompt is what comes before a row's first completion token. Right-padded rows only (the
    collators' layout); rows without a prompt or without a completion are left alone.
    """
    if not bool(attention_mask[:, 0].all()):
        return []
    has_completion = completion_mask.bool().any(dim=1)
    prompt_lengths = completion_mask.bool().int().argmax(dim=1)
    by_prompt: dict[tuple, list[int]] = {}
    for row in range(input_ids.shape[0]):
        p = int(prompt_lengths[row])
        if has_completion[row] and p > 0:
            by_prompt.setdefault(tuple(input_ids[row, :p].tolist()), []).append(row)
    return [(rows, len(prompt)) for prompt, rows in by_prompt.items() if len(rows) > 1]


@dataclass(frozen=True)
class MoeAuxSpec:
    """How an MoE family computes its router load-balancing loss (``transformers``' own function)."""

    func: Callable  # load_balancing_loss_func(gate_logits, num_experts, top_k, attention_mask)
    num_experts: int
    top_k: int

    def loss(self, router_logits, attention_mask, row_mask=None) -> torch.Tensor:
        """0-d float32 aux loss; padding (``attention_mask`` 0) and rows with ``row_mask`` False excluded."""
        if router_logits is None or (isinstance(router_logits, (tuple, list)) and len(router_logits) == 0):
            raise RuntimeError("the MoE backbone returned no router logits although output_router_logits=True "
                               "was passed; this model cannot compute the router aux loss (set "
                               "router_aux_loss_coef: 0)")
        logits = tuple(router_logits)
        mask = attention_mask
        if mask is None and row_mask is not None:  # (N, T) all ones: each layer's logits are (N·T, E)
            mask = torch.ones(row_mask.shape[0], logits[0].shape[0] // row_mask.shape[0], device=logits[0].device)
        if row_mask is not None:
            mask = mask * row_mask.to(mask.device, mask.dtype).reshape(-1, 1)
        aux = self.func(logits, self.num_experts, self.top_k, mask)
        if not isinstance(aux, torch.Tensor):  # the function returns 0 when it got no logits
            aux = logits[0].new_zeros(())
        return aux.float().reshape(())


def _hf_model(model: nn.Module) -> nn.Module:
    """The transformers model under a PEFT wrapper (or ``model`` itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_moe(model_or_config) -> bool:
    """Whether the (text) config declares ``output_router_logits``: the mark of a router-based MoE model."""
    config = getattr(model_or_config, "config", model_or_config)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return hasattr(text, "output_router_logits")


def moe_aux_spec(model: nn.Module) -> Optional[MoeAuxSpec]:
    """The model family's ``load_balancing_loss_func`` with its expert count and top-k; None for a dense model.

    The function comes from the model's own modelling module (Mixtral's as a fallback, the same
    Switch-Transformer loss that the other families copy).
    """
    hf = _hf_model(model)
    if not is_moe(hf):
        return None
    config = hf.config.get_text_config()
    num_experts = next((getattr(config, k) for k in ("num_local_experts", "num_experts", "n_routed_experts")
                        if getattr(config, k, None)), None)
    top_k = getattr(config, "num_experts_per_tok", None)
    if not num_experts or not top_k:
        raise ValueError(f"{type(hf).__name__}: the config has output_router_logits but no expert count / "
                         f"num_experts_per_tok; set router_aux_loss_coef: 0 to train it without the aux loss")
    func = getattr(sys.modules.get(type(hf).__module__), "load_balancing_loss_func", None)
    if func is None:
        from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func as func
    return MoeAuxSpec(func=func, num_experts=int(num_experts), top_k=int(top_k))


def _chunked_token_logps(head, states, targets, chunk_size, softcap, anchor):
    """Log-prob of each target token from its hidden state, ``chunk_size`` positions at a time.

    Returns ``token_logps (M,)`` float32, ``token_logit_means (M,)`` float32 detached, and a
    zero scalar tied to the filler chunks' outputs (0 when there are none).
    """
    n_positions = states.shape[0]
    most = _agreed_max_positions(n_positions)  # the same on every rank
    n_chunks = max(math.ceil(most / chunk_size), 1)
    chunk_size = max(math.ceil(most / n_chunks), 1)  # balanced: 1030 positions are 2 x 515, not 1024 + 6
    # One chunk: keep its logits for backward instead of recomputing them (one head matmul fewer,
    # ~8% of a step for a small model with a large vocabulary). Its backward peak (logits, softmax,
    # gradient) is the same as a recomputed chunk's, so this costs no memory. Several chunks: each is
    # recomputed, so that at most one chunk's logits exist at a time. ``most`` is agreed over ranks,
    # so every rank makes the same head calls in backward (each one a ZeRO-3 collective).
    recompute = n_chunks > 1
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
        if torch.is_grad_enabled() and recompute:
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
    with torch.no_grad():
        means = logits.mean(dim=1)  # metrics only
    return TokenLogps.apply(logits, targets), means


def _row_block(logits: torch.Tensor) -> int:
    """Rows of ``logits`` per elementwise pass: ~8 MiB of fp32 on CPU (the pass stays in cache),
    ~128 MiB on an accelerator (few kernel launches)."""
    budget = 2 ** 21 if logits.device.type == "cpu" else 2 ** 25
    return max(budget // max(logits.shape[1], 1), 1)


class TokenLogps(torch.autograd.Function):
    """``logits.log_softmax(-1).gather(1, targets)`` for float32 ``logits`` (m, V), in two passes.

    Forward: the per-row logsumexp, a block of rows at a time (``torch.logsumexp`` builds a whole
    (m, V) temporary; this builds one block's). Backward: the gradient ``g·(onehot − softmax)`` is
    written over the saved logits, block by block, and returned as the logits' gradient, so backward
    allocates nothing of size (m, V). That is safe because the logits are an output no other autograd
    node saves (the head's matmul keeps its input and weight; an ``.float()`` upcast or a softcap's
    final multiply keep nothing); were one to save them, autograd's version check would raise
    instead of computing a wrong gradient.
    """

    @staticmethod
    def forward(ctx, logits, targets):
        block = _row_block(logits)
        lse = logits.new_empty(logits.shape[0])
        for start in range(0, logits.shape[0], block):
            rows = logits[start:start + block]
            top = rows.amax(dim=1, keepdim=True)
            # -inf rows (a fully masked vocabulary) would give nan: shift them by 0 instead
            top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
            lse[start:start + block] = (rows - top).exp_().sum(dim=1).log_().add_(top.squeeze(1))
        picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
        ctx.save_for_backward(logits, targets, lse)
        return picked - lse

    @staticmethod
    def backward(ctx, grad):
        logits, targets, lse = ctx.saved_tensors
        block = _row_block(logits)
        for start in range(0, logits.shape[0], block):
            rows = logits[start:start + block]
            rows.sub_(lse[start:start + block, None]).exp_().mul_(-grad[start:start + block, None])
        logits.scatter_add_(1, targets.unsqueeze(1), grad.unsqueeze(1).to(logits.dtype))
        return logits, None


def _agreed_max_positions(n_positions: int) -> int:
    """The most completion positions any rank scores in this forward (max over ranks): it fixes the
    number of head calls, so that ZeRO-3's collectives line up."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        t = torch.tensor([n_positions], dtype=torch.long)
        if dist.get_backend() == "nccl":
            t = t.cuda()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        n_positions = int(t.item())
    return n_positions


class RewardScorer(nn.Module):
    """Wraps a one-label sequence classifier: ``forward`` returns ``{"rewards": (N,) float32}``.

    The score is the head's output at the last non-pad token of each sequence, found the way
    transformers' ``*ForSequenceClassification`` heads do (the rightmost position whose id is not
    ``config.pad_token_id``), so left and right padding give the same score. When the pad token
    is the EOS token (a tokenizer without a pad token), the appended EOS counts as padding and the
    score is read at the token before it, exactly as in TRL.

    With ``router_aux=True`` on an MoE classifier the result also carries ``aux_loss``: the
    classifier's own ``aux_loss`` output when it has one, else the family's load-balancing loss
    over the router logits its base model returns (captured with a forward hook, since the
    generic classification heads drop them), padding excluded.

    ``pack_tokens`` (padding-free): the backbone runs on packed bins (:func:`pack_rows`) and the
    head only on the one position per sequence that is scored; needs a classifier whose head is
    ``score`` on top of its base model (the Llama/Qwen/Mistral/Gemma family layout).
    """

    def __init__(self, model: nn.Module, *, router_aux: bool = False, pack_tokens: Optional[int] = None,
                 one_row: bool = False):
        super().__init__()
        self.model = model
        self.router_aux = router_aux
        self.pack_tokens = pack_tokens
        self.one_row = one_row
        if pack_tokens:
            classifier_parts(model)  # refuse a layout packing cannot serve before any training

    def forward(self, input_ids, attention_mask):
        spec = moe_aux_spec(self.model) if self.router_aux else None
        if self.pack_tokens:
            return self._packed(input_ids, attention_mask, spec)
        if spec is None:
            logits = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits  # (N, 1)
            return {"rewards": logits.squeeze(-1).float()}
        hf = _hf_model(self.model)
        base = getattr(hf, getattr(hf, "base_model_prefix", "model"), None)
        captured = {}
        handle = None
        if isinstance(base, nn.Module) and base is not hf:
            handle = base.register_forward_hook(
                lambda _m, _a, output: captured.__setitem__("router_logits", getattr(output, "router_logits", None)))
        try:
            out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                             output_router_logits=True)
        finally:
            if handle is not None:
                handle.remove()
        own = getattr(out, "aux_loss", None)
        if own is not None:
            aux = own.float().reshape(()) if isinstance(own, torch.Tensor) else out.logits.new_zeros((), dtype=torch.float32)
        else:
            router_logits = getattr(out, "router_logits", None)
            aux = spec.loss(router_logits if router_logits is not None else captured.get("router_logits"),
                            attention_mask)
        return {"rewards": out.logits.squeeze(-1).float(), "aux_loss": aux}

    def _packed(self, input_ids, attention_mask, spec):
        base, head, pad_id = classifier_parts(self.model)
        share = spec is None and _attention_of(self.model) == "dspref_sdpa"
        groups = paired_prefixes(input_ids, attention_mask) if share else None
        packed = pack_rows(attention_mask, bin_tokens(self.model, self.pack_tokens, self.one_row), groups or None)
        extra = {"output_router_logits": True} if spec is not None else {}
        out = base(input_ids=packed.gather(input_ids), attention_mask=None, position_ids=packed.position_ids,
                   use_cache=False, dspref_packed=packed.segments or True, **extra)
        hidden = out.last_hidden_state  # (bins, L, H)
        # The scored position, as transformers finds it on the padded row: the rightmost non-pad id.
        n, t = input_ids.shape
        positions = torch.arange(t, device=input_ids.device)
        if pad_id is None:
            last = torch.full((n,), t - 1, dtype=torch.long, device=input_ids.device)
        else:
            last = (positions * (input_ids != pad_id) * attention_mask.bool()).argmax(dim=-1)
        index = packed.index_of(torch.arange(n, device=input_ids.device), last)
        rewards = head(hidden.reshape(-1, hidden.shape[-1])[index]).squeeze(-1).float()  # (N,)
        result = {"rewards": rewards}
        if spec is not None:
            result["aux_loss"] = spec.loss(out.router_logits, packed.token_mask())
        return result


def paired_prefixes(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list:
    """``[([i, i + N/2], common prefix length), ...]``: a reward batch stacks [chosen; rejected], and each
    pair's common leading tokens (their prompt) are packed once (:func:`pack_rows`). The prefix stops
    at least one token before the shorter sequence ends, so each row keeps tokens of its own."""
    n = input_ids.shape[0]
    if n % 2:
        return []
    mask = attention_mask.bool()
    groups = []
    for i in range(n // 2):
        a, b = input_ids[i][mask[i]], input_ids[i + n // 2][mask[i + n // 2]]
        shortest = min(a.numel(), b.numel())
        differ = (a[:shortest] != b[:shortest]).nonzero()
        common = int(differ[0]) if differ.numel() else shortest
        common = min(common, shortest - 1)
        if common > 0:
            groups.append(([i, i + n // 2], common))
    return groups


def classifier_parts(model: nn.Module):
    """``(base model, score head, pad_token_id)`` of a ``*ForSequenceClassification`` (under PEFT too)."""
    hf = _hf_model(model)
    base = getattr(hf, getattr(hf, "base_model_prefix", "model"), None)
    head = getattr(hf, "score", None)
    if not isinstance(base, nn.Module) or base is hf or not isinstance(head, nn.Module):
        raise ValueError(f"padding_free: {type(hf).__name__} has no base model + `score` head that dspref can run "
                         f"on packed rows; set padding_free: false for this model")
    return base, head, getattr(hf.config, "pad_token_id", None)


def make_scorer(model: nn.Module, kind: str, chunk_size: int, *, router_aux: bool = False,
                pack_tokens: Optional[int] = None, one_row: bool = False) -> nn.Module:
    """The scoring module an engine wraps: completion log-probs (causal LM) or rewards (classifier).

    ``router_aux`` (the policy's, never a reference's): also return the MoE router aux loss.
    ``pack_tokens``: padding-free bins of at most that many tokens (None: padded rows).
    """
    if kind == "causal-lm":
        return SequenceScorer(model, chunk_size, router_aux=router_aux, pack_tokens=pack_tokens, one_row=one_row)
    if kind == "sequence-classification":
        return RewardScorer(model, router_aux=router_aux, pack_tokens=pack_tokens, one_row=one_row)
    raise ValueError(f"unknown model kind {kind!r}")


def resolve_router_aux_coef(coef: Optional[float], model_or_config) -> float:
    """The aux-loss weight a run uses: 0 for a dense model; else ``coef``, or the model config's
    ``router_aux_loss_coef``, or 0.001 (TRL's default). Read from the unwrapped model's config."""
    config = getattr(_hf_model(model_or_config), "config", model_or_config)
    if not is_moe(config):
        return 0.0
    if coef is not None:
        return float(coef)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    own = getattr(text, "router_aux_loss_coef", None)
    return float(own) if own is not None else 0.001
