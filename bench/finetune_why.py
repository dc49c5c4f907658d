"""Why pretrained does not beat random init on the built-in classification task at demo scale.

    python bench/finetune_why.py                  # after bench/finetune.py (it reuses that work folder's models)
    python bench/finetune_why.py --longer 1000    # also pretrain the demo model for 1,000 steps and compare it

Measurements over the starting models bench/finetune.py compares (the demo pretraining run's final/ and the
same architecture from random init, in bench/work/finetune), and with --longer N a third: the same demo
pretraining config run for N steps instead of 400 (same data, schedule stretched to N):

1. Learning rate. The classification fine-tune (`torchrun --nproc_per_node=2 -m finetune
   configs/finetune/demo.yaml`, 300 steps, global batch 32, cosine to lr/10) from each model at peak lr 1e-4,
   3e-4 and 1e-3: test accuracy and macro-F1. A run whose summary.json exists is not rerun.
2. The features. A linear probe (standardised features, L2-regularised logistic regression by L-BFGS,
   fitted on train, scored on validation and test) on each frozen model's final hidden state at the last
   token (what the classifier reads) and averaged over the tokens: how much class information each body
   carries before any fine-tuning. Beside them, always answering train's most frequent class.

Writes bench/results/finetune_why.json and the "Fine-tuning: why" section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)  # bench/tokenize.py must not shadow the standard library's tokenize

from bench.report import write_section  # noqa: E402
from bench.train import torchrun  # noqa: E402

BEGIN, END = "<!-- bench:finetune-why:begin -->", "<!-- bench:finetune-why:end -->"
WORK = ROOT / "bench" / "work" / "finetune"
MODELS = {"pretrained": WORK / "pretrain" / "final", "random init": WORK / "random-init"}
LONGER = "pretrained longer"
LRS = (1e-4, 3e-4, 1e-3)
STEPS = 300


def pretrain_longer(steps: int) -> Path:
    """The demo pretraining config run for `steps` steps into its own folder (skipped when finished)."""
    run_dir = WORK / f"pretrain-{steps}"
    print(f"[bench] pretraining the demo model for {steps} steps (skipped when finished)", flush=True)
    torchrun(f"pretrain-{steps}", ["-m", "pretrain", str(ROOT / "configs" / "pretrain" / "demo.yaml"),
                                   f"run_dir={run_dir}", f"data.path={WORK / 'data'}", f"train.max_steps={steps}",
                                   "train.save_every=1000000000", "tracking.wandb=false", "tracking.plots=false"],
             WORK / "logs", 4 * 3600)
    return run_dir / "final"


def sweep(models: dict, lrs: dict) -> dict:
    """{model: {lr: test scores}} of the classification fine-tune from each model at each of its peak lrs."""
    out: dict = {}
    for name, folder in models.items():
        for lr in lrs[name]:
            run_dir = WORK / "why" / f"cls-{name.replace(' ', '-').replace('-init', '')}-{lr:g}"
            if not (run_dir / "summary.json").is_file():
                print(f"[bench] {run_dir.name}: {STEPS} steps ...", flush=True)
                torchrun(run_dir.name, ["-m", "finetune", str(ROOT / "configs" / "finetune" / "demo.yaml"),
                                        f"run_dir={run_dir}", f"init_from={folder}", f"optim.lr={lr}",
                                        f"optim.min_lr={lr / 10}", f"train.max_steps={STEPS}", "train.eval_every=100",
                                        "train.save_every=1000000000", "tracking.wandb=false", "tracking.plots=false"],
                         WORK / "logs", 3600)
            s = json.loads((run_dir / "summary.json").read_text())
            out.setdefault(name, {})[f"{lr:g}"] = {k: s["test"][f"test/{k}"] for k in ("accuracy", "macro_f1")}
    return out


def scores(pred, truth, classes: int) -> dict:
    """Accuracy and macro-F1 (over every class) of predicted class ids against the truth."""
    f1 = [2 * int(((pred == c) & (truth == c)).sum()) / max(int((pred == c).sum()) + int((truth == c).sum()), 1)
          for c in range(classes)]
    return {"accuracy": float((pred == truth).float().mean()), "macro_f1": sum(f1) / len(f1)}


def fit_probe(x, y, classes: int):
    """(linear layer, mean, std): logistic regression on standardised `x`, L2 1e-3, L-BFGS 300 iterations."""
    import torch

    mu, sd = x.mean(0), x.std(0) + 1e-6
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear((x - mu) / sd), y) + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return linear, mu, sd


def probe(models: dict) -> dict:
    """{model: {pooling: {split: (accuracy, macro-F1)}}} of a linear probe on each frozen body's features,
    and {"majority": {split: ...}}: always train's most frequent class."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from finetune import tasks

    data = tasks.build("stdlib-docstring-package")
    index = {label: i for i, label in enumerate(data["labels"])}
    tokenizer = AutoTokenizer.from_pretrained(MODELS["pretrained"])
    out: dict = {}
    majority = index[max(index, key=lambda label: sum(e["label"] == label for e in data["train"]))]
    for split in ("validation", "test"):
        truth = torch.tensor([index[e["label"]] for e in data[split]])
        out.setdefault("majority", {})[split] = scores(torch.full_like(truth, majority), truth, len(index))
    for name, folder in models.items():
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        feats: dict = {}
        for split in tasks.SPLITS:
            rows = []
            for e in data[split]:
                ids = tokenizer(e["text"], truncation=True, max_length=128, return_tensors="pt").input_ids
                with torch.no_grad():
                    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
                rows.append((hidden[-1], hidden.mean(0)))
            labels = torch.tensor([index[e["label"]] for e in data[split]])
            feats[split] = (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]), labels)
        for p, pooling in enumerate(("last token", "mean")):
            linear, mu, sd = fit_probe(feats["train"][p], feats["train"][2], len(index))
            for split in ("validation", "test"):
                with torch.no_grad():
                    pred = linear((feats[split][p] - mu) / sd).argmax(-1)
                out.setdefault(name, {}).setdefault(pooling, {})[split] = scores(pred, feats[split][2], len(index))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--longer", type=int, default=None, help="also pretrain the demo model for this many steps")
    args = parser.parse_args()
    if not all((f / "config.json").is_file() for f in MODELS.values()):
        raise SystemExit(f"run `python bench/finetune.py` first: it makes the two models in {WORK}")
    models, lrs = dict(MODELS), {name: LRS for name in MODELS}
    if args.longer:
        models[LONGER], lrs[LONGER] = pretrain_longer(args.longer), (1e-3,)  # the demo config's lr
    pre = {name: json.loads((folder.parent / "summary.json").read_text()) for name, folder in models.items()
           if name != "random init"}
    report = {"benchmark": "finetune_why", "date": datetime.date.today().isoformat(), "steps": STEPS,
              "pretraining": {n: {k: s.get(k) for k in ("steps", "tokens", "val_loss", "val_ppl")} for n, s in pre.items()},
              "lr_sweep": sweep(models, lrs), "linear_probe": probe(models)}
    out = ROOT / "bench" / "results" / "finetune_why.json"
    out.write_text(json.dumps(report, indent=1) + "\n")
    write_section(ROOT / "BENCHMARKS.md", BEGIN, END, "Fine-tuning: why", "\n".join(table(report)))
    return 0


