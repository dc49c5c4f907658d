"""Distillation on 2 ranks (gloo, CPU): a ZeRO-3-partitioned teacher gives the replicated teacher's training,
a killed run resumes bit for bit and refuses a changed teacher, and classifier distillation with its no-KD
baseline exports a plain classifier with the teacher's labels and a report."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import word_tasks
from tests.harness import ROOT, distill_config, launch


def metrics(run_dir) -> dict[int, dict]:
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r for r in rows if "train/loss" in r}


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final" / "model.safetensors"))


def wide_teacher(root, tiny_lm):
    """A 2-layer Llama of width 256 with tiny_lm's tokenizer: its matrices (131k elements) are above ZeRO-3's
    persistence threshold (1e5), so partitioning really splits them (tiny_lm's are all kept whole)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    out = root / "wide-teacher"
    shutil.copytree(tiny_lm, out, ignore=shutil.ignore_patterns("*.safetensors", "config.json", "generation_config.json"))
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 bos_token_id=None, eos_token_id=0, pad_token_id=1)).save_pretrained(out)
    return out


def test_a_zero3_teacher_trains_the_student_as_a_replicated_one_does(tmp_path, tiny_lm, tiny_data):
    """The teacher partitioned by its own ZeRO-3 engine (its large matrices split over the ranks, forwards in step)
    beside a ZeRO-2 student: the same losses and weights as the teacher whole on every rank; the export loads as a
    causal LM and the report compares the two models. A run stopped after its last save (its export lost) exports
    and reports the scores it had."""
    import re

    teacher = wide_teacher(tmp_path, tiny_lm)
    runs = {}
    for name, zero3 in (("replicated", False), ("partitioned", True)):
        cfg = distill_config(tmp_path / f"{name}.yaml", teacher, tmp_path / name, tiny_data, teacher_zero3=zero3)
        proc = launch("distill", cfg, nproc=2)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("teacher partitioned (ZeRO-3)" in proc.stdout) == zero3, proc.stdout
        if zero3:
            held, whole = (int(n.replace(",", "")) for n in re.search(
                r"teacher partitioned by ZeRO-3: ([\d,]+) of its ([\d,]+) parameters", proc.stdout).groups())
            assert held < 0.6 * whole, (held, whole)  # split over 2 ranks, small vectors kept whole
        runs[name] = tmp_path / name
    a, b = metrics(runs["replicated"]), metrics(runs["partitioned"])
    assert a.keys() == b.keys() == set(range(1, 7))
    for step in a:
        for key in ("train/loss", "train/divergence"):
            assert abs(a[step][key] - b[step][key]) < 1e-5, (step, key, a[step][key], b[step][key])
    wa, wb = weights(runs["replicated"]), weights(runs["partitioned"])
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    from transformers import AutoModelForCausalLM

    student = AutoModelForCausalLM.from_pretrained(runs["partitioned"] / "final")
    assert student.config.num_hidden_layers == 1
    report = json.loads((runs["partitioned"] / "report.json").read_text())
    assert report["kind"] == "language-model" and report["models"]["teacher"]["params"] > report["models"]["student"]["params"]
    assert report["speedup"] > 1.0 and report["beats_baseline"] is None  # half the layers of the wide teacher
    assert report["ppl_ratio"] == pytest.approx(report["models"]["student"]["score"]["ppl"] /
                                                report["models"]["teacher"]["score"]["ppl"])
    assert report["models"]["teacher"]["score"]["ppl"] == json.loads(
        (runs["partitioned"] / "summary.json").read_text())["teacher"]["teacher/ppl"]
    lineage = json.loads((runs["partitioned"] / "final" / "lineage.json").read_text())
    assert lineage["stage"] == "distill" and lineage["parent"] == str(teacher.resolve())
    # the export and the report lost (a kill after the last save): the rerun exports and reports the same scores
    run = runs["replicated"]
    before = json.loads((run / "report.json").read_text())
    shutil.rmtree(run / "final")
    for name in ("report.json", "report.md", "summary.json"):
        (run / name).unlink()
    again = launch("distill", tmp_path / "replicated.yaml", nproc=2)
    assert again.returncode == 0 and "at step 6" in again.stdout, again.stderr[-3000:]
    after = json.loads((run / "report.json").read_text())
    assert after["ppl_ratio"] == before["ppl_ratio"] is not None
    assert json.loads((run / "summary.json").read_text())["val"]["val/ppl"] == before["models"]["student"]["score"]["ppl"]


