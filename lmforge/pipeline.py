"""A pipeline: the stages of a model's life, resolved and checked against what is on disk.

    lmforge run    PIPELINE.yaml [--dry-run]   # locally, stage after stage, skipping finished stages
    lmforge status PIPELINE.yaml               # each stage: done / running / waiting / failed (with its log)

(`lmforge submit`, the same chain as Slurm jobs, is lmforge.slurm.) A stage is done when its own completion
record is there and was made from the config it has now (lmforge.completion). A stage whose config changed, or
whose upstream's output changes, reruns too; its old output is moved aside (renamed, nothing deleted); a longer
train.max_steps trains on instead. Stages are separate processes that talk through folders: this module launches
them and never imports one.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmforge import atomic
from lmforge.completion import read_json, schema, state
from lmforge.config import ConfigError, load_config
from lmforge.config.pipeline import (
    CONFIG_KINDS,
    REFERENCE,
    TRAINING_KINDS,
    PipelineConfig,
    Resources,
    StageSpec,
)

PROG = "lmforge run"
# torchrun forwards SIGUSR1 only when asked; its shutdown timeout must cover a step plus a save (seconds)
TORCHRUN_SIGNALS = "--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"


@dataclass
class Step:
    """One stage, resolved: its config with upstream outputs filled in, what it makes, and how it stands."""

    spec: StageSpec
    deps: list[str]  # the stages it waits for
    overrides: list[str]  # resolved key=value
    config_path: Path | None = None
    config: object = None  # the stage's validated config (stages with a config)
    source: str | None = None  # export/push: resolved
    out: str | None = None  # export: resolved
    output: Path = Path(".")  # the folder the stage makes
    state: str = "new"  # done | changed | partial | new
    why: str = ""
    rerun_for: list[str] = field(default_factory=list)  # upstream stages that rerun

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def kind(self) -> str:
        return self.spec.stage

    @property
    def final(self) -> Path:
        return self.output / "final" if self.kind in TRAINING_KINDS else self.output

    @property
    def runs(self) -> bool:
        return self.state != "done"

    def value(self, key: str) -> str:
        """What `${name.key}` stands for."""
        if key == "dir":
            return str(self.output)
        if key == "final":
            if self.kind in ("tokenize", "push"):
                raise ConfigError(f"${{{self.name}.final}}: a {self.kind} stage makes no model folder; "
                                  f"use ${{{self.name}.dir}}")
            return str(self.final)
        node = self.config
        for part in key.split("."):
            if node is None or not hasattr(node, part) or part.startswith("_"):
                raise ConfigError(f"${{{self.name}.{key}}}: the {self.kind} config of stage {self.name} has no "
                                  f"'{key}' (use dir, final, or a key of its config such as run_dir)")
            node = getattr(node, part)
        return str(node)


class Pipeline:
    def __init__(self, path: Path, cfg: PipelineConfig, steps: list[Step]) -> None:
        self.path, self.cfg, self.steps = path, cfg, steps

    @property
    def work_dir(self) -> Path:
        return self.cfg.work_dir

    def log(self, name: str) -> Path:
        return self.work_dir / "logs" / f"{name}.log"

    @property
    def record_path(self) -> Path:
        return self.work_dir / "pipeline.json"

    def record(self) -> dict:
        return read_json(self.record_path) or {}

    def remember(self, name: str, **entry) -> None:
        """Update this stage's entry in WORK_DIR/pipeline.json (how it was last launched and how that ended)."""
        record = self.record()
        record[name] = {**entry, "at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.work_dir.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self.record_path, record)

    def resources(self, step: Step) -> Resources:
        return self.cfg.resources.model_copy(update=step.spec.resources.model_dump(exclude_unset=True))

    def procs_per_node(self, step: Step) -> int:
        r = self.resources(step)
        return r.procs_per_node or r.gpus_per_node or 1

    def env(self) -> dict[str, str]:
        """The stages' environment: W&B groups them under the pipeline's name (not a config key, so that the
        config digest of a stage run by hand and by the pipeline is the same)."""
        return {**os.environ, "WANDB_RUN_GROUP": self.cfg.name}

    def command(self, step: Step) -> list[str]:
        """How `lmforge run` launches a stage on this machine."""
        py = sys.executable
        if step.kind == "tokenize":
            return [py, "-m", "lmforge.cli", "tokenize", str(step.config_path), *step.overrides]
        if step.kind in TRAINING_KINDS:
            return [py, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={self.procs_per_node(step)}",
                    TORCHRUN_SIGNALS, "-m", step.kind, str(step.config_path), *step.overrides]
        if step.kind == "export":
            return [py, "-m", "lmforge.cli", "export", step.source, step.out]
        return [py, "-m", "lmforge.cli", "push", step.source, "--repo-id", step.spec.repo_id,
                *(["--revision", step.spec.revision] if step.spec.revision else []),
                *(["--private"] if step.spec.private else []), "--receipt", str(self.receipt(step))]

    def receipt(self, step: Step) -> Path:
        return self.work_dir / "receipts" / f"{step.name}.json"


# --------------------------------------------------------------------------------------------------
# Loading: references, configs, completion


def cwd_relative(path: Path) -> Path:
    """`path` relative to the working directory when it lies under it (shorter logs and sbatch lines)."""
    rel = os.path.relpath(path)
    return Path(rel) if not rel.startswith("..") else path.resolve()


def substitute(text: str, steps: dict[str, Step], where: str) -> str:
    def one(match) -> str:
        return steps[match.group(1)].value(match.group(2))

    try:
        return REFERENCE.sub(one, text)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def load(path: str | os.PathLike, overrides: list[str] | None = None) -> Pipeline:
    """Read and validate a pipeline and every stage config in it, with upstream outputs filled in; then
    decide each stage's state from disk. Raises ConfigError naming the file and key."""
    path = Path(path)
    cfg = load_config(path, PipelineConfig, overrides or [])
    base = path.resolve().parent
    steps: dict[str, Step] = {}
    for i, spec in enumerate(cfg.stages):
        where = f"{path}: stages[{i}] ({spec.name})"
        deps = list(dict.fromkeys([*spec.references(), *spec.after]))
        step = Step(spec, deps, [substitute(o, steps, where) for o in spec.overrides])
        if spec.stage in CONFIG_KINDS:
            step.config_path = cwd_relative(spec.config if spec.config.is_absolute() else base / spec.config)
            try:
                step.config = load_config(step.config_path, schema(spec.stage), step.overrides)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            step.output = Path(step.config.out_dir if spec.stage == "tokenize" else step.config.run_dir)
        else:
            step.source = substitute(spec.source, steps, where)
            step.out = substitute(spec.out, steps, where) if spec.out else None
            step.output = Path(step.out or step.source)
        steps[spec.name] = step
    pipeline = Pipeline(path, cfg, list(steps.values()))
    for step in pipeline.steps:
        step.state, step.why = completion(pipeline, step)
        # an upstream that changes its output reruns this one; one whose output is merely gone (token shards deleted
        # once the model trained on them) does not
        step.rerun_for = [d for d in step.deps if steps[d].state in ("changed", "partial")]
        if step.state == "done" and step.rerun_for:
            step.state, step.why = "changed", f"upstream {', '.join(step.rerun_for)} reruns"
    for step in reversed(pipeline.steps):  # an output that is gone is made again only if a stage still needs it
        users = [s for s in pipeline.steps if step.name in s.deps]
        if step.state == "new" and users and all(not u.runs for u in users):
            step.state, step.why = "done", f"{step.output} is gone, but every stage that uses it is done"
    return pipeline


def completion(pipeline: Pipeline, step: Step) -> tuple[str, str]:
    """(done | changed | partial | new, why) for one stage of this pipeline (lmforge.completion)."""
    return state(step.kind, step.config, step.output, step.source, pipeline.receipt(step),
                 (step.spec.repo_id, step.spec.revision))


def move_aside(step: Step) -> Path | None:
    """A changed stage's old output, renamed beside it (never deleted): the stage starts afresh."""
    if step.state != "changed" or not step.output.exists() or step.kind == "push":
        return None
    aside = step.output.with_name(f"{step.output.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    os.replace(step.output, aside)
    return aside


# --------------------------------------------------------------------------------------------------
# Figures for the closing table


def headline(step: Step) -> str:
    """The stage's main figures, read from its own records."""
    out = step.output
    if step.kind == "tokenize":
        meta = read_json(out / "meta.json") or {}
        splits = meta.get("splits", {})
        return (f"{splits.get('train', {}).get('tokens', 0):,} train / {splits.get('val', {}).get('tokens', 0):,} val "
                f"tokens, vocab {meta.get('tokenizer', {}).get('vocab_size', '?')}") if meta else ""
    summary = read_json(out / "summary.json") or {}
    if step.kind == "pretrain":
        return f"val ppl {summary['val_ppl']:.2f} after {summary['steps']} steps" if summary.get("val_ppl") else ""
    if step.kind == "finetune":
        split = "test" if summary.get("test") else "val"
        scores = {k.split("/")[-1]: v for k, v in (summary.get(split) or {}).items() if isinstance(v, (int, float))}
        shown = [f"{k} {100 * scores[k]:.1f}%" for k in ("accuracy", "macro_f1", "exact_match") if k in scores]
        shown += [f"ppl {scores['ppl']:.1f}"] if "ppl" in scores else []  # SFT: the responses' perplexity
        return f"{split} " + ", ".join(shown) if shown else ""
    if step.kind == "distill":
        report = read_json(out / "report.json") or {}
        models = report.get("models", {})
        if not models:
            return ""
        size = models.get("student", {}).get("params", 0) / max(models.get("teacher", {}).get("params", 1), 1)
        parts = []
        if report.get("retention") is not None:
            parts.append(f"retention {100 * report['retention']:.1f}%")
        if report.get("ppl_ratio") is not None:
            parts.append(f"ppl ratio {report['ppl_ratio']:.3f}")
        parts += [f"size {100 * size:.0f}% of the teacher", f"speed-up {report.get('speedup', 0):.2f}x"]
        if "baseline" in models:
            parts.append("beats no-KD" if report.get("beats_baseline") else "no-KD scores higher")
        return ", ".join(parts)
    return ""


def table(pipeline: Pipeline) -> str:
    rows = [(s.name, s.kind, headline(s), str(s.final)) for s in pipeline.steps]
    widths = [max(len(r[i]) for r in [("stage", "kind", "result", "artifact"), *rows]) for i in range(4)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(("stage", "kind", "result", "artifact"), widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines)


# --------------------------------------------------------------------------------------------------
# lmforge run


def execute(cmd: list[str], log: Path, env: dict[str, str]) -> int:
    """Run one stage, its output on this terminal and appended to `log` (bytes as they come: progress bars
    too). Ctrl-C reaches the stage (the same process group), which saves and stops; we wait for it."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as sink:
        sink.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
        sink.flush()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        while True:
            try:
                chunk = os.read(proc.stdout.fileno(), 65536)
            except KeyboardInterrupt:
                continue  # the stage got the SIGINT too: keep copying its output until it exits
            if not chunk:
                break
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
            sink.write(chunk)
        while True:
            try:
                return proc.wait()
            except KeyboardInterrupt:
                continue


def plan_lines(pipeline: Pipeline) -> list[str]:
    width = max(len(s.name) for s in pipeline.steps) + 2
    lines = []
    for step in pipeline.steps:
        verb = {"done": "skip", "changed": "rerun", "partial": "resume", "new": "run"}[step.state]
        extra = "; its old output moves aside" if step.state == "changed" and step.output.exists() \
            and step.kind != "push" else ""
        lines.append(f"{step.name:<{width}s}{verb:<7s} {step.why}{extra}")
    return lines


def run(pipeline: Pipeline, dry_run: bool = False) -> int:
    say = lambda text: print(f"[pipeline] {text}", flush=True)  # noqa: E731
    if dry_run:
        for line in plan_lines(pipeline):
            print(line)
        for step in pipeline.steps:
            if step.runs:
                print(f"# {step.name}: {shlex.join(pipeline.command(step))}")
        return 0
    started = time.time()
    env = pipeline.env()
    for step in pipeline.steps:
        if not step.runs:
            say(f"{step.name}: done, skipped ({step.why})")
            continue
        aside = move_aside(step)
        say(f"{step.name}: {'rerun' if step.state == 'changed' else 'run'} ({step.why})"
            + (f"; old output moved to {aside}" if aside else ""))
        log, t0 = pipeline.log(step.name), time.time()
        pipeline.remember(step.name, mode="local", pid=os.getpid(), host=os.uname().nodename, log=str(log))
        code = execute(pipeline.command(step), log, env)
        state, why = completion(pipeline, step)
        pipeline.remember(step.name, mode="local", exit=code, log=str(log), seconds=round(time.time() - t0, 1),
                          state=state)
        if code != 0 or state != "done":
            left = [s.name for s in pipeline.steps[pipeline.steps.index(step) + 1:]]
            problem = (f"failed with exit status {code}" if code != 0
                       else f"exited 0 but is not complete ({why}): it stopped early (a signal or train.max_time)")
            say(f"{step.name} {problem}; log: {log}")
            if left:
                say(f"stopped: {', '.join(left)} not run; `lmforge run {pipeline.path}` resumes")
            return code or 1
        step.state, step.why = state, why
        say(f"{step.name}: done in {time.time() - t0:.0f} s")
    say(f"all {len(pipeline.steps)} stages done ({time.time() - started:.0f} s)")
    print(table(pipeline))
    return 0


# --------------------------------------------------------------------------------------------------
# lmforge status


def status_lines(pipeline: Pipeline) -> list[str]:
    record = pipeline.record()
    jobs = {name: e.get("jobs") or [e["job_id"]] for name, e in record.items()
            if e.get("mode") == "slurm" and e.get("job_id")}
    states: dict[str, dict | None] = {}
    if jobs and any(s.runs for s in pipeline.steps):
        from lmforge import slurm  # it imports this module

        states = slurm.job_states([j for ids in jobs.values() for j in ids])
        for job in {j for ids in jobs.values() for j in ids} - set(states):  # purged by the controller: ask sacct
            states[job] = slurm.accounted(job)
    width = max(len(s.name) for s in pipeline.steps) + 2
    lines = []
    for step in pipeline.steps:
        entry = record.get(step.name, {})
        if not step.runs:
            status, detail = "done", step.why
        elif step.name in jobs:
            status, detail = slurm.stage_status(jobs[step.name], states, entry)
        elif entry.get("mode") == "local" and "exit" not in entry and alive(entry):
            status, detail = "running", f"`lmforge run` pid {entry['pid']} on {entry['host']}; log: {entry['log']}"
        elif entry.get("mode") == "local" and entry.get("exit"):
            status, detail = "failed", f"exit status {entry['exit']}; log: {entry['log']}"
        elif entry.get("mode") == "local":
            status, detail = "stopped", f"{step.why}; log: {entry['log']}"
        else:
            status, detail = {"changed": "stale", "partial": "partial", "new": "not run"}[step.state], step.why
        lines.append(f"{step.name:<{width}s}{status:<8s} {detail}")
    return lines


def alive(entry: dict) -> bool:
    """Whether the `lmforge run` that launched a stage still runs (only knowable on its own host)."""
    if entry.get("host") != os.uname().nodename:
        return False
    try:
        os.kill(int(entry["pid"]), 0)
    except (OSError, KeyError, ValueError):
        return False
    return True


# --------------------------------------------------------------------------------------------------
# Command lines


def parse(prog: str, argv: list[str] | None, description: str, dry_run: str | None) -> tuple[Pipeline, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("pipeline", help="pipeline YAML (configs/pipelines/*.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override a pipeline value, e.g. work_dir=runs/x")
    if dry_run:
        parser.add_argument("--dry-run", action="store_true", help=dry_run)
    args = parser.parse_intermixed_args(argv)
    try:
        return load(args.pipeline, args.overrides), args
    except ConfigError as e:
        print(f"{prog}: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    pipeline, args = parse(PROG, argv, "Run a pipeline's stages on this machine, in order; finished stages are "
                           "skipped, a failing stage stops the chain with its log.",
                           "print what would run, what is skipped and why, and the commands; run nothing")
    return run(pipeline, args.dry_run)


def status_main(argv: list[str] | None = None) -> int:
    pipeline, _ = parse("lmforge status", argv, "Where each stage of a pipeline stands: done, running (Slurm job), "
                        "waiting, failed (with its log), stale (config changed) or not run.", None)
    for line in status_lines(pipeline):
        print(line)
    return 0

