"""The repository keeps its promises: README commands point at real things, and the code passes lint."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from lmforge.cli import COMMANDS

from ..conftest import ROOT

README = (ROOT / "README.md").read_text()


def test_readme_opens_with_the_two_commands():
    head = README[:1500]
    assert "make demo" in head and "make test" in head


def test_every_path_the_readme_names_exists():
    # from the repository root (not `../pretrain/demo.yaml`, which a pipeline file names relative to itself)
    paths = set(re.findall(r"(?<![\w./])((?:configs|bench|tests|lmforge|pretrain|finetune|distill|slurm)/[\w./-]+"
                           r"\.(?:yaml|py|md|sbatch))", README))
    assert paths, "the README names no files"
    missing = [p for p in paths if not (ROOT / p).exists()]
    assert not missing, f"README names files that do not exist: {missing}"


def test_every_lmforge_command_in_the_readme_exists():
    used = set(re.findall(r"(?:bin/|`)lmforge (\w+)", README))  # commands run or quoted as code
    assert "tokenize" in used
    assert used <= set(COMMANDS), f"README uses commands the CLI lacks: {used - set(COMMANDS)}"


def test_every_make_target_in_the_readme_exists():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    used = set(re.findall(r"(?:`|^ {4,})make (\w+)", README, re.M))  # in code: quoted or in an indented block
    assert used and used <= targets, f"README uses make targets the Makefile lacks: {used - targets}"


def test_ruff_finds_nothing():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    assert ruff, "ruff is a dev dependency: pip install -e .[dev]"
    run = subprocess.run([ruff, "check", "--no-cache", "lmforge", "pretrain", "finetune", "distill", "bench", "tests"],
                         cwd=ROOT, capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr
