"""The distillation report (RUN_DIR/report.md, report.json, plots/report.png): what users assemble by hand.

Sizes are counted on the exported folders (parameters total and without the embeddings, bytes on disk).
Inference speed is measured here, in one process, on one batch of validation data, every model on the same
device in the training dtype, after warm-up, in interleaved rounds (teacher, student, teacher, ...) so that a
slow moment of a shared machine hits both, and the median round is reported. Scores come from the run itself:
the teacher's and the student's on the same validation windows (perplexity) or the same test split (accuracy,
macro-F1), and the no-KD baseline's from RUN_DIR/baseline/summary.json when `report.baseline` trained it.
"""

from __future__ import annotations

import io
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

from lmforge import atomic
from lmforge.checkpoint import generative, model_class
from lmforge.models import human

WARMUP = 2  # forwards before timing: the first ones pay allocations and kernel selection
# Reference points (the issue's targets, from DistilBERT and DistilGPT2): stated beside the measured figures
TARGETS = {"classifier": {"retention": 0.97, "speedup": 1.8}, "language-model": {"ppl_ratio": 1.3}}


def sizes(model: torch.nn.Module, folder: Path) -> dict:
    """Parameters (tied ones once), those outside the token embeddings and an untied output layer, and bytes of
    the weight files."""
    total = sum(p.numel() for p in model.parameters())
    embedding = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    out = model.get_output_embeddings() if generative(model.config) else None
    untied = 0 if out is None or out.weight is model.get_input_embeddings().weight else out.weight.numel()
    return {"params": total, "non_embedding_params": total - embedding - untied,
            "file_bytes": sum(p.stat().st_size for p in Path(folder).glob("*.safetensors"))}


@torch.no_grad()
def timed(models: dict[str, torch.nn.Module], batch: torch.Tensor, runs: int) -> dict[str, float]:
    """Median seconds of one forward of each model on `batch`, in interleaved rounds after warm-up."""
    seconds: dict[str, list[float]] = {name: [] for name in models}
    sync = torch.cuda.synchronize if batch.device.type == "cuda" else (lambda: None)
    for round_ in range(WARMUP + runs):
        for name, model in models.items():
            sync()
            began = time.perf_counter()
            model(input_ids=batch, use_cache=False)
            sync()
            if round_ >= WARMUP:
                seconds[name].append(time.perf_counter() - began)
    return {name: statistics.median(s) for name, s in seconds.items()}


def _score(summary: dict, lm: bool) -> dict:
    """A run's score from its summary.json: validation perplexity, or test (else validation) accuracy and F1."""
    if lm:
        return {"ppl": (summary.get("val") or {}).get("val/ppl")}
    split = "test" if summary.get("test") else "val"
    scored = summary.get(split) or {}
    return {"split": split, "accuracy": scored.get(f"{split}/accuracy"), "macro_f1": scored.get(f"{split}/macro_f1")}


