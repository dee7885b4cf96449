"""The wiring of a training run, top to bottom like a recipe.

1. config (YAML + CLI)           -> checked before anything heavy happens
2. output_dir, DeepSpeed JSON    -> refused early with a one-line reason
3. tokenizer and data            -> loaded, validated, tokenized (rank 0 first, then the cache)
4. DeepSpeed JSON resolved       -> every "auto" filled from the config, contradictions refused
5. model (sharded at birth)      -> DeepSpeed engine
6. resume, loop, export, summary
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass

import torch

from dspref import checkpoint as ckpt
from dspref import engine as eng
from dspref.config import ConfigError, ReferenceConfig, config_to_dict, parse_args, save_config
from dspref.data.formats import DataError
from dspref.dsconfig import DSConfigError, load_ds_config, num_warmup_steps, resolve_ds_config
from dspref.loop import NonFiniteLossError
from dspref.plots import PLOTS_DIR, write_run_plots
from dspref.preemption import EXIT_PREEMPTED, MARKER, Preemption, clear_marker, requeued
from dspref.tracking import GENERATIONS_FILE, METRICS_FILE, TENSORBOARD_DIR, NullTracker, Tracker, drop_rows_after

log = logging.getLogger("dspref")

# Inputs a user can fix: reported as one line on stderr, exit status 2, before any model is loaded.
USER_ERRORS = (ConfigError, DataError, DSConfigError, ckpt.CheckpointError)


class RunError(ValueError):
    """A problem with the run's set-up (paths, sizes) that the user must fix."""


@dataclass
class RunResult:
    engine: object
    tokenizer: object
    step: int
    stopped_early: bool
    last_eval: dict
    output_dir: str
    seconds: float
    headline: tuple[str, ...]
    load_hint: str
    preempted: str | None = None


def main(argv: list[str]) -> int:
    """``dspref train`` / ``launch/train.py``: returns the process exit status."""
    try:
        cfg, explicit = parse_args(argv)
    except ConfigError as e:
        print(f"dspref: error: {e}", file=sys.stderr)
        return 2
    rank = 0
    try:
        rank = eng.init_distributed()[0]
        result = train(cfg, explicit)
    except USER_ERRORS + (RunError,) as e:
        if rank == 0:
            print(f"dspref: error: {e}", file=sys.stderr)
        return 2
    except NonFiniteLossError as e:  # stopped before the bad update; nothing corrupt written
        if rank == 0:
            print(f"dspref: error: {e}", file=sys.stderr)
        return 1
    if rank == 0:
        print_summary(result)
    return EXIT_PREEMPTED if result.preempted else 0


def exit_process(status: int) -> None:
    """End a training process with ``status`` without running interpreter teardown.

    Everything a run writes is closed by then (checkpoints are atomic, the tracker is closed in
    ``train``). What is left are C++ threads of the communication backends (gloo, DeepSpeed's
    shm op); tearing them down in interpreter finalisation can abort the process with
    ``terminate called without an active exception`` (exit 250) after a run that succeeded.
    So: flush, leave the process group, then ``os._exit``.
    """
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - the status is what matters now; never turn success into a crash
        pass
    os._exit(status)


