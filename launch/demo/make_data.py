#!/usr/bin/env python
"""Build the shipped demo assets: a sorting preference dataset, a tiny tokenizer
and a tiny Llama config.

Outputs (all deterministic):

* ``launch/demo/data/train.jsonl`` / ``launch/demo/data/eval.jsonl``:
  rows ``{"prompt": "sort: 7 2 9 4 1 =", "chosen": " 1 2 4 7 9",
  "rejected": " 9 1 4 2 7"}``. ``chosen`` is the prompt's digits sorted
  ascending; ``rejected`` is a permutation of the same digits that is not
  sorted (so it is wrong and has exactly as many tokens). Eval prompts never
  occur in train.
* ``launch/demo/model/``: a word-level Hugging Face fast tokenizer
  (``tokenizer.json`` + ``tokenizer_config.json``; BOS prepended, no EOS
  appended, a small chat template) and a tiny ``LlamaConfig`` (``config.json``).
  No weights are shipped: the trainer initialises the model from the config.

Usage::

    python launch/demo/make_data.py           # (re)write every file
    python launch/demo/make_data.py --check   # exit 1 if the shipped files differ

Only the standard-library ``random`` module (with a fixed seed) is used for
sampling, so the output is identical on every machine and Python version.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys

SEED = 1234
N_TRAIN = 3000
N_EVAL = 200
MIN_LEN, MAX_LEN = 3, 6  # digits per list
DIGITS = [str(d) for d in range(10)]

HERE = os.path.dirname(os.path.abspath(__file__))
DATA_DIR = os.path.join(HERE, "data")
MODEL_DIR = os.path.join(HERE, "model")

# Special tokens. Ids are fixed by their order here (Llama-like layout).
UNK, BOS, EOS, PAD = "<unk>", "<s>", "</s>", "<pad>"
USER, ASSISTANT = "<|user|>", "<|assistant|>"
SPECIALS = [UNK, BOS, EOS, PAD, USER, ASSISTANT]
# Ordinary words: the task words plus the digits.
WORDS = ["sort", ":", "="] + DIGITS

# Rendered with ``add_generation_prompt=True`` the prompt is a strict prefix of
# the prompt+answer rendering (what TRL-style conversational handling needs).
# BOS is not in the template: the tokenizer's post-processor adds it. EOS is
# not in the template either: the trainer appends it to every completion, as
# for plain-text rows.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<|user|> ' + message['content'] + ' ' }}"
    "{% elif message['role'] == 'assistant' %}{{ '<|assistant|> ' + message['content'] + ' ' }}"
    "{% else %}{{ message['content'] + ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

# Tiny Llama: ~0.1M parameters. Tuned so that CPO reaches >= 0.9 held-out
# preference accuracy within a couple of hundred optimizer steps on CPU.
MODEL_KWARGS = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
    rms_norm_eps=1e-6,
    initializer_range=0.02,
    tie_word_embeddings=False,
)


# --------------------------------------------------------------------------- data


def _make_row(nums: list[int], rng: random.Random) -> dict:
    srt = sorted(nums)
    wrong = list(nums)
    while wrong == srt:
        rng.shuffle(wrong)
    # Shuffle once more so the rejected answer is not simply the prompt order.
    cand = list(nums)
    rng.shuffle(cand)
    if cand != srt:
        wrong = cand
    return {
        "prompt": "sort: " + " ".join(map(str, nums)) + " =",
        "chosen": " " + " ".join(map(str, srt)),
        "rejected": " " + " ".join(map(str, wrong)),
    }


def make_rows() -> tuple[list[dict], list[dict]]:
    """Return (train_rows, eval_rows); deterministic, prompts unique and disjoint."""
    rng = random.Random(SEED)
    seen: set[tuple[int, ...]] = set()
    rows: list[dict] = []
    while len(rows) < N_TRAIN + N_EVAL:
        n = rng.randint(MIN_LEN, MAX_LEN)
        nums = [rng.randrange(10) for _ in range(n)]
        if len(set(nums)) < 2:  # all equal: no wrong permutation exists
            continue
        key = tuple(nums)
        if key in seen:
            continue
        seen.add(key)
        rows.append(_make_row(nums, rng))
    return rows[N_EVAL:], rows[:N_EVAL]


def _prompt_numbers(prompt: str) -> list[int]:
    assert prompt.startswith("sort: ") and prompt.endswith(" ="), prompt
    return [int(t) for t in prompt[len("sort: ") : -len(" =")].split()]


def check_rows(train: list[dict], eval_: list[dict]) -> None:
    for row in train + eval_:
        assert set(row) == {"prompt", "chosen", "rejected"}, row
        nums = _prompt_numbers(row["prompt"])
        chosen = [int(t) for t in row["chosen"].split()]
        rejected = [int(t) for t in row["rejected"].split()]
        assert chosen == sorted(nums), row
        assert rejected != chosen and sorted(rejected) == sorted(nums), row
        assert len(rejected) == len(chosen), row
    train_prompts = {r["prompt"] for r in train}
    eval_prompts = {r["prompt"] for r in eval_}
    assert len(train_prompts) == len(train) and len(eval_prompts) == len(eval_)
    assert not train_prompts & eval_prompts, "eval prompts leak into train"


def dumps_jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(r, ensure_ascii=True) + "\n" for r in rows)


# ---------------------------------------------------------------------- tokenizer


def build_backend_tokenizer(rows: list[dict]):
    """Word-level tokenizer over the words that occur in ``rows``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors

    words = set()
    ws = pre_tokenizers.Whitespace()
    for r in rows:
        for field in ("prompt", "chosen", "rejected"):
            words.update(w for w, _ in ws.pre_tokenize_str(r[field]))
    unknown = words - set(WORDS)
    assert not unknown, f"unexpected words in data: {sorted(unknown)}"
    vocab = {tok: i for i, tok in enumerate(SPECIALS + WORDS)}

    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Splits on whitespace and between word / punctuation characters, so
    # "sort:" -> ["sort", ":"] and digits are always separate words.
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tk.add_special_tokens(SPECIALS)  # ids already in vocab: kept as is
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    tk.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    return tk