def test_a_killed_distillation_resumes_bit_for_bit_and_refuses_another_teacher(tmp_path, tiny_lm, tiny_data):
    teacher = tmp_path / "teacher"
    shutil.copytree(tiny_lm, teacher)
    common = {"kd": {"divergence": "reverse", "hidden": {"pairs": [[1, 2]], "loss": "cosine"}}}
    straight = distill_config(tmp_path / "a.yaml", teacher, tmp_path / "straight", tiny_data, **common)
    assert launch("distill", straight, nproc=2).returncode == 0
    broken = distill_config(tmp_path / "b.yaml", teacher, tmp_path / "broken", tiny_data, **common)
    killed = launch("distill", broken, nproc=2, env={"LMFORGE_FAULT": "save-committed:3:0"})
    assert killed.returncode != 0 and not (tmp_path / "broken" / "final").exists()
    resumed = launch("distill", broken, nproc=2)
    assert resumed.returncode == 0 and "at step 3" in resumed.stdout, resumed.stderr[-3000:]
    assert "teacher: val" not in resumed.stdout  # the teacher's score came from the checkpoint, not a new pass
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "broken")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    for step in range(1, 7):  # steps 4-6 logged once, identically (the kill came after step 3's save)
        for key in ("train/loss", "train/divergence", "train/grad_norm"):
            assert metrics(tmp_path / "straight")[step][key] == metrics(tmp_path / "broken")[step][key], (step, key)
    # the teacher changes under the run: resuming against it is refused, and nothing in the run changes
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.01) if not model.config.tie_word_embeddings else \
            model.model.embed_tokens.weight.mul_(1.01)
    model.save_pretrained(teacher)
    record = (tmp_path / "broken" / "checkpoints").iterdir()
    before = sorted(p.name for p in record)
    refused = launch("distill", broken, "train.max_steps=8")  # one rank: torchrun reports any refusal as 1
    assert refused.returncode == 2 and "another teacher" in refused.stderr, refused.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "broken" / "checkpoints").iterdir()) == before


def test_classifier_distillation_with_a_baseline_exports_a_classifier_and_a_report(tmp_path, tiny_classifier):
    files = word_tasks(tmp_path / "tasks")
    cfg = distill_config(tmp_path / "c.yaml", tiny_classifier, tmp_path / "run", files=files,
                         engine={"deepspeed": str(ROOT / "configs" / "deepspeed" / "zero3.json")},
                         report={"baseline": True, "speed_runs": 2}, tracking={"plots": True})
    proc = launch("distill", cfg, nproc=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "run"
    config = json.loads((run / "final" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"] and config["num_hidden_layers"] == 1
    assert config["id2label"] == {"0": "alpha", "1": "beta", "2": "gamma"}
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(run / "final")
    baseline = metrics(run / "baseline")
    assert baseline and all("train/divergence" not in r for r in baseline.values())
    assert all("train/divergence" in r for r in metrics(run).values())
    assert "kd alpha 0," in proc.stdout and "no-KD baseline" in proc.stdout
    report = json.loads((run / "report.json").read_text())
    assert set(report["models"]) == {"teacher", "student", "baseline"}
    assert report["models"]["baseline"]["score"]["split"] == "test"
    assert isinstance(report["beats_baseline"], bool) and 0 < report["retention"]
    assert report["targets"]["retention"]["target"] == 0.97
    assert (run / "report.md").read_text().startswith("# Distillation report (classifier)")
    assert (run / "plots" / "report.png").stat().st_size > 10_000
    # a rerun finds both runs finished and leaves them as they are
    again = launch("distill", cfg, nproc=2)
    assert again.returncode == 0 and again.stdout.count("already finished") == 2, again.stdout[-2000:]
