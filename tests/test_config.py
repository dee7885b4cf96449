"""dspref.config: defaults, YAML/CLI loading and precedence, type parsing, messages, help and docs."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import yaml

from dspref import config as C
from dspref.config import (METHOD_CONFIGS, ConfigError, CPOConfig, TrainConfig, config_reference_markdown,
                           config_to_dict, help_text, parse_args, register_method, save_config)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M = ["--model_name_or_path", "m"]

EXPECTED_DEFAULTS = {
    "method": "cpo", "model_name_or_path": "m", "random_init": False, "tokenizer_name_or_path": "m",
    "trust_remote_code": False, "model_init_kwargs": None, "train_file": None, "eval_file": None,
    "dataset_name": None, "dataset_config_name": None, "dataset_split": "train", "eval_dataset_split": None,
    "eval_split_ratio": 0.0, "chat_template_path": None, "max_length": 1024, "max_prompt_length": 512,
    "max_completion_length": None, "truncation_mode": "keep_end", "dataset_num_proc": None,
    "label_pad_token_id": -100, "padding_value": None, "output_dir": "runs/dspref", "overwrite_output_dir": False,
    "resume_from_checkpoint": None, "ds_config": None, "learning_rate": 1e-6, "lr_scheduler_type": "linear",
    "warmup_steps": 0, "warmup_ratio": 0.0, "weight_decay": 0.0, "adam_beta1": 0.9, "adam_beta2": 0.999,
    "adam_epsilon": 1e-8, "max_grad_norm": 1.0, "num_train_epochs": 3.0, "max_steps": -1,
    "per_device_train_batch_size": 8, "per_device_eval_batch_size": 8, "gradient_accumulation_steps": 1,
    "logging_steps": 10, "eval_steps": None, "eval_on_start": True, "save_steps": 500, "save_total_limit": None,
    "stop_after_steps": None, "padding_free": False, "padding_free_bin_size": None, "group_by_length": False, "seed": 42, "report_to": ["none"], "run_name": None, "wandb_project": "dspref",
    "gradient_checkpointing": False, "bf16": None, "fp16": None, "disable_dropout": True,
    "generate_during_eval": False, "generation_num_prompts": 4, "generation_max_new_tokens": 64,
    "generation_temperature": 1.0, "generation_top_p": 1.0, "ds3_gather_for_generation": True, "logits_chunk_size": 1024, "router_aux_loss_coef": None, "local_rank": -1,
    "peft_config": None, "merge_peft_adapter": False,
    "beta": 0.1, "label_smoothing": 0.0, "loss_type": "sigmoid", "cpo_alpha": 1.0, "simpo_gamma": 0.5,
}


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return str(path)


def error_of(argv):
    with pytest.raises(ConfigError) as info:
        parse_args(argv)
    return str(info.value)


# --- defaults and fields ------------------------------------------------------------------------

def test_defaults_match_the_spec():
    cfg, explicit = parse_args(M)
    assert type(cfg) is CPOConfig
    assert config_to_dict(cfg) == EXPECTED_DEFAULTS
    assert explicit == {"model_name_or_path"}


def test_every_field_has_help_and_group():
    for f in dataclasses.fields(CPOConfig):
        assert f.metadata.get("help"), f.name
        assert f.metadata.get("group") in C.GROUPS, f.name


def test_model_name_or_path_is_required():
    assert error_of([]) == "model_name_or_path is required (a local folder or a hub name)"
    with pytest.raises(ConfigError, match="model_name_or_path is required"):
        CPOConfig()


def test_tokenizer_defaults_to_model_but_can_differ():
    assert parse_args(M)[0].tokenizer_name_or_path == "m"
    assert parse_args(M + ["--tokenizer_name_or_path", "tok"])[0].tokenizer_name_or_path == "tok"


def test_mutable_defaults_are_not_shared():
    a, b = CPOConfig(model_name_or_path="m"), CPOConfig(model_name_or_path="m")
    a.report_to.append("wandb")
    assert b.report_to == ["none"]


# --- YAML + CLI precedence -------------------------------------------------------------------------

def test_yaml_then_cli_precedence_and_explicit_keys(tmp_path):
    recipe = write(tmp_path, "recipe.yaml", """
        model_name_or_path: from-yaml
        learning_rate: 1.0e-5
        per_device_train_batch_size: 4
        beta: 0.2
    """)
    cfg, explicit = parse_args(["--config", recipe, "--learning_rate", "2e-5", "--seed=7"])
    assert cfg.model_name_or_path == "from-yaml"
    assert cfg.learning_rate == 2e-5          # CLI beats YAML
    assert cfg.per_device_train_batch_size == 4  # YAML beats default
    assert cfg.beta == 0.2 and cfg.seed == 7
    assert cfg.max_length == 1024               # default
    assert explicit == {"model_name_or_path", "learning_rate", "per_device_train_batch_size", "beta", "seed"}


def test_config_flag_can_come_last_and_with_equals(tmp_path):
    recipe = write(tmp_path, "r.yaml", "model_name_or_path: x\n")
    cfg, _ = parse_args(["--seed", "3", f"--config={recipe}"])
    assert (cfg.model_name_or_path, cfg.seed) == ("x", 3)


def test_method_from_yaml_and_cli(tmp_path):
    recipe = write(tmp_path, "r.yaml", "method: cpo\nmodel_name_or_path: x\n")
    cfg, explicit = parse_args(["--config", recipe])
    assert cfg.method == "cpo" and "method" in explicit
    assert error_of(M + ["--method", "orpo"]) == "unknown method 'orpo'; registered methods: bco, cpo, kto, reward"
    assert error_of(M + ["--method", "cpp"]) == (
        "unknown method 'cpp'; registered methods: bco, cpo, kto, reward; did you mean 'cpo'?")
    cfg, _ = parse_args(M + ["--method", "reward", "--center_rewards_coefficient", "0.01"])
    assert type(cfg).__name__ == "RewardConfig" and cfg.learning_rate == 1e-4
    assert cfg.center_rewards_coefficient == 0.01


def test_yaml_pyyaml_float_quirk_and_hyphen_keys(tmp_path):
    # PyYAML reads 5e-7 (no dot) as a string; float options accept it anyway.
    recipe = write(tmp_path, "r.yaml", "model-name-or-path: x\nlearning_rate: 5e-7\nnum_train_epochs: 2\n")
    cfg, explicit = parse_args(["--config", recipe])
    assert cfg.learning_rate == 5e-7 and cfg.num_train_epochs == 2.0
    assert isinstance(cfg.num_train_epochs, float)
    assert "model_name_or_path" in explicit


def test_yaml_type_errors(tmp_path):
    recipe = write(tmp_path, "recipe.yaml", "model_name_or_path: x\nper_device_train_batch_size: eight\n")
    assert error_of(["--config", recipe]) == (
        f"option 'per_device_train_batch_size' expects an int, got 'eight' (from {recipe})")
    recipe = write(tmp_path, "b.yaml", "model_name_or_path: x\nbf16: 'yes'\n")
    assert error_of(["--config", recipe]) == (
        f"option 'bf16' expects a bool (true/false) or none, got 'yes' (from {recipe})")
    recipe = write(tmp_path, "c.yaml", "model_name_or_path: x\nmax_steps: 3.5\n")
    assert "option 'max_steps' expects an int, got 3.5" in error_of(["--config", recipe])
    recipe = write(tmp_path, "d.yaml", "model_name_or_path: x\nseed: true\n")
    assert "option 'seed' expects an int, got True" in error_of(["--config", recipe])


def test_yaml_unknown_key_message(tmp_path):
    recipe = write(tmp_path, "recipe.yaml", "model_name_or_path: x\nlerning_rate: 1.0e-6\n")
    assert error_of(["--config", recipe]) == (
        f"unknown option 'lerning_rate' in {recipe}; did you mean 'learning_rate'?")


def test_yaml_file_problems(tmp_path):
    assert error_of(["--config", str(tmp_path / "nope.yaml")]) == f"config file not found: {tmp_path / 'nope.yaml'}"
    bad = write(tmp_path, "bad.yaml", "a: [1, 2\nb: 3\n")
    assert error_of(["--config", bad]).startswith(f"invalid YAML in {bad} at line ")
    listed = write(tmp_path, "list.yaml", "- a\n- b\n")
    assert "must hold a mapping of option: value at the top level" in error_of(["--config", listed])
    twice = write(tmp_path, "twice.yaml", "learning-rate: 1.0e-6\nlearning_rate: 2.0e-6\n")
    assert error_of(["--config", twice]) == f"option 'learning_rate' is given twice in {twice}"
    empty = write(tmp_path, "empty.yaml", "")
    assert parse_args(["--config", empty] + M)[0].model_name_or_path == "m"


# --- command-line syntax ---------------------------------------------------------------------------

def test_hyphen_aliases():
    cfg, explicit = parse_args(M + ["--learning-rate", "3e-6", "--per-device-train-batch-size=2"])
    assert cfg.learning_rate == 3e-6 and cfg.per_device_train_batch_size == 2
    assert {"learning_rate", "per_device_train_batch_size"} <= explicit


@pytest.mark.parametrize("argv", [["--local_rank=3"], ["--local_rank", "3"], ["--local-rank=3"]])
def test_local_rank_from_launcher_is_accepted(argv):
    assert parse_args(M + argv)[0].local_rank == 3


@pytest.mark.parametrize("word,value", [("true", True), ("false", False), ("1", True), ("0", False),
                                        ("yes", True), ("no", False), ("True", True), ("FALSE", False)])
def test_bool_words(word, value):
    assert parse_args(M + ["--gradient_checkpointing", word])[0].gradient_checkpointing is value
    assert parse_args(M + [f"--disable_dropout={word}"])[0].disable_dropout is value


def test_bare_bool_flag_means_true():
    cfg, _ = parse_args(M + ["--gradient_checkpointing", "--seed", "5", "--random_init"])
    assert cfg.gradient_checkpointing is True and cfg.random_init is True and cfg.seed == 5
    assert parse_args(M + ["--bf16"])[0].bf16 is True
    assert parse_args(M + ["--bf16", "none"])[0].bf16 is None


def test_int_float_and_optional():
    cfg, _ = parse_args(M + ["--max_steps", "-1", "--eval_steps", "50", "--learning_rate", "5e-7",
                             "--adam_epsilon", "5.0e-7", "--max_grad_norm", "2", "--max_length", "none",
                             "--max_completion_length", "null", "--save_total_limit", "None"])
    assert cfg.max_steps == -1 and cfg.eval_steps == 50
    assert cfg.learning_rate == 5e-7 and cfg.adam_epsilon == 5e-7
    assert cfg.max_grad_norm == 2.0 and isinstance(cfg.max_grad_norm, float)
    assert cfg.max_length is None and cfg.max_completion_length is None and cfg.save_total_limit is None


def test_lists_and_unions():
    assert parse_args(M + ["--report_to", "wandb"])[0].report_to == ["wandb"]
    assert parse_args(M + ["--report_to", "[wandb]"])[0].report_to == ["wandb"]
    assert parse_args(M + ["--train_file", "a.jsonl"])[0].train_file == "a.jsonl"
    assert parse_args(M + ["--train_file", "a.jsonl,b.jsonl"])[0].train_file == ["a.jsonl", "b.jsonl"]
    assert parse_args(M + ["--eval_file", '["a.jsonl", "b.jsonl"]'])[0].eval_file == ["a.jsonl", "b.jsonl"]
    assert parse_args(M + ["--train_file", "none"])[0].train_file is None


def test_yaml_lists_and_str(tmp_path):
    recipe = write(tmp_path, "r.yaml", "model_name_or_path: x\nreport_to: wandb\ntrain_file: [a.jsonl, b.jsonl]\n")
    cfg, _ = parse_args(["--config", recipe])
    assert cfg.report_to == ["wandb"] and cfg.train_file == ["a.jsonl", "b.jsonl"]


def test_dict_option():
    cfg, _ = parse_args(M + ["--model_init_kwargs", '{"torch_dtype": "bfloat16", "attn_implementation": "sdpa"}'])
    assert cfg.model_init_kwargs == {"torch_dtype": "bfloat16", "attn_implementation": "sdpa"}
    assert parse_args(M + ["--model_init_kwargs", "{torch_dtype: float32}"])[0].model_init_kwargs == {
        "torch_dtype": "float32"}
    assert error_of(M + ["--model_init_kwargs", "bfloat16"]) == (
        "option 'model_init_kwargs' expects a mapping or none, got 'bfloat16' (from --model_init_kwargs)")


def test_cli_unknown_key_messages():
    assert error_of(M + ["--lerning_rate", "1e-6"]) == (
        "unknown option 'lerning_rate' from --lerning_rate; did you mean 'learning_rate'?")
    assert error_of(M + ["--lerning-rate=1e-6"]) == (
        "unknown option 'lerning_rate' from --lerning-rate; did you mean 'learning_rate'?")
    assert error_of(M + ["--zzzz", "1"]) == "unknown option 'zzzz' from --zzzz; see --help for the list of options"


def test_cli_bad_values():
    assert error_of(M + ["--per_device_train_batch_size", "eight"]) == (
        "option 'per_device_train_batch_size' expects an int, got 'eight' (from --per_device_train_batch_size)")
    assert error_of(M + ["--learning_rate", "fast"]) == (
        "option 'learning_rate' expects a float, got 'fast' (from --learning_rate)")
    assert error_of(M + ["--bf16=maybe"]) == (
        "option 'bf16' expects a bool (true/false) or none, got 'maybe' (from --bf16)")
    assert error_of(M + ["--max_steps", "3.0"]) == "option 'max_steps' expects an int, got '3.0' (from --max_steps)"
    assert error_of(M + ["--learning_rate", "nan"]).startswith("option 'learning_rate' expects a float")


def test_cli_syntax_errors(tmp_path):
    assert error_of(M + ["--max_steps"]) == (
        "option 'max_steps' needs a value (from --max_steps); use --max_steps VALUE or --max_steps=VALUE")
    assert error_of(M + ["stray"]) == "unexpected argument 'stray'; options look like --key value or --key=value"
    assert error_of(M + ["--config"]) == "--config needs the path of a YAML recipe"
    a = write(tmp_path, "a.yaml", "seed: 1\n")
    assert "--config given twice" in error_of(M + ["--config", a, "--config", a])


# --- help and docs ---------------------------------------------------------------------------------

def test_help_lists_every_option_with_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    types = C._field_types(CPOConfig)
    for f in dataclasses.fields(CPOConfig):
        default = C._format_default(C._field_default(f))
        assert f"--{f.name} " in out, f.name
        assert C._option_line(f, types[f.name]) in out
        assert f"(default: {default})" in out
        assert f.metadata["help"].split()[0] in out
    assert "(default: 1e-06)" in out and "--report_to LIST (default: none)" in out
    for title in ("Run:", "Model:", "Data:", "Method (cpo):"):
        assert title in out


def test_help_works_with_broken_arguments(capsys):
    with pytest.raises(SystemExit) as info:
        parse_args(["--nonsense", "-h", "--method", "nope"])
    assert info.value.code == 0
    assert "--beta FLOAT (default: 0.1)" in capsys.readouterr().out


def test_help_text_groups_in_order():
    text = help_text("cpo")
    positions = [text.index(f"\n{C.GROUP_TITLES[g]}") for g in C.GROUPS if f"\n{C.GROUP_TITLES[g]}" in text]
    assert len(positions) == 6  # cpo has no reference-model options
    assert positions == sorted(positions)
    with pytest.raises(ConfigError, match="unknown method"):
        help_text("nope")


def test_markdown_reference_covers_every_option():
    md = config_reference_markdown()
    for f in dataclasses.fields(CPOConfig):
        assert f"| `{f.name}` |" in md
    assert "### `method: cpo` options" in md
    assert "| `learning_rate` | `1e-06` |" in md
    # Method options appear only in the method tables (one row per method that has the option).
    assert md.count("| `beta` |") == sum(
        "beta" in {f.name for f in dataclasses.fields(cls)} for cls in METHOD_CONFIGS.values())


def test_write_readme_between_markers(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(f"# Title\n\nintro\n{C.README_START}\nold stuff\n{C.README_END}\ntail\n")
    assert C.main(["--write-readme", str(readme)]) == 0
    text = readme.read_text()
    assert "old stuff" not in text and text.startswith("# Title\n\nintro\n")
    assert config_reference_markdown() in text and text.endswith(f"{C.README_END}\ntail\n")
    assert C.main(["--write-readme", str(readme)]) == 0
    assert readme.read_text() == text  # idempotent
    missing = tmp_path / "NOMARK.md"
    missing.write_text("no markers\n")
    assert C.main(["--write-readme", str(missing)]) == 1
    assert "lacks the lines <!-- config-reference:start -->" in capsys.readouterr().err


def test_module_entry_point_prints_markdown():
    out = subprocess.run([sys.executable, "-m", "dspref.config", "--markdown"], cwd=REPO, capture_output=True,
                         text=True, check=True).stdout
    assert out == config_reference_markdown()
    assert "torch" not in subprocess.run(
        [sys.executable, "-c", "import sys, dspref.config, dspref.dsconfig; print(sorted(sys.modules))"],
        cwd=REPO, capture_output=True, text=True, check=True).stdout.replace("'", " ").split()


# --- saving -------------------------------------------------------------------------------------

def test_save_and_reload_round_trip(tmp_path):
    cfg, _ = parse_args(M + ["--learning_rate", "5e-7", "--report_to", "wandb", "--train_file", "a,b",
                             "--model_init_kwargs", "{torch_dtype: bfloat16}", "--bf16", "--beta", "0.3"])
    path = tmp_path / "out" / "config.yaml"
    save_config(cfg, str(path))
    assert sorted(os.listdir(tmp_path / "out")) == ["config.yaml"]  # no temp file left behind
    assert yaml.safe_load(path.read_text()) == config_to_dict(cfg)
    again, explicit = parse_args(["--config", str(path)])
    assert again == cfg
    assert explicit == set(config_to_dict(cfg))


def test_config_to_dict_is_a_copy():
    cfg = CPOConfig(model_name_or_path="m")
    d = config_to_dict(cfg)
    d["report_to"].append("wandb")
    assert cfg.report_to == ["none"]


# --- validation -------------------------------------------------------------------------------------

@pytest.mark.parametrize("argv,message", [
    (["--generate_during_eval"], "generate_during_eval samples eval prompts, and there is no eval data: give "
     "eval_file, eval_dataset_split or eval_split_ratio, or set generate_during_eval to false"),
    (["--generation_num_prompts", "0"], "generation_num_prompts must be >= 1, got 0"),
    (["--generation_max_new_tokens", "0"], "generation_max_new_tokens must be >= 1, got 0"),
    (["--generation_temperature", "-0.5"], "generation_temperature must be >= 0, got -0.5"),
    (["--generation_top_p", "0"], "generation_top_p must be in (0, 1], got 0.0"),
    (["--loss_type", "dpo"], "loss_type must be one of sigmoid | hinge | ipo | simpo, got 'dpo'"),
    (["--truncation_mode", "middle"], "truncation_mode must be one of keep_end | keep_start, got 'middle'"),
    (["--lr_scheduler_type", "poly"],
     "lr_scheduler_type must be one of linear | cosine | constant | constant_with_warmup, got 'poly'"),
    (["--beta", "0"], "beta must be > 0, got 0.0"),
    (["--label_smoothing", "0.6"], "label_smoothing must be in [0, 0.5], got 0.6"),
    (["--loss_type", "hinge", "--label_smoothing", "0.1"],
     "label_smoothing applies only to loss_type sigmoid or simpo, not 'hinge'; set it to 0"),
    (["--cpo_alpha", "-1"], "cpo_alpha must be >= 0, got -1.0"),
    (["--per_device_train_batch_size", "0"], "per_device_train_batch_size must be >= 1, got 0"),
    (["--per_device_eval_batch_size", "0"], "per_device_eval_batch_size must be >= 1, got 0"),
    (["--gradient_accumulation_steps", "0"], "gradient_accumulation_steps must be >= 1, got 0"),
    (["--bf16", "--fp16"], "bf16 and fp16 are both true; enable at most one"),
    (["--eval_split_ratio", "1"], "eval_split_ratio must be in [0, 1), got 1.0"),
    (["--eval_split_ratio", "0.1", "--eval_file", "e.jsonl"],
     "eval_split_ratio holds out training rows only when no eval data is given; "
     "drop it or drop eval_file / eval_dataset_split"),
    (["--report_to", "mlflow"], "report_to accepts wandb | tensorboard | none (alone or as a list), got ['mlflow']"),
    (["--report_to", "wandb,none"], "report_to cannot combine none with a tracker, got ['wandb', 'none']"),
    (["--max_prompt_length", "1024"], "max_prompt_length (1024) must be smaller than max_length (1024)"),
    (["--max_length", "0"], "max_length must be >= 1 or none, got 0"),
    (["--max_steps", "0"], "max_steps must be -1 or > 0, got 0"),
    (["--num_train_epochs", "0"], "num_train_epochs must be > 0 when max_steps is -1, got 0.0"),
    (["--warmup_ratio", "1.5"], "warmup_ratio must be in [0, 1], got 1.5"),
    (["--adam_beta2", "1"], "adam_beta2 must be in [0, 1), got 1.0"),
    (["--adam_epsilon", "0"], "adam_epsilon must be > 0, got 0.0"),
    (["--max_grad_norm", "-1"], "max_grad_norm must be >= 0 (0 disables clipping), got -1.0"),
    (["--logging_steps", "0"], "logging_steps must be >= 1, got 0"),
    (["--eval_steps", "0"], "eval_steps must be >= 1 or none, got 0"),
    (["--stop_after_steps", "0"], "stop_after_steps must be >= 1 or none, got 0"),
    (["--logits_chunk_size", "0"], "logits_chunk_size must be >= 1, got 0"),
    (["--train_file", "a.jsonl", "--dataset_name", "org/data"], "give either train_file or dataset_name, not both"),
])
def test_validation_errors(argv, message):
    assert error_of(M + argv) == message


def test_valid_edge_values():
    cfg, _ = parse_args(M + ["--max_steps", "10", "--num_train_epochs", "0", "--label_smoothing", "0.5",
                             "--max_grad_norm", "0", "--max_length", "none", "--loss_type", "simpo",
                             "--cpo_alpha", "0"])
    assert cfg.max_steps == 10 and cfg.label_smoothing == 0.5 and cfg.max_length is None


def test_constructor_checks_types():
    with pytest.raises(ConfigError, match="option 'per_device_train_batch_size' expects an int, got '8'$"):
        CPOConfig(model_name_or_path="m", per_device_train_batch_size="8")
    assert CPOConfig(model_name_or_path="m", report_to="wandb").report_to == ["wandb"]


# --- method registry -------------------------------------------------------------------------------

@dataclasses.dataclass
class _ToyConfig(TrainConfig):
    method: str = dataclasses.field(default="toy", metadata={"help": "toy", "group": "run"})
    toy_weight: float = dataclasses.field(default=2.0, metadata={"help": "Weight of the toy loss.", "group": "method"})


@pytest.fixture
def toy_method(monkeypatch):
    monkeypatch.setattr(C, "METHOD_CONFIGS", dict(METHOD_CONFIGS))
    register_method("toy", _ToyConfig)
    yield _ToyConfig


def test_register_method_adds_a_method(toy_method):
    cfg, _ = parse_args(M + ["--method", "toy", "--toy_weight", "3"])
    assert type(cfg) is toy_method and cfg.toy_weight == 3.0
    assert "### `method: toy` options" in config_reference_markdown()
    assert "--toy_weight FLOAT (default: 2.0)" in help_text("toy")
    assert error_of(M + ["--method", "toy", "--beta", "0.1"]) == (
        "option 'beta' from --beta does not apply to method 'toy' (it is an option of: bco, cpo, kto)")
    with pytest.raises(ConfigError, match="method 'toy' uses _ToyConfig, not CPOConfig"):
        CPOConfig(model_name_or_path="m", method="toy")


def test_register_method_checks_its_arguments(toy_method):
    other_toy = dataclasses.make_dataclass("OtherToy", [], bases=(_ToyConfig,))
    with pytest.raises(ValueError, match="method 'toy' is already registered to _ToyConfig"):
        register_method("toy", other_toy)
    with pytest.raises(ValueError, match="defaults to 'cpo'; override its default to 'other'"):
        register_method("other", CPOConfig)
    with pytest.raises(TypeError):
        register_method("dict", dict)
    assert register_method("toy", _ToyConfig) is _ToyConfig  # re-registering the same class is fine


RECIPES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch", "configs")


@pytest.mark.parametrize("recipe", sorted(f for f in os.listdir(RECIPES) if f.endswith(".yaml")))
def test_shipped_recipes_parse(recipe):
    """Every recipe in launch/configs is valid as shipped (the data paths need not exist to parse)."""
    cfg, given = C.parse_args(["--config", os.path.join(RECIPES, recipe)])
    assert cfg.method in METHOD_CONFIGS and "method" in given
    if recipe in ("cpo.yaml", "kto.yaml"):
        assert cfg.padding_free is True
    if recipe == "kto.yaml":
        assert cfg.precompute_ref_log_probs is True and cfg.loss_type == "kto"
