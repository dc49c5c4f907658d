"""The pretraining benchmark runs end to end in smoke mode and reports what it claims."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from ..conftest import ROOT


@pytest.mark.slow
def test_train_benchmark_smoke_run(tmp_path):
    benchmarks = ROOT / "BENCHMARKS.md"
    before = benchmarks.read_bytes() if benchmarks.exists() else None
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "train.py"), "--smoke", "--out", str(tmp_path / "results"),
                          "--work", str(tmp_path / "work")],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=400)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "results" / "train.json").read_text())
    assert report["mode"] == "smoke"

    results = report["results"]
    assert set(results) == {"lmforge", "trainer", "plain"}
    for method, r in results.items():
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1, (method, r)
        assert r["measured_steps"] == report["config"]["steps"] - report["config"]["warmup_steps_skipped"] > 0
        assert len(r["losses"]) == report["config"]["steps"], method
    # the Trainer really ran on DeepSpeed ZeRO-2 and read the windows lmforge reads, rank by rank
    assert results["trainer"]["wrapped_by"] == "DeepSpeedEngine" and results["trainer"]["zero_stage"] == 2
    assert results["trainer"]["same_windows_as_lmforge"] is True
    assert results["lmforge"]["zero_stage"] == 2
    # same seed, weights, windows and update rule: lmforge and the plain loop agree on the losses
    assert results["lmforge"]["losses"] == pytest.approx(results["plain"]["losses"], abs=1e-3)
    assert results["trainer"]["losses"][0] == pytest.approx(results["plain"]["losses"][0], abs=0.05)

    tps = {m: r["tokens_per_s"] for m, r in results.items()}
    ratios = report["ratios"]
    # one round: the median of the per-round ratios is that round's ratio
    assert ratios["per_round"]["lmforge_vs_trainer"] == [ratios["lmforge_vs_trainer"]]
    assert ratios["lmforge_vs_trainer"] == pytest.approx(tps["lmforge"] / tps["trainer"], rel=1e-2)
    assert ratios["lmforge_vs_plain"] == pytest.approx(tps["lmforge"] / tps["plain"], rel=1e-2)
    assert ratios["best_of_rounds"]["lmforge_vs_plain"] == pytest.approx(ratios["lmforge_vs_plain"], rel=1e-2)
    assert set(report["targets"]) == {"lmforge_vs_trainer", "lmforge_vs_plain", "zero3_vs_theory"}
    assert all(isinstance(t["met"], bool) for t in report["targets"].values())

    memory = report["memory"]
    n, w = memory["params"], memory["world_size"]
    assert set(memory["precisions"]) == {"bf16", "fp32"} and w == 2
    theory = {"bf16": {"0": 16 * n, "1": 4 * n + 12 * n / w, "2": 2 * n + 14 * n / w, "3": 16 * n / w},
              "fp32": {"0": 16 * n, "1": 8 * n + 8 * n / w, "2": 4 * n + 12 * n / w, "3": 16 * n / w}}
    for precision, expected in theory.items():
        stages = memory["precisions"][precision]["stages"]
        assert set(stages) == {"0", "1", "2", "3"}
        for stage, s in stages.items():
            assert s["theory_bytes"] == pytest.approx(expected[stage], abs=1)
            assert len(s["peak_rss_bytes"]) == w and all(p > b for p, b in zip(s["peak_rss_bytes"],
                                                                               memory["baseline_peak_rss_bytes"], strict=True))
            assert s["model_states_max_bytes"] > 0 and s["vs_theory"] > 0
            assert (s["deepspeed_expected_bytes"] is None) == (precision == "bf16")
    # the target is read where the theory's account applies: bf16 mixed precision
    assert report["targets"]["zero3_vs_theory"]["measured"] == memory["precisions"]["bf16"]["stages"]["3"]["vs_theory"]

    # a smoke run never touches the recorded tables
    assert (benchmarks.read_bytes() if benchmarks.exists() else None) == before


def test_the_table_renders_the_recorded_results(tmp_path):
    """write_table over the committed bench/results/train.json: every figure filled in (no f-string left
    unformatted), the headline ratio the median of the per-round ratios, and the per-round ratios listed."""
    import re
    import statistics

    from bench.train import BEGIN, END, write_table

    report = json.loads((ROOT / "bench" / "results" / "train.json").read_text())
    out = tmp_path / "BENCHMARKS.md"
    out.write_text("# Benchmarks\n")
    write_table(report, out)
    text = out.read_text()
    section = text[text.index(BEGIN):text.index(END)]
    assert not re.search(r"\{[a-z_]+\[", section), re.search(r".{40}\{[a-z_]+\[.{40}", section)[0]
    per_round = report["ratios"]["per_round"]["lmforge_vs_trainer"]
    assert report["ratios"]["lmforge_vs_trainer"] == pytest.approx(statistics.median(per_round), abs=1e-3)
    assert f"| lmforge / HF Trainer (tokens/s) | {report['ratios']['lmforge_vs_trainer']:.2f}x |" in section
    assert "Per round (lmforge / Trainer): " + ", ".join(f"{x:.2f}x" for x in per_round) in section
