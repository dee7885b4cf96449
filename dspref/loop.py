"""The one training loop. It never branches on the method: the objective decides the loss.

Data order is a pure function of ``(seed, epoch)`` and the optimizer step, so a resumed run
consumes exactly the micro-batches an uninterrupted one would have.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass

import torch

from dspref import checkpoint as ckpt
from dspref import engine as eng
from dspref.tracking import make_progress


class NonFiniteLossError(RuntimeError):
    pass


@dataclass
class LoopSettings:
    """Plain values the loop needs (taken from the config by ``run.py``)."""

    total_steps: int
    micro_batches_per_epoch: int
    gradient_accumulation_steps: int
    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    logging_steps: int
    eval_steps: int | None
    eval_on_start: bool
    save_steps: int | None
    save_total_limit: int | None
    stop_after_steps: int | None
    output_dir: str
    seed: int
    group_by_length: bool = False


@dataclass
class LoopResult:
    step: int
    stopped_early: bool
    last_eval: dict
    preempted: str | None = None  # the signal that stopped the run (a checkpoint was saved)


# --------------------------------------------------------------------------- batch order
def micro_batches_per_epoch(n_rows: int, *, world_size: int, micro_batch: int, accumulation: int) -> int:
    """Micro-batches each rank runs per epoch: whole batches, a whole number of optimizer steps."""
    per_rank = (n_rows // world_size) // micro_batch
    return per_rank - per_rank % accumulation


MEGA_BATCH = 50  # micro-batches per length-sorted group (transformers' LengthGroupedSampler uses 50 too)


def train_order(n_rows: int, *, epoch: int, seed: int, rank: int, world_size: int, micro_batch: int,
                lengths: list[int] | None = None) -> list[list[int]]:
    """This rank's micro-batches (row indices) for ``epoch``: a seeded shuffle, strided over ranks.

    With ``lengths`` (one per row; ``group_by_length``), this rank's shuffled rows are cut into groups of
    ``MEGA_BATCH`` micro-batches and each group is sorted longest first before it is cut into
    micro-batches: rows of similar length share a batch (less padding), each rank still sees the same
    rows as without grouping, and the order stays a pure function of (seed, epoch, rank).
    """
    g = torch.Generator().manual_seed(seed + epoch)
    order = torch.randperm(n_rows, generator=g)
    usable = (n_rows // world_size) * world_size
    mine = order[:usable][rank::world_size].tolist()
    n = len(mine) // micro_batch
    mine = mine[:n * micro_batch]
    if lengths is not None:
        size = MEGA_BATCH * micro_batch
        mine = [row for start in range(0, len(mine), size)
                for row in sorted(mine[start:start + size], key=lambda r: -lengths[r])]
    return [mine[i * micro_batch:(i + 1) * micro_batch] for i in range(n)]


def trained_tokens(batch: dict) -> int:
    """Non-padding tokens of the sequences the policy trains on (KTO's KL rows excluded): tokens/s counts these."""
    rows = batch.get("trained_rows")
    mask = batch["attention_mask"] if rows is None else batch["attention_mask"][:rows]
    return int(mask.sum())


def row_lengths(dataset) -> list[int]:
    """Tokens of each row's longest sequence: prompt + the longer of chosen/rejected, or prompt + completion."""
    columns = set(dataset.column_names)
    sizes = {name: [len(x) for x in dataset[name]] for name in ("prompt_ids", "chosen_ids", "rejected_ids",
                                                                 "completion_ids") if name in columns}
    if not sizes:
        raise ValueError(f"group_by_length: the dataset has no token-id columns (found {sorted(columns)})")
    n = len(dataset)
    prompt = sizes.get("prompt_ids", [0] * n)
    longest = [max(values) for values in zip(*(sizes[k] for k in sizes if k != "prompt_ids"))] or [0] * n
    return [p + c for p, c in zip(prompt, longest)]


def eval_order(n_rows: int, *, rank: int, world_size: int, batch_size: int) -> list[tuple[list[int], bool]]:
    """Every eval row exactly once over all ranks; each rank runs the same number of batches.

    Ranks whose share runs out repeat a batch flagged ``False`` (not counted): under ZeRO-3 each
    forward is a collective, so all ranks must make the same number of them.
    """
    share = math.ceil(n_rows / world_size)
    mine = list(range(rank * share, min((rank + 1) * share, n_rows)))
    n_batches = max(1, math.ceil(share / batch_size))
    batches = [(mine[i * batch_size:(i + 1) * batch_size], True) for i in range(n_batches)]
    filler = mine[:batch_size] or [0]
    return [(rows, True) if rows else (filler, False) for rows, _ in batches]


def train_batches(dataset, collate, *, seed: int, micro_batch: int, per_epoch: int, start: int, stop: int,
                  group_by_length: bool = False):
    """Yield ``(key, batch)`` for the micro-batches ``start .. stop-1`` of this rank, in training order.

    ``key`` = ("train", epoch, index) names a micro-batch for caches (precomputed reference log-probs).
    """
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    lengths = row_lengths(dataset) if group_by_length else None
    order, order_epoch = None, None
    for micro in range(start, stop):
        epoch, index = divmod(micro, per_epoch)
        if order_epoch != epoch:
            order = train_order(len(dataset), epoch=epoch, seed=seed, rank=rank, world_size=world,
                                micro_batch=micro_batch, lengths=lengths)
            order_epoch = epoch
        batch = collate(fetch(dataset, order[index]))
        batch["batch_key"] = ("train", epoch, index)
        batch["row_indices"] = order[index]  # training-set rows, named when the loss is not finite
        yield batch["batch_key"], batch


def eval_batches(dataset, collate, *, batch_size: int, split: str = "eval"):
    """Yield ``(key, batch, counted)`` for this rank's eval batches (see :func:`eval_order`)."""
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    for i, (rows, counted) in enumerate(eval_order(len(dataset), rank=rank, world_size=world, batch_size=batch_size)):
        batch = collate(fetch(dataset, rows))
        batch["batch_key"] = (split, 0, i)
        yield batch["batch_key"], batch, counted


def fetch(dataset, indices: list[int]) -> list[dict]:
    """Rows ``indices`` of a ``datasets.Dataset`` as a list of dicts."""
    columns = dataset[indices]
    keys = list(columns)
    return [dict(zip(keys, values)) for values in zip(*(columns[k] for k in keys))]


# --------------------------------------------------------------------------- metrics
class MetricWindow:
    """Per-micro-batch ``(sum, count)`` metrics until the next log, reduced in one all-reduce.

    By default a logged value is the mean over the window's micro-batches of that micro-batch's
    mean over all ranks (TRL's averaging). An objective may name metrics to reduce otherwise
    (``metric_reductions``): ``"pooled"`` = Σ sums / Σ counts over ranks and micro-batches (a
    per-class mean weighted by count), ``"total"`` = Σ sums. A metric with nothing to average is
    left out of the row, never NaN.
    """

    def __init__(self, reductions: dict | None = None):
        self.reductions = reductions or {}
        self.names: list[str] | None = None
        self.rows: list[torch.Tensor] = []
        self.tokens = 0
        self.start = time.perf_counter()

    def add(self, loss: torch.Tensor, metrics: dict, tokens: int) -> None:
        entries = {"loss": (loss.detach().float(), torch.ones(())), **metrics}
        if self.names is None:
            self.names = list(entries)
        vec = [x for name in self.names for x in entries[name]]
        self.rows.append(torch.stack([v.detach().float().cpu() for v in vec]))
        self.tokens += tokens

    def reduce(self) -> tuple[dict, int, float]:
        """``(means, global_tokens, seconds)``; resets the window."""
        table = eng.all_reduce_sum(torch.stack(self.rows))  # (micro_batches, 2K)
        means = reduce_table(self.names, table, self.reductions)
        tokens = int(eng.all_reduce_sum(torch.tensor([float(self.tokens)])).item())
        seconds = time.perf_counter() - self.start
        self.__init__(self.reductions)
        return means, tokens, seconds


def reduce_table(names: list[str], table: torch.Tensor, reductions: dict) -> dict:
    """Rows of ``[sum_k, count_k, ...]`` (one per micro-batch, already summed over ranks) -> values."""
    sums, counts = table[:, 0::2], table[:, 1::2]
    out = {}
    for k, name in enumerate(names):
        how = reductions.get(name, "step_mean")
        seen = counts[:, k] > 0
        if how == "total":
            out[name] = sums[:, k].sum().item()
        elif not seen.any():
            continue
        elif how == "pooled":
            out[name] = (sums[:, k].sum() / counts[:, k].sum()).item()
        else:
            out[name] = (sums[seen, k] / counts[seen, k]).mean().item()
    return out


def add_derived(values: dict, derived: dict, prefix: str = "") -> dict:
    """``name -> (a, b)``: ``values[name] = values[a] − values[b]`` when both are present."""
    for name, (a, b) in derived.items():
        if prefix + a in values and prefix + b in values:
            values[prefix + name] = values[prefix + a] - values[prefix + b]
    return values


def memory_row() -> dict:
    """Peak accelerator memory and peak host RSS (GiB), max over ranks."""
    gpu = torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else 0.0
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    peak = eng.all_reduce_max(torch.tensor([gpu, rss], dtype=torch.float64))
    return {"peak_memory_gib": peak[0].item(), "peak_rss_gib": peak[1].item()}


# --------------------------------------------------------------------------- eval
def evaluate(engine, objective, dataset, collate, *, batch_size: int) -> dict:
    """The eval pass with the training objective: exact means over every eval row, ``eval_`` names."""
    names, totals = None, None
    with eng.eval_mode(engine):
        for _, batch, counted in eval_batches(dataset, collate, batch_size=batch_size):
            loss, metrics = objective.compute(engine, batch, train=False)
            entries = {"loss": (loss.float(), torch.ones(())), **metrics}
            names = names or list(entries)
            vec = torch.stack([x.detach().float().cpu() for n in names for x in entries[n]])
            vec = vec if counted else torch.zeros_like(vec)
            totals = vec if totals is None else totals + vec
    totals = eng.all_reduce_sum(totals)
    values = reduce_table(names, totals.unsqueeze(0), {n: "pooled" for n in names} | _totals(objective))
    values = add_derived(values, objective.derived_metrics)
    return {f"eval_{n}": v for n, v in values.items()}


def evaluate_pairs(engine, reference, dataset, collate, *, beta: float, batch_size: int) -> dict:
    """Held-out preference accuracy of a method with a reference, on paired eval rows.

    A pair counts as right when the policy raises the chosen completion's log-prob above the
    reference's by more than the rejected one's: ``π_c − ref_c > π_r − ref_r`` (DPO's implicit
    reward, TRL's ``rewards/accuracies``). Exact over every pair; logged as ``eval_rewards/accuracies``
    and ``eval_rewards/margins`` (β times the margin).
    """
    totals = torch.zeros(3, dtype=torch.float64)  # right, margin sum, pairs
    with eng.eval_mode(engine):
        for _, batch, counted in eval_batches(dataset, collate, batch_size=batch_size, split="pairs"):
            policy = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                            completion_mask=batch["completion_mask"])["logps"].float()
            ratio = (policy - reference.logps(batch).to(policy.device).float()).cpu().double()
            chosen, rejected = ratio.chunk(2)  # (B,) each: [chosen; rejected]
            if counted:
                totals += torch.stack([(chosen > rejected).double().sum(), (beta * (chosen - rejected)).sum(),
                                       torch.tensor(float(chosen.numel()), dtype=torch.float64)])
    totals = eng.all_reduce_sum(totals)
    n = max(totals[2].item(), 1.0)
    return {"eval_rewards/accuracies": totals[0].item() / n, "eval_rewards/margins": totals[1].item() / n}


