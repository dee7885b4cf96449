"""The planner's estimate against measured memory on CPU (`dspref plan`, issue #9).

    python benchmarks/plan_check.py [--hidden 768 --layers 8 --vocab 32000 --length 128
                                     --micro-batch 2 --steps 3 --setups all]

A random-init Llama of about 106M parameters (fp32, one process, no GPU) trains a few steps through
dspref's real path (``dspref.run.train``) under several setups. Each run is a fresh subprocess that
imports everything first; the RSS just before the model is built (when ``dspref.engine.load_model``
is first called) is subtracted from the process's peak RSS (``ru_maxrss``) after the steps. The
planner's estimate for the same setup (``--cpu --dtype fp32``: device memory is host memory) is
compared with that difference. Writes benchmarks/results/plan_check.{md,json}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_results  # noqa: E402
from gradient_checkpointing import write_rows  # noqa: E402

# (name, method, zero stage, reference strategy, gradient checkpointing, LoRA rank)
SETUPS = {
    "cpo-z0": ("cpo", 0, None, False, None),
    "cpo-z2": ("cpo", 2, None, False, None),
    "cpo-z3": ("cpo", 3, None, False, None),
    "cpo-z3-gc": ("cpo", 3, None, True, None),
    "kto-z2-replicated": ("kto", 2, "replicated", False, None),
    "kto-z3-sharded": ("kto", 3, "sharded", False, None),
    "kto-z2-precomputed": ("kto", 2, "precomputed", False, None),
    "kto-z3-precomputed": ("kto", 3, "precomputed", False, None),
}
# How glibc malloc runs in the measured process. "mmap": every block of 64 KiB or more is its own
# mmap, returned to the system when freed (MALLOC_MMAP_THRESHOLD_=65536), so RSS follows the live
# tensors as a GPU's max_memory_allocated does. "default": glibc's dynamic threshold (up to 32 MiB)
# keeps freed activations and DeepSpeed's freed temporaries resident in its heap.
MALLOC_MODES = {"mmap": {"MALLOC_MMAP_THRESHOLD_": "65536"}, "default": {}}
# logits_chunk_size of the runs: smaller than the completion positions of a micro-batch (7 per
# sequence), so the planner's worst-case chunk is the chunk the runs really hold.
CHUNK = 16


def build_model_folder(path: Path, a) -> None:
    """config.json of the widened demo Llama + the demo tokenizer: enough for random_init."""
    config = json.loads((ROOT / "launch/demo/model/config.json").read_text())
    config.update(hidden_size=a.hidden, num_hidden_layers=a.layers, intermediate_size=a.hidden * 8 // 3,
                  num_attention_heads=a.hidden // 64, num_key_value_heads=a.hidden // 64, head_dim=64,
                  vocab_size=a.vocab, max_position_embeddings=max(256, a.length))
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(ROOT / "launch/demo/model" / name, path / name)


def write_ds_config(path: Path, method: str, stage: int, micro_batch: int) -> None:
    """The planner's own DeepSpeed JSON for the setup (fp32)."""
    from dspref.plan import PlanInputs, Setup, ds_config_for

    inp = PlanInputs(method=method, gpus_per_node=1, micro_batch=micro_batch, dtype="fp32", on_cpu=True)
    path.write_text(json.dumps(ds_config_for(Setup(stage), inp), indent=2))


def train_args(name: str, model: Path, data: Path, ds: Path, out: Path, a) -> list[str]:
    method, _, ref, gc, lora = SETUPS[name]
    args = ["--method", method, "--model_name_or_path", str(model), "--random_init", "true", "--train_file", str(data),
            "--ds_config", str(ds), "--output_dir", str(out), "--per_device_train_batch_size", str(a.micro_batch),
            "--max_steps", str(a.steps), "--logging_steps", "1", "--save_steps", "100000", "--eval_on_start", "false",
            "--max_length", str(a.length), "--max_prompt_length", str(a.length - 7), "--learning_rate", "1e-5",
            "--gradient_checkpointing", str(gc).lower(), "--logits_chunk_size", str(CHUNK)]
    if ref == "precomputed":
        args += ["--precompute_ref_log_probs", "true"]
    if lora:
        args += ["--peft_config", json.dumps({"r": lora, "lora_alpha": 2 * lora, "target_modules": "all-linear"})]
    return args


def child(args: list[str]) -> None:
    """Inside the measured process: import everything, sample RSS when the model is about to be
    built, train, print {"before": bytes, "peak": bytes}. The final export is skipped: it is not
    training memory (safetensors serialises a copy of the weights)."""
    import resource

    import dspref.checkpoint as ckpt
    import dspref.engine as eng
    import dspref.run as run
    from dspref.config import parse_args

    marks: dict = {}
    load_model = eng.load_model

    def measured_load_model(*a, **k):
        marks.setdefault("before", _current_rss())
        return load_model(*a, **k)

    eng.load_model = measured_load_model
    ckpt.export_model = lambda *a, **k: None
    cfg, explicit = parse_args(args)
    run.train(cfg, explicit)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print("PLAN_CHECK " + json.dumps({"before": marks["before"], "peak": peak}), flush=True)


def _current_rss() -> int:
    with open("/proc/self/status") as fh:
        kib = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:"))
    return kib * 1024


