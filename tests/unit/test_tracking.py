"""Tracking: rank-0 only, metrics.jsonl equal to an uninterrupted run's, W&B's own offline files, one run id
across resumes, W&B failures that never stop training, no secrets sent, readable plots."""

from __future__ import annotations

import json
import struct
import sys
from urllib.parse import urlsplit

import numpy as np
import pytest

from lmforge import tracking
from lmforge.config.tracking import TrackingConfig
from lmforge.tracking import Tracker, is_secret_key, read_metrics, redact, resolve_mode

from ..wandb_files import history, wandb_records

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True, scope="module")
def wandb_sandbox(tmp_path_factory):
    """Every folder W&B might write to (config, cache, logs, netrc, a stray ./wandb) is a temporary one."""
    home = tmp_path_factory.mktemp("wandb_home")
    with pytest.MonkeyPatch.context() as mp:
        for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
            mp.setenv(var, str(home / var.lower()))
        mp.setenv("NETRC", str(home / "netrc"))  # no stored login
        mp.setenv("WANDB_MODE", "offline")
        for var in ("WANDB_API_KEY", "WANDB_IDENTITY_TOKEN_FILE", "WANDB_DIR"):
            mp.delenv(var, raising=False)
        mp.chdir(home)
        yield home
    assert not (home / "wandb").exists(), "W&B wrote into the working directory instead of the run folder"


def sent_config(records) -> dict:
    config = {}
    for r in records:
        kind = r.WhichOneof("record_type")
        if kind in ("run", "config"):
            for item in (r.run.config if kind == "run" else r.config).update:
                config["/".join(item.nested_key) or item.key] = json.loads(item.value_json)
    return config


def test_other_ranks_write_nothing_and_never_import_wandb(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "wandb", None)  # any `import wandb` now fails, and rank 0 says so
    run_dir = tmp_path / "run"
    t = Tracker(run_dir, TrackingConfig(), "pretrain", {"lr": 1e-3}, rank=1)
    t.log(0, {"train/loss": 2.0})
    t.log_text(0, "sample", "hello")
    assert t.write_plots() == []
    t.finish()
    assert not run_dir.exists() and t.run_id is None
    assert capsys.readouterr().err == ""

    Tracker(run_dir, TrackingConfig(), "pretrain", {}, rank=0).finish()
    assert "W&B init failed" in capsys.readouterr().err  # the same blocked import, noticed on rank 0


def test_rank0_writes_metrics_and_an_offline_wandb_run_with_the_same_keys(tmp_path):
    run_dir = tmp_path / "pretrain-tiny"
    config = {"model": {"d_model": 64}, "hub": {"token": "hf_SECRET"}, "wandb_api_key": "k" * 40,
              "tokenizer": {"eos_token": "<|endoftext|>"}}
    with Tracker(run_dir, TrackingConfig(), "pretrain", config, rank=0) as t:
        for step in range(5):
            t.log(step, {"train/loss": np.float32(4.0 - step / 2), "train/lr": 1e-3 * (step + 1),
                         "tokens": 1024 * (step + 1)})
        t.log_text(4, "sample", "def f():\n    return '<eos>'")

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert json.loads(lines[0]) == {"step": 0, "train/loss": 4.0, "train/lr": 1e-3, "tokens": 1024}
    assert [json.loads(x)["step"] for x in lines] == [0, 1, 2, 3, 4, 4]
    assert json.loads(lines[-1]) == {"step": 4, "sample": "def f():\n    return '<eos>'"}
    assert (run_dir / "wandb_id.txt").read_text().strip() == t.run_id

    (folder,) = (run_dir / "wandb").glob("offline-run-*")
    records = wandb_records(folder)
    rows = history(records)
    assert [row["_step"] for row in rows] == [0, 1, 2, 3, 4]  # the sample merged into step 4's row
    assert [row["train/loss"] for row in rows] == [4.0, 3.5, 3.0, 2.5, 2.0]
    assert rows[-1]["tokens"] == 5120 and rows[-1]["sample/_type"] == "html-file"
    (html_file,) = (run_dir / "wandb").glob("offline-run-*/files/media/html/*.html")
    assert "return &#x27;&lt;eos&gt;&#x27;" in html_file.read_text()  # escaped, shown as text
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert (run.run_id, run.job_type, run.display_name) == (t.run_id, "pretrain", "pretrain-tiny")
    sent = sent_config(records)
    assert sent["model"] == {"d_model": 64} and sent["tokenizer"] == {"eos_token": "<|endoftext|>"}
    assert sent["hub"] == {} and "wandb_api_key" not in sent
    assert "hf_SECRET" not in str(sent) and "k" * 40 not in json.dumps(sent)