def _totals(objective) -> dict:
    return {n: how for n, how in objective.metric_reductions.items() if how == "total"}


# --------------------------------------------------------------------------- train
def train(engine, objective, train_ds, eval_ds, collate, s: LoopSettings, tracker, *, start_step: int = 0,
          pairs=None, generations=None, preemption=None) -> LoopResult:
    """Run optimizer steps ``start_step+1 .. s.total_steps`` (or until ``stop_after_steps``).

    ``pairs``: ``(dataset, collate)`` of paired eval rows for methods with a reference, whose
    held-out preference accuracy is evaluated beside the objective's own eval metrics.
    ``generations``: ``step -> rows`` (:mod:`dspref.generate`), run after each eval and logged as a table.
    ``preemption``: a :class:`~dspref.preemption.Preemption`; once any rank is signalled, every rank
    stops after the same optimizer step, with a checkpoint.
    """
    rank = torch.distributed.get_rank()
    gas, per_epoch = s.gradient_accumulation_steps, s.micro_batches_per_epoch
    step, micro = start_step, start_step * gas
    last_eval: dict = {}

    def run_eval(at_step):
        nonlocal last_eval
        if eval_ds is not None:
            last_eval = evaluate(engine, objective, eval_ds, collate, batch_size=s.per_device_eval_batch_size)
            if pairs is not None:  # (paired eval dataset, paired collator): preference accuracy
                last_eval |= evaluate_pairs(engine, objective.reference, pairs[0], pairs[1], beta=objective.beta,
                                            batch_size=s.per_device_eval_batch_size)
            tracker.log({"step": at_step, **last_eval})
            if generations is not None:
                tracker.log_generations(at_step, generations(at_step))

    if step == 0 and s.eval_on_start:
        run_eval(0)
    bar = make_progress(s.total_steps, step, enabled=rank == 0)
    window = MetricWindow(objective.metric_reductions)
    engine.train(True)
    batches = train_batches(train_ds, collate, seed=s.seed, micro_batch=s.per_device_train_batch_size,
                            per_epoch=per_epoch, start=micro, stop=s.total_steps * gas,
                            group_by_length=s.group_by_length)
    for (_, epoch, _), batch in batches:
        loss, metrics = objective.compute(engine, batch, train=True)
        _check_finite(loss, step + 1, s.output_dir, batch["row_indices"])
        lr = engine.lr  # the rate this step uses (the scheduler moves on inside step())
        engine.backward(loss)
        engine.step()
        window.add(loss, metrics, trained_tokens(batch))
        micro += 1
        if micro % gas:
            continue
        step += 1
        if bar is not None:
            bar.update(1)
        if step % s.logging_steps == 0 or step == s.total_steps:
            means, tokens, seconds = window.reduce()
            means = add_derived(means, objective.derived_metrics)
            row = {"step": step, "epoch": micro / per_epoch, **means, "learning_rate": lr,
                   "grad_norm": engine.grad_norm, "tokens_per_second": tokens / max(seconds, 1e-9), **memory_row()}
            tracker.log({k: v for k, v in row.items() if v is not None})
        if step == s.total_steps or (s.eval_steps and step % s.eval_steps == 0):
            run_eval(step)
        preempted = preemption is not None and preemption.requested() and step < s.total_steps
        stop = preempted or (bool(s.stop_after_steps) and step >= s.stop_after_steps and step < s.total_steps)
        if (s.save_steps and step % s.save_steps == 0) or stop:
            state = {"step": step, "micro_batches": micro, "epoch": epoch, "objective": objective.state_dict(),
                     "world_size": torch.distributed.get_world_size()}
            path = ckpt.save_checkpoint(engine, s.output_dir, step, state, save_total_limit=s.save_total_limit,
                                        tensors=objective.tensor_state())
        window.start = time.perf_counter()  # eval and saving are not training throughput
        if preempted:
            if rank == 0:
                from dspref.preemption import write_marker

                write_marker(s.output_dir, step=step, checkpoint=path, reason=preemption.name)
            eng.barrier()
            if bar is not None:
                bar.close()
            return LoopResult(step=step, stopped_early=True, last_eval=last_eval, preempted=preemption.name)
        if stop:
            break
    if bar is not None:
        bar.close()
    return LoopResult(step=step, stopped_early=step < s.total_steps, last_eval=last_eval)


def _check_finite(loss: torch.Tensor, step: int, output_dir: str, rows: list[int]) -> None:
    """Stop every rank together, before the update, if any rank's loss is NaN/inf; name the rows."""
    finite = torch.isfinite(loss.detach()).item()
    if not eng.all_reduce_max(torch.tensor([0.0 if finite else 1.0])).item():
        return
    world = torch.distributed.get_world_size()
    seen = [None] * world
    torch.distributed.all_gather_object(seen, None if finite else (float(loss.item()), list(rows)))
    where = "; ".join(f"rank {r}: loss {bad[0]} on training rows {bad[1]}" for r, bad in enumerate(seen) if bad)
    latest = ckpt.latest_checkpoint(output_dir)
    raise NonFiniteLossError(
        f"loss is not finite at step {step} ({where}); stopped before applying it. No checkpoint was written "
        f"for this step; the last complete checkpoint is {latest or 'none'}. Lower the learning rate, check "
        f"those rows, or use bf16 instead of fp16.")
