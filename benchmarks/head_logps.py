"""The scoring head alone: autograd's ``logsumexp``/``gather`` against dspref's ``TokenLogps``.

    python benchmarks/head_logps.py [--positions 1048 --vocab 32768 --hidden 384 --repeats 5]

One chunk of ``positions`` completion states through an ``nn.Linear`` head to per-token log-probs,
forward and backward with a different upstream gradient per token (as a loss gives), in fp32 on one
thread. ``autograd`` is the pre-TokenLogps path (``logits.gather - torch.logsumexp(logits)``);
``TokenLogps`` is ``dspref.logps._head_logps``. Each variant runs in its own process, so that its
peak RSS (``ru_maxrss``, minus the RSS before its first pass) is its own; the time is the median of
``repeats`` passes after one warm-up. The head weight has a trained model's scale (logits of std ~1):
a random-init std-1 weight would give logits of std ~20, whose exp underflows to subnormals and
times the CPU's subnormal arithmetic instead.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, write_results  # noqa: E402


def autograd_head(head, h, targets, softcap):
    logits = head(h).float()
    picked = logits.gather(1, targets.unsqueeze(1)).squeeze(1)
    return picked - torch.logsumexp(logits, dim=1), logits.mean(dim=1)


def child(variant: str, positions: int, vocab: int, hidden: int, repeats: int) -> dict:
    global torch
    import torch

    sys.path.insert(0, str(ROOT))
    from dspref.logps import _head_logps

    torch.set_num_threads(1)
    torch.manual_seed(0)
    head = torch.nn.Linear(hidden, vocab, bias=False)
    torch.nn.init.normal_(head.weight, std=hidden ** -0.5)
    states = torch.randn(positions, hidden)
    targets = torch.randint(0, vocab, (positions,))
    upstream = torch.randn(positions)
    fn = autograd_head if variant == "autograd" else _head_logps
    before = _rss_kib()
    times = []
    for _ in range(repeats + 1):
        h = states.clone().requires_grad_()
        head.weight.grad = None
        start = time.perf_counter()
        logps, _ = fn(head, h, targets, None)
        (logps * upstream).sum().backward()
        times.append(time.perf_counter() - start)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"variant": variant, "seconds": statistics.median(times[1:]), "peak_extra_mib": (peak - before) / 1024,
            "logps_sum": float(logps.detach().sum()), "grad_abs_sum": float(h.grad.abs().sum())}


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--positions", type=int, default=1048)  # CPO, variable lengths: 4 pairs x 2 x ~131 tokens
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--hidden", type=int, default=384)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--child", default=None)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(a.child, a.positions, a.vocab, a.hidden, a.repeats)))
        return 0
    rows = []
    for variant in ("autograd", "TokenLogps"):
        out = subprocess.run([sys.executable, __file__, "--child", variant, "--positions", str(a.positions),
                              "--vocab", str(a.vocab), "--hidden", str(a.hidden), "--repeats", str(a.repeats)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    base = rows[0]
    lines = ["| head | s (fwd+bwd) | time ratio | peak extra RSS MiB | memory ratio | Σ logps | Σ abs grad |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['seconds']:.3f} | {r['seconds'] / base['seconds']:.2f} | "
                     f"{r['peak_extra_mib']:.0f} | {r['peak_extra_mib'] / base['peak_extra_mib']:.2f} | "
                     f"{r['logps_sum']:.4f} | {r['grad_abs_sum']:.4f} |")
    title = (f"Scoring head, one chunk of {a.positions} positions x vocabulary {a.vocab} x hidden {a.hidden}, "
             f"fp32, one thread, median of {a.repeats} fwd+bwd passes; each variant in its own process.\n\n"
             f"`python benchmarks/head_logps.py --positions {a.positions} --vocab {a.vocab} --hidden {a.hidden} "
             f"--repeats {a.repeats}`")
    write_results("head_logps", title=title, table="\n".join(lines), payload={"args": vars(a), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
