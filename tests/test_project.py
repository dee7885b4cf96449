"""Project-level contracts: README commands, generated reference, shipped demo data, entry points."""

import re
import subprocess
import sys

from conftest import ROOT


def fenced_blocks(text):
    return re.findall(r"```(?:\w+)?\n(.*?)```", text, flags=re.S)


def test_readme_starts_with_the_two_commands():
    blocks = fenced_blocks((ROOT / "README.md").read_text())
    assert blocks[0].strip() == "bash launch/demo.sh"
    assert blocks[1].strip() == "bash .ci/run"
    ci = (ROOT / ".ci" / "run").read_text()
    assert "bash launch/test.sh" in ci
    assert "torch==2.13.0" in (ROOT / "launch" / "setup.sh").read_text()


def test_readme_config_reference_is_current():
    from dspref.config import config_reference_markdown

    readme = (ROOT / "README.md").read_text()
    start, end = "<!-- config-reference:start -->", "<!-- config-reference:end -->"
    section = readme.split(start)[1].split(end)[0]
    assert section.strip() == config_reference_markdown().strip(), "run: python -m dspref.config --write-readme README.md"


def test_shipped_demo_data_is_what_the_script_makes():
    proc = subprocess.run([sys.executable, "launch/demo/make_data.py", "--check"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_console_script_help_lists_every_option():
    from dspref.config import CPOConfig
    from dataclasses import fields

    proc = subprocess.run([sys.executable, "-m", "dspref.cli", "train", "--help"], cwd=ROOT, capture_output=True,
                          text=True)
    assert proc.returncode == 0, proc.stderr
    for f in fields(CPOConfig):
        assert f.name in proc.stdout, f.name
    assert "learning_rate" in proc.stdout and "1e-06" in proc.stdout


def test_package_import_is_light():
    code = "import sys, dspref, dspref.config, dspref.dsconfig; print(any(m in sys.modules for m in ('torch', 'deepspeed', 'transformers')))"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert out == "False"
