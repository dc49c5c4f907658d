"""Pipelines without launching anything: the schema, references, completion from disk, what reruns and why, and
`lmforge submit --dry-run` pinned by golden files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from lmforge import pipeline as pl
from lmforge import slurm
from lmforge.config import ConfigError
from lmforge.config.base import result_digest

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A copy of configs/ in an empty working directory: no run of this checkout's runs/ is seen."""
    shutil.copytree(ROOT / "configs", tmp_path / "configs")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write(path: Path, data: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def chain(tmp: Path, **changes) -> Path:
    """tokenize -> pretrain -> finetune -> export, on the shipped demo stage configs, into tmp/runs."""
    stages = [
        {"name": "tokenize", "stage": "tokenize", "config": "../tokenize/demo.yaml",
         "overrides": [f"out_dir={tmp}/runs/data"]},
        {"name": "pretrain", "stage": "pretrain", "config": "../pretrain/demo.yaml",
         "overrides": ["data.path=${tokenize.out_dir}", f"run_dir={tmp}/runs/pretrain"]},
        {"name": "finetune", "stage": "finetune", "config": "../finetune/demo.yaml",
         "overrides": ["init_from=${pretrain.final}", f"run_dir={tmp}/runs/finetune"]},
        {"name": "export", "stage": "export", "source": "${finetune.run_dir}", "out": f"{tmp}/runs/export"},
    ]
    for name, change in changes.items():
        next(s for s in stages if s["name"] == name).update(change)
    return write(tmp / "configs" / "pipelines" / "t.yaml", {"name": "t", "work_dir": str(tmp / "runs"),
                                                           "stages": stages})


def finish(step: pl.Step, digest: str | None = None) -> None:
    """Write the completion record a stage writes when it finishes."""
    out = step.output
    if step.kind == "tokenize":
        write_json(out / "meta.json", {"config_digest": digest or step.config.output_digest(), "config": {}})
    elif step.kind in ("pretrain", "finetune", "distill"):
        write_json(out / "final" / "lineage.json", {"config_digest": step.config.digest(), "step": step.config.train.max_steps,
                                                    "result_digest": digest or result_digest(step.config)})
        write_json(out / "summary.json", {"steps": 7})
        out.joinpath("config.yaml").write_text(yaml.safe_dump(step.config.model_dump(mode="json")))
    else:
        src = json.loads((Path(step.source) / "final" / "lineage.json").read_text())
        write_json(out / "lineage.json", src)


def finished_chain(tmp: Path) -> Path:
    """The chain with every stage's completion record written, in order (each from its upstream's output)."""
    path = chain(tmp)
    for i in range(4):
        finish(pl.load(path).steps[i])
    return path


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_references_resolve_to_upstream_outputs_and_order_the_stages(project):
    p = pl.load(chain(project))
    pretrain, finetune, export = p.steps[1:]
    assert pretrain.overrides[0] == f"data.path={project}/runs/data"
    assert finetune.overrides[0] == f"init_from={project}/runs/pretrain/final"
    assert export.source == f"{project}/runs/finetune" and export.deps == ["finetune"]
    assert str(finetune.config.init_from) == f"{project}/runs/pretrain/final"  # validated with the value filled in
    assert [s.state for s in p.steps] == ["new"] * 4


@pytest.mark.parametrize("change, message", [
    ({"pretrain": {"overrides": ["data.path=${finetune.run_dir}"]}}, "names finetune, which comes later"),
    ({"pretrain": {"overrides": ["data.path=${tokenizer.out_dir}"]}}, "is not a stage of this pipeline"),
    ({"finetune": {"overrides": ["init_from=${pretrain.run_dri}"]}}, "has no 'run_dri'"),
    ({"finetune": {"overrides": ["init_from=${tokenize.final}"]}}, "makes no model folder"),
    ({"finetune": {"overrides": ["optim.lrr=1"]}}, "optim.lrr: unknown key; did you mean 'lr'"),
    ({"finetune": {"name": "pretrain"}}, "two stages are named pretrain"),
    ({"export": {"out": None}}, "`stage: export` needs out"),
    ({"export": {"config": "../finetune/demo.yaml"}}, "takes no config"),
    ({"pretrain": {"config": None}}, "`stage: pretrain` needs `config`"),
    ({"pretrain": {"resources": {"array": 4}}}, "resources.array is for tokenize"),
    ({"pretrain": {"resources": {"gpus": 8}}}, "stages[1].resources.gpus: unknown key"),
])
def test_a_bad_pipeline_is_refused_before_anything_runs_naming_the_stage_and_key(project, change, message):
    with pytest.raises(ConfigError, match=None) as err:
        pl.load(chain(project, **change))
    assert message in str(err.value)
    assert "t.yaml" in str(err.value)


def test_cli_refusal_is_one_line_with_status_2(project, capsys):
    with pytest.raises(SystemExit) as exit_:
        pl.main([str(chain(project, pretrain={"overrides": ["data.path=${x.y}"]}))])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge run: ") and "Traceback" not in err


def test_finished_stages_are_skipped_and_a_changed_one_reruns_with_everything_downstream(project):
    path = chain(project)
    p = pl.load(path)
    for step in p.steps:
        finish(step)
        p = pl.load(path)  # later stages read earlier outputs (export reads the run's final/lineage.json)
    assert [s.state for s in p.steps] == ["done"] * 4
    assert not any(s.runs for s in p.steps)

    p = pl.load(chain(project, pretrain={"overrides": ["data.path=${tokenize.out_dir}", f"run_dir={project}/runs/pretrain",
                                                      "optim.lr=1.0e-3"]}))  # the pretraining config changed
    assert [s.state for s in p.steps] == ["done", "changed", "changed", "changed"]
    assert "optim.lr 0.003 -> 0.001" in p.steps[1].why
    assert p.steps[2].why == "upstream pretrain reruns" and p.steps[3].why == "upstream finetune reruns"
    lines = pl.plan_lines(p)
    assert lines[0].split()[:2] == ["tokenize", "skip"] and lines[1].split()[:2] == ["pretrain", "rerun"]
    assert "its old output moves aside" in lines[1]


def test_what_only_changes_how_a_run_is_watched_reruns_nothing_and_a_longer_run_trains_on(project):
    finished_chain(project)
    base = ["data.path=${tokenize.out_dir}", f"run_dir={project}/runs/pretrain"]
    cosmetic = ["tracking.tags=[a]", "train.log_every=1", "train.save_every=7", "engine.collective_timeout=60"]
    assert [s.state for s in pl.load(chain(project, pretrain={"overrides": base + cosmetic})).steps] == ["done"] * 4
    longer = pl.load(chain(project, pretrain={"overrides": base + ["train.max_steps=800"]}))
    assert [s.state for s in longer.steps] == ["done", "partial", "changed", "changed"]
    assert "holds step 400; train.max_steps is 800: trains on" in longer.steps[1].why
    assert "moves aside" not in pl.plan_lines(longer)[1]  # trained on in place, not thrown away
    shorter = pl.load(chain(project, pretrain={"overrides": base + ["train.max_steps=100"]}))
    assert shorter.steps[1].state == "changed" and "past train.max_steps 100" in shorter.steps[1].why


def test_deleted_token_shards_do_not_retrain_the_model_made_from_them(project):
    path = finished_chain(project)
    shutil.rmtree(project / "runs" / "data")
    p = pl.load(path)
    assert [s.state for s in p.steps] == ["done"] * 4
    assert "is gone, but every stage that uses it is done" in p.steps[0].why
    shutil.rmtree(project / "runs" / "finetune")  # the fine-tuning runs again from the model, which is there
    assert [s.state for s in pl.load(path).steps] == ["done", "done", "new", "changed"]


def test_the_lead_must_fit_in_the_time_limit_and_only_the_push_job_gets_the_token(project, monkeypatch):
    assert [slurm.seconds(t) for t in ("90", "1:30", "01:00:00", "2-00:00:00", "1-12", "UNLIMITED")] == [
        5400, 90, 3600, 172800, 129600, None]
    p = pl.load(chain(project, pretrain={"resources": {"time": "5", "signal_lead": 300}}))
    with pytest.raises(slurm.SlurmError, match="leaves no time to train"):
        slurm.sbatch_lines(p, p.steps[1], [])
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append((cmd, kwargs.get("env", {})))
        return subprocess.CompletedProcess(cmd, 0, stdout=f"{len(calls)}\n", stderr="")

    monkeypatch.setattr(slurm.subprocess, "run", fake_run)
    monkeypatch.setenv("HF_TOKEN", "hf_secret")
    path = chain(project)
    data = yaml.safe_load(path.read_text())
    data["stages"].append({"name": "push", "stage": "push", "source": "${export.dir}", "repo_id": "org/m"})
    write(path, data)
    assert slurm.submit(pl.load(path)) == 0
    envs = {cmd[cmd.index("--parsable") + 1].split("=")[1]: env for cmd, env in calls}
    assert "HF_TOKEN" not in envs["t-pretrain"] and "HF_TOKEN" not in envs["t-tokenize"]
    assert envs["t-push"]["HF_TOKEN"] == "hf_secret" and envs["t-pretrain"]["WANDB_RUN_GROUP"] == "t"
    deps = {cmd[cmd.index("--parsable") + 1].split("=")[1]: [a for a in cmd if a.startswith("--dependency")]
            for cmd, _ in calls}
    assert deps["t-tokenize"] == [] and deps["t-pretrain"] == ["--dependency=afterok:1"]
    assert deps["t-push"] == ["--dependency=afterok:4"]


def test_a_controller_that_does_not_answer_is_an_error_not_a_finished_job(monkeypatch):
    answers = iter([subprocess.CompletedProcess([], 1, stdout="", stderr="slurm_load_jobs error: Invalid job id "
                                                "specified"),
                    subprocess.CompletedProcess([], 1, stdout="", stderr="Unable to contact slurm controller")])
    monkeypatch.setattr(slurm.subprocess, "run", lambda *a, **k: next(answers))
    assert slurm.job_states(["7"]) == {}  # purged: gone
    with pytest.raises(slurm.SlurmError, match="Unable to contact"):
        slurm.job_states(["8"])


def test_moving_a_changed_stage_aside_keeps_its_output(project):
    path = chain(project)
    p = pl.load(path)
    finish(p.steps[0], digest="another")
    p = pl.load(path)
    assert p.steps[0].state == "changed" and "holds tokens of another config" in p.steps[0].why
    aside = pl.move_aside(p.steps[0])
    assert aside.name.startswith("data.old-") and (aside / "meta.json").exists()
    assert not (project / "runs" / "data").exists()


def test_a_stopped_run_resumes_and_a_missing_report_is_not_done(project):
    path = chain(project)
    p = pl.load(path)
    (p.steps[1].output / "checkpoints" / "step-00000004").mkdir(parents=True)
    (p.steps[0].output / "chunks").mkdir(parents=True)
    write_json(p.steps[0].output / "chunks" / "state.json", {"config_digest": p.steps[0].config.output_digest()})
    p = pl.load(path)
    assert [s.state for s in p.steps[:2]] == ["partial", "partial"]
    assert "resumes" in p.steps[1].why


def scontrol_line(job: str, state: str, reason: str = "None", **more: str) -> str:
    extra = " ".join(f"{k}={v}" for k, v in more.items())
    return f"JobId={job} JobName=t JobState={state} Reason={reason} ExitCode=1:0 StdOut=/logs/{job}.out {extra}"


def test_status_of_an_array_stage_names_the_failed_task_and_asks_sacct_about_purged_jobs(monkeypatch, tmp_path):
    """An array tokenization is three jobs; when one array task fails the final job is cancelled for its dependency,
    and status must name the task that failed and its log, not the cancellation. A job the controller purged
    (MinJobAge) is looked up in the accounting database."""
    array = "\n".join([scontrol_line("11", "COMPLETED", ArrayJobId="11", ArrayTaskId="0"),
                       scontrol_line("12", "FAILED", "NonZeroExitCode", ArrayJobId="11", ArrayTaskId="1"),
                       scontrol_line("13", "COMPLETED", ArrayJobId="11", ArrayTaskId="2")])
    answers = {"10": scontrol_line("10", "COMPLETED"), "11": array,
               "14": scontrol_line("14", "CANCELLED", "DependencyNeverSatisfied")}
    monkeypatch.setattr(slurm.subprocess, "run", lambda cmd, **k: subprocess.CompletedProcess(
        cmd, 0 if cmd[-1] in answers else 1, stdout=answers.get(cmd[-1], ""),
        stderr="" if cmd[-1] in answers else "Invalid job id specified"))
    states = slurm.job_states(["10", "11", "14"])
    assert len(states["11"]["tasks"]) == 3
    assert slurm.stage_status(["10", "11", "14"], states, {"log": "/logs/final.out"}) == (
        "failed", "job 11_1 FAILED (exit 1:0, NonZeroExitCode); log: /logs/12.out")
    answers["11"] = array.replace("FAILED", "RUNNING")
    states = slurm.job_states(["10", "11", "14"])
    states["14"]["tasks"][0].update(JobState="PENDING", Reason="Dependency")
    assert slurm.stage_status(["10", "11", "14"], states, {})[0] == "running"
    assert slurm.stage_status(["14"], states, {}) == ("waiting", "job 14 waits for its upstream jobs")

    # sacct, as `sacct -X -n -P -o JobID,State,ExitCode` prints it, on PATH in place of the real one
    fake = tmp_path / "bin" / "sacct"
    fake.parent.mkdir()
    fake.write_text("#!/bin/sh\necho '21|CANCELLED by 1000|0:15'\n")
    fake.chmod(0o755)
    monkeypatch.undo()
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    states = {"21": slurm.accounted("21"), "22": None}
    assert slurm.stage_status(["21"], states, {"log": "/logs/21.out"}) == (
        "cancelled", "job 21 CANCELLED (exit 0:15); log: /logs/21.out")
    assert slurm.stage_status(["22"], states, {"log": "/l"})[0] == "unknown"
    fake.write_text("#!/bin/sh\necho 'sacct: error: Slurm accounting storage is disabled' >&2; exit 1\n")
    assert slurm.accounted("21") is None


def test_local_commands_and_pipeline_record(project):
    p = pl.load(chain(project, pretrain={"resources": {"procs_per_node": 3}}))
    cmd = p.command(p.steps[1])
    assert cmd[1:5] == ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=3"]
    assert pl.TORCHRUN_SIGNALS in cmd and cmd[cmd.index("-m", 3) + 1] == "pretrain"
    assert p.command(p.steps[3])[3:] == ["export", f"{project}/runs/finetune", f"{project}/runs/export"]
    assert p.env()["WANDB_RUN_GROUP"] == "t"
    p.remember("pretrain", mode="local", exit=1, log="x.log")
    assert p.record()["pretrain"]["exit"] == 1
    assert pl.status_lines(pl.load(chain(project)))[1].split()[:2] == ["pretrain", "failed"]


def test_the_signal_lead_covers_the_measured_save(project):
    p = pl.load(chain(project))
    assert slurm.signal_lead(p, p.steps[1]) == 300  # nothing measured yet
    write_json(p.steps[1].output / "summary.json", {"checkpoint_save_seconds": [20.0, 95.5]})
    assert slurm.signal_lead(p, p.steps[1]) == int(3 * 95.5 + 120)
    p = pl.load(chain(project, pretrain={"resources": {"signal_lead": 42}}))
    assert slurm.signal_lead(p, p.steps[1]) == 42


@pytest.mark.parametrize("name", ["demo", "gpt2_124m"])
def test_submit_dry_run_is_pinned_by_a_golden_file(project, capsys, name):
    """The sbatch lines `lmforge submit --dry-run` prints for the shipped pipelines (paths normalised). After an
    intended change: LMFORGE_UPDATE_GOLDEN=1 pytest tests/unit/test_pipeline.py."""
    assert slurm.main([f"configs/pipelines/{name}.yaml", "--dry-run"]) == 0
    out = capsys.readouterr().out.replace(str(ROOT), "<ROOT>")
    golden = GOLDEN / f"submit_{name}.txt"
    if os.environ.get("LMFORGE_UPDATE_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(out)
    assert out == golden.read_text()
    assert "HF_TOKEN" not in out


def test_every_shipped_pipeline_loads(project):
    for path in sorted((project / "configs" / "pipelines").glob("*.yaml")):
        p = pl.load(path)
        assert p.steps, path


def test_outputs_of_an_older_lmforge_stay_done_after_an_upgrade(project):
    """Digest version 1 hashed every value, so a key added by a newer lmforge changed every digest: finished token
    folders and runs would have been redone. A record without today's digest version is matched through the
    config.yaml saved beside it, read with today's schema."""
    from lmforge.completion import state
    from lmforge.config import save_config

    p = pl.load(chain(project))
    tok, pre = p.steps[0], p.steps[1]
    write_json(tok.output / "meta.json", {"config_digest": "from-an-older-lmforge", "config": {}})
    save_config(tok.config, tok.output / "config.yaml")
    assert state("tokenize", tok.config, tok.output)[0] == "done"
    write_json(pre.output / "final" / "lineage.json", {"result_digest": "from-an-older-lmforge",
                                                       "step": pre.config.train.max_steps})
    write_json(pre.output / "summary.json", {})
    save_config(pre.config, pre.output / "config.yaml")
    assert state("pretrain", pre.config, pre.output)[0] == "done"
    changed = pl.load(chain(project, pretrain={"overrides": ["data.path=${tokenize.out_dir}",
                                                             f"run_dir={project}/runs/pretrain", "optim.lr=1e-3"]}))
    assert changed.steps[1].state == "changed"  # a real change is still one
    write_json(tok.output / "meta.json", {"config_digest": "x", "digest_version": 2, "config": {}})
    assert state("tokenize", tok.config, tok.output)[0] == "changed"  # today's records are compared by digest