def build_hf_tokenizer(rows: list[dict]):
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(
        tokenizer_object=build_backend_tokenizer(rows),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[USER, ASSISTANT],
        padding_side="right",
        model_max_length=MODEL_KWARGS["max_position_embeddings"],
        clean_up_tokenization_spaces=False,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def check_tokenizer(tok, rows: list[dict]) -> None:
    """The properties the demo relies on, checked on every row."""
    bos, eos = tok.bos_token_id, tok.eos_token_id
    assert tok("x").input_ids[0] == bos and tok("1 2").input_ids == [bos] + tok.convert_tokens_to_ids(["1", "2"])
    for r in rows:
        p = tok(r["prompt"]).input_ids
        assert p[0] == bos and eos not in p and tok.unk_token_id not in p, (r, p)
        assert tok(r["prompt"] + r["chosen"]).input_ids[: len(p)] == p, r
        assert tok(r["prompt"] + r["rejected"]).input_ids[: len(p)] == p, r
        full_c = tok(r["prompt"] + r["chosen"] + tok.eos_token).input_ids
        full_r = tok(r["prompt"] + r["rejected"] + tok.eos_token).input_ids
        assert full_c[: len(p)] == p and full_r[: len(p)] == p, r
        c, rj = full_c[len(p) :], full_r[len(p) :]
        assert len(c) == len(rj) == len(r["chosen"].split()) + 1, (r, c, rj)
        assert c[-1] == eos and rj[-1] == eos and tok.unk_token_id not in c + rj, r
    # Chat template: the generation prompt is a prefix of the full rendering.
    r = rows[0]
    msgs = [{"role": "user", "content": r["prompt"]}]
    gen = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(
        msgs + [{"role": "assistant", "content": r["chosen"].strip()}], tokenize=False
    )
    assert gen.endswith(ASSISTANT) and full.startswith(gen), (gen, full)
    g_ids = tok(gen).input_ids
    assert tok(full).input_ids[: len(g_ids)] == g_ids and tok.unk_token_id not in tok(full).input_ids


# -------------------------------------------------------------------------- model


def build_config(tok):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(tok),
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **MODEL_KWARGS,
    )


def check_config(cfg, tok) -> None:
    assert cfg.model_type == "llama"
    assert cfg.vocab_size == len(tok)
    assert (cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id) == (
        tok.bos_token_id,
        tok.eos_token_id,
        tok.pad_token_id,
    )
    for k, v in MODEL_KWARGS.items():
        assert getattr(cfg, k) == v, (k, getattr(cfg, k), v)


