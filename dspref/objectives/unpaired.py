"""KTO (arXiv 2402.01306) and BCO (arXiv 2404.04656): unpaired (prompt, completion, label) methods.

Both compare the policy with a frozen reference on each completion. KTO's reference point z0 is
the policy/reference KL estimated on mismatched pairs (each prompt with another row's completion
in the same micro-batch), scored in the same forward as the completions. BCO shifts the reward by
δ, a running mean of rewards over all ranks, updated before each training micro-batch's loss.
"""

from __future__ import annotations

import logging

import torch

from dspref import engine as eng
from dspref.losses import bco_loss, kto_loss
from dspref.objectives import Metrics, Stateless, add_router_aux, scalar_metric

log = logging.getLogger("dspref")

# Per-class means are pooled over ranks and micro-batches (weighted by count), as the issue asks;
# counts are totals of the logging window.
_CLASS_METRICS = ("rewards/chosen", "rewards/rejected", "logps/chosen", "logps/rejected", "logits/chosen",
                  "logits/rejected")
_REDUCTIONS = {**{name: "pooled" for name in _CLASS_METRICS}, "count/chosen": "total", "count/rejected": "total"}


def class_metrics(rewards, policy_logps, logits_sum, token_counts, desirable) -> Metrics:
    """``rewards/*``, ``logps/*``, ``logits/*`` of each class as (sum, count); ``count/*`` as totals."""
    out: Metrics = {}
    for name, mask in (("chosen", desirable), ("rejected", ~desirable)):
        n = mask.sum().float()
        out[f"rewards/{name}"] = (rewards[mask].detach().float().sum(), n)
        out[f"logps/{name}"] = (policy_logps[mask].detach().float().sum(), n)
        out[f"logits/{name}"] = (logits_sum[mask].float().sum(), token_counts[mask].sum().float())
        out[f"count/{name}"] = (n, torch.ones(()))
    return out


class _Unpaired(Stateless):
    needs_reference = True
    model_kind = "causal-lm"
    data_kind = "unpaired"
    headline_metrics = ("rewards/accuracies", "rewards/margins", "rewards/chosen", "rewards/rejected")
    metric_reductions = _REDUCTIONS
    derived_metrics = {"rewards/margins": ("rewards/chosen", "rewards/rejected")}
    with_kl = False

    def __init__(self, *, beta: float, max_length: int | None):
        self.beta = beta
        self.max_length = max_length
        self.reference = None  # set by run.py once the policy engine exists

    def collator(self, pad_token_id: int):
        from dspref.data.unpaired import UnpairedCollator

        return UnpairedCollator(pad_token_id, with_kl=self.with_kl, max_length=self.max_length)

    def _score(self, policy, batch, aux_rows: int | None = None):
        """Policy scores (with grad) and reference log-probs (no grad) of every row of the batch.

        ``aux_rows``: only the first rows count in the policy's MoE router aux loss (KTO's KL rows don't).
        While training, the rows after ``aux_rows`` (KTO's KL rows, whose log-probs are only used
        detached) are scored in a forward of their own without gradient: a forward that backward never
        revisits costs about a quarter of a trained one (no recomputation by gradient checkpointing, no
        backward through the layers or the head), which more than pays for their prompts being run
        apart from the trained rows' (``tests/test_kto_objective.py``: same loss and gradients).
        """
        rows = batch["input_ids"].shape[0] if aux_rows is not None else None
        if aux_rows is not None and aux_rows < rows and torch.is_grad_enabled():
            trained = policy(**_rows(batch, 0, aux_rows))
            with torch.no_grad():
                kl = policy(**_rows(batch, aux_rows, rows), router_aux=False)
            scores = {**trained, **{k: torch.cat([trained[k], kl[k].to(trained[k].device)])
                                    for k in ("logps", "token_counts", "logits_sum")}}
        else:
            extra = {}
            if aux_rows is not None:
                row_mask = torch.zeros(rows, dtype=torch.bool)
                row_mask[:aux_rows] = True
                extra["aux_row_mask"] = row_mask
            scores = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            completion_mask=batch["completion_mask"], **extra)
        ref = self.reference.logps(batch).to(scores["logps"].device).float()
        return scores, ref


def _rows(batch: dict, start: int, stop: int) -> dict:
    """The scorer inputs of rows ``start:stop``, without the columns that are padding in all of them
    (the collator pads on the right, to the longest row of the whole batch)."""
    mask = batch["attention_mask"][start:stop]
    width = max(int(mask.sum(dim=1).max()), 1) if mask.numel() else 1
    return {k: batch[k][start:stop, :width] for k in ("input_ids", "attention_mask", "completion_mask")}


