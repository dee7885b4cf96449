"""BCO's state outside the loss: the running reward mean δ and the UDM density-ratio classifier.

Pure torch, no ``torch.distributed`` import: a caller that runs on several ranks passes a
``reduce_sum`` function (e.g. ``torch.distributed.all_reduce``), so this module stays testable
in one process. Reference: TRL 1.13 ``trl.experimental.bco`` (``RunningMoments``,
``get_global_statistics``, the ``LogisticRegression(class_weight="balanced")`` classifier and
``_get_udm_weight``), written out in ``shared/reference/trl-loss-math.md`` §2.3–2.4.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

ReduceSum = Callable[[torch.Tensor], "torch.Tensor | None"]


def _reduce(t: torch.Tensor, reduce_sum: ReduceSum | None) -> torch.Tensor:
    """Sum ``t`` over ranks. ``reduce_sum`` may return the sum, or reduce in place and return
    ``None`` (as ``torch.distributed.all_reduce`` does)."""
    if reduce_sum is None:
        return t
    out = reduce_sum(t)
    return t if out is None else out


class RunningMoments:
    """Running mean and variance of BCO's implicit rewards; ``mean`` is the loss's δ.

    Starts at ``mean = 0, var = 1, count = 1e-24`` (TRL's ``RunningMoments``), so the first
    update sets ``mean`` to (almost exactly) the first batch's mean. Each ``update`` takes the
    batch's *global* statistics over all ranks, ``N = Σ n``, ``m = Σ x / N`` and the biased
    ``v = Σ (x − m)² / N`` (two passes, as TRL's ``get_global_statistics``), then merges:

        d = m − mean ;  tot = count + N
        mean ← mean + d·N/tot
        var  ← (var·count + d²·count·N/tot + v·N) / tot
        count ← tot

    Arithmetic is float64 throughout (TRL casts the batch mean/var to float32 first; the
    difference is float32 rounding, ~1e-7 relative). The state is three floats, JSON-ready.
    """

    def __init__(self) -> None:
        self._mean = 0.0
        self._var = 1.0
        self._count = 1e-24

    @torch.no_grad()
    def update(self, values: torch.Tensor, reduce_sum: ReduceSum | None = None) -> None:
        """Merge a batch of (local) rewards ``values`` into the running moments.

        ``reduce_sum(t)`` sums a float64 tensor over ranks (identity when ``None``); it is called
        exactly twice on every rank, also on a rank whose ``values`` is empty, so collectives
        line up: first on ``[Σx, n]``, then on ``[Σ(x − m)²]``. When the global count is 0 the
        state is left unchanged after the first call (every rank sees the same count, so every
        rank skips the second call). TRL would turn δ into NaN there.
        """
        x = values.detach().reshape(-1).to(torch.float64)
        sum_and_count = torch.stack([x.sum(), torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device)])
        sum_and_count = _reduce(sum_and_count, reduce_sum)
        total, n = float(sum_and_count[0]), float(sum_and_count[1])
        if n == 0:
            return
        batch_mean = total / n
        sq = ((x - batch_mean) ** 2).sum().reshape(1)
        batch_var = float(_reduce(sq, reduce_sum)[0]) / n

        d = batch_mean - self._mean
        tot = self._count + n
        self._mean += d * n / tot
        self._var = (self._var * self._count + d * d * self._count * n / tot + batch_var * n) / tot
        self._count = tot

    @property
    def mean(self) -> float:
        return self._mean

    @property
    def var(self) -> float:
        return self._var

    @property
    def count(self) -> float:
        return self._count

    def state_dict(self) -> dict[str, float]:
        return {"mean": self._mean, "var": self._var, "count": self._count}

    def load_state_dict(self, state: dict) -> None:
        """Load ``{"mean", "var", "count"}``; other keys are ignored, so TRL's ``running.json``
        (which also stores ``std``) loads too."""
        self._mean = float(state["mean"])
        self._var = float(state["var"])
        self._count = float(state["count"])


class DensityRatioClassifier:
    """Logistic regression ``P(desirable | prompt embedding)`` for BCO's Underlying Distribution Matching.

    The model of scikit-learn's ``LogisticRegression(class_weight="balanced")`` with its defaults
    (L2 penalty, ``C = 1.0``, fitted intercept, lbfgs), in torch. With labels ``y_i ∈ {0, 1}``
    (1 = desirable), logits ``z_i = w·e_i + b`` and balanced class weights
    ``s_i = n / (2·n_{y_i})``, ``fit`` minimises

        Σ_i s_i·[−y_i·logσ(z_i) − (1 − y_i)·logσ(−z_i)] + ‖w‖² / (2C)      (b unpenalised)

    (divided by ``Σ s_i = n`` for conditioning) in float64 with ``torch.optim.LBFGS`` (strong
    Wolfe line search) until the gradient's largest entry is below ``tol`` or the loss stops
    decreasing (float64's floor, around 1e-9). scikit-learn stops earlier (``tol=1e-4``,
    ``max_iter=100``), so coefficients agree to about that tolerance, not bit for bit.
    """

    def __init__(self, C: float = 1.0, max_iter: int = 1000, tol: float = 1e-9) -> None:
        self.C = C
        self.max_iter = max_iter
        self.tol = tol
        self.coef: torch.Tensor | None = None  # (d,) float64
        self.intercept: torch.Tensor | None = None  # () float64

    def fit(self, embeddings: torch.Tensor, labels: torch.Tensor) -> DensityRatioClassifier:
        """Fit on ``embeddings`` ``(n, d)`` and ``labels`` ``(n,)`` (bool or 0/1; 1 = desirable)."""
        x = embeddings.detach().to(device="cpu", dtype=torch.float64)
        if x.ndim != 2:
            raise ValueError(f"embeddings must be (n, d); got shape {tuple(embeddings.shape)}")
        y = labels.detach().reshape(-1).to(device="cpu", dtype=torch.float64)
        if y.shape[0] != x.shape[0]:
            raise ValueError(f"{x.shape[0]} embeddings but {y.shape[0]} labels")
        n_pos = float(y.sum())
        n = float(y.shape[0])
        if n_pos == 0 or n_pos == n:
            raise ValueError("DensityRatioClassifier.fit needs both desirable and undesirable examples")
        # balanced class weights n / (n_classes · n_c), normalised by their sum (= n)
        sample_weight = torch.where(y > 0.5, n / (2 * n_pos), n / (2 * (n - n_pos))) / n
        l2 = 1.0 / (2.0 * self.C * n)

        params = torch.zeros(x.shape[1] + 1, dtype=torch.float64, requires_grad=True)
        opt = torch.optim.LBFGS(
            [params],
            lr=1.0,
            max_iter=self.max_iter,
            tolerance_grad=self.tol,
            tolerance_change=1e-16,
            history_size=20,
            line_search_fn="strong_wolfe",
        )

        def closure() -> torch.Tensor:
            opt.zero_grad()
            w, b = params[:-1], params[-1]
            z = x @ w + b
            nll = -(sample_weight * (y * F.logsigmoid(z) + (1 - y) * F.logsigmoid(-z))).sum()
            loss = nll + l2 * (w * w).sum()
            loss.backward()
            return loss

        best = float(closure().detach())
        for _ in range(10):  # one step runs up to max_iter iterations; restart while it still makes progress
            opt.step(closure)
            loss = float(closure().detach())  # loss and gradient at the final point (not the last line-search probe)
            if params.grad.abs().max() <= self.tol or loss >= best:
                break
            best = loss
        final = params.detach()
        self.coef = final[:-1].clone()
        self.intercept = final[-1].clone()
        return self

    def _check_fitted(self) -> None:
        if self.coef is None or self.intercept is None:
            raise RuntimeError("DensityRatioClassifier is not fitted; call fit() or load_state_dict() first")

    @torch.no_grad()
    def prob_desirable(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``σ(w·e + b)`` for each row of ``embeddings`` ``(n, d)``: float64 ``(n,)`` on the
        embeddings' device (scikit-learn's ``predict_proba(E)[:, 1]``)."""
        self._check_fitted()
        x = embeddings.detach().to(torch.float64)
        z = x @ self.coef.to(x.device) + self.intercept.to(x.device)
        return torch.sigmoid(z)

    @torch.no_grad()
    def density_weights(
        self, embeddings: torch.Tensor, *, min_ratio: float = 0.5, max_ratio: float = 10.0
    ) -> torch.Tensor:
        """BCO's UDM weight for undesirable rows: ``clamp(p / (1 − p + 1e-8), min_ratio, max_ratio)``
        with ``p = P(desirable | prompt)``; float64 ``(n,)``."""
        p = self.prob_desirable(embeddings)
        return (p / (1 - p + 1e-8)).clamp(min=min_ratio, max=max_ratio)

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only (``torch.save``-able, loads with ``weights_only=True``)."""
        self._check_fitted()
        return {
            "coef": self.coef.clone(),
            "intercept": self.intercept.clone(),
            "C": torch.tensor(self.C, dtype=torch.float64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.coef = torch.as_tensor(state["coef"], dtype=torch.float64).detach().clone().cpu()
        self.intercept = torch.as_tensor(state["intercept"], dtype=torch.float64).detach().clone().cpu().reshape(())
        if "C" in state:
            self.C = float(state["C"])


def sample_prompt_indices(n_rows: int, sample_size: int, seed: int) -> list[int]:
    """Indices of the prompts that fit the UDM classifier: ``min(n_rows, sample_size)`` draws
    *with replacement* from ``range(n_rows)`` (as TRL's ``np.random.choice(n, size)``, so a
    prompt can appear twice), from a ``torch.Generator`` seeded with ``seed``: the same on every
    rank and every run, independent of the global RNG state.
    """
    if n_rows < 0 or sample_size < 0:
        raise ValueError(f"n_rows and sample_size must be >= 0; got {n_rows}, {sample_size}")
    k = min(n_rows, sample_size)
    if k == 0:
        return []
    gen = torch.Generator(device="cpu").manual_seed(seed)
    return torch.randint(0, n_rows, (k,), generator=gen).tolist()
