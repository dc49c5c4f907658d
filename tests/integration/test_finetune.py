"""The fine-tuning stage as a user runs it (one rank): both task kinds from a causal LM folder, the export
loading with transformers alone (pipeline predictions = what the stage reported), and bad input refused with
the file, line and field named before any work."""

from __future__ import annotations

import json
import re

import pytest

from tests.conftest import write_jsonl
from tests.harness import finetune_config, launch

pytestmark = pytest.mark.slow


def no_worker_traceback(stderr: str) -> bool:
    return not re.search(r'File ".*/(lmforge|finetune|deepspeed)/', stderr)


def test_classification_exports_a_model_whose_pipeline_predicts_what_the_stage_reported(tmp_path, tiny_lm, tasks_data):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, pipeline

    cfg = finetune_config(tmp_path / "c.yaml", tiny_lm, tmp_path / "run", "classification", tasks_data,
                          tracking={"plots": True})
    proc = launch("finetune", cfg)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "FutureWarning" not in proc.stderr
    assert "classification: 96 train / 24 validation / 24 test examples, 3 labels" in proc.stdout
    final = tmp_path / "run" / "final"
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    confusion = summary["test"]["test/confusion"]  # [truth][prediction], from the stage
    model = AutoModelForSequenceClassification.from_pretrained(final)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    assert model.config.id2label == {0: "alpha", 1: "beta", 2: "gamma"} and model.config.pad_token_id == 1
    classify = pipeline("text-classification", model=str(final), tokenizer=AutoTokenizer.from_pretrained(final))
    mine = [[0] * 3 for _ in range(3)]
    for line in tasks_data["cls_test"].read_text().splitlines():
        example = json.loads(line)
        predicted = classify(example["text"])[0]["label"]
        mine[model.config.label2id[example["label"]]][model.config.label2id[predicted]] += 1
    assert mine == confusion
    assert summary["test"]["test/accuracy"] == pytest.approx(sum(confusion[i][i] for i in range(3)) / 24)
    card = (final / "README.md").read_text()
    assert "pipeline_tag: text-classification" in card and "`alpha`, `beta`, `gamma`" in card
    assert "test/accuracy" in card and "finetune" in card
    lineage = json.loads((final / "lineage.json").read_text())
    assert lineage["stage"] == "finetune" and lineage["parent"] == str(tiny_lm)
    assert lineage["data"]["examples"] == 96
    assert [r["label"] for r in summary["per_class"]] == ["alpha", "beta", "gamma"]
    assert sum(r["support"] for r in summary["per_class"]) == 24 and "per class (test):" in proc.stdout
    assert (tmp_path / "run" / "plots" / "confusion.png").stat().st_size > 1000
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {"val/accuracy", "val/macro_f1"} <= metrics[0].keys() and metrics[-1]["test/accuracy"] >= 0