def test_resume_drops_later_steps_and_continues_the_same_wandb_run(tmp_path):
    def train(run_dir, steps, resume_step=None, wandb=True, run_id=None):
        t = Tracker(run_dir, TrackingConfig(wandb=wandb, plots=False), "pretrain", {}, rank=0,
                    run_id=run_id, resume_step=resume_step)
        for step in steps:
            t.log(step, {"train/loss": 10.0 / (step + 1)})
        t.finish()
        return t

    reference = tmp_path / "uninterrupted"
    train(reference, range(10), wandb=False)

    run_dir = tmp_path / "run"
    first = train(run_dir, range(8))  # checkpoint at step 6, crash after logging step 7 ...
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "train/lo')  # ... in the middle of writing step 8
    second = train(run_dir, range(6, 10), resume_step=6)
    assert (run_dir / "metrics.jsonl").read_bytes() == (reference / "metrics.jsonl").read_bytes()
    assert second.run_id == first.run_id
    # offline, each attempt is a folder of the same run id; `wandb sync` appends the second to the first
    folders = sorted((run_dir / "wandb").glob(f"offline-run-*-{first.run_id}*"))
    assert [[row["_step"] for row in history(wandb_records(f))] for f in folders] == [[*range(8)], [6, 7, 8, 9]]

    explicit = train(run_dir, [6], resume_step=6, run_id="fromckpt1")  # the id stored in the checkpoint wins
    assert explicit.run_id == "fromckpt1" and (run_dir / "wandb_id.txt").read_text().strip() == "fromckpt1"
    fresh = train(run_dir, [0], wandb=True)  # no resume: a new run and a new history
    assert fresh.run_id not in (first.run_id, "fromckpt1")
    assert read_metrics(run_dir / "metrics.jsonl") == [{"step": 0, "train/loss": 10.0}]


def test_wandb_floor_skips_steps_a_resumed_run_already_holds(tmp_path, monkeypatch):
    import wandb

    class ResumedRun:  # an online run resumed after W&B got steps 0..11
        step, sent = 12, []

        def log(self, data, step):
            self.sent.append(step)

        def finish(self, exit_code=0):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: ResumedRun())
    t = Tracker(tmp_path, TrackingConfig(plots=False), "pretrain", {}, rank=0, resume_step=10)
    for step in [10, 11, 12, 12, 13]:
        t.log(step, {"train/loss": 1.0})
    t.log(5, {"val/loss": 1.0})  # out of order: kept in metrics.jsonl, not sent
    t.finish()
    assert ResumedRun.sent == [12, 12, 13]
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [10, 11, 12, 12, 13, 5]


def test_wandb_failures_are_reported_once_and_never_stop_training(tmp_path, monkeypatch, capsys):
    import wandb

    calls = []

    def broken_init(**kwargs):
        calls.append(kwargs)
        raise RuntimeError("wandb service crashed")

    monkeypatch.setattr(wandb, "init", broken_init)
    run_dir = tmp_path / "ft"
    config = {"optim": {"lr": 3e-4}, "hub": {"hf_token": "hf_x", "repo_id": "org/m"}, "db_password": "p"}
    t = Tracker(run_dir, TrackingConfig(tags=["demo"]), "finetune", config, rank=0)
    for step in range(3):
        t.log(step, {"train/loss": 1.0})
    t.finish()
    (kwargs,) = calls
    assert kwargs["config"] == {"optim": {"lr": 3e-4}, "hub": {"repo_id": "org/m"}}  # secrets stripped
    assert config["hub"]["hf_token"] == "hf_x"  # the caller's dict is left as it was
    assert (kwargs["dir"], kwargs["id"], kwargs["resume"], kwargs["mode"]) == (run_dir, t.run_id, "allow", "offline")
    assert (kwargs["job_type"], kwargs["name"], kwargs["tags"]) == ("finetune", "ft", ["demo"])
    assert len(read_metrics(run_dir / "metrics.jsonl")) == 3
    assert capsys.readouterr().err.count("W&B init failed") == 1

    class FlakyRun:
        step, calls = 0, 0

        def log(self, data, step):
            FlakyRun.calls += 1
            raise OSError("socket closed")

        def finish(self, exit_code=0):
            raise AssertionError("a failed run is not finished again")

    monkeypatch.setattr(wandb, "init", lambda **kw: FlakyRun())
    t = Tracker(tmp_path / "pt", TrackingConfig(plots=False), "pretrain", {}, rank=0)
    for step in range(4):
        t.log(step, {"train/loss": 1.0})
    t.finish()
    assert FlakyRun.calls == 1 and len(read_metrics(tmp_path / "pt" / "metrics.jsonl")) == 4
    assert capsys.readouterr().err.count("W&B log failed") == 1


def test_plots_are_valid_pngs_for_the_keys_present_and_no_wandb_when_off(tmp_path):
    run_dir = tmp_path / "run"
    with Tracker(run_dir, TrackingConfig(wandb=False), "pretrain", {}, rank=0) as t:
        for step in range(40):
            t.log(step, {"train/loss": 8.0 / (1 + step) + 1.5, "train/lr": 1e-3 * min(1, step / 10),
                         "train/tokens_per_s": 5000.0 + step, "train/grad_norm": 1.0, "tokens": 2048 * step})
            if step % 10 == 9:
                t.log(step, {"val/loss": 8.0 / (1 + step) + 1.7})
        t.log(40, {"train/loss": float("nan"), "tokens": 2048 * 40})  # a diverged step must not break plotting
    assert not (run_dir / "wandb").exists() and not (run_dir / "wandb_id.txt").exists() and t.run_id is None
    plots = {p.name: p.read_bytes() for p in (run_dir / "plots").iterdir()}
    assert sorted(plots) == ["grad_norm.png", "loss.png", "lr.png", "throughput.png"]  # no mfu, no accuracy
    for png in plots.values():
        assert png[:8] == PNG_SIGNATURE and len(png) > 10_000
        width, height = struct.unpack(">II", png[16:24])  # IHDR
        assert (width, height) == (960, 540)


