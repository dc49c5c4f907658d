"""`lmforge submit PIPELINE.yaml`: a pipeline as Slurm jobs, one per stage, each waiting for its upstream jobs
with `--dependency=afterok` (a stage that fails, or ends at its time limit without requeueing, cancels its
dependents: `--kill-on-invalid-dep=yes`).

Each job is one of the readable templates in slurm/ (train.sbatch, tokenize.sbatch, cpu.sbatch) with the stage's
resources as sbatch options, which win over the template's own #SBATCH lines; `--dry-run` prints exactly those
sbatch lines. Finished stages get no job; a stage whose job is still queued or running is not submitted again
(its job id stands in for it in the dependencies). Job ids and log paths go to WORK_DIR/pipeline.json, which
`lmforge status` reads.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from lmforge.completion import read_json
from lmforge.config.pipeline import TRAINING_KINDS
from lmforge.pipeline import Pipeline, Step, cwd_relative, parse, plan_lines

PROG = "lmforge submit"
ROOT = Path(__file__).resolve().parents[1]
TEMPLATES = ROOT / "slurm"
LIVE = {"PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "CONFIGURING", "COMPLETING", "SUSPENDED",
        "RESIZING", "SIGNALING", "STAGE_OUT"}


class SlurmError(Exception):
    """sbatch or scontrol refused or is missing; the message says what to do."""


SECRETS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")  # only the push job gets them (sbatch passes the environment on)


def job_states(ids: list[str]) -> dict[str, dict]:
    """`scontrol show job` of each id, as Key=Value fields; ids Slurm no longer knows are left out. Any other
    failure (a controller that does not answer) is a SlurmError: a job must never be taken for gone, and its stage
    resubmitted under it, because scontrol timed out."""
    out = {}
    for job in ids:
        try:
            proc = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True,
                                  timeout=60)
        except FileNotFoundError:
            raise SlurmError("scontrol not found: `lmforge submit` and the status of Slurm jobs need a Slurm login "
                             "node") from None
        except subprocess.TimeoutExpired:
            raise SlurmError(f"scontrol show job {job} did not answer in 60 s; try again") from None
        if proc.returncode != 0 and "Invalid job id" in proc.stderr:
            continue
        if proc.returncode != 0 or not proc.stdout.strip():
            raise SlurmError(f"scontrol show job {job}: {proc.stderr.strip() or 'no answer'}")
        tasks = [fields(line) for line in proc.stdout.splitlines() if line.strip()]
        out[str(job)] = {**tasks[0], "tasks": tasks}  # an array job answers one line per task
    return out


def fields(line: str) -> dict[str, str]:
    """One line of `scontrol show job -o` as Key=Value fields (the first of a repeated key wins)."""
    out: dict[str, str] = {}
    for token in line.split():
        key, sep, value = token.partition("=")
        if sep and key not in out:
            out[key] = value
    return out


def accounted(job: str) -> dict | None:
    """How a job Slurm's controller has forgotten (MinJobAge, 300 s by default) ended, from the accounting database
    (`sacct`); None where there is no accounting or it does not know the job either."""
    try:
        proc = subprocess.run(["sacct", "-X", "-n", "-P", "-j", str(job), "-o", "JobID,State,ExitCode"],
                              capture_output=True, text=True, timeout=60)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    tasks = []
    for line in proc.stdout.splitlines() if proc.returncode == 0 else []:
        parts = line.split("|")
        if len(parts) == 3:
            tasks.append({"JobId": parts[0], "JobState": parts[1].split()[0], "ExitCode": parts[2], "Reason": "None"})
    return {**tasks[0], "tasks": tasks, "accounted": "yes"} if tasks else None


def stage_status(ids: list[str], states: dict[str, dict | None], entry: dict) -> tuple[str, str]:
    """Where a stage run as Slurm jobs stands (an array tokenization is three jobs, one of them an array), told by
    the job that explains it: the first that failed, else one cancelled for its dependency, else the first still
    queued or running; a stage whose jobs all completed without its output being complete has failed."""
    tasks = []
    for job in ids:
        info = states.get(job)
        if info is None:
            return "unknown", (f"job {job} is no longer known to Slurm (nor to sacct) and the stage is not done; "
                               f"log: {entry.get('log', '?')}")
        for t in info["tasks"]:
            name = f"{t['ArrayJobId']}_{t['ArrayTaskId']}" if t.get("ArrayTaskId") else t.get("JobId", job)
            tasks.append((name, t, t.get("StdOut") or entry.get("log", "?")))
    dependency = lambda t: t.get("Reason", "").startswith("Dependency")  # noqa: E731
    broken = [x for x in tasks if x[1]["JobState"] not in (*LIVE, "COMPLETED")]
    for name, t, log in sorted(broken, key=lambda x: dependency(x[1])):  # a real failure before what it cancelled
        why = "" if t.get("Reason", "None") in ("None", "") else f", {t['Reason']}"
        return ("cancelled" if t["JobState"] == "CANCELLED" else "failed",
                f"job {name} {t['JobState']} (exit {t.get('ExitCode', '?')}{why}); log: {log}")
    for name, t, log in tasks:
        state, reason = t["JobState"], t.get("Reason", "None")
        if state == "PENDING" and dependency(t):
            return "waiting", f"job {name} waits for its upstream jobs"
        if state in ("RUNNING", "COMPLETING"):
            return "running", f"job {name} on {t.get('NodeList', '?')}; log: {log}"
        if state in LIVE:
            held = "; requeued after a save" if int(t.get("Restarts", 0) or 0) else ""
            return "waiting", f"job {name} {state.lower()} ({reason}){held}"
    return "failed", f"job {tasks[-1][0]} completed but the stage's output is not complete; log: {tasks[-1][2]}"


def signal_lead(pipeline: Pipeline, step: Step) -> int:
    """Seconds before the time limit that the batch shell gets USR1: the stage's own value, else three of its
    measured saves (an earlier launch's summary.json) plus 120, at least 300. Slurm may send it up to 60 s early,
    never late."""
    given = pipeline.resources(step).signal_lead
    if given:
        return given
    summary = read_json(step.output / "summary.json") or {}
    saves = summary.get("checkpoint_save_seconds") or []
    saves = list(saves.values()) if isinstance(saves, dict) else saves if isinstance(saves, list) else [saves]
    save = max([s for s in saves if isinstance(s, (int, float))], default=0.0)
    return int(max(300, 3 * save + 120))


def seconds(limit: str) -> int | None:
    """A Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in seconds; None when unlimited or odd."""
    days, _, rest = limit.rpartition("-") if "-" in limit else ("0", "", limit)
    parts = rest.split(":")
    if not days.isdigit() or not all(p.isdigit() for p in parts) or not 1 <= len(parts) <= 3:
        return None
    nums = [int(p) for p in parts]
    if days != "0" or "-" in limit:  # D-HH[:MM[:SS]]
        h, m, sec = (nums + [0, 0])[:3]
    else:  # MM, MM:SS, HH:MM:SS
        h, m, sec = [0, *nums] if len(nums) == 2 else nums if len(nums) == 3 else [0, nums[0], 0]
    return int(days) * 86400 + h * 3600 + m * 60 + sec


def sbatch_lines(pipeline: Pipeline, step: Step, after: list[str]) -> list[tuple[str, dict[str, str], list[str]]]:
    """The jobs of one stage, in order, each (label, environment, sbatch command); sbatch passes its environment to
    the job. One job per stage, but an array tokenization: the tokenizer once, the array (task i encodes chunks
    i, i+N, ...), then the job that writes meta.json. `after` holds upstream job ids (or $JOB_name placeholders);
    each later job of a stage waits for the one before it."""
    r = pipeline.resources(step)
    exports = {"WANDB_RUN_GROUP": pipeline.cfg.name}
    if pipeline.cfg.setup:
        exports["LMFORGE_SETUP"] = "; ".join(pipeline.cfg.setup)
    common = [f"--{k.replace('_', '-')}={getattr(r, k)}" for k in ("cpus_per_task", "mem", "time", "partition",
                                                                    "account", "qos") if getattr(r, k) is not None]
    if r.gpus_per_node:
        common.insert(0, f"--gpus-per-node={r.gpus_per_node}")

    def line(label: str, template: str, args: list[str], options: list[str], env: dict, wait_for: list[str],
             log: str = "%x-%j.out"):  # an array's tasks: %x-%A_%a.out, the array's id and the task's index
        name = f"{pipeline.cfg.name}-{step.name}" + (f"-{label}" if label else "")
        deps = [f"--dependency=afterok:{':'.join(wait_for)}", "--kill-on-invalid-dep=yes"] if wait_for else []
        return label, {**exports, **env}, ["sbatch", "--parsable", f"--job-name={name}",
                                           f"--output={pipeline.work_dir / 'logs' / log}", *options,
                                           *common, *deps, *r.sbatch, str(cwd_relative(TEMPLATES / template)), *args]

    if step.kind in TRAINING_KINDS:
        procs, launch = pipeline.procs_per_node(step), r.launch or "torchrun"
        lead = signal_lead(pipeline, step)
        limit = seconds(r.time) if r.time else None
        if limit is not None and lead + 60 >= limit:  # Slurm may send it 60 s early: it would come at the start
            raise SlurmError(f"stage {step.name}: resources.time {r.time} leaves no time to train before the save "
                             f"signal {lead} s ahead of it (resources.signal_lead); ask for more time or a shorter lead")
        # torchrun's wait for the workers' save after a signal: inside the lead, with time left to requeue
        env = {"LMFORGE_LAUNCH": launch, "LMFORGE_PROCS_PER_NODE": str(procs),
               "LMFORGE_SHUTDOWN_TIMEOUT": str(lead - min(60, lead // 3))}
        options = [f"--nodes={r.nodes or 1}", f"--ntasks-per-node={procs if launch == 'srun' else 1}",
                   f"--signal=B:USR1@{lead}"]
        return [line("", "train.sbatch", [step.kind, str(step.config_path), *step.overrides], options, env, after)]
    if step.kind == "tokenize":
        args = [str(step.config_path), *step.overrides]
        if not r.array:
            return [line("", "tokenize.sbatch", args, [], {}, after)]
        return [line("tokenizer", "tokenize.sbatch", [*args, "--tokenizer-only"], [], {}, after),
                line("encode", "tokenize.sbatch", args, [f"--array=0-{r.array - 1}"],
                     {"LMFORGE_ARRAY_PARTS": str(r.array)}, ["$PREVIOUS"], log="%x-%A_%a.out"),
                line("", "tokenize.sbatch", args, [], {}, ["$PREVIOUS"])]
    return [line("", "cpu.sbatch", pipeline.command(step)[3:], [], {}, after)]  # `lmforge export|push ...`


def shell(exports: dict[str, str], line: list[str]) -> str:
    """A copy-pasteable shell line; `$JOB_name` placeholders stay expandable."""
    quote = lambda a: f'"{a}"' if "$JOB_" in a else shlex.quote(a)  # noqa: E731
    return " ".join([*(f"{k}={shlex.quote(v)}" for k, v in exports.items()), *map(quote, line)])


def submit(pipeline: Pipeline, dry_run: bool = False) -> int:
    from lmforge.pipeline import move_aside

    record = pipeline.record()
    known = {e["job_id"]: name for name, e in record.items() if e.get("mode") == "slurm" and e.get("job_id")}
    live = {known[j]: j for j, info in (job_states(list(known)) if known and not dry_run else {}).items()
            if info.get("JobState") in LIVE}
    if dry_run:
        for text in plan_lines(pipeline):
            print(text)
    jobs: dict[str, str] = {}
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if not dry_run:
        (pipeline.work_dir / "logs").mkdir(parents=True, exist_ok=True)
    for step in pipeline.steps:
        if not step.runs:
            if not dry_run:
                print(f"[submit] {step.name}: done, no job ({step.why})")
            continue
        renewed = [d for d in step.deps if d in jobs and jobs[d] not in live.values()]
        if step.name in live and not renewed:
            jobs[step.name] = live[step.name]
            print(f"[submit] {step.name}: already queued as job {live[step.name]}; not submitted again")
            continue
        if step.name in live:  # it waits on upstream jobs that this submission replaced: it must wait on the new ones
            if not dry_run:
                subprocess.run(["scancel", live[step.name]], capture_output=True, timeout=60)
            print(f"[submit] {step.name}: job {live[step.name]} cancelled: it waited on the old jobs of "
                  f"{', '.join(renewed)}")
        after = [jobs[d] for d in step.deps if d in jobs]  # done upstream stages have no job to wait for
        aside = None if dry_run else move_aside(step)
        previous, ids = None, []
        for label, exports, line in sbatch_lines(pipeline, step, after):
            line = [a.replace("$PREVIOUS", previous) if previous else a for a in line]
            if dry_run:  # a shell script: each job's id in JOB_<name> for the lines that wait on it
                previous = "$JOB_" + "_".join(filter(None, [step.name, label])).replace("-", "_")
                print(f"{previous[1:]}=$({shell(exports, line)})")
                continue
            try:
                job_env = {k: v for k, v in {**env, **exports}.items() if step.kind == "push" or k not in SECRETS}
                proc = subprocess.run(line, capture_output=True, text=True, env=job_env, timeout=120)
            except FileNotFoundError:
                raise SlurmError("sbatch not found: run `lmforge submit` on a Slurm login node (or use `lmforge run` "
                                 "to run the pipeline here)") from None
            if proc.returncode != 0:
                raise SlurmError(f"sbatch refused stage {step.name}: {proc.stderr.strip() or proc.stdout.strip()}"
                                 f"\n  command: {shell(exports, line)}")
            previous = proc.stdout.strip().split(";")[0]
            ids.append(previous)
        jobs[step.name] = previous
        if dry_run:
            continue
        log = pipeline.work_dir / "logs" / f"{pipeline.cfg.name}-{step.name}-{previous}.out"
        pipeline.remember(step.name, mode="slurm", job_id=previous, jobs=ids, log=str(log))
        print(f"[submit] {step.name}: job {' -> '.join(ids)}" + (f" after {', '.join(after)}" if after else "")
              + (f"; old output moved to {aside}" if aside else "") + f"; log {log}")
    return 0


def main(argv: list[str] | None = None) -> int:
    pipeline, args = parse(PROG, argv, "Submit a pipeline to Slurm: one job per unfinished stage, each after its "
                           "upstream jobs (afterok); `lmforge status` follows them.",
                           "print what would be submitted, what is skipped and why, and the sbatch lines; submit nothing")
    try:
        return submit(pipeline, args.dry_run)
    except SlurmError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
