"""dspref vs TRL, side by side: tokens/s, seconds/step and peak memory on the same model and data.

    python benchmarks/run.py --method cpo,kto --model-shape tiny --data-shape fixed,variable \
        --ds_config ds_configs/zero3.json [--steps 10 --warmup 2 --micro-batch 4 --max-length 512
        --compare trl --dspref-args "--key value ..."]

For each (method, data shape): a random-init Qwen2 of the chosen shape (seeded, cached; a sequence
classifier with one label for reward), a WordLevel tokenizer whose vocabulary is exactly the
model's (``w0``..``wN`` and special tokens, so k synthetic words are k tokens), seeded synthetic
rows, then one training process per side: dspref (``benchmarks/child_dspref.py``) and, with
``--compare trl``, TRL's trainer for the method (``benchmarks/child_trl.py`` in the venvs made by
``benchmarks/setup_bench.sh``). Both: one process, ZeRO-3 from the same DeepSpeed JSON, fp32 (bf16 with --bf16),
micro-batch 4, no gradient accumulation, gradient checkpointing, max_length 512, no eval, no saving.

Same definitions on both sides (each child writes per-step records, see step_records.py; this
script computes every figure from them):

- tokens/s: non-padding tokens (prompt + completion) of the sequences the policy trains on
  (chosen + rejected, or the completions; KTO's KL rows not counted), summed over the steps after
  the warm-up, divided by the wall time from the end of the last warm-up optimizer step to the end
  of the last step. seconds/step: that time over the measured steps.
- peak RSS: ``ru_maxrss`` of the training process (its own, not its children's).
- with CUDA: peak GPU memory (``max_memory_allocated``) and MFU = model FLOPs / seconds / peak,
  model FLOPs = 6·N·trained tokens + 2·N·no-grad tokens + attention, where N counts every weight
  that a token's forward multiplies by (all parameters but the input embedding; the output
  projection counted once even when tied), no-grad tokens are KTO's KL rows plus, where the
  reference runs inside the step, the reference's forward over all rows, and attention is
  2·L·width·T² per sequence forward (causal QKᵀ and AV), ×3 when trained. Recomputation by
  gradient checkpointing is not model FLOPs. Peak: --peak-flops (default 989e12, H100 dense bf16).

Time spent before the first step (loading, tokenizing, dspref's reference precompute) is outside the
measured window; it is reported as ``seconds_to_first_step``. Writes benchmarks/results/run_<shape>.json/.md
(``run_<shape>_L<max_length>`` at a --max-length other than 512: the data lengths scale with it).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, ROOT, write_results  # noqa: E402

METHODS = ("bco", "cpo", "kto", "reward")
PAIRED = ("cpo", "reward")  # prompt/chosen/rejected rows; the others: prompt/completion/label

# Qwen2 shapes: hidden, layers, attention heads, KV heads, MLP width, vocabulary (embeddings tied).
SHAPES = {
    "tiny": dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, num_key_value_heads=2,
                 intermediate_size=1024, vocab_size=32768),
    "qwen2-0.5b": dict(hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                       intermediate_size=4864, vocab_size=151936),
    "qwen2.5-3b": dict(hidden_size=2048, num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=2,
                       intermediate_size=11008, vocab_size=151936),
}
# Token lengths (inclusive) at max_length 512: prompts, completions. 256 + 254 + EOS fits on both sides.
# Other max_length values scale every bound (see data_lengths): the scaling runs keep the same shape.
DATA_SHAPES = {"fixed": ((240, 256), (240, 254)), "variable": ((16, 256), (8, 254))}
BASE_LENGTH = 512
SPECIALS = ("<unk>", "<|endoftext|>", "<|pad|>")  # the last ids of the vocabulary: unk, eos, pad

# The dspref settings a user asking for speed would use, per method (what both sides share: dspref_command).
PRECOMPUTE = ["--precompute_ref_log_probs", "true"]
PACKED = ["--padding_free", "true"]  # padding-free batches (bins of max_length tokens)
SPEED_FLAGS = {"bco": PRECOMPUTE + PACKED, "cpo": PACKED, "kto": PRECOMPUTE + PACKED, "reward": PACKED}
METHOD_FLAGS = {"kto": ["--loss_type", "kto"]}  # KTO with its KL pairs, as TRL's default

# What differs in how TRL runs a method, for the table.
TRL_NOTES = {"bco": "trl 1.13.0 (BCO left TRL after it); ref_model loaded from the same folder, as TRL asks "
                    "under ZeRO-3"}
SETUP_HINT = "bash benchmarks/setup_bench.sh"


# --------------------------------------------------------------------------- model and tokenizer
def word_vocab(vocab_size: int) -> dict[str, int]:
    """``w0``..``w{V-4}`` then the special tokens: exactly ``vocab_size`` entries."""
    words = {f"w{i}": i for i in range(vocab_size - len(SPECIALS))}
    return words | {s: vocab_size - len(SPECIALS) + i for i, s in enumerate(SPECIALS)}


def build_tokenizer(vocab_size: int):
    """A WordLevel tokenizer (whitespace pre-tokenizer) over :func:`word_vocab`: one token per word."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    unk, eos, pad = SPECIALS
    core = Tokenizer(models.WordLevel(word_vocab(vocab_size), unk_token=unk))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece()  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token=unk, eos_token=eos, pad_token=pad)