def train(cfg, explicit: set[str]) -> RunResult:
    """Run training as configured; every rank calls this. Returns the live engine (tests use it)."""
    started = time.perf_counter()
    rank, _, world = eng.init_distributed()
    _setup_logging(rank)
    _set_seed(cfg.seed)
    resume_path, replaced = _prepare_output_dir(cfg)
    if resume_path:
        ckpt.check_world_size(resume_path, world)
    ds_raw = load_ds_config(cfg.ds_config) if cfg.ds_config else _missing_ds_config()
    _check_local_path(cfg.model_name_or_path, "model_name_or_path")
    _check_local_path(cfg.tokenizer_name_or_path, "tokenizer_name_or_path")
    from dspref.objectives import build_objective

    objective = build_objective(cfg)
    tokenizer = load_tokenizer(cfg)
    train_ds, eval_ds = _main_process_first(rank, lambda: load_data(cfg, tokenizer, objective.data_kind))
    pairs_ds = _main_process_first(rank, lambda: load_eval_pairs(cfg, tokenizer)) if objective.needs_reference else None
    model_config = _read_model_config(cfg, objective.model_kind)
    ref_ds_user = _check_reference_inputs(cfg, tokenizer, model_config) if objective.needs_reference else None
    hidden = getattr(model_config.get_text_config(), "hidden_size", None)
    # First pass pulls batch sizes the JSON sets into cfg; the step count depends on them.
    resolve_ds_config(ds_raw, cfg, explicit, world_size=world, num_training_steps=None, on_cpu=_on_cpu(), hidden_size=hidden)
    settings = _loop_settings(cfg, len(train_ds), world)
    ds_config = resolve_ds_config(ds_raw, cfg, explicit, world_size=world, num_training_steps=settings.total_steps,
                                  on_cpu=_on_cpu(), hidden_size=hidden)
    _clear_replaced_run(cfg.output_dir, replaced, rank)  # only now that every input check has passed
    if rank == 0:
        clear_marker(cfg.output_dir)  # this run is under way: no requeue unless it is preempted again
        save_config(cfg, os.path.join(cfg.output_dir, "dspref_config.yaml"))
        ckpt.write_json(os.path.join(cfg.output_dir, "ds_config.json"), ds_config)

    pad_id = cfg.padding_value if cfg.padding_value is not None else tokenizer.pad_token_id
    engine = eng.Engine(build_policy(cfg, objective, model_config, ds_config, pad_id), ds_config,
                        optimizer_factory=lambda params: _adamw(cfg, params),
                        scheduler_factory=lambda opt: _scheduler(cfg, opt, settings.total_steps))
    collate = objective.collator(pad_id)
    pairs = None
    if pairs_ds is not None:
        from dspref.data.collate import PairedCollator

        pairs = (pairs_ds, PairedCollator(pad_id))
    if objective.needs_reference:
        objective.reference = _reference(cfg, engine, ds_config, ref_ds_user, train_ds, eval_ds, collate, settings,
                                         pairs)
        log.info("reference: %s", objective.reference.description)

    start_step = 0
    if resume_path:
        state, tensors = ckpt.load_checkpoint(engine, resume_path)
        objective.load_state_dict(state.get("objective", {}))
        objective.load_tensor_state(tensors)
        start_step = state["step"]
        log.info("resumed from %s at step %d", resume_path, start_step)
    objective.prepare(train_ds)  # BCO's UDM classifier: fitted once, or kept as loaded from the checkpoint
    if rank == 0:
        for name in (METRICS_FILE, GENERATIONS_FILE):  # a resumed run logs the later rows again
            drop_rows_after(os.path.join(cfg.output_dir, name), start_step if start_step else -1)
    tracker = _tracker(cfg, rank, start_step)
    from dspref.generate import make_sampler
    from dspref.loop import train as train_loop

    generations = make_sampler(cfg, objective, engine, eval_ds, collate, tokenizer)
    try:
        with Preemption() as preemption:
            result = train_loop(engine, objective, train_ds, eval_ds, collate, settings, tracker,
                                start_step=start_step, pairs=pairs, generations=generations, preemption=preemption)
        if not result.stopped_early:
            ckpt.export_model(engine, tokenizer, cfg.output_dir, merge_adapter=cfg.merge_peft_adapter)
    finally:
        tracker.close()
    if rank == 0:
        write_run_plots(cfg.output_dir)  # warns, never raises: figures never cost a run
    return RunResult(engine=engine, tokenizer=tokenizer, step=result.step, stopped_early=result.stopped_early,
                     preempted=result.preempted,
                     last_eval=result.last_eval, output_dir=cfg.output_dir, seconds=time.perf_counter() - started,
                     headline=objective.headline_metrics, load_hint=_load_hint(cfg, objective.model_kind))


# --------------------------------------------------------------------------- set-up pieces
def build_policy(cfg, objective, model_config, ds_config: dict, pad_id: int):
    """The policy's scoring module: the model (sharded at birth under ZeRO-3; LoRA-wrapped with
    ``peft_config``) inside the one scoring forward. Sets the objective's MoE router aux coefficient."""
    from dspref.logps import make_scorer, resolve_router_aux_coef

    # MoE router aux loss: the coefficient comes from the unwrapped config (TRL issue 2197); 0 for dense models.
    objective.router_aux_loss_coef = resolve_router_aux_coef(cfg.router_aux_loss_coef, model_config)
    model = eng.load_model(cfg.model_name_or_path, kind=objective.model_kind, ds_config=ds_config,
                           random_init=cfg.random_init, init_kwargs=cfg.model_init_kwargs,
                           trust_remote_code=cfg.trust_remote_code, seed=cfg.seed, pad_token_id=pad_id)
    eng.prepare_model(model, gradient_checkpointing=cfg.gradient_checkpointing, disable_dropout=cfg.disable_dropout)
    from dspref.config import pack_one_row, pack_tokens

    if pack_tokens(cfg):
        from dspref.attention import use_packed_attention

        use_packed_attention(model)  # sdpa: attend within each packed sequence only, not over the whole row
    if cfg.peft_config:
        has_ref = isinstance(cfg, ReferenceConfig)
        ref_adapter = (cfg.ref_adapter_name, cfg.ref_adapter_path) if has_ref and cfg.ref_adapter_name else None
        model = eng.apply_peft(model, cfg.peft_config, kind=objective.model_kind,
                               adapter_name=cfg.model_adapter_name if has_ref else None, ref_adapter=ref_adapter)
    return make_scorer(model, objective.model_kind, cfg.logits_chunk_size,
                       router_aux=objective.router_aux_loss_coef > 0, pack_tokens=pack_tokens(cfg),
                       one_row=pack_one_row(cfg))


