"""`dspref eval` with a method that carries state (BCO: the running reward mean δ and the UDM classifier):
a checkpoint restores both and reproduces the run's eval row; an exported model reports what needs
neither; bad input is refused with one line. Short in-process runs on the tiny demo model.
"""

from __future__ import annotations

import json

import pytest

from conftest import base_args, read_metrics, save_tiny_bert
from dspref.eval_model import main as eval_main

LENGTHS = ["--max_length", "64", "--max_prompt_length", "32"]  # base_args' length options


def train(out, small_data, **options) -> None:
    from dspref.run import main

    assert main(base_args(out, *small_data, method="bco", **options)) == 0


def logged_eval(out, step: int) -> dict:
    (row,) = [r for r in read_metrics(out) if r["step"] == step and "eval_loss" in r]
    return row


def run_eval(args: list[str], out_json) -> dict:
    assert eval_main(args + ["--out", str(out_json)]) == 0
    return json.loads(out_json.read_text())


@pytest.fixture(scope="module")
def udm_run(tmp_path_factory, small_data):
    """BCO + UDM from random initial weights (the reference: those weights), checkpoint and eval at step 3."""
    root = tmp_path_factory.mktemp("bco_udm")
    out = root / "run"
    train(out, small_data, max_steps=6, save_steps=3, eval_steps=3, embedding_model_name_or_path=save_tiny_bert(
        root / "bert"), prompt_sample_size=8, min_density_ratio=0.2, max_density_ratio=5.0)
    return out


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, small_data, saved_base):
    """BCO from a saved model (which is also the reference), exported at step 4."""
    out = tmp_path_factory.mktemp("bco_base") / "run"
    train(out, small_data, model_name_or_path=saved_base, random_init="false", max_steps=4)
    return out


def test_checkpoint_eval_restores_delta_and_udm_and_reproduces_the_row(udm_run, small_data, tmp_path, capsys):
    report = run_eval(["--model", str(udm_run / "checkpoint-3"), "--data", str(small_data[1])], tmp_path / "e.json")
    logged = logged_eval(udm_run, 3)
    assert logged["eval_delta"] != 0 and logged["eval_udm_weight"] != 1  # the state matters to these numbers
    assert report["omitted"] == [] and report["checkpoint_step"] == 3 and report["rows"] == 32
    assert set(report["metrics"]) == set(logged) - {"step"}  # incl. preference accuracy on the paired rows
    for name, value in report["metrics"].items():
        assert value == pytest.approx(logged[name], abs=1e-5), name
    assert report["logged_max_abs_difference"] < 1e-5
    assert "the run logged this eval row at step 3" in capsys.readouterr().out


def test_exported_model_reports_what_needs_no_state(base_run, small_data, saved_base, tmp_path, capsys):
    report = run_eval(["--model", str(base_run), "--method", "bco", "--ref", str(saved_base), "--data",
                       str(small_data[1]), *LENGTHS], tmp_path / "e.json")
    logged = logged_eval(base_run, 4)
    assert report["omitted"] == ["eval_loss", "eval_delta"]  # BCO's loss is centred on the run's δ
    assert set(report["metrics"]) == set(logged) - {"step", "eval_loss", "eval_delta"}
    for name, value in report["metrics"].items():
        assert value == pytest.approx(logged[name], abs=1e-5), name
    assert report["metrics"]["eval_rewards/accuracies"] > 0  # the held-out preference accuracy is there
    assert "left out: eval_loss, eval_delta" in capsys.readouterr().out


def test_checkpoint_eval_with_another_reference_scores_against_it(udm_run, small_data, saved_base, tmp_path):
    """--ref replaces the run's reference: the rewards change, the policy's own log-probs do not."""
    report = run_eval(["--model", str(udm_run / "checkpoint-3"), "--data", str(small_data[1]), "--ref",
                       str(saved_base)], tmp_path / "e.json")
    logged = logged_eval(udm_run, 3)
    assert report["metrics"]["eval_logps/chosen"] == pytest.approx(logged["eval_logps/chosen"], abs=1e-5)
    assert abs(report["metrics"]["eval_rewards/chosen"] - logged["eval_rewards/chosen"]) > 1e-3
    assert "logged_max_abs_difference" in report  # compared, and far off: it is another reference
    assert report["logged_max_abs_difference"] > 1e-3


BAD_INPUT = [
    ("missing", "dspref eval: error: --model {missing}: no such folder"),
    ("empty", "dspref eval: error: --model {empty} is neither a dspref checkpoint (checkpoint-N with "
              "dspref_state.json) nor an exported model (config.json); pass one of them"),
    ("adapter", "dspref eval: error: --model {adapter} is a LoRA adapter export; evaluate one of its run's "
                "checkpoint folders (they hold base and adapter), or a model exported with merge_peft_adapter: true"),
    ("no_method", "dspref eval: error: --model {export} is an exported model: pass --method (bco | cpo | kto | reward)"),
    ("no_ref", "dspref eval: error: method bco scores the policy against a reference model, which an exported model "
               "does not name: pass --ref DIR (the model the run started from, or its ref_model)"),
    ("udm_export", "dspref eval: error: BCO's UDM classifier is fitted on the training prompts during a run and "
                   "saved only in its checkpoints: evaluate a checkpoint folder, or drop embedding_model_name_or_path"),
    ("wrong_method", "dspref eval: error: --method cpo: checkpoint {checkpoint} was trained with method bco; drop "
                     "--method or pass --method bco"),
    ("bad_option", "dspref eval: error: unknown option 'betaa' from --betaa; did you mean 'beta'?"),
    ("no_data", "dspref eval: error: --data {nodata}: no such file (relative paths start at "),
]


@pytest.mark.parametrize("case, message", BAD_INPUT, ids=[case for case, _ in BAD_INPUT])
def test_bad_input_is_one_line_with_exit_status_2(case, message, udm_run, small_data, saved_base, tmp_path, capsys):
    paths = {"missing": tmp_path / "nope", "empty": tmp_path / "empty", "adapter": tmp_path / "adapter",
             "export": udm_run, "checkpoint": udm_run / "checkpoint-3", "nodata": tmp_path / "nodata.jsonl"}
    paths["empty"].mkdir()
    paths["adapter"].mkdir()
    (paths["adapter"] / "adapter_config.json").write_text("{}")
    data = ["--data", str(small_data[1])]
    argv = {
        "missing": ["--model", str(paths["missing"]), *data],
        "empty": ["--model", str(paths["empty"]), *data],
        "adapter": ["--model", str(paths["adapter"]), "--method", "bco", *data],
        "no_method": ["--model", str(udm_run), *data],
        "no_ref": ["--model", str(udm_run), "--method", "bco", *data],
        "udm_export": ["--model", str(udm_run), "--method", "bco", "--ref", str(saved_base), *data,
                       "--embedding_model_name_or_path", str(saved_base)],
        "wrong_method": ["--model", str(paths["checkpoint"]), "--method", "cpo", *data],
        "bad_option": ["--model", str(paths["checkpoint"]), *data, "--betaa", "0.2"],
        "no_data": ["--model", str(paths["checkpoint"]), "--data", str(paths["nodata"])],
    }[case]
    assert eval_main(argv + ["--out", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith(message.format(**paths)), err
    assert not (tmp_path / "e.json").exists()
