"""``dspref eval --model DIR --data FILE [--ref DIR] --method M``: the eval pass alone.

The same eval as training, through the same code: ``loop.evaluate`` with the method's objective
(loss and TRL-named metrics), and for methods with a reference ``loop.evaluate_pairs`` (held-out
preference accuracy on paired rows). Printed as a table and written as JSON.

- A checkpoint folder (``output_dir/checkpoint-N``): the run's saved ``dspref_config.yaml`` and
  ``ds_config.json`` rebuild the same objective and reference; the weights are consolidated from
  the DeepSpeed shards (whatever number of ranks wrote them) and the method's state is restored
  (BCO's δ and UDM classifier), so the result is the eval row the run logged at step N.
- An exported model folder: the method and its options come from the command line
  (``--method``, ``--beta`` ...); metrics that need state only a checkpoint carries (BCO's loss)
  are left out, and named.

Any other ``--key value`` is a training option (``dspref train --help``), e.g.
``--per_device_eval_batch_size 16`` or ``--max_length 512``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from dspref import checkpoint as ckpt
from dspref.config import ConfigError, ReferenceConfig, parse_args

# A frozen engine needs only batch sizes and precision; ZeRO-0 keeps the model whole on each rank.
DEFAULT_DS = {"train_batch_size": "auto", "train_micro_batch_size_per_gpu": "auto",
              "gradient_accumulation_steps": "auto", "bf16": {"enabled": "auto"}, "fp16": {"enabled": "auto"},
              "zero_optimization": {"stage": 0}}
RUN_CONFIG, RUN_DS_CONFIG = "dspref_config.yaml", "ds_config.json"


DESCRIPTION = ("The eval pass alone, on a checkpoint folder or an exported model: loss, TRL-named "
               "metrics and preference accuracy, printed as a table and written as JSON.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dspref eval", description=DESCRIPTION,
                                epilog="Other --key value options are training options (dspref train --help).")
    p.add_argument("--model", required=True,
                   help="a checkpoint folder (output_dir/checkpoint-N) or an exported model folder")
    p.add_argument("--data", required=True, nargs="+", help="eval data file(s), in any format training reads")
    p.add_argument("--method", default=None, help="bco | cpo | kto | reward (required for an exported model)")
    p.add_argument("--ref", default=None, help="reference model folder (KTO/BCO; required for an exported model)")
    p.add_argument("--ds_config", default=None,
                   help="DeepSpeed JSON (default: the run's ds_config.json for a checkpoint, ZeRO-0 otherwise)")
    p.add_argument("--out", default=None, help="JSON written (default: <model folder name>.eval.json)")
    return p


class Target:
    """What ``--model`` names: a checkpoint (its step, and its run's DeepSpeed JSON and eval files) or an
    exported model."""

    def __init__(self, path: str):
        from dspref.run import RunError

        if not os.path.isdir(path):
            raise RunError(f"--model {path}: no such folder")
        self.path = os.path.abspath(path)
        self.is_checkpoint = os.path.isfile(os.path.join(path, ckpt.STATE_FILE))
        self.run_dir = os.path.dirname(self.path) if self.is_checkpoint else None
        self.step, self.run_ds, self.run_eval_files = None, None, None
        if self.is_checkpoint:
            lacking = [n for n in (RUN_CONFIG, RUN_DS_CONFIG) if not os.path.isfile(os.path.join(self.run_dir, n))]
            if lacking:
                raise RunError(f"checkpoint {path}: its run folder {self.run_dir} lacks {' and '.join(lacking)} "
                               f"(written there when training starts); evaluate it inside its output_dir")
            self.step = ckpt.read_state(self.path)[0]["step"]
            with open(os.path.join(self.run_dir, RUN_DS_CONFIG), encoding="utf-8") as f:
                self.run_ds = json.load(f)
            self.run_eval_files = parse_args(["--config", os.path.join(self.run_dir, RUN_CONFIG)])[0].eval_file
        elif os.path.isfile(os.path.join(path, "adapter_config.json")):
            raise RunError(f"--model {path} is a LoRA adapter export; evaluate one of its run's checkpoint folders "
                           f"(they hold base and adapter), or a model exported with merge_peft_adapter: true")
        elif not os.path.isfile(os.path.join(path, "config.json")):
            raise RunError(f"--model {path} is neither a dspref checkpoint (checkpoint-N with {ckpt.STATE_FILE}) "
                           f"nor an exported model (config.json); pass one of them")


def build_config(args, options: list[str], target: Target):
    """``(cfg, explicit option names)``: the run's saved config for a checkpoint, else ``--method`` and options."""
    from dspref.run import RunError

    data = ["--eval_file", json.dumps(args.data), "--eval_split_ratio", "0"]
    ref = ["--ref_model", args.ref] if args.ref else []
    if target.is_checkpoint:
        cfg, _ = parse_args(["--config", os.path.join(target.run_dir, RUN_CONFIG), *data, *ref, *options])
        if args.method and args.method != cfg.method:
            raise RunError(f"--method {args.method}: checkpoint {args.model} was trained with method {cfg.method}; "
                           f"drop --method or pass --method {cfg.method}")
        return cfg, set()  # the run's options are not the user's choice here: a --ds_config's values win
    if not args.method:
        raise RunError(f"--model {args.model} is an exported model: pass --method (bco | cpo | kto | reward)")
    cfg, explicit = parse_args(["--method", args.method, "--model_name_or_path", args.model, *data, *ref, *options])
    if isinstance(cfg, ReferenceConfig) and not cfg.ref_model:
        raise RunError(f"method {cfg.method} scores the policy against a reference model, which an exported model "
                       f"does not name: pass --ref DIR (the model the run started from, or its ref_model)")
    if cfg.method == "bco" and cfg.embedding_model_name_or_path:
        raise RunError("BCO's UDM classifier is fitted on the training prompts during a run and saved only in its "
                       "checkpoints: evaluate a checkpoint folder, or drop embedding_model_name_or_path")
    return cfg, explicit


def evaluate_model(cfg, explicit: set[str], *, checkpoint: str | None, run_ds: dict | None,
                   ds_config_path: str | None) -> tuple[dict, list[str], int]:
    """Every rank: ``(eval metrics, metrics left out, eval rows)`` of the model ``cfg`` names, or of
    ``checkpoint`` (``run_ds``: its run's DeepSpeed JSON)."""
    from dspref import engine as eng
    from dspref import run
    from dspref.dsconfig import reference_ds_config
    from dspref.loop import evaluate, evaluate_pairs
    from dspref.objectives import build_objective

    rank, _, world = eng.init_distributed()
    run._setup_logging(rank)
    run._set_seed(cfg.seed)
    objective = build_objective(cfg)
    tokenizer = run.load_tokenizer(cfg)
    eval_ds = run._main_process_first(rank, lambda: _eval_rows(cfg, tokenizer, objective.data_kind))
    pairs_ds, ref_ds_user = None, None
    model_config = run._read_model_config(cfg, objective.model_kind)
    if objective.needs_reference:  # paired rows for the preference accuracy, as training evaluates them
        pairs_ds = run._main_process_first(rank, lambda: run.load_eval_pairs(cfg, tokenizer))
        ref_ds_user = run._check_reference_inputs(cfg, tokenizer, model_config)
    ds_config = _ds_config(cfg, explicit, run_ds, ds_config_path, world, model_config)
    frozen_ds = reference_ds_config(ds_config)  # no optimizer: ZeRO-3 stays sharded, ZeRO-0/1/2 becomes stage 0
    pad_id = cfg.padding_value if cfg.padding_value is not None else tokenizer.pad_token_id
    engine = eng.InferenceEngine(run.build_policy(cfg, objective, model_config, frozen_ds, pad_id), frozen_ds)
    if objective.needs_reference:
        from dspref.reference import build_reference

        # Built while the policy still holds its initial weights: a reference made of them copies them.
        objective.reference = build_reference(cfg, policy_engine=engine, policy_ds=ds_config, ref_ds_user=ref_ds_user)
    if checkpoint:
        ckpt.load_weights(engine, checkpoint)
        state, tensors = ckpt.read_state(checkpoint)
        objective.load_state_dict(state.get("objective", {}))
        objective.load_tensor_state(tensors)
    batch_size = cfg.per_device_eval_batch_size
    metrics = evaluate(engine, objective, eval_ds, objective.collator(pad_id), batch_size=batch_size)
    if pairs_ds is not None:
        from dspref.data.collate import PairedCollator

        metrics |= evaluate_pairs(engine, objective.reference, pairs_ds, PairedCollator(pad_id), beta=objective.beta,
                                  batch_size=batch_size)
    omitted = [] if checkpoint else [f"eval_{n}" for n in objective.state_metrics if f"eval_{n}" in metrics]
    return {k: v for k, v in metrics.items() if k not in omitted}, omitted, len(eval_ds)


def _eval_rows(cfg, tokenizer, data_kind: str):
    """Every row of ``cfg.eval_file``, tokenized and truncated as training prepares its eval rows."""
    from dspref.data.formats import load_sources
    from dspref.run import RunError, tokenize_sources

    rows, _ = tokenize_sources(cfg, tokenizer, data_kind, load_sources(cfg.eval_file), [], eval_split_ratio=0.0)
    if len(rows) == 0:
        raise RunError(f"--data {' '.join(cfg.eval_file)}: no rows left to evaluate (reward modeling drops pairs "
                       f"longer than max_length={cfg.max_length}); raise max_length or check the file")
    return rows


def _ds_config(cfg, explicit, run_ds, ds_config_path, world: int, model_config) -> dict:
    """``--ds_config`` resolved against the options; else the run's JSON with its global batch re-derived for
    this number of ranks; else a ZeRO-0 JSON in the precision the options ask for."""
    from dspref.dsconfig import load_ds_config, resolve_ds_config
    from dspref.run import _on_cpu

    if run_ds is not None and not ds_config_path:
        per_step = run_ds["train_micro_batch_size_per_gpu"] * run_ds.get("gradient_accumulation_steps", 1)
        return {**run_ds, "train_batch_size": per_step * world}
    raw = load_ds_config(ds_config_path) if ds_config_path else DEFAULT_DS
    hidden = getattr(model_config.get_text_config(), "hidden_size", None)
    return resolve_ds_config(raw, cfg, explicit, world_size=world, num_training_steps=1, on_cpu=_on_cpu(),
                             hidden_size=hidden)


def logged_row(target: Target, data: list[str]) -> dict | None:
    """The eval row a checkpoint's run logged at its step, when ``data`` are the run's own eval files (else None)."""
    from dspref.tracking import METRICS_FILE, read_metrics

    files = target.run_eval_files
    run_files = [files] if isinstance(files, str) else list(files or [])
    path = os.path.join(target.run_dir, METRICS_FILE)
    same = sorted(map(os.path.realpath, data)) == sorted(map(os.path.realpath, run_files))
    if not same or not os.path.isfile(path):
        return None
    rows = [r for r in read_metrics(path) if r.get("step") == target.step and any(k.startswith("eval_") for k in r)]
    return rows[-1] if rows else None


def make_report(target: Target, cfg, data: list[str], metrics: dict, omitted: list[str], n_rows: int) -> dict:
    """What is printed and written as JSON; for a checkpoint, its difference from the row its run logged."""
    report = {"model": target.path, "checkpoint_step": target.step, "method": cfg.method, "data": list(data),
              "rows": n_rows, "metrics": metrics, "omitted": omitted}
    logged = logged_row(target, data) if target.is_checkpoint else None
    shared = [k for k in metrics if k in (logged or {})]
    if shared:
        report["logged_max_abs_difference"] = max(abs(metrics[k] - logged[k]) for k in shared)
        report["logged_metrics_compared"] = len(shared)
    return report


def format_report(report: dict) -> str:
    """The table printed on the console."""
    where = f"{report['model']} (step {report['checkpoint_step']})" if report["checkpoint_step"] is not None \
        else report["model"]
    lines = [f"dspref eval: {where}, method {report['method']}, {report['rows']} rows of {', '.join(report['data'])}"]
    width = max(len(k) for k in report["metrics"])
    lines += [f"  {name:<{width}}  {value:.6g}" for name, value in report["metrics"].items()]
    if report["omitted"]:
        lines.append(f"  left out: {', '.join(report['omitted'])} (they need the method's state from training; "
                     f"evaluate a checkpoint folder)")
    if "logged_max_abs_difference" in report:
        lines.append(f"  the run logged this eval row at step {report['checkpoint_step']}: max |difference| "
                     f"{report['logged_max_abs_difference']:.3g} over {report['logged_metrics_compared']} metrics")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    args, options = _parser().parse_known_args(argv)
    from dspref.run import USER_ERRORS, RunError

    out = args.out or os.path.basename(os.path.normpath(args.model)) + ".eval.json"
    rank = 0
    try:
        target = Target(args.model)
        missing = [path for path in args.data if not os.path.exists(path)]
        if missing:
            raise RunError(f"--data {missing[0]}: no such file (relative paths start at {os.getcwd()})")
        cfg, explicit = build_config(args, options, target)
        from dspref import engine as eng

        rank = eng.init_distributed()[0]
        metrics, omitted, n_rows = evaluate_model(cfg, explicit, checkpoint=target.path if target.is_checkpoint
                                                  else None, run_ds=target.run_ds, ds_config_path=args.ds_config)
        report = make_report(target, cfg, args.data, metrics, omitted, n_rows)
        if rank == 0:
            ckpt.write_json(out, report)
    # OSError: a model or reference folder without weights, an --out that cannot be written
    except USER_ERRORS + (RunError, ConfigError, OSError) as e:
        if rank == 0:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            print(f"dspref eval: error: {reason}", file=sys.stderr)
        return 2
    if rank == 0:
        print(format_report(report) + f"\n  written to {out}", flush=True)
    return 0