class KTOObjective(_Unpaired):
    """``mean_B(w·L_KTO)``; z0 = clamp(mean over ranks of the micro-batch KL estimate, 0), no gradient."""

    def __init__(self, *, beta, loss_type, desirable_weight, undesirable_weight, max_length):
        super().__init__(beta=beta, max_length=max_length)
        self.loss_type = loss_type
        self.with_kl = loss_type == "kto"
        self.desirable_weight = desirable_weight
        self.undesirable_weight = undesirable_weight

    def compute(self, policy, batch: dict, *, train: bool):
        desirable = batch["label"].to(torch.bool)  # (B,)
        b = desirable.numel()
        # (N,) with N = 2B when KL rows follow the completions; those rows stay out of the aux loss
        scores, ref = self._score(policy, batch, aux_rows=b if self.with_kl else None)
        logps = scores["logps"]
        kl = torch.zeros((), device=logps.device)
        if self.with_kl:
            local = (logps[b:].detach() - ref[b:]).mean()
            world = torch.distributed.get_world_size()
            kl = (eng.all_reduce_sum(local.cpu().reshape(1)) / world).clamp(min=0).to(logps.device)[0]
        desirable = desirable.to(logps.device)
        losses, rewards, _ = kto_loss(logps[:b], ref[:b], desirable, kl=kl, beta=self.beta, loss_type=self.loss_type,
                                      desirable_weight=self.desirable_weight,
                                      undesirable_weight=self.undesirable_weight)
        metrics = class_metrics(rewards, logps[:b], scores["logits_sum"][:b], scores["token_counts"][:b], desirable)
        metrics["kl"] = scalar_metric(kl)
        return add_router_aux(losses.mean(), scores, self.router_aux_loss_coef, metrics), metrics


