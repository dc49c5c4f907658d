"""bench/finetune_why.py's table states what its numbers say, not a fixed conclusion."""

from __future__ import annotations

from bench.finetune_why import LONGER, table


def report(pretrained: float, random: float, longer: float | None = None) -> dict:
    scores = lambda x: {"accuracy": x, "macro_f1": x / 2}  # noqa: E731
    sweep = {"pretrained": {lr: scores(pretrained) for lr in ("0.0001", "0.001")},
             "random init": {lr: scores(random) for lr in ("0.0001", "0.001")}}
    probe = {"majority": {"test": scores(0.5)},
             **{m: {k: {"test": scores(v)} for k in ("last token", "mean")}
                for m, v in (("pretrained", pretrained), ("random init", random))}}
    pre = {"pretrained": {"steps": 400, "tokens": 1.6e6, "val_loss": 4.3, "val_ppl": 76.0}}
    if longer is not None:
        sweep[LONGER] = {"0.001": scores(longer)}
        probe[LONGER] = {k: {"test": scores(longer)} for k in ("last token", "mean")}
        pre[LONGER] = {"steps": 1000, "tokens": 4.1e6, "val_loss": 3.9, "val_ppl": 50.0}
    return {"date": "2026-11-30", "steps": 300, "pretraining": pre, "lr_sweep": sweep, "linear_probe": probe}


def test_the_conclusion_follows_the_numbers():
    lost = "\n".join(table(report(0.6, 0.7)))
    assert "at 2 of 2 learning rates" in lost and "-5.0 macro-F1 points over the last token" in lost
    won = "\n".join(table(report(0.8, 0.7)))
    assert "at 0 of 2 learning rates (none)" in won and "+5.0 macro-F1 points" in won
    longer = "\n".join(table(report(0.6, 0.7, longer=0.75)))
    assert "| pretrained | random init | pretrained longer |" in longer
    assert "Pretrained 1000 steps instead of 400, at lr 0.001: 75.0% / 37.5%" in longer


def test_the_head_and_seed_sections_conclude_from_their_numbers():
    scores = lambda x: {"accuracy": x, "macro_f1": x / 2}  # noqa: E731
    r = report(0.6, 0.7)
    r["heads"] = {"pretrained": {"zero": scores(0.65), "probe": scores(0.8)},
                  "random init": {"zero": scores(0.7), "probe": scores(0.72)}}
    r["seeds"] = {"pretrained": [scores(0.6), scores(0.62), scores(0.58)],
                  "random init": [scores(0.7), scores(0.71), scores(0.69)]}
    text = "\n".join(table(r))
    assert "| probe | 80.0% / 40.0% | 72.0% / 36.0% |" in text
    assert "With its best head, the demo-pretrained model (80.0% / 40.0%) beats random init with its best (72.0% / 36.0%)" in text
    assert "| pretrained | 60.0% ± 2.0% | 30.0% ± 1.0% |" in text
    assert ("Pretrained minus random init: -10.0 accuracy points on average, against a seed spread of 2.0 (beyond "
            "twice the spread); -5.0 macro-F1 points on average, against a seed spread of 1.0 (beyond twice") in text
    assert "|\n\nWith its best head" in text  # a paragraph after a table needs a blank line (else it is a row)
    r["heads"]["pretrained"]["probe"] = scores(0.66)
    assert "(66.0% / 33.0%) does not beat random init" in "\n".join(table(r))


def test_a_probe_head_loads_as_the_classifiers_score(tmp_path):
    """The head experiment hands the stage a folder whose safetensors also hold `score.weight`: transformers'
    classifier must load it as its head (not draw a new one) and the body as it was."""
    import torch
    from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

    from bench.finetune_why import with_head

    torch.manual_seed(0)
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, num_key_value_heads=1, pad_token_id=0))
    lm.save_pretrained(tmp_path / "lm")
    head = torch.randn(3, 16)
    folder = with_head(tmp_path / "lm", head, tmp_path / "with-head")
    clf = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=3)
    assert torch.equal(clf.score.weight, head)
    assert torch.equal(clf.model.embed_tokens.weight, lm.model.embed_tokens.weight)
