"""Precomputed reference log-probs: one pass before training, cached on disk, no reference after.

The pass walks exactly the micro-batches the loop will run (training order is a pure function of
seed and epoch, see :mod:`dspref.loop`), each rank its own share, and stores the reference's
log-probs of every row of every batch, KTO's mismatched KL rows included (they depend on which
rows share a micro-batch, so they are stored per batch, not per row). A run with more than one
epoch therefore scores each epoch's batches once.

The cache lives in ``$DSPREF_CACHE`` (default ``~/.cache/dspref``) under a fingerprint of the
reference model (its config and weight files), the tokenized data, and every option that shapes
the batches. A second run with the same inputs reuses it; any change gives a new fingerprint. A
cache that is incomplete or does not load is rebuilt, never silently used.
"""

from __future__ import annotations

import glob
import hashlib
import json
import logging
import math
import os
import shutil

import torch

from dspref import engine as eng

log = logging.getLogger("dspref")
COMPLETE = "complete.json"


def cache_root() -> str:
    return os.environ.get("DSPREF_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dspref"))


def _n_eval_batches(n_rows: int, batch_size: int) -> int:
    share = math.ceil(n_rows / torch.distributed.get_world_size())
    return max(1, math.ceil(share / batch_size))


def fingerprint(cfg, *, train_ds, eval_ds, pairs_ds=None, world_size: int, total_micro: int, per_epoch: int) -> str:
    """Hash of everything the cached values depend on."""
    path = cfg.ref_model or cfg.model_name_or_path
    inputs = {
        "reference": {"path": os.path.abspath(path) if os.path.exists(path) else path, "files": _model_files(path),
                      "random_init": cfg.random_init and not cfg.ref_model, "seed": cfg.seed,
                      "quantized": [cfg.ref_load_in_8bit, cfg.ref_load_in_4bit], "peft": cfg.peft_config,
                      "ref_adapter_name": cfg.ref_adapter_name, "bf16": cfg.bf16, "fp16": cfg.fp16},
        "data": [d._fingerprint if d is not None else None for d in (train_ds, eval_ds, pairs_ds)],
        "batches": {"world": world_size, "micro": cfg.per_device_train_batch_size,
                    "eval": cfg.per_device_eval_batch_size, "seed": cfg.seed, "total_micro": total_micro,
                    "per_epoch": per_epoch, "method": cfg.method, "loss_type": getattr(cfg, "loss_type", None),
                    "max_length": cfg.max_length, "group_by_length": cfg.group_by_length},
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _model_files(path: str) -> list:
    """Names, sizes and modification times of the model's config and weights (cheap identity)."""
    if not os.path.isdir(path):
        return [path]
    files = sorted(glob.glob(os.path.join(path, "*.json")) + glob.glob(os.path.join(path, "*.safetensors"))
                   + glob.glob(os.path.join(path, "*.bin")))
    return [(os.path.basename(f), os.path.getsize(f), int(os.path.getmtime(f))) for f in files]


def load_or_compute(key: str, reference, *, batches, expected: int) -> dict:
    """This rank's ``{batch_key: ref_logps}``: from the cache if complete and valid, else computed now.

    ``batches`` is an iterable of ``(batch_key, batch)`` (every rank calls this collectively).
    """
    rank = torch.distributed.get_rank()
    folder = os.path.join(cache_root(), "ref_logps", key)
    values = _load(folder, rank, expected)
    ok = torch.tensor([0.0 if values is None else 1.0])
    if eng.all_reduce_sum(ok).item() == torch.distributed.get_world_size():
        log.info("reference log-probs: reusing the cache %s", folder)
        return values
    if os.path.exists(folder) and rank == 0:
        log.warning("reference log-prob cache %s is incomplete or unreadable; rebuilding it", folder)
    eng.barrier()
    if rank == 0:
        shutil.rmtree(folder, ignore_errors=True)
        os.makedirs(folder, exist_ok=True)
    eng.barrier()
    values = {}
    for batch_key, batch in batches:
        values[_name(batch_key)] = reference.logps(batch).detach().float().cpu()
    tmp = os.path.join(folder, f"rank{rank}.pt.tmp")
    torch.save(values, tmp)
    os.replace(tmp, os.path.join(folder, f"rank{rank}.pt"))
    eng.barrier()
    if rank == 0:  # written last: marks the cache complete
        with open(os.path.join(folder, COMPLETE), "w", encoding="utf-8") as f:
            json.dump({"ranks": torch.distributed.get_world_size(), "batches_per_rank": expected}, f)
    eng.barrier()
    log.info("reference log-probs: computed %d batches per rank into %s", expected, folder)
    return values


def _load(folder: str, rank: int, expected: int) -> dict | None:
    if not os.path.exists(os.path.join(folder, COMPLETE)):
        return None
    try:
        values = torch.load(os.path.join(folder, f"rank{rank}.pt"), weights_only=True)
    except Exception:  # truncated, corrupted, foreign: rebuilt by the caller
        return None
    if not isinstance(values, dict) or len(values) != expected:
        return None
    return values


def _name(batch_key) -> str:
    split, epoch, index = batch_key
    return f"{split}/{epoch}/{index}"


class PrecomputedReference:
    """Reads each batch's reference log-probs from the precomputed table; holds no model."""

    description = "precomputed (no reference model held during training)"

    def __init__(self, values: dict):
        self.values = values

    def logps(self, batch: dict) -> torch.Tensor:
        return self.values[_name(batch["batch_key"])]


def precompute(cfg, live_reference, *, train_ds, eval_ds, collate, total_micro: int, per_epoch: int, pairs=None):
    """Run (or reuse) the precompute pass with ``live_reference``; return the reference for training.

    ``pairs``: ``(dataset, collate)`` of the paired eval rows scored for preference accuracy.
    """
    from dspref.loop import eval_batches, train_batches

    def all_batches():
        yield from train_batches(train_ds, collate, seed=cfg.seed, micro_batch=cfg.per_device_train_batch_size,
                                 per_epoch=per_epoch, start=0, stop=total_micro, group_by_length=cfg.group_by_length)
        for split, dataset, batch_collate in (("eval", eval_ds, collate), ("pairs", *(pairs or (None, None)))):
            if dataset is not None:
                for key, batch, _ in eval_batches(dataset, batch_collate, batch_size=cfg.per_device_eval_batch_size,
                                                  split=split):
                    yield key, batch

    n_eval = sum(_n_eval_batches(len(d), cfg.per_device_eval_batch_size)
                 for d in (eval_ds, (pairs or (None,))[0]) if d is not None)
    key = fingerprint(cfg, train_ds=train_ds, eval_ds=eval_ds, pairs_ds=(pairs or (None,))[0], world_size=torch.distributed.get_world_size(),
                      total_micro=total_micro, per_epoch=per_epoch)
    values = load_or_compute(key, live_reference, batches=all_batches(), expected=total_micro + n_eval)
    return PrecomputedReference(values)
