"""Distillation benchmark: the report's figures on the demo tasks, and offline (cached top-k) against live teacher.

    python bench/distill.py                     # full run: bench/results/distill.json + BENCHMARKS.md
    python bench/distill.py --smoke --out DIR   # tiny models it makes itself, a few steps; never touches BENCHMARKS.md

Every run is a real launch, in processes of its own: `python -m torch.distributed.run --nproc_per_node=2 -m distill
CONFIG.yaml` (2 CPU ranks, gloo, OMP_NUM_THREADS=1, DS_ACCELERATOR=cpu, fp32, DeepSpeed ZeRO-2).

1. Language model: the demo pretraining run's final/ (the teacher: `bench/finetune.py`'s preparation, tokenize
   then pretrain into bench/work/finetune, skipped when done) distilled with configs/distill/demo.yaml (a
   half-depth student from teacher layers 0 and 2, `report.baseline: true`): the stage's own report.json.
2. Classifier: the demo classification fine-tune of that model (configs/finetune/demo.yaml, into this work
   folder, skipped when done) distilled with configs/distill/demo_classifier.yaml: its report.json.
   With `strong` also: the same distillation from the demo model pretrained 800 steps instead of 400 (the
   teacher bench/finetune_why.py --longer 800 makes, made here when missing): a teacher the students do not
   overtake within their 300 steps.
3. Offline against live: the same student, config and steps trained from the live teacher and from its cached
   top-k logits (`python -m distill.cache`, top_k 64, fp16 values), on a slice of the demo data (its first
   `--cache-windows` train windows: caching all 31k windows would take the teacher ~20 CPU-minutes); student
   tokens/s is the median of the logged windows after the first; the cache's bytes per token and the teacher's
   tokens/s in the cache pass come from its meta.json.

Writes OUT/distill.json (default bench/results) and, for a full run, the Distillation section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)  # bench/tokenize.py must not shadow the standard library's tokenize

from bench.finetune import code_state, prepare_pretrained  # noqa: E402
from bench.report import write_section  # noqa: E402
from bench.train import torchrun  # noqa: E402

BEGIN, END = "<!-- bench:distill:begin -->", "<!-- bench:distill:end -->"
PARTS = ("lm", "classifier", "strong", "throughput")
WORLD = 2


def run_distill(name: str, config: Path, overrides: list[str], work: Path, timeout: float) -> dict:
    """One `torchrun -m distill CONFIG` from scratch: its report, summaries and logged rates."""
    run_dir = work / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # an existing run_dir would be resumed, not retrained
    seconds = torchrun(name, ["-m", "distill", str(config), f"run_dir={run_dir}", "tracking.wandb=false",
                              *overrides], work / "logs", timeout)
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["train/tokens_per_s"] for r in rows if "train/tokens_per_s" in r]
    out = {"wall_seconds": round(seconds, 1), "summary": json.loads((run_dir / "summary.json").read_text()),
           "tokens_per_s": statistics.median(rates[1:] or rates),  # the first window holds the warm-up
           "val_curve": [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]}
    if (run_dir / "report.json").is_file():
        out["report"] = json.loads((run_dir / "report.json").read_text())
    if (run_dir / "baseline" / "summary.json").is_file():
        base_rows = [json.loads(x) for x in (run_dir / "baseline" / "metrics.jsonl").read_text().splitlines()]
        out["baseline_val_curve"] = [(r["step"], r["val/loss"]) for r in base_rows if "val/loss" in r]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    shutil.rmtree(run_dir / "baseline" / "checkpoints", ignore_errors=True)
    return out


def data_slice(src: Path, dst: Path, windows: int, seq_len: int) -> Path:
    """The first `windows` train windows of the token folder `src` (and its whole val split) as a folder of their
    own, same tokenizer: what the offline-vs-live comparison trains on."""
    import numpy as np

    from lmforge import atomic
    from lmforge.data.shards import TokenShards, read_meta, write_shard

    if (dst / "meta.json").is_file():
        return dst
    shutil.rmtree(dst, ignore_errors=True)
    meta, splits = read_meta(src), {}
    for split in ("train", "val"):
        shards = TokenShards(src, split)
        count = min(windows * seq_len + 1, shards.num_tokens) if split == "train" else shards.num_tokens
        tokens = shards.tokens(0, count)
        splits[split] = {"tokens": int(tokens.size), "documents": 1,
                         "shards": [write_shard(dst, split, 0, tokens, np.array([tokens.size], dtype=np.uint64))]}
    shutil.copytree(src / "tokenizer", dst / "tokenizer")
    atomic.write_json(dst / "meta.json", {**meta, "splits": splits,
                                          "source_fingerprint": f"{meta['source_fingerprint']}-first{windows}"})
    return dst


def prepare_smoke(work: Path) -> tuple[Path, Path, Path, dict]:
    """Smoke: a tiny byte-level BPE, a few stdlib files tokenized with it, a tiny 4-layer Llama teacher (seed 0,
    untrained: nothing is pretrained in a smoke run) and a classifier teacher on local task files."""
    import subprocess

    import torch
    import yaml
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    from bench.finetune import prepare_smoke as finetune_smoke
    from bench.train import env
    from lmforge.data.sources import stdlib_files

    tiny, files = finetune_smoke(work)  # a 512-token BPE folder (with a tiny model) and classification files
    data = work / "data"
    if not (data / "meta.json").is_file():
        cfg = work / "tokenize.yaml"
        cfg.write_text(yaml.safe_dump({"out_dir": str(data), "sources": [
            {"type": "files", "paths": [str(p) for p in stdlib_files()[:40]], "format": "txt"}],
            "tokenizer": {"pretrained": str(tiny)}, "split": {"val_fraction": 0.1}, "workers": 1, "progress": False}))
        run = subprocess.run([sys.executable, "-m", "lmforge.cli", "tokenize", str(cfg)], capture_output=True,
                             text=True, env=env(), cwd=ROOT)
        if run.returncode != 0:
            raise SystemExit(f"lmforge tokenize failed:\n{run.stderr[-3000:]}")
    teachers = {}
    for kind in ("lm", "classifier"):
        out = work / f"teacher-{kind}"
        if not (out / "config.json").is_file():
            shutil.copytree(tiny, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json",
                                                                     "generation_config.json"), dirs_exist_ok=True)
            config = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                 eos_token_id=0, pad_token_id=1)
            torch.manual_seed(0)
            if kind == "classifier":
                labels = sorted({json.loads(x)["label"] for x in files["classification"]["train"].read_text().splitlines()})
                config.num_labels, config.id2label = len(labels), dict(enumerate(labels))
                config.label2id = {v: k for k, v in config.id2label.items()}
                LlamaForSequenceClassification(config).save_pretrained(out)
            else:
                LlamaForCausalLM(config).save_pretrained(out)
        teachers[kind] = out
    return teachers["lm"], teachers["classifier"], data, files["classification"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny models of its own, a few steps; never writes "
                        "BENCHMARKS.md")
    parser.add_argument("--steps", type=int, default=None, help="distillation steps (default: the demo configs' 300; "
                        "smoke 4)")
    parser.add_argument("--throughput-steps", type=int, default=None, help="steps of each offline/live run (default "
                        "60; smoke 4)")
    parser.add_argument("--cache-windows", type=int, default=None, help="train windows of the offline/live slice "
                        "(default 2048; smoke 64)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated parts to run (default all: "
                        f"{','.join(PARTS)}); the others are kept from OUT/distill.json with the commit they ran at")
    parser.add_argument("--out", type=Path, default=None, help="folder for distill.json (default bench/results)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default bench/work/distill[-smoke])")
    args = parser.parse_args()
    parts = [p for p in args.parts.split(",") if p]
    if not set(parts) <= set(PARTS):
        parser.error(f"--parts: choose from {', '.join(PARTS)}")
    began, code = time.perf_counter(), code_state()
    args.steps = args.steps or (4 if args.smoke else 300)
    args.throughput_steps = args.throughput_steps or (4 if args.smoke else 60)
    args.cache_windows = args.cache_windows or (64 if args.smoke else 2048)
    work = (args.work or ROOT / "bench" / "work" / ("distill-smoke" if args.smoke else "distill")).resolve()
    out = args.out or (work / "results-smoke" if args.smoke else ROOT / "bench" / "results")
    work.mkdir(parents=True, exist_ok=True)
    timeout = 600 if args.smoke else 3600


    lm_config, cls_config = ROOT / "configs" / "distill" / "demo.yaml", ROOT / "configs" / "distill" / "demo_classifier.yaml"
    common = [f"train.max_steps={args.steps}"]
    if args.smoke:
        lm_teacher, cls_teacher, data, task_files = prepare_smoke(work)
        seq_len = 32
        lm_extra = [f"data.path={data}", f"data.seq_len={seq_len}", "eval.windows=4", "batch.micro_batch_size=2",
                    "batch.global_batch_size=4", "train.log_every=1", "train.eval_every=2", "train.save_every=4",
                    "report.speed_runs=2"]
        cls_extra = ["examples.builtin=null", *(f"examples.{s}={task_files[s]}" for s in ("train", "validation", "test")),
                     "task.max_length=32", "batch.micro_batch_size=2", "batch.global_batch_size=4", "train.log_every=1",
                     "train.eval_every=2", "train.save_every=4", "report.speed_runs=2"]
    else:
        ft_work = ROOT / "bench" / "work" / "finetune"  # shared with bench/finetune.py: pretrained once
        lm_teacher = prepare_pretrained(ft_work, timeout)
        data, seq_len = ft_work / "data", 256
        cls_dir = work / "teacher-package"
        print("[bench] fine-tuning the classifier teacher (configs/finetune/demo.yaml; skipped when finished)",
              flush=True)
        torchrun("teacher-package", ["-m", "finetune", str(ROOT / "configs" / "finetune" / "demo.yaml"),
                                     f"init_from={lm_teacher}", f"run_dir={cls_dir}", "tracking.wandb=false"],
                 work / "logs", timeout)
        cls_teacher = cls_dir / "final"
        lm_extra, cls_extra = [f"data.path={data}"], []

    out.mkdir(parents=True, exist_ok=True)
    kept = json.loads((out / "distill.json").read_text()) if (out / "distill.json").is_file() else {}
    missing = [p for p in PARTS if p not in parts and p not in kept]
    if missing:
        raise SystemExit(f"--parts leaves out {missing}, and {out / 'distill.json'} has no recorded result for them")
    results: dict = {p: kept[p] | {"code": kept[p].get("code", kept.get("code"))} for p in PARTS if p not in parts}

    # -- 1 and 2: the reports (and the stronger teacher's) ----------------------------------------------------
    strong_teacher = lm_teacher
    if "strong" in parts and not args.smoke:
        from bench.finetune_why import pretrain_longer

        strong_teacher = pretrain_longer(800)
    for name, config, teacher, extra in (("lm", lm_config, lm_teacher, lm_extra),
                                         ("classifier", cls_config, cls_teacher, cls_extra),
                                         ("strong", lm_config, strong_teacher, lm_extra)):
        if name not in parts:
            continue
        print(f"[bench] distill {name}: {args.steps} steps, with the no-KD baseline ...", flush=True)
        results[name] = run_distill(name, config, [f"teacher={teacher}", *common, *extra], work, timeout)
        results[name]["code"] = code
        print(f"[bench] {name}: {results[name]['report'] and _headline(results[name]['report'])} "
              f"({results[name]['wall_seconds']:.0f} s)", flush=True)

    # -- 3: offline (cached top-k) against live, same slice, steps and student ---------------------------------
    if "throughput" not in parts:
        return finish(results, args, out, began, code, seq_len)
    sliced = data_slice(data, work / f"slice-{args.cache_windows}", args.cache_windows, seq_len)
    cache_dir = work / f"cache-{args.cache_windows}"
    shutil.rmtree(cache_dir, ignore_errors=True)
    cache_cfg = work / "cache.yaml"
    import yaml

    cache_cfg.write_text(yaml.safe_dump({"teacher": str(lm_teacher), "data": {"path": str(sliced), "seq_len": seq_len},
                                         "out_dir": str(cache_dir), "top_k": 64, "dtype": "fp16",
                                         "micro_batch_size": 8, "windows_per_shard": 256, "progress": False,
                                         "eval_windows": 4 if args.smoke else 32,  # the distillation's eval.windows
                                         "temperature": 2.0}))  # and its kd.temperature (the demo configs')
    print(f"[bench] distill.cache over {args.cache_windows} windows ...", flush=True)
    cache_seconds = torchrun("cache", ["-m", "distill.cache", str(cache_cfg)], work / "logs", timeout)
    cache_meta = json.loads((cache_dir / "meta.json").read_text())
    tput = [f"train.max_steps={args.throughput_steps}", f"data.path={sliced}", "report.baseline=false",
            f"train.save_every={args.throughput_steps}", f"train.eval_every={args.throughput_steps}",
            "train.log_every=5" if not args.smoke else "train.log_every=1", f"teacher={lm_teacher}",
            *(lm_extra[1:] if args.smoke else [])]
    throughput = {}
    for name, extra in (("live", []), ("offline", [f"data.cache={cache_dir}"])):
        print(f"[bench] {name} teacher: {args.throughput_steps} steps ...", flush=True)
        r = run_distill(f"tput-{name}", lm_config, [*tput, *extra], work, timeout)
        throughput[name] = {"tokens_per_s": r["tokens_per_s"], "wall_seconds": r["wall_seconds"],
                            "train_seconds": r["summary"]["seconds"], "val_loss": r["summary"]["val"].get("val/loss")}
        print(f"[bench] {name}: {r['tokens_per_s']:,.0f} student tokens/s", flush=True)
    throughput["offline_over_live"] = throughput["offline"]["tokens_per_s"] / throughput["live"]["tokens_per_s"]
    throughput["cache"] = {k: cache_meta.get(k) for k in ("top_k", "index_dtype", "value_dtype", "bytes_per_token",
                                                          "teacher_tokens_per_s", "windows", "bytes", "seconds")}
    throughput["cache"]["wall_seconds"] = round(cache_seconds, 1)
    throughput["code"] = code
    results["throughput"] = throughput
    return finish(results, args, out, began, code, seq_len)


def finish(results: dict, args, out: Path, began: float, code: dict, seq_len: int) -> int:
    """distill.json (and, for a full run, the BENCHMARKS.md section) from every part's results."""
    import deepspeed
    import torch
    import transformers

    report = {"date": datetime.date.today().isoformat(), "smoke": args.smoke, "code": code,
              "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                          "python": platform.python_version(), "ranks": WORLD, "gpu": torch.cuda.is_available()},
              "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                           "transformers": transformers.__version__},
              "config": {"steps": args.steps, "throughput_steps": args.throughput_steps,
                         "cache_windows": args.cache_windows, "seq_len": seq_len},
              **results, "seconds": round(time.perf_counter() - began, 1)}
    (out / "distill.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[bench] wrote {out / 'distill.json'}", flush=True)
    if not args.smoke:
        write_section(ROOT / "BENCHMARKS.md", BEGIN, END, "Distillation", table(report))
    return 0


