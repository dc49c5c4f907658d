"""The built-in fine-tuning tasks (lmforge/data/tasks.py): made from this interpreter's standard library, split by
source file, and held out of the pretraining train split by construction."""

from __future__ import annotations

import sysconfig
from collections import Counter
from pathlib import Path

import pytest
import yaml

from lmforge.data import tasks
from lmforge.data.sources import DataError, doc_hash, hash_fraction

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow  # parses every stdlib file (~10 s per task)


@pytest.fixture(scope="module")
def built():
    return {t: tasks.build(t, top_packages=16, holdout=0.1) for t in tasks.TASKS}


def test_each_file_lands_in_one_split_and_held_out_files_are_pretraining_validation(built):
    pretrain_val = yaml.safe_load((ROOT / "configs/tokenize/demo.yaml").read_text())["split"]["val_fraction"]
    for name in ("demo.yaml", "demo_sft.yaml"):  # the shipped fine-tuning configs hold out no more than that
        assert yaml.safe_load((ROOT / "configs/finetune" / name).read_text())["data"]["holdout"] <= pretrain_val
    root = Path(sysconfig.get_paths()["stdlib"])
    for task, data in built.items():
        files = {s: {e["source"] for e in data[s]} for s in tasks.SPLITS}
        assert not files["train"] & files["validation"] and not files["train"] & files["test"]
        assert not files["validation"] & files["test"], task
        for source in files["validation"] | files["test"]:
            # the hash tokenization splits by: below val_fraction the file is in pretraining's val split
            text = (root / source).read_bytes().decode("utf-8", errors="replace")
            assert hash_fraction(doc_hash(text.encode())) < pretrain_val, source
        assert len(data["validation"]) > 20 and len(data["test"]) > 20 and len(data["train"]) > 1000, task


def test_the_classification_task_has_the_top_packages_and_no_ambiguous_docstring(built):
    data = built["stdlib-docstring-package"]
    assert 2 <= len(data["labels"]) <= 16 and data["labels"] == sorted(data["labels"])
    for split in tasks.SPLITS:  # every class is scored: a package in train only is not a class
        assert {e["label"] for e in data[split]} == set(data["labels"]), split
    every = [e for s in tasks.SPLITS for e in data[s]]
    fewer = tasks.build("stdlib-docstring-package", top_packages=2, holdout=0.1)
    assert fewer["labels"] == sorted(sorted(data["labels"], key=lambda p: -sum(e["label"] == p for e in every))[:2])
    with pytest.raises(DataError, match="raise data.holdout"):  # too few held-out files: a clear error
        tasks.build("stdlib-docstring-package", holdout=0.002)
    docs = Counter(e["text"] for e in every)
    assert max(docs.values()) == 1  # a docstring in two files (an ambiguous label) is dropped
    assert all(e["label"] == Path(e["source"]).parts[0].removesuffix(".py") for e in every[:500])


def test_the_sft_task_names_public_functions_from_their_docstrings(built):
    data = built["stdlib-docstring-name"]
    every = [e for s in tasks.SPLITS for e in data[s]]
    assert all(e["response"].isidentifier() and not e["response"].startswith("_") for e in every)
    assert len({e["prompt"] for e in every}) == len(every)
    assert any(e["response"] == "dumps" and "JSON" in e["prompt"] for e in every)  # json.dumps is there


def test_the_builtin_tasks_work_on_a_stdlib_stripped_as_distributions_ship_it(monkeypatch):
    """Debian's and Ubuntu's python3 and the official Docker images ship the standard library without test/ (and
    often without tkinter, idlelib, turtledemo): ~650-750 files. The demo's tasks must still be there."""
    from lmforge.data import sources, tasks

    real = sources.stdlib_files
    stripped = [p for p in real(exclude_tests=True)
                if not {"tkinter", "turtledemo", "idlelib", "test", "tests"} & set(p.parts)]
    monkeypatch.setattr(tasks, "stdlib_files", lambda exclude_tests=False: stripped)
    tasks._docstrings.cache_clear()
    try:
        package = tasks.build("stdlib-docstring-package")
        name = tasks.build("stdlib-docstring-name")
    finally:
        tasks._docstrings.cache_clear()
    assert 500 < len(stripped) < len(real())
    assert len(package["labels"]) >= 2 and all(package[s] for s in tasks.SPLITS)
    assert "test" not in package["labels"] and "tkinter" not in package["labels"]
    assert all(len(name[s]) > 50 for s in tasks.SPLITS)