def _prepare_output_dir(cfg) -> tuple[str | None, list[str]]:
    """Create ``output_dir``; refuse one that holds another run.

    Returns the checkpoint to resume and, with ``overwrite_output_dir``, the old run's entries to
    remove once all inputs are known good (a bad recipe never costs the old run).
    """
    try:
        os.makedirs(cfg.output_dir, exist_ok=True)
    except OSError as e:
        raise RunError(f"cannot create output_dir {cfg.output_dir!r}: {e.strerror}; choose another output_dir") from None
    if requeued() and not cfg.resume_from_checkpoint:
        log.info("SLURM_RESTART_COUNT=%s: a requeued job resumes from the latest checkpoint",
                 os.environ.get("SLURM_RESTART_COUNT"))
        cfg.resume_from_checkpoint = "latest"
    resume_path = ckpt.resolve_resume(cfg.output_dir, cfg.resume_from_checkpoint)
    traces = _run_traces(cfg.output_dir)
    if traces and not cfg.resume_from_checkpoint:
        if not cfg.overwrite_output_dir:
            raise RunError(
                f"output_dir {cfg.output_dir!r} already holds a run ({', '.join(traces[:3])}); pass "
                f"--resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, "
                f"or choose another output_dir")
    if cfg.resume_from_checkpoint and not resume_path:
        log.warning("resume_from_checkpoint=%s: no checkpoint in %s yet; starting from step 0",
                    cfg.resume_from_checkpoint, cfg.output_dir)
    replaced = _run_files(cfg.output_dir) if traces and not cfg.resume_from_checkpoint else []
    return resume_path, replaced


# What a run writes into output_dir (removed, with overwrite_output_dir, before a new run writes its own).
_EXPORT_FILES = ("config.json", "generation_config.json", "model.safetensors", "model.safetensors.index.json",
                 "adapter_config.json", "adapter_model.safetensors", "tokenizer.json", "tokenizer_config.json",
                 "special_tokens_map.json", "chat_template.jinja", "README.md", "ds_config.json", "wandb_run_id",
                 TENSORBOARD_DIR, PLOTS_DIR, MARKER)


def _run_files(output_dir: str) -> list[str]:
    names = os.listdir(output_dir)
    return sorted(n for n in names if n in _EXPORT_FILES or n in _run_traces(output_dir)
                  or n.startswith(("model-", ".tmp-")))