def _headline(r: dict) -> str:
    if r["kind"] == "language-model":
        return (f"perplexity ratio {r['ppl_ratio']:.3f}, speed-up {r['speedup']:.2f}x, beats the no-KD student: "
                f"{r['beats_baseline']}")
    return (f"retention {100 * r['retention']:.1f}%, speed-up {r['speedup']:.2f}x, beats the no-KD student: "
            f"{r['beats_baseline']}")


def strong_rows(report: dict) -> list[str]:
    """The language model again, from the demo model pretrained 800 steps: a teacher the students do not overtake."""
    if "strong" not in report or "report" not in report["strong"]:
        return []
    r = report["strong"]["report"]
    m = r["models"]
    return [
        f"**The same, from a stronger teacher**: the demo model pretrained 800 steps instead of 400 (val perplexity "
        f"{m['teacher']['score']['ppl']:.2f} against 76.32; `bench/finetune_why.py --longer 800`), everything else as "
        "above. Here the students do not overtake the teacher within their 300 steps, and distillation pays:",
        "",
        "| model | val perplexity | perplexity ratio to the teacher |",
        "|---|---:|---:|",
        f"| teacher (800 steps) | {m['teacher']['score']['ppl']:.2f} | 1.000 |",
        f"| student, distilled | {m['student']['score']['ppl']:.2f} | {r['ppl_ratio']:.3f} |",
        f"| student, no KD | {m['baseline']['score']['ppl']:.2f} | "
        f"{m['baseline']['score']['ppl'] / m['teacher']['score']['ppl']:.3f} |",
        "",
        f"Distilled beats no-KD: **{'yes' if r['beats_baseline'] else 'no'}** "
        f"({m['student']['score']['ppl']:.2f} vs {m['baseline']['score']['ppl']:.2f}).",
        "",
    ]


