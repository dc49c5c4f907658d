"""The tokenization benchmark runs end to end on a slice of the corpus and reports what it claims."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from ..conftest import ROOT


def test_tokenize_benchmark_smoke_run(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "tokenize.py"), "--limit-docs", "60", "--scale", "2",
                          "--vocab-size", "1024", "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work")],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / "results" / "tokenize.json").read_text())
    results = report["results"]
    assert set(results) == {"encode_batch", "encode_batch_1thread", "fast_path_1thread", "lmforge",
                            "lmforge_tokenizers", "datasets_map", "lmforge_x2"}
    assert results["fast_path_1thread"]["identical_ids"] is True
    # every method encoded the same documents into the same number of tokens (EOS included)
    assert results["encode_batch"]["tokens"] == results["lmforge"]["tokens"] == results["lmforge_tokenizers"]["tokens"]
    assert results["lmforge_x2"]["bytes"] == 2 * results["lmforge"]["bytes"]
    assert results["lmforge"]["encoder"] == "tiktoken" and results["lmforge_tokenizers"]["encoder"] == "tokenizers"
    assert all(r["mb_per_s"] > 0 and r["peak_rss_bytes"] > 0 for r in results.values())
    assert set(report["targets"]) == {"lmforge_vs_encode_batch", "lmforge_vs_datasets_map",
                                      "fast_path_vs_encode_batch_per_core"}
    # a smoke run (a slice) never overwrites the recorded table, and cleans up its scratch data
    assert "--limit-docs" not in (ROOT / "BENCHMARKS.md").read_text()
    assert not list((tmp_path / "work").glob("lmforge*/")) and not (tmp_path / "work" / "hf_cache").exists()
