"""The tokenization benchmark runs end to end on a slice of the corpus and reports what it claims."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from ..conftest import ROOT


def test_tokenize_benchmark_smoke_run(tmp_path):
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "tokenize.py"), "--limit-docs", "60", "--scale", "2",
                          "--vocab-size", "1024", "--out", str(tmp_path / "results"), "--work", str(tmp_path / "work")],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / "results" / "tokenize.json").read_text())
    results = report["results"]
    assert set(results) == {"encode_batch", "encode_batch_1thread", "fast_path_1thread", "lmforge",
                            "lmforge_tokenizers", "lmforge_jsonl", "lmforge_jsonl_main_reading", "datasets_map",
                            "lmforge_x2", "lmforge_jsonl_survey", "lmforge_jsonl_survey_main_reading",
                            "lmforge_jsonl_survey_x2"}
    assert results["fast_path_1thread"]["identical_ids"] is True
    # every method encoded the same documents into the same number of tokens (EOS included)
    assert results["encode_batch"]["tokens"] == results["lmforge"]["tokens"] == results["lmforge_tokenizers"]["tokens"]
    # the same documents, as JSONL, whoever reads them
    assert results["lmforge_jsonl"]["tokens"] == results["lmforge_jsonl_main_reading"]["tokens"] == \
        results["lmforge"]["tokens"]
    for key in ("lmforge", "lmforge_jsonl", "lmforge_jsonl_main_reading"):  # the serial share: the main process's CPU against the workers'
        cpu = results[key]["encode_cpu_seconds"]
        assert cpu["main"] > 0 and cpu["workers"] > 0 and 0 < results[key]["serial_share"] < 1
        ratio = cpu["workers"] / cpu["main"]  # from seconds rounded to 1 ms: agree to a few percent
        assert abs(results[key]["workers_at_saturation"] - ratio) <= 0.1 * ratio + 0.1
    assert results["lmforge_x2"]["bytes"] == 2 * results["lmforge"]["bytes"]
    # the survey (a tokenizer trained on its sample, val_docs, exact dedup): the workers' and the main process's
    # reading train the same tokenizer and keep the same documents; each reports its own serial share
    survey, before = results["lmforge_jsonl_survey"], results["lmforge_jsonl_survey_main_reading"]
    assert survey["tokens"] == before["tokens"] and survey["documents"] == before["documents"]
    assert survey["survey"]["cpu_seconds"]["main"] > 0 and survey["survey"]["cpu_seconds"]["workers"] > 0
    assert before["survey"]["cpu_seconds"]["workers"] == 0  # the main process read for it
    assert results["lmforge_jsonl_survey_x2"]["documents"] == 2 * survey["documents"]  # distinct copies: none dropped
    assert "survey_marginal_main_cpu_seconds_per_gb" in report["ratios"]
    assert results["lmforge"]["encoder"] == "tiktoken" and results["lmforge_tokenizers"]["encoder"] == "tokenizers"
    assert all(r["mb_per_s"] > 0 and r["peak_rss_bytes"] > 0 for r in results.values())
    assert set(report["targets"]) == {"lmforge_vs_encode_batch", "lmforge_vs_datasets_map",
                                      "fast_path_vs_encode_batch_per_core"}
    # a smoke run (a slice) never overwrites the recorded table, and cleans up its scratch data
    assert "--limit-docs" not in (ROOT / "BENCHMARKS.md").read_text()
    assert not list((tmp_path / "work").glob("lmforge*/")) and not (tmp_path / "work" / "hf_cache").exists()


CHILD = '''
import argparse
from pathlib import Path

from bench.report import parse_args


def returns(spec):
    return {"value": spec["value"] * 2}


def writes_itself(spec):
    Path(spec["result"]).write_text("written by the child")


args = parse_args(argparse.ArgumentParser(), {"returns": returns, "writes": writes_itself})
print("parent code ran, child:", args.child)
'''


def test_child_launch_runs_the_child_writes_rank_0_result_and_never_returns(tmp_path):
    """bench/report.parse_args, every benchmark's child entry point: `--child NAME --spec FILE` runs that child
    instead of the script, rank 0 alone writes what it returns, and the parent's code never runs in a child."""
    script = tmp_path / "script.py"
    script.write_text(CHILD)

    def run(*args: str, rank: str | None = None) -> subprocess.CompletedProcess:
        env = {k: v for k, v in os.environ.items() if k != "RANK"} | {"PYTHONPATH": str(ROOT)}
        return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=60,
                              env=env | ({"RANK": rank} if rank is not None else {}))

    def child(name: str, rank: str | None) -> tuple[subprocess.CompletedProcess, Path]:
        result = tmp_path / f"{name}-{rank}.json"
        spec = tmp_path / f"{name}-{rank}.spec.json"
        spec.write_text(json.dumps({"value": 21, "result": str(result)}))
        return run("--child", name, "--spec", str(spec), rank=rank), result

    for rank in (None, "0"):  # alone (no torchrun), and rank 0 under torchrun
        proc, result = child("returns", rank)
        assert proc.returncode == 0 and "parent code ran" not in proc.stdout, proc.stdout + proc.stderr
        assert json.loads(result.read_text()) == {"value": 42}
    proc, result = child("returns", "1")
    assert proc.returncode == 0 and not result.exists()  # other ranks return the same record: one writer
    proc, result = child("writes", "0")
    assert proc.returncode == 0 and result.read_text() == "written by the child"  # None: nothing overwritten
    proc = run("--child", "nope", "--spec", str(tmp_path / "x.json"))
    assert proc.returncode == 2 and "invalid choice" in proc.stderr
    proc = run()
    assert proc.returncode == 0 and "parent code ran, child: None" in proc.stdout


def test_distill_benchmark_smoke_run_reports_every_figure_and_leaves_the_table(tmp_path):
    """bench/distill.py --smoke: both distillations with their baselines, the cache pass and the offline/live pair
    run end to end on tiny models, and the BENCHMARKS.md section renders from what it recorded."""
    before = (ROOT / "BENCHMARKS.md").read_text()
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "distill.py"), "--smoke", "--out", str(tmp_path / "out"),
                          "--work", str(tmp_path / "work")], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    report = json.loads((tmp_path / "out" / "distill.json").read_text())
    assert report["lm"]["report"]["kind"] == "language-model" and report["classifier"]["report"]["kind"] == "classifier"
    for kind in ("lm", "classifier"):
        assert set(report[kind]["report"]["models"]) == {"teacher", "student", "baseline"}
        assert report[kind]["baseline_val_curve"] and report[kind]["val_curve"]
    tp = report["throughput"]
    assert tp["cache"]["bytes_per_token"] == 64 * (2 + 2) + 4  # top-64, uint16 ids, fp16 logits, fp32 normaliser
    assert tp["live"]["tokens_per_s"] > 0 and tp["offline"]["tokens_per_s"] > 0 and tp["offline_over_live"] > 0
    sys.path.insert(0, str(ROOT))
    from bench.distill import BEGIN, END, table

    section = table(report)
    assert section.startswith(BEGIN) and section.endswith(END) and "260 bytes per token" in section
    assert (ROOT / "BENCHMARKS.md").read_text() == before  # a smoke run never writes the recorded table
