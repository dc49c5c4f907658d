"""`python -m pretrain` in one process: dry run, errors before work, gradient accumulation, resume, init_from."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ..conftest import ROOT, launch, pretrain_config, write_yaml


def losses(run_dir) -> list[float]:
    return [m["train/loss"] for m in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "train/loss" in m]


def test_dry_run_prints_config_deepspeed_sizes_and_does_no_work(tmp_path, tiny_data):
    cfg = pretrain_config(tmp_path / "p.yaml", tiny_data, tmp_path / "run")
    proc = launch("pretrain", cfg, "--dry-run", env={"WORLD_SIZE": "2"})
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert "run_dir:" in out and '"train_micro_batch_size_per_gpu": 4' in out and '"gradient_accumulation_steps": 1' in out
    assert '"stage": 2' in out and '"gradient_clipping": 1.0' in out and '"type": "AdamW"' in out
    assert "global batch 8 sequences = micro 4 x accum 1 x 2 ranks; 512 tokens per step" in out
    assert "parameters: 106,816" in out  # the tiny model with a 512-token vocabulary (counted in models.py)
    assert "FLOPs per token" in out
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (["batch.global_batch_size=10"], "batch.global_batch_size 10 is not a multiple of batch.micro_batch_size 4"),
    (["batch.grad_accum=3"], "batch.global_batch_size 8 != batch.micro_batch_size 4 x batch.grad_accum 3"),
    (["model.vocab_size=1000"], "model.vocab_size is 1000 but the data in"),
    (["data.seq_len=512"], "data.seq_len 512 is longer than model.max_seq_len 256"),
    (["engine.deepspeed=" + str(ROOT / "configs" / "deepspeed" / "nope.json")], "DeepSpeed config not found"),
])
def test_impossible_settings_fail_before_any_work(tmp_path, tiny_data, overrides, message):
    cfg = pretrain_config(tmp_path / "p.yaml", tiny_data, tmp_path / "run")
    proc = launch("pretrain", cfg, *overrides)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr
    assert not (tmp_path / "run").exists()


def test_a_deepspeed_json_that_sets_what_the_stage_owns_is_refused(tmp_path, tiny_data):
    bad = tmp_path / "zero.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 32, "bf16": {"enabled": True}}))
    cfg = pretrain_config(tmp_path / "p.yaml", tiny_data, tmp_path / "run", engine={"deepspeed": str(bad)})
    proc = launch("pretrain", cfg)
    assert proc.returncode == 2
    assert "'train_batch_size' (set batch.global_batch_size in the stage config)" in proc.stderr
    assert "'bf16' (set engine.precision in the stage config)" in proc.stderr


def test_missing_data_says_to_tokenize_first(tmp_path):
    cfg = pretrain_config(tmp_path / "p.yaml", tmp_path / "nothing", tmp_path / "run")
    proc = launch("pretrain", cfg)
    assert proc.returncode == 2 and "run `lmforge tokenize` first" in proc.stderr


def test_gradient_accumulation_matches_a_bigger_micro_batch(tmp_path, tiny_data):
    """4 sequences in one micro-batch or 2 x 2 accumulated: the same global batch, the same losses
    (to fp32 round-off: the mean is summed in another order)."""
    runs = {}
    for name, batch in (("big", {"micro_batch_size": 4, "grad_accum": 1, "global_batch_size": None}),
                        ("accum", {"micro_batch_size": 2, "grad_accum": 2, "global_batch_size": None})):
        cfg = pretrain_config(tmp_path / f"{name}.yaml", tiny_data, tmp_path / name, batch=batch,
                              train={"max_steps": 5, "log_every": 1, "eval_every": 100, "save_every": 100})
        proc = launch("pretrain", cfg)
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[name] = losses(tmp_path / name)
    assert len(runs["big"]) == 5
    assert runs["accum"] == pytest.approx(runs["big"], abs=2e-5)


def test_rerun_resumes_from_the_latest_checkpoint_and_a_finished_run_is_left_alone(tmp_path, tiny_data):
    cfg = pretrain_config(tmp_path / "p.yaml", tiny_data, tmp_path / "run",
                          train={"max_steps": 4, "log_every": 1, "eval_every": 2, "save_every": 2})
    first = launch("pretrain", cfg)
    assert first.returncode == 0, first.stderr[-3000:]
    again = launch("pretrain", cfg)
    assert again.returncode == 0 and "already finished 4 steps" in again.stdout
    longer = launch("pretrain", cfg, "train.max_steps=6")
    assert longer.returncode == 0, longer.stderr[-3000:]
    assert "resumed from" in longer.stdout and "at step 4" in longer.stdout
    steps = [m["step"] for m in map(json.loads, (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(steps) and steps[-1] == 6 and steps.count(5) == 1
    assert json.loads((tmp_path / "run" / "final" / "lineage.json").read_text())["step"] == 6

    # final/ from an earlier, shorter run (the export of step 6 never happened: killed during it) is not
    # taken for the finished run: the rerun exports step 6 again
    lineage = tmp_path / "run" / "final" / "lineage.json"
    lineage.write_text(json.dumps({**json.loads(lineage.read_text()), "step": 4}))
    stale = launch("pretrain", cfg, "train.max_steps=6")
    assert stale.returncode == 0 and "already finished" not in stale.stdout, stale.stderr[-3000:]
    assert "resumed from" in stale.stdout and json.loads(lineage.read_text())["step"] == 6


def test_a_different_model_or_different_data_cannot_resume_a_run(tmp_path, tiny_data):
    import shutil

    cfg = pretrain_config(tmp_path / "p.yaml", tiny_data, tmp_path / "run",
                          train={"max_steps": 2, "log_every": 1, "eval_every": 2, "save_every": 2})
    assert launch("pretrain", cfg).returncode == 0
    saved = (tmp_path / "run" / "config.yaml").read_bytes()
    proc = launch("pretrain", cfg, "model.num_layers=3", "train.max_steps=4")
    assert proc.returncode == 2 and "was saved by a different model config" in proc.stderr
    # the refused rerun left the run's config.yaml (which the message points to) as the run wrote it
    assert (tmp_path / "run" / "config.yaml").read_bytes() == saved
    other = tmp_path / "other_data"
    shutil.copytree(tiny_data, other)
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "source_fingerprint": "something-else"}))
    proc = launch("pretrain", cfg, f"data.path={other}", "train.max_steps=4")
    assert proc.returncode == 2 and "was trained on different data (fingerprint" in proc.stderr


def test_a_fresh_start_takes_the_datas_tokenizer_over_one_an_earlier_attempt_left(tmp_path, tiny_data):
    """An attempt that died before its first checkpoint left a tokenizer from other data in the run folder."""
    stale = tmp_path / "run" / "tokenizer"
    stale.mkdir(parents=True)
    (stale / "tokenizer.json").write_text('{"stale": true}')
    cfg = pretrain_config(tmp_path / "p.yaml", tiny_data, tmp_path / "run",
                          train={"max_steps": 2, "log_every": 1, "eval_every": 2, "save_every": 2})
    proc = launch("pretrain", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data_tokenizer = (tiny_data / "tokenizer" / "tokenizer.json").read_bytes()
    assert (stale / "tokenizer.json").read_bytes() == data_tokenizer
    assert (tmp_path / "run" / "final" / "tokenizer.json").read_bytes() == data_tokenizer


def test_a_resumed_run_logs_into_the_same_wandb_run(tmp_path, tiny_data):
    cfg = pretrain_config(tmp_path / "p.yaml", tiny_data, tmp_path / "run", tracking={"wandb": True},
                          train={"max_steps": 2, "log_every": 1, "eval_every": 2, "save_every": 2})
    assert launch("pretrain", cfg).returncode == 0
    run_id = (tmp_path / "run" / "wandb_id.txt").read_text().strip()
    record = json.loads((tmp_path / "run" / "checkpoints" / "step-00000002" / "lmforge.json").read_text())
    assert record["wandb_id"] == run_id
    proc = launch("pretrain", cfg, "train.max_steps=3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) or f"-{run_id}-" in r.name for r in runs), runs
    assert "less than the current step" not in proc.stdout + proc.stderr  # W&B's step-order warning


def test_init_from_continues_from_an_exported_model(tmp_path, tiny_data):
    base = pretrain_config(tmp_path / "base.yaml", tiny_data, tmp_path / "base",
                           train={"max_steps": 6, "log_every": 1, "eval_every": 6, "save_every": 6})
    assert launch("pretrain", base).returncode == 0
    start = json.loads((tmp_path / "base" / "summary.json").read_text())["val_loss"]
    cont = pretrain_config(tmp_path / "cont.yaml", tiny_data, tmp_path / "cont", init_from=str(tmp_path / "base" / "final"),
                           train={"max_steps": 2, "log_every": 1, "eval_every": 2, "save_every": 2})
    proc = launch("pretrain", cont)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "cont" / "summary.json").read_text())
    assert summary["val_loss_start"] == pytest.approx(start, abs=1e-4)  # it started from the exported weights
    lineage = json.loads((tmp_path / "cont" / "final" / "lineage.json").read_text())
    assert lineage["parent"] == str((tmp_path / "base" / "final").resolve())
    assert lineage["upstream"][0]["stage"] == "pretrain"  # the parent's own lineage, carried along


def test_a_blend_of_two_token_folders_trains_by_weight_and_resumes_on_another_rank_count(tmp_path, tiny_data,
                                                                                         tiny_tokenizer):
    """`data.mix`: two folders (one tokenizer), 0.75/0.25. The run reads them by weight, says so at start, counts
    what it read per source, and a resume on one rank after a stop on two continues the same stream: the rows
    trained after the resume are those the uninterrupted run trained."""
    from lmforge.data.sources import stdlib_files
    from pretrain import tokenize

    files = [str(p) for p in stdlib_files()[200:260]]
    other = write_yaml(tmp_path / "tok.yaml", {
        "out_dir": str(tmp_path / "other"), "sources": [{"type": "files", "paths": files, "format": "txt"}],
        "tokenizer": {"pretrained": str(tiny_tokenizer)}, "split": {"val_fraction": 0.1}, "workers": 1,
        "progress": False, "shard_bytes": 1 << 20})
    assert tokenize.main([str(other)]) == 0
    mix = {"mix": [{"path": str(tiny_data), "weight": 3}, {"path": str(tmp_path / "other"), "weight": 1}],
           "path": None}
    train = {"max_steps": 8, "log_every": 1, "eval_every": 4, "save_every": 4}
    whole = pretrain_config(tmp_path / "whole.yaml", tiny_data, tmp_path / "whole", train=train)
    cut = pretrain_config(tmp_path / "cut.yaml", tiny_data, tmp_path / "cut", train=train)
    for cfg in (whole, cut):
        data = yaml.safe_load(cfg.read_text())
        data["data"] = {**{k: v for k, v in data["data"].items() if k != "path"}, **{k: v for k, v in mix.items() if v}}
        cfg.write_text(yaml.safe_dump(data))
    (tmp_path / "trace-whole").mkdir()
    (tmp_path / "trace-cut").mkdir()
    proc = launch("pretrain", whole, nproc=2, env={"LMFORGE_TRACE_DIR": str(tmp_path / "trace-whole")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "data: " in proc.stdout and "75.0% of the windows" in proc.stdout and "25.0% of the windows" in proc.stdout
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    assert [s["windows_read"] for s in summary["data_sources"]] == [48, 16]  # 8 steps x 8 windows, by weight
    env = {"LMFORGE_TRACE_DIR": str(tmp_path / "trace-cut")}
    assert launch("pretrain", cut, "train.max_steps=4", nproc=2, env=env).returncode == 0
    resumed = launch("pretrain", cut, nproc=1, env=env)
    assert resumed.returncode == 0 and "resumed from" in resumed.stdout, resumed.stderr[-3000:]

    def rows(run: Path) -> dict:
        out = {}
        for trace in sorted(run.glob("trace-*.jsonl")):
            for line in trace.read_text().splitlines():
                entry = json.loads(line)
                out.setdefault(entry["step"], []).extend(map(tuple, entry["rows"]))
        return {step: sorted(r) for step, r in out.items()}

    assert rows(tmp_path / "trace-whole") == rows(tmp_path / "trace-cut")
    assert sorted(rows(tmp_path / "trace-cut")) == list(range(1, 9))
