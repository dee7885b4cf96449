"""Runs several short dspref trainings one after another in one launched process group.

Usage: deepspeed --num_gpus N tests/dist/run_many.py RESULT_JSON SPECS_JSON
SPECS_JSON maps a name to a list of dspref train options. Each run's metrics rows (and its error,
if any) are written to RESULT_JSON by rank 0. Sharing the launch saves ~10 s of start-up per run.
"""

import gc
import json
import sys
import traceback

import torch


def main():
    argv = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
    out_path, specs = argv[0], json.loads(open(argv[1]).read())
    from dspref.config import parse_args
    from dspref.run import train
    from dspref.tracking import read_metrics

    results = {}
    for name, args in specs.items():
        try:
            cfg, explicit = parse_args(args)
            result = train(cfg, explicit)
            results[name] = {"rows": read_metrics(f"{cfg.output_dir}/metrics.jsonl"), "step": result.step}
            del result
        except Exception as e:  # recorded, and the next run still starts
            results[name] = {"error": f"{type(e).__name__}: {e}", "trace": traceback.format_exc()[-3000:]}
        gc.collect()
        torch.distributed.barrier()
    if torch.distributed.get_rank() == 0:
        with open(out_path, "w") as f:
            json.dump(results, f)


if __name__ == "__main__":
    main()