def test_secret_keys_are_recognised_without_losing_tokenizer_settings():
    for key in ["token", "hf_token", "HF_TOKEN", "hubToken", "auth_token", "wandb_api_key", "apiKey", "api-key",
                "db_password", "client_secret", "credentials"]:
        assert is_secret_key(key), key
    for key in ["tokenizer", "tokens_per_step", "eos_token", "pad_token", "max_tokens", "special_tokens",
                "num_tokens", "tokenize", "keyword", "lr"]:
        assert not is_secret_key(key), key
    assert redact({"a": [{"token": 1, "b": 2}], "s": {"password": "x"}}) == {"a": [{"b": 2}], "s": {}}


def test_auto_mode_goes_online_only_with_credentials(tmp_path, monkeypatch):
    from wandb.sdk import wandb_setup

    monkeypatch.delenv("WANDB_MODE")
    assert resolve_mode("auto") == "offline"  # no key, empty netrc path: never prompts, never online
    host = urlsplit(wandb_setup.singleton().settings.base_url).netloc
    (tmp_path / "netrc").write_text(f"machine {host}\n  login user\n  password {'a' * 40}\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert tracking.has_wandb_login() and resolve_mode("auto") == "online"  # a stored `wandb login`
    monkeypatch.setenv("NETRC", str(tmp_path / "missing"))
    monkeypatch.setenv("WANDB_API_KEY", "b" * 40)
    assert resolve_mode("auto") == "online" and resolve_mode("offline") == "offline"
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert resolve_mode("auto") == "offline" and resolve_mode("online") == "online"
    monkeypatch.setenv("WANDB_MODE", "disabled")
    t = Tracker(tmp_path / "run", TrackingConfig(), "pretrain", {}, rank=0)
    t.finish()
    assert t.run_id is None and not (tmp_path / "run" / "wandb").exists()


def _refuse_non_standard(constant: str):
    raise ValueError(f"not strict JSON: {constant}")


def test_metrics_jsonl_is_strict_json_with_null_for_non_finite_values_while_wandb_gets_the_floats(tmp_path):
    sent = []

    class FakeRun:  # stands in for a live W&B run: records what `log` was given
        def log(self, values, step):
            sent.append((step, values))

        def finish(self, exit_code=0):
            pass

    run_dir = tmp_path / "run"
    t = Tracker(run_dir, TrackingConfig(wandb=False), "pretrain", {}, rank=0)
    t._run = FakeRun()
    t.log(1, {"train/loss": float("nan"), "train/grad_norm": float("inf"), "train/mfu": np.float32("-inf"),
              "train/lr": 1e-3, "eval": {"val/loss": float("nan"), "per_task": [1.0, float("inf")]}})
    t.log(2, {"train/loss": np.float64("nan"), "train/tokens": np.int64(4096)})
    t.finish()

    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line, parse_constant=_refuse_non_standard) for line in lines]  # raises on NaN/Infinity
    assert records == [{"step": 1, "train/loss": None, "train/grad_norm": None, "train/mfu": None, "train/lr": 1e-3,
                        "eval": {"val/loss": None, "per_task": [1.0, None]}},
                       {"step": 2, "train/loss": None, "train/tokens": 4096}]
    assert read_metrics(run_dir / "metrics.jsonl") == records
    (step, values), _ = sent
    assert step == 1 and np.isnan(values["train/loss"]) and values["train/grad_norm"] == float("inf")
    assert values["train/mfu"] == float("-inf") and np.isnan(values["eval"]["val/loss"])
    assert np.isnan(sent[1][1]["train/loss"])


def test_resume_rewrites_an_older_file_with_bare_nan_as_strict_json_and_plots_skip_nulls(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": NaN, "train/lr": 0.001}\n'
                                           '{"step": 2, "train/loss": 2.5, "train/lr": Infinity}\n'
                                           '{"step": 3, "train/loss": 2.0}\n')
    with Tracker(run_dir, TrackingConfig(wandb=False), "pretrain", {}, rank=0, resume_step=3) as t:
        t.log(3, {"train/loss": 1.5, "train/lr": 1e-3})
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line, parse_constant=_refuse_non_standard) for line in lines] == [
        {"step": 1, "train/loss": None, "train/lr": 0.001}, {"step": 2, "train/loss": 2.5, "train/lr": None},
        {"step": 3, "train/loss": 1.5, "train/lr": 1e-3}]
    assert sorted(p.name for p in (run_dir / "plots").iterdir()) == ["loss.png", "lr.png"]
