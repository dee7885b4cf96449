"""``run_many.py`` with the per-expert MoE test model registered (``moe_list_model``).

Usage: deepspeed --num_gpus N tests/dist/run_moe.py RESULT_JSON SPECS_JSON
"""

import moe_list_model  # noqa: F401  (registers model_type "dspref-list-moe" with the Auto classes)
import run_many

if __name__ == "__main__":
    run_many.main()