def table(report: dict) -> list[str]:
    pct = "{:.1%}".format
    both = lambda c: f"{pct(c['accuracy'])} / {pct(c['macro_f1'])}"  # noqa: E731
    sweep_, probe_, pre = report["lr_sweep"], report["linear_probe"], report["pretraining"]
    names = list(sweep_)
    described = "; ".join(f"*{n}*: {p['steps']} steps, {p['tokens'] / 1e6:.1f}M tokens, val perplexity "
                          f"{p['val_ppl']:.0f}" for n, p in pre.items())
    lines = [BEGIN, f"Measured {report['date']} by `python bench/finetune_why.py` (2 CPU ranks, fp32, ZeRO-2) over the "
             f"starting models of the table above ({described}). **Learning rate**: the classification fine-tune, "
             f"{report['steps']} steps, global batch 32, cosine to lr/10, from each model (test accuracy / macro-F1):",
             "", "| peak lr | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for lr in sorted({lr for n in names for lr in sweep_[n]}, key=float):
        lines.append(f"| {lr} | " + " | ".join(both(sweep_[n][lr]) if lr in sweep_[n] else "" for n in names) + " |")
    lines += ["", "**Features before fine-tuning**: a linear probe on each frozen model's final hidden state "
              "(test accuracy / macro-F1; validation in the JSON), beside always answering train's most frequent "
              f"class ({both(probe_['majority']['test'])}):", "",
              "| pooling | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for pooling in ("last token", "mean"):
        lines.append(f"| {pooling} | " + " | ".join(both(probe_[n][pooling]["test"]) for n in names) + " |")
    p, r = sweep_["pretrained"], sweep_["random init"]
    beaten = [lr for lr in p if r[lr]["accuracy"] > p[lr]["accuracy"] and r[lr]["macro_f1"] > p[lr]["macro_f1"]]
    gaps = {k: probe_["pretrained"][k]["test"]["macro_f1"] - probe_["random init"][k]["test"]["macro_f1"]
            for k in ("last token", "mean")}
    lines += ["", f"Random init beats the demo-pretrained model at {len(beaten)} of {len(p)} learning rates "
              f"({', '.join(beaten) or 'none'}). The linear probe on the frozen pretrained body against the random "
              f"body's: {gaps['last token'] * 100:+.1f} macro-F1 points over the last token (what the classifier "
              f"reads), {gaps['mean'] * 100:+.1f} over the mean of the tokens. The classifier's new "
              "head is initialised the same way for every model (`score`, normal with `initializer_range`)."]
    if LONGER in sweep_:
        longer = sweep_[LONGER]["0.001"]
        lines.append(f"Pretrained {pre[LONGER]['steps']} steps instead of {pre['pretrained']['steps']}, at lr 0.001: "
                     f"{both(longer)}, against {both(p['0.001'])} (demo pretraining) and {both(r['0.001'])} (random "
                     "init).")
    return lines + [END]


if __name__ == "__main__":
    raise SystemExit(main())
