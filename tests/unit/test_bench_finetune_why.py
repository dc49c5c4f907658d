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