def model_config(shape: str, kind: str):
    from transformers import Qwen2Config

    s = SHAPES[shape]
    ids = word_vocab(s["vocab_size"])
    extra = dict(num_labels=1) if kind == "seq-cls" else {}
    return Qwen2Config(**s, tie_word_embeddings=True, max_position_embeddings=4096, use_cache=False,
                       eos_token_id=ids[SPECIALS[1]], pad_token_id=ids[SPECIALS[2]], bos_token_id=None, **extra)


def build_model(shape: str, kind: str, cache: Path, seed: int = 0) -> tuple[Path, Path]:
    """(model folder, tokenizer folder) of the random-init model (``causal`` or ``seq-cls``), saved once in ``cache``.

    The tokenizer has its own folder: beside a Qwen2 config.json, transformers 5's AutoTokenizer
    loads the Qwen2 tokenizer class, which rebuilds the vocabulary as BPE and drops every word.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    config = model_config(shape, kind)
    tokenizer = cache / f"tokenizer-v{config.vocab_size}"
    if not (tokenizer / "tokenizer.json").exists():
        build_tokenizer(config.vocab_size).save_pretrained(tokenizer.with_name(tokenizer.name + ".tmp"))
        tokenizer.with_name(tokenizer.name + ".tmp").rename(tokenizer)  # complete or absent
    path = cache / f"{shape}-{kind}-seed{seed}"
    if not (path / "config.json").exists():
        torch.manual_seed(seed)
        auto = AutoModelForSequenceClassification if kind == "seq-cls" else AutoModelForCausalLM
        auto.from_config(config).save_pretrained(path.with_name(path.name + ".tmp"))
        path.with_name(path.name + ".tmp").rename(path)
    return path, tokenizer


def flop_params(shape: str, kind: str) -> int:
    """N of the MFU formula: every weight a token's forward multiplies by (not the input embedding)."""
    s = SHAPES[shape]
    d, layers, inter = s["hidden_size"], s["num_hidden_layers"], s["intermediate_size"]
    head = d // s["num_attention_heads"]
    q, kv = s["num_attention_heads"] * head, s["num_key_value_heads"] * head
    per_layer = d * q + 2 * d * kv + q * d + 3 * d * inter  # q, k, v, o projections; gate, up, down
    out = d * (1 if kind == "seq-cls" else s["vocab_size"])  # score head, or the (tied) output projection
    return layers * per_layer + out