def _clear_replaced_run(output_dir: str, names: list[str], rank: int) -> None:
    eng.barrier()
    if rank == 0:
        for name in names:
            path = os.path.join(output_dir, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    eng.barrier()


def _run_traces(output_dir: str) -> list[str]:
    names = sorted(os.listdir(output_dir))
    marks = {METRICS_FILE, GENERATIONS_FILE, "dspref_config.yaml", ckpt.LATEST, "model.safetensors"}
    return [n for n in names if n in marks or n.startswith("checkpoint-")]


def _check_local_path(path: str | None, option: str) -> None:
    """A path that cannot be a hub id ('name' or 'org/name') must exist locally."""
    looks_local = os.path.isabs(path or "") or (path or "").startswith((".", "~")) or (path or "").count("/") > 1
    if path and looks_local and not os.path.exists(os.path.expanduser(path)):
        raise RunError(f"{option} {path!r} does not exist")


def _missing_ds_config():
    raise DSConfigError("no DeepSpeed config given; pass --ds_config ds_configs/zero3.json (or zero2.json)")


def load_tokenizer(cfg):
    """The tokenizer (local folder or hub name); EOS becomes the pad token when there is none."""
    from transformers import AutoTokenizer

    path = cfg.tokenizer_name_or_path or cfg.model_name_or_path
    tokenizer = _user_step(lambda: AutoTokenizer.from_pretrained(path, trust_remote_code=cfg.trust_remote_code),
                           f"cannot load the tokenizer from {path!r}")
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RunError(f"the tokenizer at {path!r} has neither a pad token nor an EOS token; add one of them")
        log.warning("tokenizer has no pad token; using its EOS token %r for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_data(cfg, tokenizer, data_kind: str):
    """Train and eval datasets, tokenized and validated (raises DataError with row and column).

    ``data_kind`` comes from the objective: ``paired`` (prompt + completions, truncated) or
    ``reward`` (whole sequences; rows longer than max_length dropped, as TRL's RewardTrainer).
    """
    from dspref.data.formats import load_sources

    if not cfg.train_file and not cfg.dataset_name:
        raise RunError("no training data: set train_file (a path or a list of paths) or dataset_name")
    train_sources = load_sources(cfg.train_file, cfg.dataset_name, cfg.dataset_config_name, cfg.dataset_split)
    eval_sources = []
    if cfg.eval_file:
        eval_sources = load_sources(cfg.eval_file)
    elif cfg.dataset_name and cfg.eval_dataset_split:
        eval_sources = load_sources(None, cfg.dataset_name, cfg.dataset_config_name, cfg.eval_dataset_split)
    train_ds, eval_ds = tokenize_sources(cfg, tokenizer, data_kind, train_sources, eval_sources,
                                         eval_split_ratio=cfg.eval_split_ratio)
    if data_kind == "unpaired":
        _check_classes(cfg, train_ds)
    if eval_ds is not None and len(eval_ds) == 0:
        eval_ds = None
    return train_ds, eval_ds


def tokenize_sources(cfg, tokenizer, data_kind: str, train_sources, eval_sources, *, eval_split_ratio: float):
    """``(train, eval or None)`` datasets of loaded sources, built as ``data_kind`` needs (see :func:`load_data`)."""
    chat_template = None
    if cfg.chat_template_path:
        with open(cfg.chat_template_path, encoding="utf-8") as f:
            chat_template = f.read()
    common = dict(eval_split_ratio=eval_split_ratio, seed=cfg.seed, max_length=cfg.max_length,
                  num_proc=cfg.dataset_num_proc, chat_template=chat_template)
    if data_kind == "unpaired":
        from dspref.data.unpaired import build_unpaired_datasets

        # BCO's UDM embeds the prompts' text (chat template applied)
        keep_prompt_text = cfg.method == "bco" and bool(cfg.embedding_model_name_or_path)
        return build_unpaired_datasets(
            train_sources, eval_sources, tokenizer, max_prompt_length=cfg.max_prompt_length,
            max_completion_length=cfg.max_completion_length, truncation_mode=cfg.truncation_mode,
            keep_prompt_text=keep_prompt_text, **common)
    if data_kind == "reward":
        from dspref.data.reward import build_reward_datasets

        return build_reward_datasets(train_sources, eval_sources, tokenizer, **common)
    from dspref.data.tokenize import build_paired_datasets

    return build_paired_datasets(
        train_sources, eval_sources, tokenizer, max_prompt_length=cfg.max_prompt_length,
        max_completion_length=cfg.max_completion_length, truncation_mode=cfg.truncation_mode, **common)


def _read_model_config(cfg, model_kind: str):
    """The model's config (checks the path before any weights load); a reward model needs one label."""
    from transformers import AutoConfig

    config = _user_step(lambda: AutoConfig.from_pretrained(cfg.model_name_or_path,
                                                           trust_remote_code=cfg.trust_remote_code),
                        f"cannot read the model config from model_name_or_path={cfg.model_name_or_path!r}")
    is_classifier = any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))
    if model_kind == "sequence-classification" and is_classifier and config.num_labels != 1:
        raise RunError(f"model_name_or_path {cfg.model_name_or_path!r} is a sequence classifier with "
                       f"{config.num_labels} labels; a reward model has exactly one. Start from a base or "
                       f"instruction model (a new one-label head is added) or from a one-label reward model")
    return config


