"""The built-in tasks (fine-tuning, classifier distillation), made from the running interpreter's standard
library (no download).

    python -m lmforge.data.tasks stdlib-docstring-package OUT_DIR   # writes train/validation/test.jsonl + meta.json

- `stdlib-docstring-package` (classification): a function's or class's docstring -> the top-level stdlib
  package its file belongs to (`email`, `asyncio`, `test`, ...): the `top_packages` most frequent packages that
  have docstrings in train, validation and test are the classes (a package split into train only is never scored).
- `stdlib-docstring-name` (SFT): a public function's docstring -> the function's name (exact match).

Deterministic for a given interpreter. Split by source file, with the rule tokenization uses for its
validation split: a file whose content hash (`lmforge.data.sources.hash_fraction`) is below `holdout` is held
out (the lower half validation, the upper half test), so as long as the pretraining data held out at least
`holdout` of the files (`split.val_fraction` of configs/tokenize/demo.yaml), no validation or test docstring
was ever in the pretraining train split. A docstring found in two files is dropped (its label is ambiguous,
and it could cross splits). Distributions differ (Debian ships no `test/`): the tasks hold whatever is there.
"""

from __future__ import annotations

import argparse
import ast
import functools
import gc
import json
import sys
import sysconfig
import warnings
from collections import Counter, defaultdict, deque
from pathlib import Path

from lmforge import atomic
from lmforge.data.sources import DataError, doc_hash, hash_fraction, stdlib_files

TASKS = ("stdlib-docstring-package", "stdlib-docstring-name")
SPLITS = ("train", "validation", "test")
MIN_DOC_CHARS = 20  # docstrings shorter than this ("Return self.") say too little to learn from


def file_split(text: str, holdout: float) -> str:
    """The split of a source file with this text: the same hash tokenization splits documents by."""
    fraction = hash_fraction(doc_hash(text.encode("utf-8")))
    if fraction < holdout / 2:
        return "validation"
    return "test" if fraction < holdout else "train"


DEFS = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
BLOCKS = (ast.stmt, ast.excepthandler, ast.match_case)  # what a list of statements (or of their clauses) holds


def definitions(tree: ast.AST):
    """The functions and classes of a module, nested ones included, in `ast.walk`'s order (breadth first),
    visiting only the lists of statements (bodies, branches, handlers, match cases): a def is a statement,
    and expressions, most of a tree's nodes, cannot hold one."""
    todo = deque([tree])
    while todo:
        node = todo.popleft()
        if isinstance(node, DEFS):
            yield node
        for field in node._fields:  # in ast.iter_child_nodes' order
            inner = getattr(node, field, None)
            if isinstance(inner, list) and inner and isinstance(inner[0], BLOCKS):
                todo.extend(inner)


def docstrings(exclude_tests: bool = False) -> tuple[dict, ...]:
    """Every (file, package, kind, name, docstring) of the stdlib's functions and classes, in file order.
    Parsed once per process (~1,800 files, ~8 s on one core): the result is shared, treat it as read-only."""
    return _docstrings(bool(exclude_tests))


@functools.lru_cache(maxsize=2)
def _docstrings(exclude_tests: bool) -> tuple[dict, ...]:
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    collecting = gc.isenabled()
    gc.disable()  # millions of short-lived tree nodes, no cycles: the collector would rescan them for nothing
    try:
        for path in stdlib_files(exclude_tests):
            # as tokenization decodes a file (a UTF-8 byte-order mark dropped): the split hashes must agree
            text = path.read_bytes().decode("utf-8", errors="replace").removeprefix("\ufeff")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # invalid escape sequences in old test files
                try:
                    tree = ast.parse(text)
                except (SyntaxError, ValueError):  # lib2to3's Python 2 test data, deliberately broken test files
                    continue
            rel = path.relative_to(root)
            package = rel.parts[0].removesuffix(".py")
            for node in definitions(tree):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= MIN_DOC_CHARS:
                    found.append({"file": str(rel), "text": text, "package": package, "name": node.name,
                                  "function": not isinstance(node, ast.ClassDef), "doc": doc})
    finally:
        if collecting:
            gc.enable()
    return tuple(found)