# --------------------------------------------------------------------------- main


def _data_files(train, eval_) -> dict[str, str]:
    return {
        os.path.join(DATA_DIR, "train.jsonl"): dumps_jsonl(train),
        os.path.join(DATA_DIR, "eval.jsonl"): dumps_jsonl(eval_),
    }


def tokenizer_config() -> dict:
    """``tokenizer_config.json``, written by hand so that it is the same under
    transformers 4.x and 5.x (and keeps the chat template inside it)."""
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "unk_token": UNK,
        "additional_special_tokens": [USER, ASSISTANT],
        "add_bos_token": True,
        "add_eos_token": False,
        "padding_side": "right",
        "model_max_length": MODEL_KWARGS["max_position_embeddings"],
        "clean_up_tokenization_spaces": False,
        "chat_template": CHAT_TEMPLATE,
    }


def _model_files(tok) -> dict[str, str]:
    """Tokenizer files for MODEL_DIR (config.json is written by LlamaConfig)."""
    return {
        "tokenizer.json": tok.backend_tokenizer.to_str(pretty=True) + "\n",
        "tokenizer_config.json": json.dumps(tokenizer_config(), indent=2) + "\n",
    }


def write_all() -> None:
    train, eval_ = make_rows()
    check_rows(train, eval_)
    os.makedirs(DATA_DIR, exist_ok=True)
    for path, text in _data_files(train, eval_).items():
        with open(path, "w", encoding="utf-8", newline="\n") as f:
            f.write(text)

    tok = build_hf_tokenizer(train + eval_)
    check_tokenizer(tok, train + eval_)
    cfg = build_config(tok)
    check_config(cfg, tok)
    os.makedirs(MODEL_DIR, exist_ok=True)
    for name in os.listdir(MODEL_DIR):  # drop stale files from older layouts
        os.remove(os.path.join(MODEL_DIR, name))
    for name, text in _model_files(tok).items():
        with open(os.path.join(MODEL_DIR, name), "w", encoding="utf-8", newline="\n") as f:
            f.write(text)
    cfg.save_pretrained(MODEL_DIR)

    # Reload from disk and check again: what ships is what was checked.
    from transformers import AutoConfig, AutoTokenizer

    tok2 = AutoTokenizer.from_pretrained(MODEL_DIR)
    check_tokenizer(tok2, train + eval_)
    check_config(AutoConfig.from_pretrained(MODEL_DIR), tok2)
    print(f"wrote {len(train)} train / {len(eval_)} eval rows to {DATA_DIR}")
    print(f"wrote tokenizer (vocab {len(tok2)}) and config to {MODEL_DIR}")


def check_all() -> int:
    """Return 0 when the shipped files match what this script generates."""
    train, eval_ = make_rows()
    check_rows(train, eval_)
    problems = []
    for path, text in _data_files(train, eval_).items():
        try:
            with open(path, encoding="utf-8", newline="") as f:
                on_disk = f.read()
        except OSError as e:
            problems.append(f"{path}: {e}")
            continue
        if on_disk != text:
            problems.append(f"{path}: differs from generated data")

    # Tokenizer/config files depend on the transformers version's serialisation,
    # so they are compared semantically rather than byte for byte.
    try:
        from transformers import AutoConfig, AutoTokenizer

        shipped = AutoTokenizer.from_pretrained(MODEL_DIR)
        fresh = build_hf_tokenizer(train + eval_)
        if shipped.get_vocab() != fresh.get_vocab():
            problems.append(f"{MODEL_DIR}: tokenizer vocabulary differs")
        check_tokenizer(shipped, train + eval_)
        check_config(AutoConfig.from_pretrained(MODEL_DIR), shipped)
    except Exception as e:  # noqa: BLE001 - report any failure as a mismatch
        problems.append(f"{MODEL_DIR}: {type(e).__name__}: {e}")

    for p in problems:
        print("MISMATCH:", p, file=sys.stderr)
    if not problems:
        print("demo assets are up to date")
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--check", action="store_true", help="verify the shipped files instead of writing")
    args = ap.parse_args(argv)
    if args.check:
        return check_all()
    write_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