def table(report: dict) -> str:
    """The Distillation section of BENCHMARKS.md, from the recorded JSON."""
    m, v, c = report["machine"], report["versions"], report["config"]
    lm, cl, tp = report["lm"]["report"], report["classifier"]["report"], report["throughput"]

    def row(label: str, r: dict, name: str, lm_kind: bool) -> str:
        x = r["models"][name]
        score = x["score"]
        shown = f"{score['ppl']:.2f}" if lm_kind else f"{100 * score['accuracy']:.1f}% / {100 * score['macro_f1']:.1f}%"
        speed = f"{x['tokens_per_s']:,.0f}" if "tokens_per_s" in x else "(student's)"
        return f"| {label} | {x['params'] / 1e6:.2f}M | {x['non_embedding_params'] / 1e6:.2f}M | {speed} | {shown} |"

    def met(t: dict) -> str:
        return "n/a" if t["met"] is None else ("met" if t["met"] else "**NOT MET**")

    lines = [
        BEGIN,
        f"Measured {report['date']} by `python bench/distill.py` on **{m['cpus']} CPU cores** ({m['processor']}, "
        f"Python {m['python']}, torch {v['torch']}, DeepSpeed {v['deepspeed']}, transformers {v['transformers']}), "
        f"fp32, {m['ranks']} ranks under torchrun (gloo), DeepSpeed ZeRO-2. Every figure comes from a real "
        "`torchrun -m distill` launch; the reports are the stage's own `report.json`. Raw figures: "
        "`bench/results/distill.json`" + "".join(
            f"; {part} at {str(report[part].get('code', {}).get('commit', '?'))[:7]}" for part in PARTS
            if isinstance(report.get(part), dict) and report[part].get("code")) + ".",
        "",
        f"**Language model** (`configs/distill/demo.yaml`): the demo pretraining run's 4-layer model (teacher) into "
        f"a 2-layer student made of its layers 0 and 2, {c['steps']} steps of seq {c['seq_len']} at alpha "
        f"{lm['kd']['alpha']:g}, T {lm['kd']['temperature']:g}, forward KL; beside it the same student trained "
        "without the teacher for the same steps. Inference speed: one batch of validation windows, median of "
        "interleaved rounds after warm-up, same process.",
        "",
        "| model | parameters | non-embedding | inference tokens/s | val perplexity |",
        "|---|---:|---:|---:|---:|",
        row("teacher", lm, "teacher", True), row("student, distilled", lm, "student", True),
        row("student, no KD", lm, "baseline", True),
        "",
        "| target | value | reference | |",
        "|---|---:|---:|---|",
        f"| perplexity ratio student / teacher | {lm['ppl_ratio']:.3f} | <= 1.3 (DistilGPT2 1.29) | "
        f"{met(lm['targets']['ppl_ratio'])} |",
        f"| distilled beats no-KD (val perplexity) | {lm['models']['student']['score']['ppl']:.2f} vs "
        f"{lm['models']['baseline']['score']['ppl']:.2f} | lower | "
        f"{'met' if lm['beats_baseline'] else '**NOT MET**'} |",
        f"| speed-up (teacher / student forward) | {lm['speedup']:.2f}x | DistilGPT2 2x | |",
        "",
        *strong_rows(report),
        f"**Classifier** (`configs/distill/demo_classifier.yaml`): the demo fine-tuned docstring -> package "
        "classifier (4 layers) into a 2-layer student from its layers 0 and 2 (head included), "
        f"{c['steps']} steps at alpha {cl['kd']['alpha']:g}, T {cl['kd']['temperature']:g}; scores on the test split.",
        "",
        "| model | parameters | non-embedding | inference tokens/s | test accuracy / macro-F1 |",
        "|---|---:|---:|---:|---:|",
        row("teacher", cl, "teacher", False), row("student, distilled", cl, "student", False),
        row("student, no KD", cl, "baseline", False),
        "",
        "| target | value | reference | |",
        "|---|---:|---:|---|",
        f"| accuracy retention student / teacher | {100 * cl['retention']:.1f}% | >= 97% (DistilBERT 96.9% on GLUE) | "
        f"{met(cl['targets']['retention'])} |",
        f"| speed-up (teacher / student forward) | {cl['speedup']:.2f}x | >= 1.8x (DistilBERT 1.63x) | "
        f"{met(cl['targets']['speedup'])} |",
        f"| distilled beats no-KD (test accuracy) | {100 * cl['models']['student']['score']['accuracy']:.1f}% vs "
        f"{100 * cl['models']['baseline']['score']['accuracy']:.1f}% | higher | "
        f"{'met' if cl['beats_baseline'] else '**NOT MET**'} |",
        "",
        f"**Offline teacher (cached top-k) against the live teacher**: the same student and config, "
        f"{c['throughput_steps']} steps on the first {c['cache_windows']:,} train windows of the demo data. The cache: "
        f"top-{tp['cache']['top_k']} {tp['cache']['index_dtype']} indices + {tp['cache']['value_dtype']} values + the fp32 "
        "log-normaliser (the teacher's mass beyond its top-k is kept) = "
        f"**{tp['cache']['bytes_per_token']} bytes per token** (target <= 300), written by the teacher at "
        f"{tp['cache']['teacher_tokens_per_s']:,.0f} tokens/s ({tp['cache']['wall_seconds']:.0f} s for the slice, "
        "launch included).",
        "",
        "| teacher | student tokens/s (median window) | train seconds | val loss after |",
        "|---|---:|---:|---:|",
        f"| live (forward on every step) | {tp['live']['tokens_per_s']:,.0f} | {tp['live']['train_seconds']:.0f} | "
        f"{tp['live']['val_loss']:.4f} |",
        f"| offline (cached top-{tp['cache']['top_k']}) | {tp['offline']['tokens_per_s']:,.0f} | "
        f"{tp['offline']['train_seconds']:.0f} | {tp['offline']['val_loss']:.4f} |",
        "",
        f"Offline / live: **{tp['offline_over_live']:.2f}x** student tokens/s.",
        END,
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