# --------------------------------------------------------------------------- data
def data_lengths(data_shape: str, max_length: int = BASE_LENGTH) -> tuple[tuple[int, int], tuple[int, int]]:
    """((prompt lo, hi), (completion lo, hi)) in tokens: :data:`DATA_SHAPES` scaled by max_length / 512.

    Prompts stay within max_length // 2 (the max_prompt_length both sides get) and prompt + completion
    + EOS within max_length, so nothing is truncated at any max_length."""
    (p_lo, p_hi), (c_lo, c_hi) = DATA_SHAPES[data_shape]
    scale = max_length / BASE_LENGTH  # 1 at 512: DATA_SHAPES unchanged
    p_hi = min(round(p_hi * scale), max_length // 2)
    c_hi = min(round(c_hi * scale), max_length - p_hi - 2)
    return (min(max(1, round(p_lo * scale)), p_hi), p_hi), (min(max(1, round(c_lo * scale)), c_hi), c_hi)


def synthetic_rows(method: str, n: int, data_shape: str, vocab_words: int, seed: int = 0,
                   max_length: int = BASE_LENGTH) -> list[dict]:
    """``n`` seeded rows of random words: paired (prompt/chosen/rejected) or unpaired (prompt/completion/label)."""
    rng = random.Random(seed)
    (p_lo, p_hi), (c_lo, c_hi) = data_lengths(data_shape, max_length)

    def text(lo, hi, lead=""):
        return lead + " ".join(f"w{rng.randrange(vocab_words)}" for _ in range(rng.randint(lo, hi)))

    rows = []
    for i in range(n):
        prompt = text(p_lo, p_hi)
        if method in PAIRED:
            rows.append({"prompt": prompt, "chosen": text(c_lo, c_hi, " "), "rejected": text(c_lo, c_hi, " ")})
        else:
            rows.append({"prompt": prompt, "completion": text(c_lo, c_hi, " "), "label": i % 2 == 0})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


# --------------------------------------------------------------------------- measurement
def summarize(records: list[dict], warmup: int) -> dict:
    """The figures of one side from its per-step records (see the module docstring)."""
    if warmup < 1 or len(records) <= warmup:
        raise ValueError(f"need at least {warmup + 1} step records after {warmup} warm-up steps, got {len(records)}")
    window = records[warmup:]
    seconds = window[-1]["t"] - records[warmup - 1]["t"]
    trained = sum(r["trained_tokens"] for r in window)
    gpu = [r["gpu_gib"] for r in records if r.get("gpu_gib") is not None]
    return {"steps_measured": len(window), "seconds": seconds, "trained_tokens": trained,
            "trained_sq": sum(r["trained_sq"] for r in window),
            "no_grad_tokens": sum(r["no_grad_tokens"] for r in window),
            "no_grad_sq": sum(r["no_grad_sq"] for r in window),
            "tokens_per_second": trained / seconds, "seconds_per_step": seconds / len(window),
            "seconds_to_first_step": records[0]["t"], "peak_rss_gib": max(r["rss_gib"] for r in records),
            "peak_gpu_gib": max(gpu) if gpu else None}


def model_flops(n_params: int, layers: int, attn_width: int, s: dict, *, reference_in_step: bool) -> float:
    """Model FLOPs of the measured window of one side's summary ``s`` (see the module docstring)."""
    tokens, sq = s["no_grad_tokens"], s["no_grad_sq"]
    if reference_in_step:  # the reference scores every row (trained and KL) once, without grad
        tokens, sq = 2 * tokens + s["trained_tokens"], 2 * sq + s["trained_sq"]
    attention = 2 * layers * attn_width  # per T² of one causal forward: QKᵀ and AV, halved by the mask
    return (6 * n_params * s["trained_tokens"] + 3 * attention * s["trained_sq"]
            + 2 * n_params * tokens + attention * sq)


def length_suffix(max_length: int) -> str:
    """Result and run names: none at max_length 512, ``_L<max_length>`` otherwise (the scaling runs)."""
    return "" if max_length == BASE_LENGTH else f"_L{max_length}"


def ratio(a, b):
    return a / b if a is not None and b else None


def fmt(x, digits=2):
    return "–" if x is None else f"{x:,.{digits}f}"


def table(results: list[dict]) -> str:
    """Markdown: each side's figures and dspref / TRL ratios, one row per (method, data shape)."""
    lines = ["| method | data | dspref tok/s | TRL tok/s | ratio | dspref s/step | TRL s/step | ratio "
             "| dspref RSS GiB | TRL RSS GiB | ratio | TRL notes |", "|" + "---|" * 12]
    for r in results:
        d, t = r.get("dspref") or {}, r.get("trl") or {}
        cells = [r["method"], r["data_shape"]]
        for key, digits in (("tokens_per_second", 0), ("seconds_per_step", 2), ("peak_rss_gib", 2)):
            cells += [fmt(d.get(key), digits), fmt(t.get(key), digits), fmt(ratio(d.get(key), t.get(key)), 2)]
        cells.append(r.get("trl_note", ""))
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    flags = {r["method"]: " ".join(r.get("dspref_flags") or []) or "(none)" for r in results if "dspref_flags" in r}
    if flags:
        lines += [""] + [f"- dspref {m} flags beyond the shared settings: `{f}`" for m, f in flags.items()]
    if any((r.get("dspref") or {}).get("mfu") is not None for r in results):
        lines += ["", "| method | data | dspref MFU | TRL MFU | dspref GPU GiB | TRL GPU GiB |", "|" + "---|" * 6]
        for r in results:
            d, t = r.get("dspref") or {}, r.get("trl") or {}
            lines.append(f"| {r['method']} | {r['data_shape']} | {fmt(d.get('mfu'), 4)} | {fmt(t.get('mfu'), 4)} | "
                         f"{fmt(d.get('peak_gpu_gib'))} | {fmt(t.get('peak_gpu_gib'))} |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- the two sides
def trl_python(method: str, venvs: dict[str, Path]) -> Path:
    return venvs.get(method, venvs["default"]) / "bin" / "python"


def check_trl(methods: list[str], venvs: dict[str, Path]) -> dict[str, str]:
    """Methods without a TRL peer -> why. Exits, naming the setup script, when the main TRL venv has no trl."""
    main = trl_python("cpo", venvs)
    if not main.exists() or subprocess.run([str(main), "-c", "import trl"], capture_output=True).returncode:
        sys.exit(f"run.py: error: --compare trl needs TRL in its own venv ({main} has no trl); create it with "
                 f"`{SETUP_HINT}` (.venv-bench: trl 1.16.0, .venv-trl113: trl 1.13.0 for BCO)")
    missing = {}
    for method in methods:
        py = trl_python(method, venvs)
        if not py.exists() or subprocess.run([str(py), "-c", "import trl"], capture_output=True).returncode:
            missing[method] = f"no TRL venv at {py.parent.parent} ({SETUP_HINT})"
    return missing


def child_env(python: str) -> dict:
    """The same environment for both sides: one process, world size 1, a free port.

    Each venv gets its own torch extensions folder: DeepSpeed's CPU ops are built against that venv's
    torch, and a shared folder would make the two sides rebuild them in turn.
    """
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    if Path(python).parent.parent.resolve() != Path(sys.prefix).resolve():
        base = env.get("TORCH_EXTENSIONS_DIR") or str(Path.home() / ".cache/torch_extensions")
        env["TORCH_EXTENSIONS_DIR"] = f"{base}-{Path(python).parent.parent.name}"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
               OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"), TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    return env


def run_child(cmd: list[str], records: Path, log: Path, timeout: float | None,
              env: dict | None = None) -> tuple[list[dict], str | None]:
    """Run one side (``env``: extra variables); returns (its step records, None) or ([], the tail of its log)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    for stale in (records, Path(str(records) + ".facts.json")):  # never read an earlier run's records
        stale.unlink(missing_ok=True)
    with open(log, "w") as f:
        try:
            status = subprocess.run(cmd, env=child_env(cmd[0]) | (env or {}), stdout=f, stderr=subprocess.STDOUT,
                                    timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            status = "timeout"
    rows = [json.loads(x) for x in records.read_text().splitlines()] if records.exists() else []
    if status != 0:
        return rows, f"exit {status}: " + log.read_text()[-1500:]
    return rows, None


def dspref_command(a, method: str, model: Path, tokenizer: Path, data: Path, out: Path, records: Path) -> list[str]:
    args = ["--method", method, "--model_name_or_path", str(model), "--tokenizer_name_or_path", str(tokenizer),
            "--train_file", str(data),
            "--ds_config", str(a.ds_config), "--output_dir", str(out), "--overwrite_output_dir", "true",
            "--per_device_train_batch_size", str(a.micro_batch), "--gradient_accumulation_steps", "1",
            "--gradient_checkpointing", "true", "--bf16", str(a.bf16).lower(), "--fp16", "false",
            "--max_length", str(a.max_length), "--max_steps", str(a.warmup + a.steps), "--learning_rate", "1e-6",
            "--lr_scheduler_type", "linear", "--warmup_steps", "0", "--seed", str(a.seed), "--logging_steps", "1",
            "--eval_on_start", "false", "--save_steps", "1000000000", "--report_to", "none"]
    if method != "reward":  # dspref wants it below max_length; no synthetic prompt is longer
        args += ["--max_prompt_length", str(a.max_length // 2)]
    args += METHOD_FLAGS.get(method, []) + SPEED_FLAGS[method] + shlex.split(a.dspref_args)
    return [sys.executable, str(ROOT / "benchmarks/child_dspref.py"), str(records), "--"] + args


def trl_command(a, method: str, model: Path, tokenizer: Path, data: Path, out: Path, records: Path,
                venvs) -> list[str]:
    return [str(trl_python(method, venvs)), str(ROOT / "benchmarks/child_trl.py"), "--method", method,
            "--model", str(model), "--tokenizer", str(tokenizer), "--data", str(data),
            "--ds-config", str(trl_ds_config(a.ds_config, out)),
            "--records", str(records), "--output-dir", str(out), "--micro-batch", str(a.micro_batch),
            "--max-length", str(a.max_length), "--steps", str(a.warmup + a.steps), "--seed", str(a.seed),
            *(["--bf16"] if a.bf16 else [])]


def trl_ds_config(path: Path, out: Path) -> Path:
    """The same DeepSpeed JSON for TRL, with the one change dspref also makes on CPU: torch's AdamW
    (``torch_adam``) instead of FusedAdam, whose kernels need CUDA (dspref.dsconfig._resolve_optimizer)."""
    import torch

    ds = json.loads(Path(path).read_text())
    offloaded = (ds.get("zero_optimization", {}).get("offload_optimizer") or {}).get("device") in ("cpu", "nvme")
    if not torch.cuda.is_available() and "optimizer" in ds and not offloaded:
        ds["optimizer"].setdefault("params", {})["torch_adam"] = True
        ds["zero_allow_untested_optimizer"] = True
    out.mkdir(parents=True, exist_ok=True)
    (out / "ds_config.json").write_text(json.dumps(ds, indent=2))
    return out / "ds_config.json"


def measure(a, method, side, cmd, records, log, shape, kind, reference_in_step, env=None) -> dict:
    rows, error = run_child(cmd, records, log, a.timeout, env)
    if error:
        print(f"{side} {method}: failed ({log})\n{error}", file=sys.stderr, flush=True)
        return {"error": error, "log": str(log)}
    s = summarize(rows, a.warmup)
    facts = Path(str(records) + ".facts.json")
    s["engine"] = json.loads(facts.read_text()) if facts.exists() else None
    import torch

    if torch.cuda.is_available():
        cfg = SHAPES[shape]
        attn_width = cfg["hidden_size"]  # heads × head_dim
        flops = model_flops(flop_params(shape, kind), cfg["num_hidden_layers"], attn_width, s,
                            reference_in_step=reference_in_step)
        s["mfu"] = flops / s["seconds"] / a.peak_flops
    else:
        s["mfu"] = None
    s["log"] = str(log)
    s["reference_in_step"] = reference_in_step
    return s


def engine_note(facts: dict | None) -> str:
    if not facts:
        return "engine unknown"
    if not facts["deepspeed"]:
        return f"**NOT under DeepSpeed** ({facts['module']})"
    return f"DeepSpeed ZeRO-{facts['zero_stage']} ({facts['optimizer']})"


def trl_note(s: dict, method: str, reference_in_step: bool) -> str:
    if "error" in s:
        return "failed: see " + s["log"]
    ref = "reference each step (precompute_ref_log_probs=False)" if reference_in_step else "no reference"
    return "; ".join([engine_note(s.get("engine")), ref] + ([TRL_NOTES[method]] if method in TRL_NOTES else []))


# --------------------------------------------------------------------------- main
def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default="cpo", help="comma list of " + ",".join(METHODS))
    p.add_argument("--model-shape", default="tiny", choices=sorted(SHAPES))
    p.add_argument("--data-shape", default="fixed", help="comma list of " + ",".join(DATA_SHAPES))
    p.add_argument("--ds_config", "--ds-config", type=Path, default=ROOT / "ds_configs/zero3.json")
    p.add_argument("--steps", type=int, default=10, help="measured optimizer steps (after the warm-up)")
    p.add_argument("--warmup", type=int, default=2, help="optimizer steps before the measured window (>= 1)")
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--max-length", type=int, default=512)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--bf16", action="store_true", help="train in bf16 on both sides (GPU runs); default fp32")
    p.add_argument("--compare", choices=["trl"], default=None)
    p.add_argument("--dspref-args", default="", help='extra dspref flags, e.g. "--logits_chunk_size 512"')
    p.add_argument("--work-dir", type=Path, default=ROOT / "runs/bench", help="models, data, outputs, logs")
    p.add_argument("--results-dir", type=Path, default=RESULTS, help="where the result table and JSON go")
    p.add_argument("--bench-venv", type=Path, default=ROOT / ".venv-bench", help="TRL 1.16.0 venv")
    p.add_argument("--bco-venv", type=Path, default=ROOT / ".venv-trl113", help="TRL 1.13.0 venv (BCO)")
    p.add_argument("--peak-flops", type=float, default=989e12, help="accelerator peak FLOP/s for MFU")
    p.add_argument("--timeout", type=float, default=None, help="seconds per training child")
    a = p.parse_args(argv)
    a.methods, a.data_shapes = a.method.split(","), a.data_shape.split(",")
    for name, values, allowed in (("--method", a.methods, METHODS), ("--data-shape", a.data_shapes, DATA_SHAPES)):
        if bad := [v for v in values if v not in allowed]:
            p.error(f"{name}: unknown {bad}; choose from {', '.join(allowed)}")
    if a.warmup < 1 or a.steps < 1:
        p.error("--warmup and --steps must be >= 1 (the window starts at the end of the last warm-up step)")
    if "gradient_accumulation" in a.dspref_args:
        p.error("--dspref-args: the benchmark runs without gradient accumulation on both sides")
    return a


def main(argv=None) -> int:
    a = parse(argv)
    venvs = {"default": a.bench_venv, "bco": a.bco_venv}
    no_peer = check_trl(a.methods, venvs) if a.compare else {}
    work = a.work_dir.resolve()
    results = []
    for method in a.methods:
        kind = "seq-cls" if method == "reward" else "causal"
        model, tokenizer = build_model(a.model_shape, kind, work / "models", seed=a.seed)
        for data_shape in a.data_shapes:
            vocab_words = SHAPES[a.model_shape]["vocab_size"] - len(SPECIALS)
            rows = synthetic_rows(method, a.micro_batch * (a.warmup + a.steps), data_shape, vocab_words, a.seed,
                                  a.max_length)
            run = work / f"{a.model_shape}-{method}-{data_shape}{length_suffix(a.max_length)}"
            data = write_rows(run / "train.jsonl", rows)  # exactly one epoch: both sides train on the same rows
            entry = {"method": method, "data_shape": data_shape, "rows": len(rows),
                     "dspref_flags": METHOD_FLAGS.get(method, []) + SPEED_FLAGS[method] + shlex.split(a.dspref_args)}
            cmd = dspref_command(a, method, model, tokenizer, data, run / "dspref", run / "dspref-steps.jsonl")
            # a fresh dspref cache: tokenizing and the reference precompute happen in every run, as TRL's work does
            shutil.rmtree(run / "dspref-cache", ignore_errors=True)
            entry["dspref"] = measure(a, method, "dspref", cmd, run / "dspref-steps.jsonl", run / "dspref.log",
                                      a.model_shape, kind, reference_in_step=False,
                                      env={"DSPREF_CACHE": str(run / "dspref-cache")})
            if a.compare and method in no_peer:
                entry["trl_note"] = "no peer: " + no_peer[method]
            elif a.compare:
                cmd = trl_command(a, method, model, tokenizer, data, run / "trl", run / "trl-steps.jsonl", venvs)
                # TRL's default: no precomputed reference, so KTO/BCO score the reference inside each step
                ref = method in ("kto", "bco")
                entry["trl"] = measure(a, method, "trl", cmd, run / "trl-steps.jsonl", run / "trl.log",
                                       a.model_shape, kind, reference_in_step=ref)
                entry["trl_note"] = trl_note(entry["trl"], method, ref)
            results.append(entry)
            print(json.dumps({k: entry[k] for k in ("method", "data_shape")} |
                             {side: {k: entry[side].get(k) for k in ("tokens_per_second", "seconds_per_step",
                                                                    "peak_rss_gib", "error")}
                              for side in ("dspref", "trl") if side in entry}), flush=True)
    title = (f"dspref vs TRL on {a.model_shape} (random-init Qwen2), ZeRO-3 from {a.ds_config.name}, one process, "
             f"{'bf16' if a.bf16 else 'fp32'}, micro-batch {a.micro_batch}, max_length {a.max_length}, gradient checkpointing, "
             f"{a.steps} measured steps after {a.warmup} warm-up. Ratios are dspref / TRL.\n\n"
             f"`python benchmarks/run.py {' '.join(sys.argv[1:] if argv is None else argv)}`")
    write_results(f"run_{a.model_shape}{length_suffix(a.max_length)}", title=title, table=table(results),
                  payload={"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
                           "versions": versions(a, venvs), "results": results}, folder=a.results_dir)
    return 0 if all("error" not in (r.get("dspref") or {}) for r in results) else 1


def versions(a, venvs) -> dict:
    """Library versions of each side's interpreter."""
    code = ("import json, torch, transformers, deepspeed\n"
            "try:\n import trl; v = trl.__version__\nexcept ImportError:\n v = None\n"
            "print(json.dumps({'torch': torch.__version__, 'transformers': transformers.__version__, "
            "'deepspeed': deepspeed.__version__, 'trl': v}))")
    pythons = {"dspref": Path(sys.executable)}
    if a.compare:
        pythons |= {f"trl ({trl_python(m, venvs).parent.parent.name})": trl_python(m, venvs) for m in a.methods}
    out = {}
    for side, py in pythons.items():
        proc = subprocess.run([str(py), "-c", code], capture_output=True, text=True) if py.exists() else None
        out[side] = json.loads(proc.stdout.splitlines()[-1]) if proc is not None and proc.returncode == 0 else None
    return out


if __name__ == "__main__":
    sys.exit(main())
