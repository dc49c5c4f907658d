"""Why pretrained does not beat random init on the built-in classification task at demo scale.

    python bench/finetune_why.py                  # after bench/finetune.py (it reuses that work folder's models)
    python bench/finetune_why.py --longer 1000    # also pretrain the demo model for 1,000 steps and compare it
    python bench/finetune_why.py --longer 800 --heads --seeds 3    # and the head's init, and the seed spread

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
3. With --heads, the head's init, for the demo-pretrained and the random-init model. transformers draws
   the new `score` head at random (normal, std `initializer_range`), and its first, random gradients reach
   the body through every layer. The same fine-tune (lr 1e-3) with the head set instead to zero (no
   gradient reaches the body until the head has learned something) and to a linear probe fitted on that
   body's frozen last-token features (no bias, as `score` has none: linear probing, then fine-tuning, as
   in Kumar et al. 2022). The head goes in as `score.weight` in a copy of the model folder, which
   `...ForSequenceClassification.from_pretrained` loads.
4. With --seeds N, the lr 1e-3 fine-tune of both models again under train.seed 1..N-1 (the head's draw and
   the order of the examples change): the spread that one run's difference has to beat.

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


def finetune(name: str, folder: Path, lr: float, seed: int = 1234) -> dict:
    """Test accuracy and macro-F1 of the classification fine-tune from `folder` (a run whose summary.json
    exists is not rerun)."""
    run_dir = WORK / "why" / name
    if not (run_dir / "summary.json").is_file():
        print(f"[bench] {name}: {STEPS} steps ...", flush=True)
        torchrun(name, ["-m", "finetune", str(ROOT / "configs" / "finetune" / "demo.yaml"), f"run_dir={run_dir}",
                        f"init_from={folder}", f"optim.lr={lr}", f"optim.min_lr={lr / 10}", f"train.seed={seed}",
                        f"train.max_steps={STEPS}", "train.eval_every=100", "train.save_every=1000000000",
                        "tracking.wandb=false", "tracking.plots=false"], WORK / "logs", 3600)
    s = json.loads((run_dir / "summary.json").read_text())
    return {k: s["test"][f"test/{k}"] for k in ("accuracy", "macro_f1")}


def slug(name: str) -> str:
    return name.replace(" ", "-").replace("-init", "")


def sweep(models: dict, lrs: dict) -> dict:
    """{model: {lr: test scores}} of the classification fine-tune from each model at each of its peak lrs."""
    return {name: {f"{lr:g}": finetune(f"cls-{slug(name)}-{lr:g}", folder, lr) for lr in lrs[name]}
            for name, folder in models.items()}


def seeds(models: dict, n: int) -> dict:
    """{model: [test scores at seed 1234 (the sweep's run), 1, ..., n-1]} at lr 1e-3."""
    return {name: [finetune(f"cls-{slug(name)}-0.001", folder, 1e-3)]
            + [finetune(f"cls-{slug(name)}-0.001-seed{k}", folder, 1e-3, k) for k in range(1, n)]
            for name, folder in models.items()}


def with_head(folder: Path, weight, out: Path) -> Path:
    """A copy of the causal LM `folder` whose safetensors also hold `score.weight` (the classifier's head)."""
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(folder, out)
    tensors = load_file(str(folder / "model.safetensors"))
    save_file({**tensors, "score.weight": weight.contiguous()}, str(out / "model.safetensors"), {"format": "pt"})
    return out


def heads(models: dict, feats: dict, classes: int) -> dict:
    """{model: {head: test scores}} of the lr 1e-3 fine-tune from each model with its head set to zero and
    to a linear probe of its frozen last-token features (the default random head is the sweep's run)."""
    out: dict = {}
    for name, folder in models.items():
        x, y = feats[name]["train"][0], feats[name]["train"][2]
        probe_head = fit_probe(x, y, classes, standardise=False)[0].weight.detach()
        for head, weight in (("zero", probe_head * 0), ("probe", probe_head)):
            start = with_head(folder, weight, WORK / "why" / "heads" / f"{slug(name)}-{head}")
            out.setdefault(name, {})[head] = finetune(f"cls-{slug(name)}-0.001-head-{head}", start, 1e-3)
    return out


def scores(pred, truth, classes: int) -> dict:
    """Accuracy and macro-F1 (over every class) of predicted class ids against the truth."""
    f1 = [2 * int(((pred == c) & (truth == c)).sum()) / max(int((pred == c).sum()) + int((truth == c).sum()), 1)
          for c in range(classes)]
    return {"accuracy": float((pred == truth).float().mean()), "macro_f1": sum(f1) / len(f1)}


def fit_probe(x, y, classes: int, standardise: bool = True):
    """(linear layer, mean, std): logistic regression on standardised `x`, L2 1e-3, L-BFGS 300 iterations.
    `standardise=False`: on `x` as it is and without a bias (a head the classifier can load as it is)."""
    import torch

    mu, sd = (x.mean(0), x.std(0) + 1e-6) if standardise else (torch.zeros(x.shape[1]), torch.ones(x.shape[1]))
    torch.manual_seed(0)
    linear = torch.nn.Linear(x.shape[1], classes, bias=standardise)
    opt = torch.optim.LBFGS(linear.parameters(), max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear((x - mu) / sd), y) + 1e-3 * linear.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return linear, mu, sd


def features(models: dict) -> tuple[dict, dict]:
    """({model: {split: (last-token features, mean features, label ids)}}, the task) of each frozen body:
    its final hidden states (after the last norm: what `score` reads) on each example as the stage encodes it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.data import tasks

    data = tasks.build("stdlib-docstring-package")
    index = {label: i for i, label in enumerate(data["labels"])}  # the stage's label ids: its order of labels
    tokenizer = AutoTokenizer.from_pretrained(MODELS["pretrained"])
    out: dict = {}
    for name, folder in models.items():
        model = AutoModelForCausalLM.from_pretrained(folder).eval()
        for split in tasks.SPLITS:
            rows = []
            for e in data[split]:
                ids = tokenizer(e["text"], truncation=True, max_length=128, return_tensors="pt").input_ids
                with torch.no_grad():
                    hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
                rows.append((hidden[-1], hidden.mean(0)))
            labels = torch.tensor([index[e["label"]] for e in data[split]])
            out.setdefault(name, {})[split] = (torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows]),
                                               labels)
    return out, data


def probe(feats: dict, data: dict) -> dict:
    """{model: {pooling: {split: (accuracy, macro-F1)}}} of a linear probe on each frozen body's features,
    and {"majority": {split: ...}}: always train's most frequent class."""
    import torch

    index = {label: i for i, label in enumerate(data["labels"])}
    out: dict = {}
    majority = index[max(index, key=lambda label: sum(e["label"] == label for e in data["train"]))]
    for split in ("validation", "test"):
        truth = torch.tensor([index[e["label"]] for e in data[split]])
        out.setdefault("majority", {})[split] = scores(torch.full_like(truth, majority), truth, len(index))
    for name, of in feats.items():
        for p, pooling in enumerate(("last token", "mean")):
            linear, mu, sd = fit_probe(of["train"][p], of["train"][2], len(index))
            for split in ("validation", "test"):
                with torch.no_grad():
                    pred = linear((of[split][p] - mu) / sd).argmax(-1)
                out.setdefault(name, {}).setdefault(pooling, {})[split] = scores(pred, of[split][2], len(index))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--longer", type=int, default=None, help="also pretrain the demo model for this many steps")
    parser.add_argument("--heads", action="store_true", help="also fine-tune from a zero head and a linear-probe head")
    parser.add_argument("--seeds", type=int, default=1, help="fine-tune each model at lr 1e-3 under this many seeds")
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
              "lr_sweep": sweep(models, lrs)}
    feats, data = features(models)
    report["linear_probe"] = probe(feats, data)
    # the head's init and the seeds for the two models the issue compares (4 minutes a fine-tune here)
    if args.heads:
        report["heads"] = heads(MODELS, feats, len(data["labels"]))
    if args.seeds > 1:
        report["seeds"] = seeds(MODELS, args.seeds)
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
    if "heads" in report:
        h = report["heads"]
        lines += ["", "**The head's init** (lr 0.001, test accuracy / macro-F1): transformers' random `score` head "
                  "(the runs above), a zero head, and a head fitted as a linear probe on the frozen body's last-token "
                  "features (no bias; then the same fine-tune):", "",
                  "| head | " + " | ".join(h) + " |", "|---|" + "---:|" * len(h),
                  "| random (default) | " + " | ".join(both(sweep_[n]["0.001"]) for n in h) + " |"]
        lines += [f"| {head} | " + " | ".join(both(h[n][head]) for n in h) + " |" for head in ("zero", "probe")]
        best = {n: max([sweep_[n]["0.001"], *h[n].values()], key=lambda c: c["macro_f1"]) for n in h}
        verdict = ("beats" if all(best["pretrained"][k] > best["random init"][k] for k in ("accuracy", "macro_f1"))
                   else "does not beat")
        lines.append("")
        lines.append(f"With its best head, the demo-pretrained model ({both(best['pretrained'])}) {verdict} random "
                     f"init with its best ({both(best['random init'])}).")
    if "seeds" in report:
        import statistics

        runs = report["seeds"]
        spread = {n: {k: (statistics.mean(r[k] for r in rs), statistics.stdev(r[k] for r in rs)) for k in
                      ("accuracy", "macro_f1")} for n, rs in runs.items()}
        lines += ["", f"**Seeds** (lr 0.001, train.seed 1234, 1, ..., {len(next(iter(runs.values()))) - 1}: the "
                  "head's draw and the example order change; test mean ± standard deviation):", "",
                  "| model | accuracy | macro-F1 | runs |", "|---|---:|---:|---|"]
        lines += [f"| {n} | {pct(v['accuracy'][0])} ± {pct(v['accuracy'][1])} | {pct(v['macro_f1'][0])} ± "
                  f"{pct(v['macro_f1'][1])} | " + ", ".join(both(r) for r in runs[n]) + " |" for n, v in spread.items()]
        said = []
        for key, what in (("accuracy", "accuracy"), ("macro_f1", "macro-F1")):
            gap = spread["pretrained"][key][0] - spread["random init"][key][0]
            noise = max(spread["pretrained"][key][1], spread["random init"][key][1])
            said.append(f"{gap * 100:+.1f} {what} points on average, against a seed spread of {noise * 100:.1f} "
                        f"({'beyond' if abs(gap) > 2 * noise else 'within'} twice the spread)")
        lines += ["", "Pretrained minus random init: " + "; ".join(said) + "."]
    return lines + [END]


if __name__ == "__main__":
    raise SystemExit(main())