def test_sft_saves_its_chat_template_and_learns_only_responses(tmp_path, tiny_lm, tasks_data):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg = finetune_config(tmp_path / "s.yaml", tiny_lm, tmp_path / "run", "sft", tasks_data,
                          train={"max_steps": 4, "eval_every": 2, "save_every": 2})
    proc = launch("finetune", cfg)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert re.search(r"step 4: loss [\d.]+, ppl [\d.]+, exact_match [\d.]+%", proc.stdout), proc.stdout[-2000:]
    final = tmp_path / "run" / "final"
    tok = AutoTokenizer.from_pretrained(final)  # the default template came along: prompts render as in training
    prompt = tok.apply_chat_template([{"role": "user", "content": "reverse abc"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt == "### Instruction:\nreverse abc\n\n### Response:\n"
    model = AutoModelForCausalLM.from_pretrained(final)
    assert (final / "generation_config.json").is_file() and model.config.eos_token_id == 0
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["task"] == "sft" and 0 <= summary["test"]["test/exact_match"] <= 1
    assert summary["val"]["val/loss"] < summary["val_start"]["val/loss"]  # it learned something in 4 steps
    # transformers' own pipeline, from final/ alone, answers the scored prompts as the stage did
    from transformers import pipeline

    generate = pipeline("text-generation", model=str(final))
    prompts = [json.loads(x)["prompt"] for x in tasks_data["sft_test"].read_text().splitlines()[:4]]
    mine = [generate([{"role": "user", "content": p}], max_new_tokens=6, do_sample=False)[0]["generated_text"][-1]
            ["content"].strip() for p in prompts]
    assert mine == summary["test"]["test/answers"] and len(mine) == 4 and all(mine)


@pytest.mark.parametrize("problem, message", [
    ("unseen_label", r"cls_validation.jsonl:2: label 'delta' never occurs in the train split"),
    ("missing_field", r"cls_train.jsonl:3: no field 'text'"),
    ("empty_test", r"cls_test.jsonl: the test split is empty"),
])
def test_bad_data_is_refused_before_any_work_naming_file_line_and_field(tmp_path, tiny_lm, tasks_data, problem,
                                                                          message):
    files = dict(tasks_data)
    rows = {s: [json.loads(x) for x in files[f"cls_{s}"].read_text().splitlines()]
            for s in ("train", "validation", "test")}
    if problem == "unseen_label":
        rows["validation"][1]["label"] = "delta"
    elif problem == "missing_field":
        rows["train"][2] = {"txt": "alpha", "label": "alpha"}
    else:
        rows["test"] = []
    for split, records in rows.items():
        files[f"cls_{split}"] = write_jsonl(tmp_path / f"cls_{split}.jsonl", records)
    cfg = finetune_config(tmp_path / "c.yaml", tiny_lm, tmp_path / "run", "classification", files)
    proc = launch("finetune", cfg)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert re.search(message, proc.stderr) and no_worker_traceback(proc.stderr), proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # nothing written: the error came before the run opened


def test_an_init_from_that_is_not_a_causal_lm_is_refused(tmp_path, tiny_lm, tasks_data):
    cfg = finetune_config(tmp_path / "c.yaml", tmp_path, tmp_path / "run", "classification", tasks_data)
    proc = launch("finetune", cfg)
    assert proc.returncode == 2 and "is not a Hugging Face model folder (no config.json)" in proc.stderr
    assert no_worker_traceback(proc.stderr)


@pytest.mark.parametrize("kind", ["sft", "classification"])
def test_lora_exports_the_merged_model_and_an_adapter_that_gives_the_same_logits(tmp_path, tiny_lm, tasks_data, kind):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    cfg = finetune_config(tmp_path / "l.yaml", tiny_lm, tmp_path / "run", kind, tasks_data,
                          lora={"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj", "down_proj"]},
                          train={"max_steps": 4, "eval_every": 4, "save_every": 4})
    proc = launch("finetune", cfg)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "FutureWarning" not in proc.stderr and "LoRA r=4" in proc.stdout
    final = tmp_path / "run" / "final"
    summary = json.loads((final.parent / "summary.json").read_text())
    total = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(tiny_lm).parameters())
    assert 0 < summary["trainable_params"] < total / 4  # adapters (and a classifier's head) only
    x = torch.tensor([[5, 17, 42, 99, 7, 3]])
    if kind == "sft":
        merged = AutoModelForCausalLM.from_pretrained(final)
        base = AutoModelForCausalLM.from_pretrained(tiny_lm)
    else:
        merged = AutoModelForSequenceClassification.from_pretrained(final)
        base = AutoModelForSequenceClassification.from_pretrained(
            tiny_lm, num_labels=3, id2label=merged.config.id2label, label2id=merged.config.label2id, pad_token_id=1)
    adapted = PeftModel.from_pretrained(base, final / "adapter")
    assert type(merged).__name__.startswith("Llama") and not hasattr(merged, "peft_config")  # plain transformers
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=x).logits, adapted(input_ids=x).logits, rtol=1e-5, atol=1e-5)
        with adapted.disable_adapter():  # the adapter changed the model: without it the logits differ
            assert not torch.allclose(adapted(input_ids=x).logits, merged(input_ids=x).logits, atol=1e-4)
    assert "LoRA" in (final / "README.md").read_text()
    assert not (final.parent / "plots").exists()  # tracking.plots: false (the harness's) writes no plot at all


def test_dry_run_prints_the_resolved_config_and_sizes_and_writes_nothing(tmp_path, tiny_lm, tasks_data):
    cfg = finetune_config(tmp_path / "c.yaml", tiny_lm, tmp_path / "run", "classification", tasks_data)
    proc = launch("finetune", cfg, "train.max_steps=7", "--dry-run")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "max_steps: 7" in proc.stdout and '"zero_optimization"' in proc.stdout
    assert "# parameters:" in proc.stdout and "96 train / 24 validation / 24 test examples, 3 labels" in proc.stdout
    assert not (tmp_path / "run").exists()