def write(cfg, run_dir: Path, lm: bool, teacher_config, teacher_eval: dict, labels, pad_id, val, val_ids, test,
          device: torch.device, dtype: torch.dtype) -> Path:
    """Measure, compare and write the report for the finished run in `run_dir`; returns report.md's path."""
    from lmforge.data import examples as fd

    run_dir = Path(run_dir)
    kind = "language-model" if lm else "classifier"
    folders = {"teacher": Path(cfg.teacher), "student": run_dir / "final"}
    baseline_dir = run_dir / "baseline"
    if (baseline_dir / "final" / "config.json").is_file():
        folders["baseline"] = baseline_dir / "final"
    # the same batch for every model: validation windows (language models) or examples (classifiers)
    count = cfg.report.speed_batch
    if lm:
        ids = [val_ids[i % len(val_ids)] for i in range(count)]
        batch = torch.stack([torch.from_numpy(val.window(i, cfg.data.seq_len).astype("int64")) for i in ids])[:, :-1]
    else:
        batch = fd.batch(val, [i % len(val) for i in range(count)], pad_id, False)[0]
    batch = batch.to(device)

    models, facts, notes = {}, {}, []
    for name, folder in folders.items():
        config = _config(folder)
        with torch.device("meta"):  # counted without memory: a 70B teacher is sized, then timed only if it fits
            facts[name] = sizes(model_class(config)(config), folder)
        if name == "baseline":  # the student's architecture: timed once, as the student
            continue
        # the weights, and the forward's logits in fp32 twice over (what a [batch, seq, vocab] forward may hold)
        needed = facts[name]["params"] * torch.finfo(dtype).bits // 8 + 2 * 4 * batch.numel() * config.vocab_size
        free = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else \
            os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        if needed > 0.8 * free:
            notes.append(f"the {name} ({needed / 1e9:.1f} GB with its logits) does not fit this {device.type} "
                         f"({free / 1e9:.1f} GB free): not timed")
            continue
        models[name] = model_class(config).from_pretrained(folder, dtype=dtype).to(device).eval()
    seconds = timed(models, batch, cfg.report.speed_runs) if models else {}
    for name, s in seconds.items():
        facts[name] |= {"forward_seconds": s, "tokens_per_s": batch.numel() / s, "examples_per_s": batch.shape[0] / s}
    del models

    student_summary = json.loads((run_dir / "summary.json").read_text())
    if lm:
        facts["teacher"]["score"] = {"ppl": teacher_eval.get("teacher/ppl")}
    else:
        split = "test" if "teacher_test/accuracy" in teacher_eval else "val"
        prefix = "teacher_test" if split == "test" else "teacher"
        facts["teacher"]["score"] = {"split": split, "accuracy": teacher_eval.get(f"{prefix}/accuracy"),
                                     "macro_f1": teacher_eval.get(f"{prefix}/macro_f1")}
    facts["student"]["score"] = _score(student_summary, lm)
    if "baseline" in facts:
        facts["baseline"]["score"] = _score(json.loads((baseline_dir / "summary.json").read_text()), lm)

    report = {"kind": kind, "teacher_folder": str(cfg.teacher), "steps": student_summary.get("steps"),
              "kd": cfg.kd.model_dump(mode="json"), "models": facts, "notes": notes,
              "speed": {"batch": list(batch.shape), "device": str(device), "dtype": str(dtype).removeprefix("torch."),
                        "runs": cfg.report.speed_runs, "warmup": WARMUP, "statistic": "median of interleaved rounds"}}
    t, s, b = facts["teacher"], facts["student"], facts.get("baseline")
    report["speedup"] = t["forward_seconds"] / s["forward_seconds"] if "forward_seconds" in t and \
        "forward_seconds" in s else None
    report["size_ratio"] = s["params"] / t["params"]
    if lm:
        tp, sp = t["score"]["ppl"], s["score"]["ppl"]
        report["ppl_ratio"] = sp / tp if tp and sp else None
        report["beats_baseline"] = sp < b["score"]["ppl"] if b and sp and b["score"]["ppl"] else None
    else:
        ta, sa = t["score"]["accuracy"], s["score"]["accuracy"]
        report["retention"] = sa / ta if ta and sa is not None else None
        report["beats_baseline"] = sa > b["score"]["accuracy"] if b and sa is not None else None
    report["targets"] = {name: {"target": goal, "value": report.get(name),
                                "met": None if report.get(name) is None else
                                (report[name] <= goal if name == "ppl_ratio" else report[name] >= goal)}
                         for name, goal in TARGETS[kind].items()}
    atomic.write_json(run_dir / "report.json", report)
    atomic.write_text(run_dir / "report.md", markdown(report))
    if cfg.tracking.plots:
        plot(report, run_dir)
    return run_dir / "report.md"


def _config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def _fmt(value, pattern: str) -> str:
    return "n/a" if value is None else format(value, pattern)