def predict(name: str, model: Path, a) -> dict:
    from dspref.plan import LoraSpec, PlanInputs, Setup, estimate, load_model_config, model_shape

    method, stage, ref, gc, lora = SETUPS[name]
    shape = model_shape(load_model_config(str(model)), lora=LoraSpec(lora) if lora else None, name="check")
    inp = PlanInputs(method=method, gpus_per_node=1, micro_batch=a.micro_batch, max_length=a.length, dtype="fp32",
                     logits_chunk_size=CHUNK, on_cpu=True)
    e = estimate(shape, inp, Setup(stage, "none", ref, gc, True))
    parts = {k: getattr(e, k) for k in ("params", "grads", "optim", "step", "reference", "activations", "logits",
                                        "buffers", "prepass")}
    return {"params": shape.params, "predicted": e.device, "parts": parts}


def measure(name: str, tmp: Path, a, malloc: str) -> dict:
    """One training run in a fresh process: RSS before the model, peak RSS, their difference."""
    method, stage, *_ = SETUPS[name]
    ds = tmp / f"{name}.json"
    write_ds_config(ds, method, stage, a.micro_batch)
    out = tmp / f"{name}-{malloc}"
    args = train_args(name, tmp / "model", tmp / "train.jsonl", ds, out, a)
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT") and not k.startswith("MALLOC_")}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="offline", DSPREF_CACHE=str(tmp / "cache"),
               PYTHONPATH=str(ROOT), **MALLOC_MODES[malloc])
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], env=env, capture_output=True,
                          text=True)
    shutil.rmtree(out, ignore_errors=True)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("PLAN_CHECK ")), None)
    if proc.returncode != 0 or line is None:
        return {"failed": (proc.stderr or proc.stdout)[-1500:]}
    got = json.loads(line.removeprefix("PLAN_CHECK "))
    return {"rss_before": got["before"], "peak_rss": got["peak"], "measured": got["peak"] - got["before"]}


def run_one(name: str, tmp: Path, a) -> dict:
    result = {"setup": name, **predict(name, tmp / "model", a)}
    for malloc in a.malloc:
        got = measure(name, tmp, a, malloc)
        if "measured" in got:
            got["error_pct"] = 100 * (result["predicted"] - got["measured"]) / got["measured"]
        result[malloc] = got
    return result


COLUMN = {"mmap": "measured, malloc mmap >= 64 KiB (GiB)", "default": "measured, glibc defaults (GiB)"}


def table(results: list[dict], modes: list[str]) -> str:
    def cells(r: dict, malloc: str) -> str:
        got = r[malloc]
        if "measured" not in got:
            return "failed | "
        return f"{got['measured'] / 2**30:.3f} | {got['error_pct']:+.1f}%"

    head = "| setup | predicted (GiB) | " + " | ".join(f"{COLUMN[m]} | error" for m in modes) + " |"
    lines = [head, "|---|---|" + "---|---|" * len(modes)]
    for r in results:
        lines.append(f"| {r['setup']} | {r['predicted'] / 2**30:.3f} | " + " | ".join(cells(r, m) for m in modes) + " |")
    return "\n".join(lines)


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return 0
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--length", type=int, default=128)
    p.add_argument("--micro-batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--setups", default="all", help=f"comma-separated among {', '.join(SETUPS)}")
    p.add_argument("--malloc", default="mmap", help="comma-separated among mmap, default (see MALLOC_MODES)")
    a = p.parse_args()
    a.malloc = a.malloc.split(",")
    if any(m not in MALLOC_MODES for m in a.malloc):
        p.error(f"--malloc takes mmap and/or default, got {','.join(a.malloc)}")
    names = list(SETUPS) if a.setups == "all" else a.setups.split(",")
    unknown = [n for n in names if n not in SETUPS]
    if unknown:
        p.error(f"unknown setups {unknown}; choose among {', '.join(SETUPS)}")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_model_folder(tmp / "model", a)
        # Rows longer than max_length: every sequence is truncated to exactly --length tokens.
        write_rows(tmp / "train.jsonl", 4 * a.micro_batch * (a.steps + 1), a.length + 16)
        for name in names:
            results.append(run_one(name, tmp, a))
            print(json.dumps({k: v for k, v in results[-1].items() if k != "parts"}), flush=True)
    n_params = results[0]["params"] if results else 0
    modes = {"mmap": "glibc returning every freed block of 64 KiB or more (MALLOC_MMAP_THRESHOLD_=65536), so RSS "
                     "follows live memory, which the planner models",
             "default": "glibc's defaults (freed heap blocks below its dynamic threshold stay resident)"}
    flags = ("" if a.setups == "all" else f" --setups {a.setups}") + ("" if a.malloc == ["mmap"] else
                                                                       f" --malloc {','.join(a.malloc)}")
    title = (f"Planner estimate vs measured memory on CPU: random-init Llama, {n_params / 1e6:.1f}M parameters "
             f"(hidden {a.hidden}, {a.layers} layers, vocab {a.vocab}), fp32, one process, {a.length}-token sequences, "
             f"micro-batch {a.micro_batch}, {a.steps} steps, logits_chunk_size {CHUNK}. Measured: peak RSS "
             f"(ru_maxrss) minus the RSS just before the model is built, with "
             f"{'; and with '.join(modes[m] for m in a.malloc)}. Command: `python benchmarks/plan_check.py{flags}`")
    write_results("plan_check", title=title, table=table(results, a.malloc), payload={"args": vars(a),
                                                                                        "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
