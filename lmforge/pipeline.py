"""A pipeline: the stages of a model's life, resolved and checked against what is on disk.

    lmforge run    PIPELINE.yaml [--dry-run]   # locally, stage after stage, skipping finished stages
    lmforge status PIPELINE.yaml               # each stage: done / running / waiting / failed (with its log)

(`lmforge submit`, the same chain as Slurm jobs, is lmforge.slurm.) A stage is done when its own completion
record is there and was made from the config it has now: token shards' meta.json with the same output digest,
a training run's final/lineage.json with the same config digest (plus summary.json, and a distillation's
report.json), an export's lineage.json equal to its run's, a push's receipt. A stage whose config changed, or
whose upstream reruns, reruns too; its old output is moved aside (renamed, nothing deleted). Stages are
separate processes that talk through folders: this module launches them and never imports one.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from lmforge import atomic
from lmforge.config import ConfigError, load_config
from lmforge.config.base import RUN_ONLY, result_digest
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


def schema(kind: str):
    """The stage config schema of `kind` (the config package is the core's: no stage is imported)."""
    from lmforge.config.distill import DistillConfig
    from lmforge.config.finetune import FinetuneConfig
    from lmforge.config.pretrain import PretrainConfig
    from lmforge.config.tokenize import TokenizeConfig

    return {"tokenize": TokenizeConfig, "pretrain": PretrainConfig, "finetune": FinetuneConfig,
            "distill": DistillConfig}[kind]


def read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def flatten(data, prefix: str = "") -> dict[str, object]:
    if isinstance(data, dict):
        out: dict[str, object] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    return {prefix.rstrip("."): data}


def differences(old: dict, new: dict, limit: int = 3) -> str:
    """`optim.lr 0.003 -> 0.001, ...`: what changed between two resolved configs."""
    a, b = flatten(old), flatten(new)
    changed = [f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    more = f" (+{len(changed) - limit} more)" if len(changed) > limit else ""
    return ", ".join(changed[:limit]) + more if changed else "the config"


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
    """(done | changed | partial | new, why), from the stage's own records on disk."""
    out = step.output
    if step.kind == "tokenize":
        meta = read_json(out / "meta.json")
        if meta is not None:
            if meta.get("config_digest") == step.config.output_digest():
                return "done", f"{out}/meta.json matches this config"
            return "changed", f"{out} holds tokens of another config: " + differences(
                meta.get("config", {}), step.config.model_dump(mode="json", exclude={"out_dir", "workers", "progress"}))
        state = read_json(out / "chunks" / "state.json")
        if state is not None:
            if state.get("config_digest") != step.config.output_digest():
                return "changed", f"{out} holds a stopped run of another config"
            return "partial", "stopped part-way: resumes"
        return "new", "not run yet"
    if step.kind in TRAINING_KINDS:
        lineage = read_json(out / "final" / "lineage.json")
        needed = ["summary.json"] + (["report.json"] if step.kind == "distill" else [])
        if lineage is not None:
            made, steps, want = lineage.get("result_digest"), lineage.get("step"), step.config.train.max_steps
            same = made == result_digest(step.config) if made else lineage.get("config_digest") == step.config.digest()
            if not same:
                return "changed", f"{out}/final was made from another config: " + differences(
                    result_config(out / "config.yaml", step.kind), step.config.model_dump(mode="json", exclude=RUN_ONLY))
            if made and want is not None and steps != want:
                if steps < want:  # the resume checks decide at launch whether it may go on
                    return "partial", f"{out}/final holds step {steps}; train.max_steps is {want}: trains on"
                return "changed", f"{out}/final holds step {steps}, past train.max_steps {want}"
            missing = [n for n in needed if not (out / n).exists()]
            if not missing:
                return "done", f"{out}/final holds step {lineage.get('step')} of this config"
            return "partial", f"{', '.join(missing)} missing: the stage finishes it"
        if (out / "checkpoints").is_dir() and any((out / "checkpoints").iterdir()):
            return "partial", "checkpoints present: resumes from the newest"
        return "new", "not run yet"
    if step.kind == "export":
        made, src = read_json(out / "lineage.json"), read_json(Path(step.source) / "final" / "lineage.json")
        if made is None:
            return "new", "not run yet"
        if src is not None and (made.get("config_digest"), made.get("step")) == (src.get("config_digest"), src.get("step")):
            return "done", f"{out} is step {made.get('step')} of {step.source}"
        return "changed", f"{out} is not the newest export of {step.source}"
    receipt, src = read_json(pipeline.receipt(step)), read_json(Path(step.source) / "lineage.json")
    if receipt is None:
        return "new", "not pushed yet"
    want = {"repo_id": step.spec.repo_id, "revision": step.spec.revision or "main",
            "lineage": src and {k: src.get(k) for k in ("config_digest", "step")}}
    if {k: receipt.get(k) for k in want} == want:
        return "done", f"pushed to {step.spec.repo_id}@{want['revision']}"
    return "changed", f"{step.source} changed since it was pushed"


def result_config(path: Path, kind: str) -> dict:
    """A run folder's saved config.yaml as the digest sees it (RUN_ONLY left out), {} when unreadable."""
    try:
        return load_config(path, schema(kind)).model_dump(mode="json", exclude=RUN_ONLY)
    except ConfigError:
        return {}


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
    jobs = {name: e["job_id"] for name, e in record.items() if e.get("mode") == "slurm" and e.get("job_id")}
    states = {}
    if jobs and any(s.runs for s in pipeline.steps):
        from lmforge import slurm

        states = slurm.job_states(list(jobs.values()))
    width = max(len(s.name) for s in pipeline.steps) + 2
    lines = []
    for step in pipeline.steps:
        entry = record.get(step.name, {})
        if not step.runs:
            status, detail = "done", step.why
        elif step.name in jobs:
            status, detail = slurm_status(jobs[step.name], states.get(jobs[step.name]), entry)
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


def slurm_status(job: str, info: dict | None, entry: dict) -> tuple[str, str]:
    log = entry.get("log", "?")
    if info is None:
        return "unknown", f"job {job} is no longer known to Slurm and the stage is not done; log: {log}"
    state, reason = info.get("JobState", "?"), info.get("Reason", "None")
    if state == "PENDING" and reason.startswith("Dependency"):
        return "waiting", f"job {job} waits for its upstream jobs"
    if state in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "SUSPENDED"):
        held = "; requeued after a save" if int(info.get("Restarts", 0) or 0) else ""
        return "waiting", f"job {job} {state.lower()} ({reason}){held}"
    if state in ("RUNNING", "COMPLETING"):
        return "running", f"job {job} on {info.get('NodeList', '?')}; log: {log}"
    if state == "COMPLETED":
        return "failed", f"job {job} completed but the stage's output is not complete; log: {log}"
    why = "" if reason in ("None", "") else f", {reason}"
    return ("cancelled" if state == "CANCELLED" else "failed",
            f"job {job} {state} (exit {info.get('ExitCode', '?')}{why}); log: {log}")


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


def newest_checkpoint(run_dir: Path) -> int:
    """The newest committed checkpoint's step in a run folder (commit record written), plus its no-KD baseline's
    (a distillation trains RUN_DIR/baseline first): it grows whenever either run saves. 0 if none."""
    def newest(pattern: str) -> int:
        return max((int(p.parent.name.removeprefix("step-")) for p in Path(run_dir).glob(pattern)
                    if p.parent.name.removeprefix("step-").isdigit()), default=0)

    return newest("checkpoints/step-*/lmforge.json") + newest("baseline/checkpoints/step-*/lmforge.json")


def check_done(argv: list[str]) -> int:
    """What slurm/train.sbatch asks about its stage, without torch: `python -m lmforge.pipeline [--newest | --since
    STEP] STAGE CONFIG [key=value ...]`. --newest prints the newest committed checkpoint's step. Otherwise: exit 0
    when the stage's output is complete for this config; 1 when not, but a checkpoint newer than STEP is there (a
    run stopped by a signal or train.max_time: requeue); 3 when not and no newer one (requeueing would loop
    without progress); 2 on a bad config."""
    mode, since = "check", -1
    if argv[:1] == ["--newest"]:
        mode, argv = "newest", argv[1:]
    elif argv[:1] == ["--since"] and len(argv) > 1 and argv[1].isdigit():
        since, argv = int(argv[1]), argv[2:]
    if len(argv) < 2 or argv[0] not in TRAINING_KINDS + ("tokenize",):
        print("usage: python -m lmforge.pipeline [--newest | --since STEP] pretrain|finetune|distill CONFIG "
              "[key=value ...]", file=sys.stderr)
        return 2
    kind, config, *overrides = argv
    try:
        cfg = load_config(config, schema(kind), overrides)
    except ConfigError as e:
        print(f"lmforge: {e}", file=sys.stderr)
        return 2
    output = Path(cfg.out_dir if kind == "tokenize" else cfg.run_dir)
    if mode == "newest":
        print(newest_checkpoint(output))
        return 0
    spec = StageSpec(name=kind, stage=kind, config=Path(config), overrides=overrides)
    state, why = completion(None, Step(spec, [], overrides, Path(config), cfg, output=output))
    if state == "done":
        print(f"[{kind}] finished: {why}", flush=True)
        return 0
    newest = newest_checkpoint(output)
    print(f"[{kind}] not finished: {why}; newest checkpoint: step {newest}", flush=True)
    return 1 if newest > since else 3


def status_main(argv: list[str] | None = None) -> int:
    pipeline, _ = parse("lmforge status", argv, "Where each stage of a pipeline stands: done, running (Slurm job), "
                        "waiting, failed (with its log), stale (config changed) or not run.", None)
    for line in status_lines(pipeline):
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(check_done(sys.argv[1:]))
