"""Reliability report: kills during saves, resumes on other rank counts, and what checkpointing costs.

    python bench/reliability.py [--out DIR] [--quick]

Runs real `torchrun -m pretrain` launches on 2 CPU ranks through the test harness (tests/harness.py):

  kills         for every point of a save (before it, mid-shard, after the shards, after the RNG
                states, before and after the commit, after pruning), SIGKILL one rank while saving
                step 4, relaunch, and check the finished run against an uninterrupted one: per-step
                losses and final weights bitwise, and the windows trained on, step by step
  world size    ZeRO-1/2/3 checkpoints saved on 2 ranks resumed on 1, and on 1 resumed on 2
                (through DeepSpeed's universal checkpoint): largest difference from the uninterrupted
                run in loss and weights, and whether the data order is the same
  timings       the `demo` model (~5 M parameters) on the built-in corpus, ZeRO-2, 2 ranks: seconds per
                checkpoint save and load, and saving's share of training time at save_every

Writes DIR/reliability.json (default bench/results) and, unless --quick, the section in BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)  # the project root, for `tests.harness` and `lmforge`

from bench.report import write_section  # noqa: E402
from tests.harness import launch, position_corpus, pretrain_config, traced, trained_windows  # noqa: E402

BEGIN, END = "<!-- bench:reliability:begin -->", "<!-- bench:reliability:end -->"
KILLS = [("save-begin", 1), ("save-mid-shards", 1), ("save-shards", 0), ("save-rng", 1), ("save-commit", 0),
         ("save-committed", 0), ("save-pruned", 0)]
RESIZES = [(1, 2, 1), (2, 2, 1), (3, 2, 1), (1, 1, 2), (2, 1, 2), (3, 1, 2)]


def weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


def losses(run_dir: Path) -> list[float]:
    return [m["train/loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in m]


def compare(run_dir: Path, ref_dir: Path, traces: list[Path], ref_windows: dict) -> dict:
    a, b = weights(run_dir), weights(ref_dir)
    la, lb = losses(run_dir), losses(ref_dir)
    return {"weights_max_abs_diff": max(float((a[k] - b[k]).abs().max()) for k in b),
            "loss_max_abs_diff": max(abs(x - y) for x, y in zip(la, lb, strict=True)),
            "bitwise": la == lb and all((a[k] == b[k]).all() for k in b),
            "same_windows": trained_windows(*traces) == ref_windows}


def position_config(tmp: Path, data: Path, stage: int = 2) -> Path:
    return pretrain_config(tmp / "run.yaml", data, tmp / "run", seq_len=16,
                           batch={"micro_batch_size": 2, "global_batch_size": 8},
                           engine={"deepspeed": str(ROOT / "configs" / "deepspeed" / f"zero{stage}.json")},
                           train={"max_steps": 8, "log_every": 1, "eval_every": 100, "save_every": 2, "keep_last": 2},
                           eval={"windows": 4, "prompt": "", "max_new_tokens": 4})


def must(proc: subprocess.CompletedProcess, what: str) -> None:
    if proc.returncode != 0:
        raise SystemExit(f"{what} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")


def tiny_tokenizer(work: Path) -> Path:
    from lmforge.data.sources import stdlib_files
    from lmforge.tokenizer import save_folder, train_bpe

    texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()[:80]]
    save_folder(train_bpe(texts, 512, ["<|endoftext|>", "<|pad|>"], show_progress=False), work / "tok",
                eos_token="<|endoftext|>", pad_token="<|pad|>")
    return work / "tok"


def run_kills(work: Path, data: Path, reference: tuple, points) -> list[dict]:
    out = []
    for point, rank in points:
        tmp = Path(tempfile.mkdtemp(dir=work, prefix=f"kill-{point}-"))
        cfg = position_config(tmp, data)
        first, second = traced(tmp, "crashed"), traced(tmp, "resumed")
        crashed = launch("pretrain", cfg, nproc=2, env={**first, "LMFORGE_FAULT": f"{point}:4:{rank}"})
        resumed = launch("pretrain", cfg, nproc=2, env=second)
        must(resumed, f"resume after a kill at {point}")
        resumed_at = int(resumed.stdout.split(" at step ")[1].split(" ")[0]) if " at step " in resumed.stdout else None
        result = {"point": point, "rank": rank, "killed": crashed.returncode != 0, "resumed_from_step": resumed_at,
                  **compare(tmp / "run", reference[0], [Path(first["LMFORGE_TRACE_DIR"]),
                                                         Path(second["LMFORGE_TRACE_DIR"])], reference[1])}
        print(f"[reliability] kill at {point} (rank {rank}): resumed from step {resumed_at}, "
              f"{'bitwise identical' if result['bitwise'] else 'DIFFERENT'}", flush=True)
        out.append(result)
        shutil.rmtree(tmp)
    return out


def run_resizes(work: Path, data: Path, reference: tuple, cases) -> list[dict]:
    out = []
    for stage, before, after in cases:
        tmp = Path(tempfile.mkdtemp(dir=work, prefix=f"resize-z{stage}-"))
        cfg = position_config(tmp, data, stage)
        first, second = traced(tmp, "first"), traced(tmp, "second")
        launch("pretrain", cfg, nproc=before, env={**first, "LMFORGE_FAULT": "save-committed:4:0"})
        started = time.perf_counter()
        resumed = launch("pretrain", cfg, nproc=after, env=second)
        must(resumed, f"ZeRO-{stage} resume {before} -> {after} ranks")
        result = {"zero_stage": stage, "from_ranks": before, "to_ranks": after,
                  "converted": "converting it to a universal checkpoint" in resumed.stdout,
                  "resume_wall_seconds": round(time.perf_counter() - started, 2),
                  **compare(tmp / "run", reference[0], [Path(first["LMFORGE_TRACE_DIR"]),
                                                         Path(second["LMFORGE_TRACE_DIR"])], reference[1])}
        print(f"[reliability] ZeRO-{stage} {before} -> {after} ranks: weights within "
              f"{result['weights_max_abs_diff']:.1e}, same windows: {result['same_windows']}", flush=True)
        out.append(result)
        shutil.rmtree(tmp)
    return out


def run_timings(work: Path, steps: int, save_every: int) -> dict:
    data = ROOT / "bench" / "work" / "train" / "data"
    if not (data / "meta.json").exists():
        data = work / "demo_data"
        must(subprocess.run([sys.executable, "-m", "lmforge.cli", "tokenize", str(ROOT / "configs/tokenize/demo.yaml"),
                             f"out_dir={data}", "progress=false"], capture_output=True, text=True, cwd=ROOT),
             "tokenizing the built-in corpus")
    tmp = work / "timings"
    shutil.rmtree(tmp, ignore_errors=True)
    cfg = pretrain_config(tmp / "demo.yaml", data, tmp / "run", seq_len=256,
                          model={"include": str(ROOT / "configs" / "model" / "demo.yaml")},
                          batch={"micro_batch_size": 8, "global_batch_size": 16},
                          train={"max_steps": steps, "log_every": 1, "eval_every": 10**6, "save_every": save_every,
                                 "keep_last": 2},
                          eval={"windows": 4, "prompt": "", "max_new_tokens": 4})
    must(launch("pretrain", cfg, nproc=2), "the demo-model run")
    first = json.loads((tmp / "run" / "summary.json").read_text())
    must(launch("pretrain", cfg, f"train.max_steps={steps + save_every}", nproc=2), "the demo-model resume")
    second = json.loads((tmp / "run" / "summary.json").read_text())
    step_seconds = first["train_seconds"] / steps
    saves = first["checkpoint_save_seconds"][:-1] or first["checkpoint_save_seconds"]  # periodic saves
    save = sum(saves) / len(saves)
    size = sum(p.stat().st_size for p in (tmp / "run" / "checkpoints").rglob("*") if p.is_file()) / 2
    shutil.rmtree(tmp)
    return {"model": "demo", "params": 5_048_576, "ranks": 2, "zero_stage": 2, "steps": steps, "save_every": save_every,
            "step_seconds": round(step_seconds, 4), "save_seconds": round(save, 4),
            "load_seconds": round(second["checkpoint_load_seconds"], 4), "checkpoint_bytes": int(size),
            "overhead_share": round(save / (save + save_every * step_seconds), 4)}


def write_table(report: dict, path: Path) -> None:
    kills, resizes, t = report["kills"], report["resizes"], report["timings"]
    exact = sum(k["bitwise"] and k["same_windows"] for k in kills)
    lines = [
        BEGIN,
        f"Measured {report['date']} by `python bench/reliability.py` on {report['machine']['cpus']} CPU cores, "
        "fp32, real `torchrun -m pretrain` launches on 2 ranks (gloo). Raw figures: `bench/results/reliability.json`.",
        "",
        f"**Kills during a save: {len(kills)} points tried, {exact} resumes exact.** One rank is SIGKILLed at each "
        "point of saving step 4 (of 8, saves every 2); the relaunched run must finish with per-step losses and "
        "final weights bitwise equal to an uninterrupted run's, having trained on the same windows step by step.",
        "",
        "| kill point | rank | resumed from step | losses and weights bitwise | same windows |",
        "|---|---:|---:|---|---|",
        *[f"| `{k['point']}` | {k['rank']} | {k['resumed_from_step']} | {'yes' if k['bitwise'] else '**no**'} | "
          f"{'yes' if k['same_windows'] else '**no**'} |" for k in kills],
        "",
        f"**Resume on another number of ranks: {len(resizes)} cases.** Saved at step 4, resumed on the other rank "
        "count through DeepSpeed's universal checkpoint; compared with the uninterrupted 2-rank run (reductions "
        "sum in another order on another rank count, so agreement is to fp32 round-off, not bitwise).",
        "",
        "| ZeRO | ranks | converted | max loss diff | max weight diff | same windows | resume wall s |",
        "|---:|---|---|---:|---:|---|---:|",
        *[f"| {r['zero_stage']} | {r['from_ranks']} -> {r['to_ranks']} | {'yes' if r['converted'] else 'no'} | "
          f"{r['loss_max_abs_diff']:.1e} | {r['weights_max_abs_diff']:.1e} | {'yes' if r['same_windows'] else '**no**'} | "
          f"{r['resume_wall_seconds']:.1f} |" for r in resizes],
    ]
    if t:
        lines += [
            "",
            f"**Checkpoint cost, `demo` model** ({t['params'] / 1e6:.1f} M parameters, ZeRO-{t['zero_stage']}, "
            f"{t['ranks']} ranks, {t['checkpoint_bytes'] / 1e6:.0f} MB per checkpoint):",
            "",
            "| step s | save s | load s | save every | checkpointing share of training time |",
            "|---:|---:|---:|---:|---:|",
            f"| {t['step_seconds']:.3f} | {t['save_seconds']:.3f} | {t['load_seconds']:.3f} | {t['save_every']} steps | "
            f"{100 * t['overhead_share']:.1f}% |",
        ]
    lines.append(END)
    write_section(path, BEGIN, END, "Reliability", "\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "reliability")
    parser.add_argument("--quick", action="store_true", help="two kill points, one resize, no timings; no table")
    args = parser.parse_args()
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    data = position_corpus(work / "positions", tiny_tokenizer(work))
    ref_tmp = work / "reference"
    ref_tmp.mkdir()
    env = traced(ref_tmp, "reference")
    must(launch("pretrain", position_config(ref_tmp, data), nproc=2, env=env), "the reference run")
    reference = (ref_tmp / "run", trained_windows(Path(env["LMFORGE_TRACE_DIR"])))
    report = {
        "benchmark": "reliability", "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": len(__import__("os").sched_getaffinity(0)), "python": platform.python_version()},
        "kills": run_kills(work, data, reference, KILLS[:2] if args.quick else KILLS),
        "resizes": run_resizes(work, data, reference, RESIZES[1:2] if args.quick else RESIZES),
        "timings": None if args.quick else run_timings(work, steps=20, save_every=5),
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "reliability.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[reliability] wrote {args.out / 'reliability.json'}")
    if not args.quick:
        write_table(report, ROOT / "BENCHMARKS.md")
    shutil.rmtree(work, ignore_errors=True)
    ok = all(k["bitwise"] and k["same_windows"] for k in report["kills"]) and \
        all(r["same_windows"] and r["weights_max_abs_diff"] < 1e-4 for r in report["resizes"])
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