def build(task: str, top_packages: int = 16, holdout: float = 0.1, exclude_tests: bool = False) -> dict:
    """{"train"|"validation"|"test": [example, ...], "labels": [...] (classification)} for a built-in task."""
    if task not in TASKS:
        raise ValueError(f"unknown built-in task {task!r}; choose one of {', '.join(TASKS)}")
    found = docstrings(exclude_tests)
    if task == "stdlib-docstring-name":
        found = [d for d in found if d["function"] and not d["name"].startswith("_")]
    files_of = defaultdict(set)
    for d in found:
        files_of[d["doc"]].add(d["file"])
    seen, unique = set(), []
    for d in found:  # a docstring in two files: dropped; twice in one file: the first
        if len(files_of[d["doc"]]) == 1 and d["doc"] not in seen:
            seen.add(d["doc"])
            unique.append(d)
    split_of = {d["file"]: file_split(d["text"], holdout) for d in unique}
    out: dict = {s: [] for s in SPLITS}
    if task == "stdlib-docstring-package":
        # Only a package with examples in every split is a class: most packages are one module or a few files,
        # so a file-level split puts all of them in train, and a class that is never scored only distracts.
        splits_of = defaultdict(set)
        for d in unique:
            splits_of[d["package"]].add(split_of[d["file"]])
        counts = Counter(d["package"] for d in unique if splits_of[d["package"]] == set(SPLITS))
        labels = sorted(p for p, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_packages])
        if len(labels) < 2:
            raise DataError(
                f"stdlib-docstring-package: only {len(labels)} stdlib package(s) of this interpreter have docstrings in "
                f"train, validation and test with holdout {holdout}; raise data.holdout (and the pretraining "
                "split.val_fraction with it) or use your own data")
        keep = set(labels)
        unique = [d for d in unique if d["package"] in keep]
        out["labels"] = labels
    for d in unique:
        split = split_of[d["file"]]
        if task == "stdlib-docstring-package":
            out[split].append({"text": d["doc"], "label": d["package"], "source": d["file"]})
        else:
            out[split].append({"prompt": d["doc"], "response": d["name"], "source": d["file"]})
    out["held_out_files"] = sorted({e["source"] for s in ("validation", "test") for e in out[s]})
    return out


def write(task: str, out_dir: Path, top_packages: int = 16, holdout: float = 0.1, exclude_tests: bool = False
          ) -> dict:
    """Write `out_dir/{train,validation,test}.jsonl` and `meta.json` (each file atomically); returns meta."""
    data = build(task, top_packages, holdout, exclude_tests)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for split in SPLITS:
        lines = "".join(json.dumps(e, ensure_ascii=False) + "\n" for e in data[split])
        atomic.write_text(out_dir / f"{split}.jsonl", lines)
    meta = {"task": task, "python": sys.version.split()[0], "top_packages": top_packages, "holdout": holdout,
            "exclude_tests": exclude_tests, "examples": {s: len(data[s]) for s in SPLITS},
            "labels": data.get("labels"), "held_out_files": data["held_out_files"]}
    atomic.write_json(out_dir / "meta.json", meta)
    return meta


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m lmforge.data.tasks", description=__doc__.split("\n")[0])
    parser.add_argument("task", choices=TASKS)
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--top-packages", type=int, default=16, help="classes of stdlib-docstring-package")
    parser.add_argument("--holdout", type=float, default=0.1,
                        help="share of files held out for validation + test (<= the pretraining val_fraction)")
    parser.add_argument("--exclude-tests", action="store_true", help="leave out test/, tests/ and idlelib")
    args = parser.parse_args(argv)
    meta = write(args.task, args.out_dir, args.top_packages, args.holdout, args.exclude_tests)
    print(f"[tasks] {args.task}: {meta['examples']} -> {args.out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
