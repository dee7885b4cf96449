"""Trains with a precomputed reference and records whether the precompute pass's engine is still alive.

Usage: python tests/dist/reference_freed.py RESULT_JSON [dspref train options]
Writes {"engines_built": n, "alive_at_each_step": [bool per training micro-batch]} (after gc.collect()).
"""

import gc
import json
import sys
import weakref


def main():
    out_path, args = sys.argv[1], sys.argv[2:]
    import dspref.reference as reference
    from dspref.objectives.unpaired import KTOObjective
    from dspref.run import main as train_main

    engines, alive = [], []
    build = reference.build_reference

    def tracked(*a, **kw):
        live = build(*a, **kw)
        engines.append(weakref.ref(live.engine.ds))
        return live

    compute = KTOObjective.compute

    def checked(self, policy, batch, *, train):
        if train:
            gc.collect()
            alive.append(any(ref() is not None for ref in engines))
        return compute(self, policy, batch, train=train)

    reference.build_reference = tracked
    KTOObjective.compute = checked
    status = train_main(args)
    with open(out_path, "w") as f:
        json.dump({"engines_built": len(engines), "alive_at_each_step": alive}, f)
    sys.exit(status)


if __name__ == "__main__":
    main()
