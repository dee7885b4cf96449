"""The scoring head: chunked log-probs and :class:`dspref.logps.TokenLogps` against full logits.

``TokenLogps`` computes ``log_softmax(logits)[target]`` with a blockwise logsumexp and a backward
that writes the gradient over the saved logits. These tests hold it to autograd's own
``log_softmax(-1).gather`` (values and gradients, fp32) and hold ``score_sequences`` (one kept
chunk and several recomputed ones, with and without a softcap) to the sums over the model's full
``[N, T, V]`` logits.
"""

from __future__ import annotations

import pytest
import torch

from dspref import logps as L


def _reference(logits, targets):
    return logits.log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)


@pytest.mark.parametrize("rows, vocab, scale", [(7, 50, 1.0), (130, 4099, 3.0), (1, 1, 1.0)])
def test_token_logps_equal_autograd_values_and_gradients(rows, vocab, scale):
    g = torch.Generator().manual_seed(rows)
    base = torch.randn(rows, vocab, generator=g) * scale
    targets = torch.randint(0, vocab, (rows,), generator=g)
    upstream = torch.randn(rows, generator=g)  # a different gradient per position, as a loss gives

    ours_in = base.clone().requires_grad_()
    ours = L.TokenLogps.apply(ours_in * 1.0, targets)  # a non-leaf, as the head's output is
    (ours * upstream).sum().backward()
    ref_in = base.clone().requires_grad_()
    ref = _reference(ref_in, targets)
    (ref * upstream).sum().backward()

    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(ours_in.grad, ref_in.grad, rtol=0, atol=1e-6)


def test_token_logps_blocks_cover_every_row(monkeypatch):
    """Rows split over several blocks (here 3 rows a block) give the values of one block."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(10, 33, generator=g)
    targets = torch.randint(0, 33, (10,), generator=g)
    whole = L.TokenLogps.apply(logits.clone(), targets)
    monkeypatch.setattr(L, "_row_block", lambda logits: 3)
    x = logits.clone().requires_grad_()
    blocked = L.TokenLogps.apply(x * 1.0, targets)
    blocked.sum().backward()
    torch.testing.assert_close(blocked, whole, rtol=0, atol=1e-6)
    torch.testing.assert_close(blocked, _reference(logits, targets), rtol=0, atol=1e-5)
    ref = logits.clone().requires_grad_()
    _reference(ref, targets).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=0, atol=1e-6)


def test_token_logps_masked_vocabulary_entries():
    """-inf logits (a masked vocabulary entry) get probability 0 and a zero gradient, as in autograd."""
    logits = torch.tensor([[0.5, float("-inf"), 1.5, -2.0], [float("-inf"), 3.0, float("-inf"), 0.0]])
    targets = torch.tensor([2, 1])
    x = logits.clone().requires_grad_()
    ours = L.TokenLogps.apply(x * 1.0, targets)
    ours.sum().backward()
    ref_in = logits.clone().requires_grad_()
    ref = _reference(ref_in, targets)
    ref.sum().backward()
    torch.testing.assert_close(ours, ref)
    torch.testing.assert_close(x.grad, ref_in.grad)
    assert x.grad[0, 1] == 0 and x.grad[1, 0] == 0


def test_token_logps_backward_allocates_no_logits_sized_gradient():
    """The gradient handed to the head is the saved logits' own storage, rewritten in place."""
    seen = {}
    logits = torch.randn(6, 40, requires_grad=True)
    head_out = logits * 1.0
    head_out.register_hook(lambda grad: seen.update(ptr=grad.data_ptr()))
    L.TokenLogps.apply(head_out, torch.arange(6)).sum().backward()
    assert seen["ptr"] == head_out.data_ptr()


def _tiny_lm(**config):
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                      intermediate_size=64, vocab_size=97, tie_word_embeddings=True, pad_token_id=0,
                      attn_implementation="eager", **config)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():  # logits of a trained model's spread, not a random init's ~0
        model.model.embed_tokens.weight.mul_(40)
    return model


def _batch():
    g = torch.Generator().manual_seed(5)
    lengths, prompts = [12, 9, 15, 6], [4, 5, 3, 2]
    ids = torch.randint(1, 97, (4, 15), generator=g)
    attention, completion = torch.zeros_like(ids), torch.zeros_like(ids)
    for i, (n, p) in enumerate(zip(lengths, prompts)):
        attention[i, :n], completion[i, p:n], ids[i, n:] = 1, 1, 0
    return ids, attention, completion


def _full_logits_logps(model, ids, attention, completion, softcap=None):
    logits = model(input_ids=ids, attention_mask=attention).logits[:, :-1].float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    token = logits.log_softmax(-1).gather(2, ids[:, 1:].unsqueeze(2)).squeeze(2)
    return (token * completion[:, 1:]).sum(dim=1)


@pytest.mark.parametrize("chunk_size", [1024, 7])  # 36 completion positions: one kept chunk, or six recomputed
@pytest.mark.parametrize("softcap", [None, 3.0])
def test_score_sequences_equal_full_logits_with_gradients(chunk_size, softcap):
    model = _tiny_lm()
    model.config.final_logit_softcapping = softcap  # read by score_sequences (Gemma-2's setting)
    ids, attention, completion = _batch()
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])

    ours = L.score_sequences(model, ids, attention, completion, chunk_size=chunk_size)
    (ours["logps"] * weights).sum().backward()
    ours_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = _full_logits_logps(model, ids, attention, completion, softcap)
    (ref * weights).sum().backward()

    assert ours["token_counts"].tolist() == [8, 4, 12, 4]
    assert ref.abs().min() > 1.0  # logits with a real spread: the check is not on near-uniform softmaxes
    torch.testing.assert_close(ours["logps"], ref, rtol=1e-5, atol=1e-4)
    for name, param in model.named_parameters():
        torch.testing.assert_close(ours_grads[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_balanced_chunks_make_the_same_head_calls_on_every_size():
    """1030 positions with chunk_size 1024 run as two chunks of 515 (not 1024 + 6)."""
    calls = []

    class Head(torch.nn.Linear):
        def forward(self, x):
            calls.append(x.shape[0])
            return super().forward(x)

    head = Head(8, 11, bias=False)
    states = torch.randn(1030, 8, requires_grad=True)
    targets = torch.randint(0, 11, (1030,))
    token, _, _ = L._chunked_token_logps(head, states, targets, 1024, None, states[:1] * 0)
    token.sum().backward()
    assert calls[:2] == [515, 515]  # forward; backward recomputes the same two chunks
    assert calls[2:] == [515, 515]
    ref = (states @ head.weight.t()).log_softmax(-1).gather(1, targets.unsqueeze(1)).squeeze(1)
    torch.testing.assert_close(token, ref, rtol=0, atol=1e-5)
