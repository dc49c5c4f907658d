"""`python -m distill` as a user runs it, one process: a student narrower than the teacher learns the teacher's
hidden states through a projection that is not exported; `--dry-run`; and every bad input is a clear error before
any work (a teacher folder that is not a model, another tokenizer, a layer out of range, the wrong kind of teacher)."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from tests.conftest import word_tasks
from tests.harness import ROOT, distill_config, launch


def test_a_narrower_student_learns_hidden_states_through_a_projection_left_out_of_the_export(tmp_path, tiny_lm,
                                                                                         tiny_data):
    cfg = distill_config(tmp_path / "d.yaml", tiny_lm, tmp_path / "run", tiny_data,
                         student={"model": {"family": "llama", "hidden_size": 16, "num_layers": 1, "num_heads": 2,
                                            "intermediate_size": 32, "max_seq_len": 64}},
                         kd={"divergence": "jsd", "beta": 0.3, "hidden": {"pairs": [[1, 2]], "loss": "mse"}},
                         train={"max_steps": 4, "eval_every": 2, "save_every": 2})
    proc = launch("distill", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "hidden mse on [(1, 2)]" in proc.stdout and "jsd" in proc.stdout
    from safetensors.torch import load_file

    names = load_file(str(tmp_path / "run" / "final" / "model.safetensors")).keys()
    assert names and not any("distill_projections" in n for n in names)
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    saved = get_fp32_state_dict_from_zero_checkpoint(str(tmp_path / "run" / "checkpoints"), tag="step-00000004")
    assert tuple(saved["distill_projections.maps.0.weight"].shape) == (32, 16)  # trained and checkpointed
    config = json.loads((tmp_path / "run" / "final" / "config.json").read_text())
    assert config["hidden_size"] == 16 and config["vocab_size"] == 512
    # `lmforge export` of a checkpoint leaves the projection out too (the checkpoint's record says what to skip)
    import subprocess
    import sys

    exported = subprocess.run([sys.executable, "-m", "lmforge.cli", "export", str(tmp_path / "run"),
                               str(tmp_path / "export")], capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(ROOT)})
    assert exported.returncode == 0, exported.stderr[-2000:]
    assert load_file(str(tmp_path / "export" / "model.safetensors")).keys() == names


def test_dry_run_prints_the_config_and_the_student_without_work(tmp_path, tiny_lm, tiny_data):
    cfg = distill_config(tmp_path / "d.yaml", tiny_lm, tmp_path / "run", tiny_data)
    proc = launch("distill", cfg, "--dry-run", "kd.temperature=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "temperature: 4.0" in proc.stdout and "# DeepSpeed config" in proc.stdout
    assert f"teacher {tiny_lm} (LlamaForCausalLM" in proc.stdout and "student 1 layers" in proc.stdout
    assert not (tmp_path / "run").exists()


def test_bad_input_is_refused_before_any_work(tmp_path, tiny_lm, tiny_data, tiny_classifier, tiny_tokenizer):
    files = word_tasks(tmp_path / "tasks")
    other_tokenizer = tmp_path / "other-teacher"
    shutil.copytree(tiny_lm, other_tokenizer)
    data = json.loads((other_tokenizer / "tokenizer.json").read_text())
    data["added_tokens"].append({**data["added_tokens"][-1], "id": 511, "content": "<|other|>"})
    (other_tokenizer / "tokenizer.json").write_text(json.dumps(data))
    cases = {
        "not-a-model": (dict(teacher=tmp_path), "is not a Hugging Face model folder (no config.json)"),
        "tokenizer": (dict(teacher=other_tokenizer), "made with another tokenizer than the teacher"),
        "layer": (dict(student={"from_teacher": {"layers": [0, 5]}}), "[5] out of range; the teacher"),
        "classifier-teacher-for-shards": (dict(teacher=tiny_classifier), "holds a LlamaForSequenceClassification"),
        "lm-teacher-for-a-task": (dict(files=files), "distil a fine-tuned classifier"),
        "hidden-pair": (dict(kd={"hidden": {"pairs": [[3, 1]]}}), "kd.hidden.pairs: [3, 1] is out of range"),
    }
    for name, (change, message) in cases.items():
        args = {"teacher": tiny_lm, "data": tiny_data, **change}
        if "files" in args:
            args.pop("data")
        teacher = args.pop("teacher")
        cfg = distill_config(tmp_path / f"{name}.yaml", teacher, tmp_path / name, **args)
        proc = launch("distill", cfg, env={"DS_ACCELERATOR": "cpu"})
        assert proc.returncode == 2, (name, proc.stderr[-2000:])
        assert message in proc.stderr and "Traceback" not in proc.stderr, (name, proc.stderr[-2000:])
        assert not (tmp_path / name).exists(), name  # nothing written
    # a config mistake names the key
    cfg = distill_config(tmp_path / "typo.yaml", tiny_lm, tmp_path / "typo", tiny_data, kd={"temprature": 2})
    proc = launch("distill", cfg)
    assert proc.returncode == 2 and "kd.temprature" in proc.stderr, proc.stderr[-2000:]


def test_the_first_step_loss_is_alpha_t2_kl_plus_the_rest_cross_entropy(tmp_path, tiny_lm, tiny_data):
    """The stage's loss, recomputed from outside with the plain formulas on the first step's windows: the
    student's first weights (an init_from folder) and the teacher, KL(teacher || student) at T over the vocabulary
    times alpha T^2, plus (1 - alpha) x the next-token cross entropy, averaged over the step's micro-batches."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    from lmforge.data.sampler import WindowSampler
    from lmforge.data.shards import TokenShards

    start = tmp_path / "student"  # another model (its own seed) on the teacher's tokenizer: a KL far from 0
    shutil.copytree(tiny_lm, start, ignore=shutil.ignore_patterns("*.safetensors", "config.json", "generation_config.json"))
    torch.manual_seed(5)
    LlamaForCausalLM(LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                 bos_token_id=None, eos_token_id=0, pad_token_id=1)).save_pretrained(start)
    alpha, temperature = 0.3, 3.0
    cfg = distill_config(tmp_path / "d.yaml", tiny_lm, tmp_path / "run", tiny_data, student={"init_from": str(start)},
                         kd={"alpha": alpha, "temperature": temperature}, train={"max_steps": 1})
    proc = launch("distill", cfg)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step1 = next(r for r in logged if r.get("step") == 1 and "train/loss" in r)
    sampler = WindowSampler(TokenShards(tiny_data, "train"), 32, 1234)  # train.seed's default
    student = AutoModelForCausalLM.from_pretrained(start)
    teacher = AutoModelForCausalLM.from_pretrained(tiny_lm)
    losses, divergences = [], []
    with torch.no_grad():
        for m in range(2):  # micro 4 x 2 accumulation steps = the global batch of 8 on one rank
            x = sampler.batch(sampler.rank_positions(0, 4, 2, 0, 1, m))
            s, t = (net(input_ids=x[:, :-1]).logits.double() for net in (student, teacher))
            kl = F.kl_div(F.log_softmax(s / temperature, -1), F.log_softmax(t / temperature, -1), log_target=True,
                          reduction="none").sum(-1).mean()
            ce = F.cross_entropy(s.flatten(0, 1), x[:, 1:].flatten())
            losses.append(alpha * temperature ** 2 * kl + (1 - alpha) * ce)
            divergences.append(kl)
    kl = float(sum(divergences) / 2)
    assert kl > 1e-3  # the KD term weighs in the loss: a missing T^2 or a swapped alpha shows
    assert step1["train/loss"] == pytest.approx(float(sum(losses) / 2), rel=1e-5)
    assert step1["train/divergence"] == pytest.approx(kl, rel=1e-4)