class BCOObjective(_Unpaired):
    """``mean_B(L_BCO)`` with the running reward mean δ (updated before the loss in training only).

    With an embedder (``embedding_model_name_or_path``, or ``embedder`` given directly), Underlying
    Distribution Matching (arXiv 2404.04656 §3.3, TRL's BCOTrainer) weights each undesirable row's loss by
    ``clamp(p/(1 − p + 1e-8), min_density_ratio, max_density_ratio)``, ``p = P(desirable | prompt)`` from a
    logistic-regression classifier on prompt embeddings, fitted once by :meth:`prepare` (or restored by
    :meth:`load_tensor_state`); desirable rows keep weight 1. Batches must then carry ``prompt_text``
    (datasets built with ``keep_prompt_text=True``). The metric ``udm_weight`` is the mean weight of the
    undesirable rows, pooled over ranks and micro-batches.
    """

    metric_reductions = {**_REDUCTIONS, "udm_weight": "pooled"}
    # The loss is centred on the running δ and weighted by the UDM classifier: a model without them has neither.
    state_metrics = ("loss", "delta", "udm_weight")

    def __init__(self, *, beta, max_length, embedding_model_name_or_path=None, embedder=None,
                 prompt_sample_size: int = 1024, min_density_ratio: float = 0.5, max_density_ratio: float = 10.0,
                 seed: int = 42, embedding_batch_size: int = 64):
        super().__init__(beta=beta, max_length=max_length)
        from dspref.udm import RunningMoments

        self.running = RunningMoments()
        if embedder is None and embedding_model_name_or_path:
            embedder = _load_embedder(embedding_model_name_or_path)
        self.embedder = embedder
        self.prompt_sample_size = int(prompt_sample_size)
        self.min_density_ratio = float(min_density_ratio)
        self.max_density_ratio = float(max_density_ratio)
        self.seed = int(seed)
        self.embedding_batch_size = int(embedding_batch_size)
        self.classifier = None  # DensityRatioClassifier once fitted or loaded

    @property
    def udm(self) -> bool:
        """Whether Underlying Distribution Matching is on."""
        return self.embedder is not None

    # ------------------------------------------------------------------ UDM classifier
    def prepare(self, train_dataset) -> None:
        """Fit the UDM classifier on the training prompts; every rank calls it, with the same dataset.

        A no-op without UDM or when a classifier is already there (fitted, or loaded from a checkpoint by
        :meth:`load_tensor_state`). Otherwise ``min(n_class, prompt_sample_size)`` prompts per class are drawn
        with replacement (``sample_prompt_indices`` with ``seed`` for the desirable rows, ``seed + 1`` for the
        undesirable ones: independent draws, as TRL's two ``np.random.choice`` calls), embedded with the
        work split over ranks and gathered (one ``all_gather_object``), and the classifier is fitted on the
        same embeddings on every rank (deterministic float64 LBFGS), so all ranks hold the same classifier.
        """
        if not self.udm or self.classifier is not None:
            return
        from dspref.udm import DensityRatioClassifier, sample_prompt_indices

        if "prompt_text" not in train_dataset.column_names:
            raise ValueError("BCO with UDM needs the prompts as text: build the unpaired datasets with "
                             "keep_prompt_text=True")
        labels = train_dataset["label"]
        desirable = [i for i, label in enumerate(labels) if label]
        undesirable = [i for i, label in enumerate(labels) if not label]
        if not desirable or not undesirable:
            raise ValueError("BCO with UDM needs both desirable and undesirable training rows")
        rows = [desirable[j] for j in sample_prompt_indices(len(desirable), self.prompt_sample_size, self.seed)]
        n_desirable = len(rows)
        rows += [undesirable[j] for j in sample_prompt_indices(len(undesirable), self.prompt_sample_size,
                                                               self.seed + 1)]
        texts = train_dataset.select_columns(["prompt_text"])[rows]["prompt_text"]
        embeddings = _embed_sharded(self.embedder, texts, self.embedding_batch_size)  # (n, d), same on all ranks
        target = torch.zeros(len(rows), dtype=torch.float64)
        target[:n_desirable] = 1.0
        self.classifier = DensityRatioClassifier().fit(embeddings, target)
        log.info("UDM: density-ratio classifier fitted on %d desirable and %d undesirable prompts",
                 n_desirable, len(rows) - n_desirable)

    def udm_weights(self, batch: dict, desirable: torch.Tensor) -> torch.Tensor:
        """``(B,)`` float64 on the CPU: the clamped density ratio on undesirable rows, 1 on desirable rows."""
        if self.classifier is None:
            raise RuntimeError("BCO with UDM: the density-ratio classifier is not fitted; call prepare(train_dataset) "
                               "(or load_tensor_state from a checkpoint) before training")
        if "prompt_text" not in batch:
            raise ValueError("BCO with UDM needs batch['prompt_text']: build the unpaired datasets with "
                             "keep_prompt_text=True")
        weights = torch.ones(desirable.numel(), dtype=torch.float64)
        rows = (~desirable.cpu()).nonzero().flatten().tolist()
        if rows:
            texts = [batch["prompt_text"][i] for i in rows]
            embeddings = self.embedder.embed(texts, batch_size=self.embedding_batch_size)
            weights[rows] = self.classifier.density_weights(embeddings, min_ratio=self.min_density_ratio,
                                                            max_ratio=self.max_density_ratio).cpu()
        return weights

    # ------------------------------------------------------------------ loss
    def compute(self, policy, batch: dict, *, train: bool):
        desirable = batch["label"].to(torch.bool)
        weights = self.udm_weights(batch, desirable) if self.udm else None  # per-rank, no collective
        scores, ref = self._score(policy, batch)
        logps = scores["logps"]
        desirable = desirable.to(logps.device)
        if train:
            rewards = self.beta * (logps.detach() - ref)
            self.running.update(rewards.double().cpu(), reduce_sum=eng.all_reduce_sum)
        delta = self.running.mean
        losses, rewards = bco_loss(logps, ref, desirable, beta=self.beta, delta=delta, udm_weights=weights)
        metrics = class_metrics(rewards, logps, scores["logits_sum"], scores["token_counts"], desirable)
        metrics["delta"] = scalar_metric(torch.tensor(float(delta)))
        if weights is not None:
            undesirable = ~desirable.cpu()
            metrics["udm_weight"] = (weights[undesirable].float().sum(), undesirable.sum().float())
        return add_router_aux(losses.mean(), scores, self.router_aux_loss_coef, metrics), metrics

    # ------------------------------------------------------------------ checkpoint state
    def state_dict(self) -> dict:
        return {"running": self.running.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "running" in state:
            self.running.load_state_dict(state["running"])

    def tensor_state(self) -> dict:
        """The UDM classifier's tensors (``udm/coef``, ``udm/intercept``, ``udm/C``); empty when there is none."""
        if self.classifier is None:
            return {}
        return {f"{_UDM_PREFIX}{name}": value for name, value in self.classifier.state_dict().items()}

    def load_tensor_state(self, tensors: dict) -> None:
        """Restore the classifier (then :meth:`prepare` does not refit); ignored without UDM or without its keys."""
        state = {k[len(_UDM_PREFIX):]: v for k, v in (tensors or {}).items() if k.startswith(_UDM_PREFIX)}
        if not self.udm or "coef" not in state:
            return
        from dspref.udm import DensityRatioClassifier

        classifier = DensityRatioClassifier()
        classifier.load_state_dict(state)
        self.classifier = classifier


_UDM_PREFIX = "udm/"


def _load_embedder(name_or_path: str):
    """The :class:`PromptEmbedder` of ``embedding_model_name_or_path``; a load failure is a ConfigError."""
    from dspref.config import ConfigError
    from dspref.embedding import PromptEmbedder

    try:
        return PromptEmbedder(name_or_path)
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"cannot load the embedding model from embedding_model_name_or_path={name_or_path!r}: "
                          f"{reason}") from None


def _embed_sharded(embedder, texts: list[str], batch_size: int) -> torch.Tensor:
    """Embeddings ``(n, d)`` float32 on the CPU of all ``texts``, identical on every rank: each rank embeds a
    contiguous slice and one ``all_gather_object`` joins them (rank order = text order)."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return embedder.embed(texts, batch_size=batch_size).float().cpu()
    rank, world = dist.get_rank(), dist.get_world_size()
    share = -(-len(texts) // world)
    mine = texts[rank * share:(rank + 1) * share]
    local = embedder.embed(mine, batch_size=batch_size).float().cpu() if mine else None
    parts: list = [None] * world
    dist.all_gather_object(parts, local)
    return torch.cat([p for p in parts if p is not None], dim=0)