def _reference(cfg, engine, ds_config, ref_ds_user, train_ds, eval_ds, collate, settings, pairs):
    """The live reference, or with precompute_ref_log_probs its cached values (the model then freed)."""
    from dspref.reference import build_reference

    live = build_reference(cfg, policy_engine=engine, policy_ds=ds_config, ref_ds_user=ref_ds_user)
    if not cfg.precompute_ref_log_probs:
        return live
    from dspref.precompute import precompute

    total_micro = settings.total_steps * settings.gradient_accumulation_steps
    reference = precompute(cfg, live, train_ds=train_ds, eval_ds=eval_ds, collate=collate, total_micro=total_micro,
                           per_epoch=settings.micro_batches_per_epoch, pairs=pairs)
    close = getattr(live, "close", None)
    if close is not None:
        close()  # a ZeRO-3 engine is otherwise kept alive by DeepSpeed for the rest of the run
    del live, close
    import gc

    gc.collect()
    return reference


def _check_classes(cfg, train_ds) -> None:
    """Both labels must be present; a KTO imbalance outside TRL's guidance is a warning with the fix."""
    from dspref.data.unpaired import check_balance, class_counts

    n_desirable, n_undesirable = class_counts(train_ds)
    weights = (cfg.desirable_weight, cfg.undesirable_weight) if cfg.method == "kto" else (1.0, 1.0)
    warning = check_balance(n_desirable, n_undesirable, *weights)
    if warning and cfg.method == "kto":
        log.warning(warning)


def _check_reference_inputs(cfg, tokenizer, policy_config) -> dict | None:
    """Reference options that can be checked before any model loads; returns the user's ref JSON."""
    from transformers import AutoConfig, AutoTokenizer

    if cfg.ref_model:
        _check_local_path(cfg.ref_model, "ref_model")
        ref_config = _user_step(lambda: AutoConfig.from_pretrained(cfg.ref_model, trust_remote_code=cfg.trust_remote_code),
                                f"cannot read the reference config from ref_model={cfg.ref_model!r}")
        ref_vocab = ref_config.get_text_config().vocab_size
        if ref_vocab != policy_config.get_text_config().vocab_size:
            raise RunError(f"ref_model {cfg.ref_model!r} has a vocabulary of {ref_vocab} tokens but the policy has "
                           f"{policy_config.get_text_config().vocab_size}; the reference must share the policy's "
                           f"tokenizer")
        try:
            ref_tokenizer = AutoTokenizer.from_pretrained(cfg.ref_model, trust_remote_code=cfg.trust_remote_code)
        except (OSError, ValueError):
            ref_tokenizer = None  # a folder with weights only: the vocabulary size check above stands
        if ref_tokenizer is not None and ref_tokenizer.get_vocab() != tokenizer.get_vocab():
            raise RunError(f"ref_model {cfg.ref_model!r} has a different tokenizer from the policy's (token ids would "
                           f"not mean the same); use a reference trained with the policy's tokenizer")
    if cfg.ref_ds_config:
        return load_ds_config(cfg.ref_ds_config)
    return None


def load_eval_pairs(cfg, tokenizer):
    """Paired eval rows (prompt/chosen/rejected) for the preference accuracy of KTO/BCO, or None.

    Only when eval files are given and every one of them is paired data.
    """
    from dspref.data.formats import detect_paired_format, load_sources
    from dspref.data.tokenize import build_paired_datasets

    if not cfg.eval_file:
        return None
    sources = load_sources(cfg.eval_file)
    try:
        for source in sources:
            detect_paired_format(source)
    except DataError:
        return None  # unpaired eval data: the objective's own metrics only
    chat_template = open(cfg.chat_template_path, encoding="utf-8").read() if cfg.chat_template_path else None
    pairs, _ = build_paired_datasets(
        sources, [], tokenizer, eval_split_ratio=0.0, seed=cfg.seed, max_length=cfg.max_length,
        max_prompt_length=cfg.max_prompt_length, max_completion_length=cfg.max_completion_length,
        truncation_mode=cfg.truncation_mode, num_proc=cfg.dataset_num_proc, chat_template=chat_template)
    return pairs


def _loop_settings(cfg, n_train: int, world: int):
    from dspref.loop import LoopSettings, micro_batches_per_epoch

    per_epoch = micro_batches_per_epoch(n_train, world_size=world, micro_batch=cfg.per_device_train_batch_size,
                                        accumulation=cfg.gradient_accumulation_steps)
    if per_epoch == 0:
        need = world * cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
        raise RunError(f"the training set has {n_train} rows, fewer than one optimizer step needs "
                       f"({world} ranks x per_device_train_batch_size {cfg.per_device_train_batch_size} x "
                       f"gradient_accumulation_steps {cfg.gradient_accumulation_steps} = {need}); "
                       f"add data or lower the batch size")
    steps_per_epoch = per_epoch // cfg.gradient_accumulation_steps
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.num_train_epochs * steps_per_epoch))
    return LoopSettings(
        total_steps=total, micro_batches_per_epoch=per_epoch,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        per_device_train_batch_size=cfg.per_device_train_batch_size,
        per_device_eval_batch_size=cfg.per_device_eval_batch_size, logging_steps=cfg.logging_steps,
        eval_steps=cfg.eval_steps, eval_on_start=cfg.eval_on_start, save_steps=cfg.save_steps,
        save_total_limit=cfg.save_total_limit, stop_after_steps=cfg.stop_after_steps,
        output_dir=cfg.output_dir, seed=cfg.seed, group_by_length=cfg.group_by_length)