def markdown(report: dict) -> str:
    """report.md: one table of the models, then the comparisons and whether each reference target is met."""
    lm = report["kind"] == "language-model"
    score_head = "val perplexity" if lm else "accuracy / macro-F1"
    lines = [f"# Distillation report ({report['kind']})", "",
             f"Teacher `{report['teacher_folder']}`; student trained {report['steps']} steps with kd "
             f"alpha {report['kd']['alpha']:g}, T {report['kd']['temperature']:g}, {report['kd']['divergence']}.", "",
             f"| model | parameters | non-embedding | file | forward (ms) | tokens/s | examples/s | {score_head} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, m in report["models"].items():
        score = m.get("score", {})
        shown = _fmt(score.get("ppl"), ".2f") if lm else \
            f"{_fmt(score.get('accuracy') and 100 * score['accuracy'], '.1f')}% / " \
            f"{_fmt(score.get('macro_f1') and 100 * score['macro_f1'], '.1f')}% ({score.get('split')})"
        label = {"teacher": "teacher", "student": "student (distilled)", "baseline": "student without KD"}[name]
        lines.append(f"| {label} | {human(m['params'])} | {human(m['non_embedding_params'])} | "
                     f"{m['file_bytes'] / 1e6:.1f} MB | {_fmt(m.get('forward_seconds') and 1e3 * m['forward_seconds'], '.2f')} | "
                     f"{_fmt(m.get('tokens_per_s'), ',.0f')} | {_fmt(m.get('examples_per_s'), ',.1f')} | {shown} |")
    speed = report["speed"]
    lines += ["", f"Speed: batch {speed['batch']} on {speed['device']} in {speed['dtype']}, {speed['statistic']} "
              f"({speed['runs']} runs after {speed['warmup']} warm-up)." + (" A baseline uses the student's "
                                                                            "architecture: its speed is the student's."
                                                                            if "baseline" in report["models"] else ""),
              "", "| comparison | value | reference | met |", "|---|---:|---:|---|"]
    lines.append(f"| size (student / teacher parameters) | {report['size_ratio']:.2f} | | |")
    lines.append(f"| speed-up (teacher / student forward time) | {_fmt(report['speedup'], '.2f')}x | "
                 + (f"{TARGETS['classifier']['speedup']}x | {_met(report['targets'].get('speedup'))} |" if not lm
                    else "| |"))
    if lm:
        lines.append(f"| perplexity ratio (student / teacher) | {_fmt(report['ppl_ratio'], '.3f')} | <= "
                     f"{TARGETS['language-model']['ppl_ratio']} | {_met(report['targets']['ppl_ratio'])} |")
    else:
        lines.append(f"| retention (student / teacher accuracy) | {_fmt(report['retention'] and 100 * report['retention'], '.1f')}% "
                     f"| >= {100 * TARGETS['classifier']['retention']:.0f}% | {_met(report['targets']['retention'])} |")
    lines.append(f"| distilled beats the same student without KD | "
                 f"{'n/a (report.baseline off)' if report['beats_baseline'] is None else report['beats_baseline']} | "
                 f"True | {_met({'met': report['beats_baseline']})} |")
    lines += [f"- {note}" for note in report["notes"]]
    return "\n".join(lines) + "\n"


def _met(target: dict | None) -> str:
    met = (target or {}).get("met")
    return "n/a" if met is None else ("yes" if met else "**no**")


def headline(report: dict) -> str:
    """One line for the log: the comparison a user looks for first."""
    parts = [f"speed-up {_fmt(report['speedup'], '.2f')}x", f"size {report['size_ratio']:.2f}x"]
    if report["kind"] == "language-model":
        parts.append(f"perplexity ratio {_fmt(report['ppl_ratio'], '.3f')}")
    else:
        parts.append(f"accuracy retention {_fmt(report['retention'] and 100 * report['retention'], '.1f')}%")
    if report["beats_baseline"] is not None:
        parts.append("beats the no-KD student" if report["beats_baseline"] else "does NOT beat the no-KD student")
    return "[distill] " + "; ".join(parts)


def plot(report: dict, run_dir: Path) -> Path:
    """plots/report.png: validation loss over steps of the distilled student and the no-KD baseline, with the
    teacher's as a line; and each model's measured inference speed."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=120, layout="constrained")
    curves, bars = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for name, folder in (("distilled", run_dir), ("without KD", run_dir / "baseline")):
        path = folder / "metrics.jsonl"
        if path.is_file():
            rows = [json.loads(x) for x in path.read_text().splitlines() if x.strip()]
            points = [(r["step"], r["val/loss"]) for r in rows if "val/loss" in r]
            if points:
                curves.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=name)
    teacher_loss = report["models"]["teacher"].get("score", {})
    if teacher_loss.get("ppl"):
        import math

        curves.axhline(math.log(teacher_loss["ppl"]), color="gray", linestyle="--", label="teacher")
    curves.set_xlabel("step")
    curves.set_ylabel("validation loss")
    curves.set_title("student validation loss")
    curves.legend()
    timed_models = [(n, m["tokens_per_s"]) for n, m in report["models"].items() if "tokens_per_s" in m]
    if timed_models:
        bars.bar([n for n, _ in timed_models], [v for _, v in timed_models], color=["gray", "tab:blue"][:len(timed_models)])
    bars.set_ylabel("tokens/s (inference)")
    bars.set_title(f"speed-up {_fmt(report['speedup'], '.2f')}x")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic.write_bytes(run_dir / "plots" / "report.png", buf.getvalue())
    return run_dir / "plots" / "report.png"


def write_for(cfg, run, lm: bool, teacher_config, record: dict, labels, pad_id, val, val_ids, test, dtype) -> int:
    """The stage's call (rank 0, after the export): `write`, and its outcome in the log; 0, or 1 when it failed."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" bars of three small loads
    try:
        path = write(cfg, run.dir, lm, teacher_config, record.get("teacher_eval") or {}, labels, pad_id, val,
                     val_ids, test, run.dist.device, dtype)
    except Exception as e:  # the model is trained and exported: say what failed; a rerun writes the report only
        traceback.print_exc()
        run.say(f"error: the report failed ({type(e).__name__}: {e}); {run.dir / 'final'} is complete. Rerun the "
                "same command to write the report again", file=sys.stderr)
        return 1
    run.say(f"report: {path}\n" + headline(json.loads((run.dir / "report.json").read_text())))
    return 0