def _adamw(cfg, params):
    """Used only when the DeepSpeed JSON has no optimizer block."""
    return torch.optim.AdamW(params, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2),
                             eps=cfg.adam_epsilon, weight_decay=cfg.weight_decay)


def _scheduler(cfg, optimizer, total_steps: int):
    """Used only when the DeepSpeed JSON has no scheduler block: HF's schedules, warmup linear."""
    kind = cfg.lr_scheduler_type
    warmup = 0 if kind == "constant" else num_warmup_steps(cfg, total_steps)

    def factor(step: int) -> float:
        if step < warmup:
            return step / max(1, warmup)
        if kind in ("constant", "constant_with_warmup"):
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _tracker(cfg, rank: int, start_step: int):
    if rank != 0:
        return NullTracker()
    report_to = [cfg.report_to] if isinstance(cfg.report_to, str) else list(cfg.report_to)
    return Tracker(cfg.output_dir, report_to=report_to, config=config_to_dict(cfg), run_name=cfg.run_name,
                   project=cfg.wandb_project, start_step=start_step)


def _main_process_first(rank: int, fn):
    """Rank 0 runs ``fn`` first (tokenizing into the datasets cache), then the others (cache hits).

    Validation errors are deterministic, so every rank raises the same one: none is left waiting.
    """
    error, result = None, None
    if rank == 0:
        try:
            result = fn()
        except Exception as e:  # re-raised after the barrier so the other ranks are released
            error = e
    eng.barrier()
    if error is not None:
        raise error
    return fn() if rank != 0 else result


def _user_step(fn, what: str):
    """Run a loading step; turn its OSError/ValueError into a one-line RunError naming ``what``."""
    try:
        return fn()
    except (OSError, ValueError) as e:
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise RunError(f"{what}: {reason}") from None


def _on_cpu() -> bool:
    return not torch.cuda.is_available()


def _set_seed(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _setup_logging(rank: int) -> None:
    import warnings

    # torch's own collectives warn about their deprecated names on every call DeepSpeed makes.
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format="[dspref] %(message)s", stream=sys.stdout)
    logging.getLogger("dspref").setLevel(level)
    for noisy in ("DeepSpeed", "deepspeed", "datasets", "transformers", "bitsandbytes"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _load_hint(cfg, model_kind: str) -> str:
    """How a user loads what this run exports."""
    auto = "AutoModelForCausalLM" if model_kind == "causal-lm" else "AutoModelForSequenceClassification"
    out = cfg.output_dir
    if cfg.peft_config and not cfg.merge_peft_adapter:
        return f"LoRA adapter: PeftModel.from_pretrained({auto}.from_pretrained({cfg.model_name_or_path!r}), {out!r})"
    return f"{auto}.from_pretrained({out!r})"


def print_summary(result: RunResult) -> None:
    """The short report at the end of a run: what it reached and where everything was written."""
    out = result.output_dir
    how = f"preempted ({result.preempted})" if result.preempted else "stopped" if result.stopped_early else "finished"
    lines = [f"dspref: {how} at step {result.step} in {result.seconds:.1f} s"]
    for key in ("eval_loss",) + tuple(f"eval_{name}" for name in result.headline):
        if key in result.last_eval:
            lines.append(f"  {key:<26} {result.last_eval[key]:.4f}")
    if not result.stopped_early:
        lines.append(f"  model      {out}  ({result.load_hint})")
    else:
        lines.append(f"  checkpoint {ckpt.latest_checkpoint(out)}  (--resume_from_checkpoint latest)")
    lines.append(f"  metrics    {os.path.join(out, METRICS_FILE)}")
    lines.append(f"  config     {os.path.join(out, 'dspref_config.yaml')}, {os.path.join(out, 'ds_config.json')}")
    print("\n".join(lines), flush=True)
