"""Fine-tuning benchmark: what pretraining buys, full fine-tuning beside LoRA, and lmforge beside the HF Trainer.

    python bench/finetune.py                       # full run: bench/results/finetune.json + BENCHMARKS.md
    python bench/finetune.py --smoke --out DIR     # a tiny model it makes itself, a few steps; never touches BENCHMARKS.md

Every run is a real launch, in processes of its own: `python -m torch.distributed.run --nproc_per_node=2
-m finetune CONFIG.yaml` (2 CPU ranks, gloo, OMP_NUM_THREADS=1, DS_ACCELERATOR=cpu, fp32, DeepSpeed ZeRO-2),
with a config this script writes into its work folder over configs/finetune/demo.yaml (classification:
a stdlib docstring -> its top-level package, 5 classes on CPython 3.11) or configs/finetune/demo_sft.yaml (SFT: a public
function's docstring -> its name, greedy exact match).

1. The honest comparison. The starting model is the demo pretraining run's final/ (`lmforge tokenize
   configs/tokenize/demo.yaml`, then `torchrun -m pretrain configs/pretrain/demo.yaml`, both into the work
   folder; rerunning skips what is finished). Beside it, the same architecture from random init: final/'s
   config.json, `AutoModelForCausalLM.from_config` after `torch.manual_seed(1234)`, with final/'s tokenizer
   files. Both are fine-tuned with the same config, steps and examples (only `init_from` differs), and
   scored on the test split: accuracy and macro-F1 (classification), exact match and loss (SFT).
2. Full fine-tuning beside LoRA (r=16, alpha=32, every linear layer; its own, higher learning rate), from
   the pretrained model on both tasks: score, trainable parameters, peak memory (the largest
   `train/memory_gb` in metrics.jsonl: the peak RSS of the worse rank) and tokens/s (the median
   `train/tokens_per_s` over the logged windows after the first).
3. Throughput beside `transformers.Trainer` on the classification task: the same model (built as the stage
   builds it: `classifier_config(folder_config(...))`, then `from_pretrained(final, config=...)`), the same
   encoded examples (`lmforge.data.tasks.build` + `lmforge.data.examples.encode_classification` with the same TaskConfig),
   micro batch, accumulation and examples in every step (item p of a map-style dataset is the train example
   `GlobalOrder(len(train), seed).item_at(p)`, `train_sampling_strategy="sequential"`: accelerate hands rank
   r the batches r, r + W, ..., so step s reads positions s x G .. (s + 1) x G - 1, lmforge's step s; checked.
   Within a step lmforge sorts the step's examples by length over ranks and micro-batches, the Trainer keeps
   them in order), `DataCollatorWithPadding` (right padding to the micro-batch's longest, with its attention
   mask), and lmforge's own DeepSpeed ZeRO-2 config
   (`lmforge.engine.ds_config`, "auto" where the Trainer owns the value), use_cpu=True,
   `trainer.model_accepts_loss_kwargs = False` and average_tokens_across_devices=False (by default transformers 5
   scales a sequence classifier's mean loss by accum x ranks; so told, the first step's loss agrees with
   lmforge's: same weights, head init and examples, checked). lmforge logs every
   step (log_every=1); the Trainer is timed by a callback at every step end. Tokens/s = the real (unpadded)
   tokens of the examples the steady-state steps consumed (the first `--warmup` left out) / their seconds;
   best of `--rounds` interleaved runs of each method, each round led by the other method.

Writes OUT/finetune.json (default bench/results) and, for a full run, the Fine-tuning section of BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as `python bench/finetune.py` (here and in every rank), this file's folder comes first on sys.path, where
# bench/tokenize.py would shadow the standard library's `tokenize` module; the project root takes its place.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)

from bench.report import parse_args, write_section  # noqa: E402
from bench.train import env, torchrun  # noqa: E402

BEGIN, END = "<!-- bench:finetune:begin -->", "<!-- bench:finetune:end -->"
TARGETS = {"lmforge_vs_trainer": 1.0}  # tokens/s ratio, at least; and pretrained beats random init on both tasks
WORLD = 2
RANDOM_SEED = 1234  # the random-init model's weights
LORA = {"r": 16, "alpha": 32.0, "dropout": 0.0, "target_modules": "all-linear"}
TASKS = {"classification": "demo.yaml", "sft": "demo_sft.yaml"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "special_tokens_map.json")


# --------------------------------------------------------------------------------------------------
# The examples, as the stage reads and encodes them (the Trainer child and the parent share this)


def task_examples(cfg) -> dict:
    """{"tokenizer", "pad_id", "labels", "train", "records"} for a classification config, exactly as
    `python -m finetune` builds them (finetune/__main__.py): built-in task or local files, the tokenizer of
    `init_from`, pad = its pad token, else EOS."""
    from transformers import AutoTokenizer

    from lmforge.data import examples as fd
    from lmforge.data import tasks

    tokenizer = AutoTokenizer.from_pretrained(cfg.init_from)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if cfg.data.builtin:
        made = tasks.build(cfg.data.builtin, cfg.data.top_packages, cfg.data.holdout)
        records = {s: [(f"{cfg.data.builtin} {s} #{i}", r) for i, r in enumerate(made[s])] for s in tasks.SPLITS}
        labels = made["labels"]
    else:
        records = fd.load_records(cfg.data, cfg.train.seed)
        labels = fd.label_set(records["train"], cfg.data)
    train = fd.encode_classification(records["train"], tokenizer, cfg.task, cfg.data, labels, "train")
    return {"tokenizer": tokenizer, "pad_id": pad_id, "labels": labels, "train": train, "records": records}


def step_tokens(train, seed: int, steps: int, global_batch: int) -> list[int]:
    """Real (unpadded) tokens of the examples each optimizer step consumes, in lmforge's global order."""
    from lmforge.data.sampler import GlobalOrder

    order = GlobalOrder(len(train), seed)
    return [sum(len(train.ids[order.item_at(p)]) for p in range(s * global_batch, (s + 1) * global_batch))
            for s in range(steps)]


# --------------------------------------------------------------------------------------------------
# The Trainer child (under torchrun; rank 0 writes spec["result"])


def child_trainer(spec: dict) -> None:
    """`transformers.Trainer` on the stage's classifier, examples, order, batch and DeepSpeed config."""
    import torch
    import torch.distributed as dist
    from transformers import (
        AutoModelForSequenceClassification,
        DataCollatorWithPadding,
        Trainer,
        TrainerCallback,
        TrainingArguments,
    )

    from lmforge import engine as eng
    from lmforge.config import load_config
    from lmforge.config.finetune import FinetuneConfig
    from lmforge.data.sampler import GlobalOrder
    from lmforge.models import classifier_config, folder_config

    cfg = load_config(spec["config"], FinetuneConfig)
    world, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
    micro, accum, global_batch = eng.resolve_batch(cfg.batch.micro_batch_size, cfg.batch.grad_accum,
                                                   cfg.batch.global_batch_size, world)
    steps = spec["steps"]
    ex = task_examples(cfg)
    tokenizer, pad_id, labels, train = ex["tokenizer"], ex["pad_id"], ex["labels"], ex["train"]
    if tokenizer.pad_token_id is None:  # the stage's rule: pad with EOS where the tokenizer has no pad token
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    # lmforge's own DeepSpeed config, "auto" wherever the Trainer owns the value (as bench/train.py does)
    ds = eng.ds_config(eng.read_zero_json(cfg.engine.deepspeed), micro, accum, global_batch, torch.float32,
                       cfg.optim, torch.device("cpu"))
    fused = {k: v for k, v in ds["optimizer"]["params"].items() if k in ("torch_adam", "fused")}
    ds.update(train_batch_size="auto", train_micro_batch_size_per_gpu="auto", gradient_accumulation_steps="auto",
              gradient_clipping="auto", bf16={"enabled": "auto"},
              optimizer={"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                     "weight_decay": "auto", **fused}})
    o = cfg.optim
    args = TrainingArguments(
        output_dir=spec["work"], use_cpu=True, deepspeed=ds, ddp_backend="gloo", seed=cfg.train.seed,
        per_device_train_batch_size=micro, gradient_accumulation_steps=accum, max_steps=steps,
        learning_rate=o.lr, lr_scheduler_type="cosine_with_min_lr", lr_scheduler_kwargs={"min_lr": o.min_lr},
        warmup_steps=o.warmup_steps, weight_decay=o.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1],
        adam_epsilon=o.eps, max_grad_norm=o.grad_clip, bf16=False, fp16=False,
        train_sampling_strategy="sequential", dataloader_drop_last=True, logging_steps=1, save_strategy="no",
        # see model_accepts_loss_kwargs below
        average_tokens_across_devices=False, report_to="none", disable_tqdm=True)
    # the stage's model: the causal LM's config as a classifier over the labels, the body from the folder
    hf_config = classifier_config(folder_config(cfg.init_from, cfg.task.max_length, "task.max_length"), labels, pad_id)
    torch.manual_seed(cfg.train.seed)  # the new head, as the stage seeds it
    model = AutoModelForSequenceClassification.from_pretrained(cfg.init_from, config=hf_config, dtype=torch.float32,
                                                               attn_implementation="sdpa")
    order = GlobalOrder(len(train), cfg.train.seed)

    class Examples(torch.utils.data.Dataset):
        """Item p: the train example lmforge reads at global position p."""

        def __init__(self):
            self.seen: list[int] = []

        def __len__(self) -> int:
            return steps * global_batch

        def __getitem__(self, p: int) -> dict:
            self.seen.append(int(p))
            i = order.item_at(int(p))
            return {"input_ids": train.ids[i].tolist(), "labels": int(train.targets[i])}

    class Timer(TrainerCallback):
        def __init__(self):
            self.ends, self.losses, self.start = [], [], None

        def on_train_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                self.losses.append(float(logs["loss"]))

    dataset, timer = Examples(), Timer()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[timer],
                      data_collator=DataCollatorWithPadding(tokenizer, padding="longest"))
    # transformers 5 takes the classifier's `**kwargs` in forward for a loss normalised by num_items_in_batch:
    # it then neither divides the loss by the accumulation steps (DeepSpeed is told not to either) and, with
    # average_tokens_across_devices (the default), multiplies it by the number of ranks. A sequence classifier's
    # loss is a plain mean over its micro-batch, so that trains on accum x world times the stage's loss and
    # gradients (and the clipping sees them so). Told the truth, the Trainer averages as the stage does.
    trainer.model_accepts_loss_kwargs = False
    trainer.train()
    expected = [p for s in range(steps) for m in range(accum)
                for p in GlobalOrder.rank_positions(s * global_batch, micro, accum, rank, world, m)]
    box = [None] * world
    dist.all_gather_object(box, {"same_step_examples": dataset.seen[:len(expected)] == expected})
    if rank == 0:
        Path(spec["result"]).write_text(json.dumps({
            "start": timer.start, "step_ends": timer.ends, "losses": timer.losses,
            "same_step_examples_as_lmforge": all(b["same_step_examples"] for b in box),
            "wrapped_by": type(trainer.model_wrapped).__name__, "deepspeed_enabled": bool(trainer.is_deepspeed_enabled),
            "zero_stage": int(trainer.accelerator.state.deepspeed_plugin.zero_stage),
            "micro": micro, "accum": accum, "global_batch": global_batch}))
    dist.barrier()
    dist.destroy_process_group()


# --------------------------------------------------------------------------------------------------
# The parent


def run_child(kind: str, name: str, spec: dict, work: Path, timeout: float) -> dict:
    spec = {**spec, "result": str(work / "results" / f"{name}.json")}
    Path(spec["result"]).parent.mkdir(parents=True, exist_ok=True)
    Path(spec["result"]).unlink(missing_ok=True)
    spec_path = work / "specs" / f"{name}.json"
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    spec_path.write_text(json.dumps(spec))
    seconds = torchrun(name, [str(Path(__file__).resolve()), "--child", kind, "--spec", str(spec_path)],
                       work / "logs", timeout)
    return {**json.loads(Path(spec["result"]).read_text()), "wall_seconds": round(seconds, 1)}


def steady(step_seconds: list[float], tokens: list[int], warmup: int) -> dict:
    """Steady-state rates over the steps after the first `warmup`: real tokens / seconds over the window (the
    headline: steps differ in length), and the median of the per-step rates beside it."""
    secs, toks = step_seconds[warmup:], tokens[warmup:len(step_seconds)]
    per_step = [t / s for t, s in zip(toks, secs, strict=True)]
    return {"tokens_per_s": sum(toks) / sum(secs), "median_step_tokens_per_s": statistics.median(per_step),
            "mean_step_seconds": round(sum(secs) / len(secs), 4), "measured_steps": len(secs),
            "measured_tokens": sum(toks), "measured_seconds": round(sum(secs), 3),
            "step_seconds": [round(x, 4) for x in step_seconds]}


def write_config(work: Path, name: str, task: str, init_from: Path, steps: int, args: argparse.Namespace,
                 lora: bool = False, throughput: bool = False, smoke_data: dict | None = None) -> Path:
    """A fine-tuning config over the demo one: this run's folder, starting model, length and intervals."""
    import yaml

    never = 10**9
    over: dict = {
        "include": str(ROOT / "configs" / "finetune" / TASKS[task]),
        "run_dir": str(work / "runs" / name),
        "init_from": str(init_from),
        # evaluation at the start and the end only, one save (at the end); tokens/s of every step when timed
        "train": {"max_steps": steps, "log_every": 1 if throughput else args.log_every,
                  "eval_every": never if throughput else steps, "save_every": never},
        "tracking": {"wandb": False, "plots": False},
    }
    if task == "sft":  # exact match over (up to) this many examples of each split, not the demo's first 64
        over["task"] = {"exact_match_examples": args.exact_match}
    if lora:
        over["lora"] = dict(LORA)
        over["optim"] = {"lr": args.lora_lr, "min_lr": args.lora_lr / 10}
    if smoke_data is not None:  # local files, a short length, small batches (accum 2: that path too)
        over["data"] = {"builtin": None, **{s: str(p) for s, p in smoke_data[task].items()}}
        over["task"] = {**over.get("task", {}), "max_length": 64}
        if task == "sft":
            over["task"].update(exact_match_examples=4, max_new_tokens=4)
        over["batch"] = {"micro_batch_size": 2, "global_batch_size": 8}
    path = work / "configs" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(over, sort_keys=False))
    return path


def run_stage(config: Path, name: str, work: Path, timeout: float) -> dict:
    """One `torchrun -m finetune CONFIG` from scratch: its summary, peak memory and logged rates."""
    from lmforge.config import load_config
    from lmforge.config.finetune import FinetuneConfig

    run_dir = Path(load_config(config, FinetuneConfig).run_dir)
    shutil.rmtree(run_dir, ignore_errors=True)  # an existing run_dir would be resumed, not retrained
    seconds = torchrun(name, ["-m", "finetune", str(config)], work / "logs", timeout)
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train/tokens_per_s" in r]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)  # ~80 MB each; final/ and the logs stay
    return {"summary": summary, "wall_seconds": round(seconds, 1), "logged_steps": [r["step"] for r in logged],
            "train_loss": [r["train/loss"] for r in logged],
            "logged_tokens_per_s": [r["train/tokens_per_s"] for r in logged],
            "peak_memory_gb": max(r["train/memory_gb"] for r in logged),
            # the first window holds the first steps' warm-up
            "tokens_per_s": statistics.median([r["train/tokens_per_s"] for r in logged[1:]] or
                                              [logged[0]["train/tokens_per_s"]])}


def prepare_pretrained(work: Path, timeout: float) -> Path:
    """The demo pretraining run's final/ (tokenize, then pretrain; each skips what is already finished)."""
    data, run_dir = work / "data", work / "pretrain"
    print("[bench] tokenizing the built-in corpus (configs/tokenize/demo.yaml; skipped when done)", flush=True)
    cmd = [sys.executable, "-m", "lmforge.cli", "tokenize", str(ROOT / "configs" / "tokenize" / "demo.yaml"),
           f"out_dir={data}", "progress=false"]
    run = subprocess.run(cmd, capture_output=True, text=True, env=env(), cwd=ROOT)
    if run.returncode != 0:
        raise SystemExit(f"lmforge tokenize failed:\n{run.stdout[-2000:]}\n{run.stderr[-3000:]}")
    print("[bench] pretraining the demo model (configs/pretrain/demo.yaml; skipped when finished)", flush=True)
    seconds = torchrun("pretrain", ["-m", "pretrain", str(ROOT / "configs" / "pretrain" / "demo.yaml"),
                                    f"run_dir={run_dir}", f"data.path={data}", "tracking.wandb=false"],
                       work / "logs", timeout)
    print(f"[bench] pretrained model: {run_dir / 'final'} ({seconds:.0f} s)", flush=True)
    return run_dir / "final"


def prepare_smoke(work: Path) -> tuple[Path, dict]:
    """Smoke: a tiny Llama (seed 0) on a small BPE, saved as a Hugging Face folder (the "pretrained" model:
    nothing is pretrained in a smoke run), and small local task files from a few stdlib packages."""
    import ast
    import sysconfig

    import torch
    import yaml

    from lmforge.config.model import ModelConfig
    from lmforge.data.sources import stdlib_files
    from lmforge.models import build_model
    from lmforge.tokenizer import save_folder, train_bpe

    folder = work / "tiny"
    if not (folder / "config.json").is_file():
        texts = [p.read_text(encoding="utf-8", errors="replace") for p in stdlib_files()[:60]]
        tok = train_bpe(texts, 512, ["<|endoftext|>", "<|pad|>"], show_progress=False)
        save_folder(tok, folder, eos_token="<|endoftext|>", pad_token="<|pad|>")
        model_cfg = ModelConfig(**yaml.safe_load((ROOT / "configs" / "model" / "tiny.yaml").read_text()))
        torch.manual_seed(0)
        model = build_model(model_cfg, tok.get_vocab_size(), tok.token_to_id("<|endoftext|>"),
                            tok.token_to_id("<|pad|>"))
        model.save_pretrained(folder)
    root = Path(sysconfig.get_paths()["stdlib"])
    by_package = []
    for package in ("json", "email", "http", "logging"):
        found = []
        for path in sorted((root / package).glob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8", errors="replace"))):
                if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                    doc = ast.get_docstring(node)
                    if doc and len(doc) >= 20:
                        found.append((package, node.name, isinstance(node, ast.FunctionDef), doc))
        by_package.append(found)
    # the packages in turn, so that every split holds every label
    found = [d for group in itertools.zip_longest(*by_package) for d in group if d is not None]
    files: dict = {}
    for task in TASKS:
        rows = [{"text": d, "label": p} if task == "classification" else {"prompt": d, "response": n}
                for p, n, fn, d in found if task == "classification" or (fn and not n.startswith("_"))]
        splits = {"validation": rows[0::10][:16], "test": rows[1::10][:16],
                  "train": [r for i, r in enumerate(rows) if i % 10 > 1][:96]}
        files[task] = {}
        for split, recs in splits.items():
            path = work / "smoke-data" / task / f"{split}.jsonl"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text("".join(json.dumps(r) + "\n" for r in recs))
            files[task][split] = path
    return folder, files


def make_random_init(pretrained: Path, out: Path) -> Path:
    """The pretrained model's architecture with fresh weights (seeded), beside its tokenizer files."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.rmtree(out, ignore_errors=True)
    torch.manual_seed(RANDOM_SEED)
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(pretrained), dtype=torch.float32)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        if (pretrained / name).is_file():
            shutil.copy2(pretrained / name, out / name)
    return out


def scores(task: str, summary: dict) -> dict:
    """The figures a run is judged by, from its summary.json."""
    test, val = summary.get("test") or {}, summary.get("val") or {}
    if task == "classification":
        return {"test_accuracy": test.get("test/accuracy"), "test_macro_f1": test.get("test/macro_f1"),
                "val_accuracy": val.get("val/accuracy"), "val_macro_f1": val.get("val/macro_f1"),
                "test_loss": test.get("test/loss"), "val_loss": val.get("val/loss")}
    return {"test_exact_match": test.get("test/exact_match"), "test_loss": test.get("test/loss"),
            "val_exact_match": val.get("val/exact_match"), "val_loss": val.get("val/loss")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model of its own, a few steps; never writes "
                        "BENCHMARKS.md")
    parser.add_argument("--steps", type=int, default=None, help="fine-tuning steps of every quality run (default 300, "
                        "the demo configs'; smoke 4)")
    parser.add_argument("--throughput-steps", type=int, default=None, help="steps of each throughput run (default "
                        "40; smoke 6)")
    parser.add_argument("--warmup", type=int, default=None, help="throughput steps left out of the rates (default 5;"
                        " smoke 2)")
    parser.add_argument("--rounds", type=int, default=None, help="throughput runs of each method, interleaved "
                        "(default 2; smoke 1)")
    parser.add_argument("--lora-lr", type=float, default=3e-3, help="LoRA's peak learning rate (default 3e-3; "
                        "min_lr a tenth of it); full fine-tuning keeps the demo configs' 1e-3")
    parser.add_argument("--exact-match", type=int, default=256, help="SFT: examples of each split scored by exact "
                        "match (default 256: the whole test split)")
    parser.add_argument("--log-every", type=int, default=20, help="steps per logged window of the quality runs")
    parser.add_argument("--out", type=Path, default=None, help="folder for finetune.json (default bench/results)")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default bench/work/finetune[-smoke])")
    parser.add_argument("--no-table", action="store_true", help="leave BENCHMARKS.md as it is")
    args = parse_args(parser, {"trainer": child_trainer})

    began, code = time.perf_counter(), code_state()
    args.steps = args.steps or (4 if args.smoke else 300)
    args.throughput_steps = args.throughput_steps or (6 if args.smoke else 40)
    args.warmup = args.warmup if args.warmup is not None else (2 if args.smoke else 5)
    args.rounds = args.rounds or (1 if args.smoke else 2)
    if not 0 < args.warmup < args.throughput_steps:
        parser.error("--warmup must be at least 1 and below --throughput-steps")
    work = (args.work or ROOT / "bench" / "work" / ("finetune-smoke" if args.smoke else "finetune")).resolve()
    out = args.out or (work / "results-smoke" if args.smoke else ROOT / "bench" / "results")
    work.mkdir(parents=True, exist_ok=True)
    timeout = 600 if args.smoke else 1800

    import importlib.util

    for module, pin in (("accelerate", "accelerate>=1.1"), ("peft", "peft")):
        if importlib.util.find_spec(module) is None:  # the Trainer runs on accelerate; LoRA is peft's
            raise SystemExit(f"bench/finetune.py needs `{module}`: pip install '{pin}'")
    import accelerate
    import deepspeed
    import peft
    import torch
    import transformers
    from transformers.utils import logging as hf_logging

    from lmforge.config import load_config
    from lmforge.config.finetune import FinetuneConfig

    hf_logging.disable_progress_bar()  # save_pretrained's bar for a one-shard save
    if args.smoke:
        pretrained, smoke_data = prepare_smoke(work)
    else:
        pretrained, smoke_data = prepare_pretrained(work, timeout), None
    random_init = make_random_init(pretrained, work / "random-init")
    pretrain_summary = None if args.smoke else json.loads((pretrained.parent / "summary.json").read_text())
    print(f"[bench] random init: {random_init} (config of {pretrained}, seed {RANDOM_SEED})", flush=True)

    # -- 1 and 2: quality, full vs LoRA -----------------------------------------------------------------
    plan = [(task, init, lora) for task in TASKS for init, lora in (("pretrained", False), ("random", False),
                                                                   ("pretrained", True))]
    quality: dict = {task: {} for task in TASKS}
    for task, init, lora in plan:
        name = f"{'cls' if task == 'classification' else 'sft'}-{init}-{'lora' if lora else 'full'}"
        config = write_config(work, name, task, pretrained if init == "pretrained" else random_init, args.steps, args,
                              lora=lora, smoke_data=smoke_data)
        print(f"[bench] {name}: {args.steps} steps ...", flush=True)
        r = run_stage(config, name, work, timeout)
        r["scores"] = scores(task, r["summary"])
        r["trainable_params"] = r["summary"].get("trainable_params")
        quality[task][f"{init}_{'lora' if lora else 'full'}"] = r
        shown = ", ".join(f"{k} {v:.4f}" for k, v in r["scores"].items() if v is not None)
        print(f"[bench] {name}: {shown}; {r['tokens_per_s']:,.0f} tokens/s, peak {r['peak_memory_gb']:.2f} GB, "
              f"{r['trainable_params']:,} trained ({r['wall_seconds']:.0f} s)", flush=True)

    # -- 3: throughput beside the Trainer ---------------------------------------------------------------
    config = write_config(work, "tput-lmforge", "classification", pretrained, args.throughput_steps, args,
                          throughput=True, smoke_data=smoke_data)
    cfg = load_config(config, FinetuneConfig)
    ex = task_examples(cfg)
    from lmforge.engine import resolve_batch

    micro, accum, global_batch = resolve_batch(cfg.batch.micro_batch_size, cfg.batch.grad_accum,
                                               cfg.batch.global_batch_size, WORLD)
    tokens = step_tokens(ex["train"], cfg.train.seed, args.throughput_steps, global_batch)
    train_targets = ex["train"].targets
    majority = max(set(train_targets), key=train_targets.count)
    print(f"[bench] throughput: classification, {len(ex['train']):,} train examples, global batch {global_batch} = "
          f"micro {micro} x accum {accum} x {WORLD} ranks, {sum(tokens) / len(tokens):,.0f} real tokens/step on "
          f"average; {args.throughput_steps} steps ({args.warmup} warm-up) x {args.rounds} round(s)", flush=True)
    runs: dict[str, list[dict]] = {"lmforge": [], "trainer": []}
    for k in range(args.rounds):
        for method in (list(runs) if k % 2 == 0 else list(runs)[::-1]):
            name = f"{method}_r{k}"
            if method == "lmforge":
                r = run_stage(config, name, work, timeout)
                logged = r["logged_steps"]
                assert logged == list(range(1, len(logged) + 1)), "lmforge did not log every step"
                # each logged rate covers one step (log_every=1): its seconds are the step's tokens / the rate
                secs = [tokens[s - 1] / rate for s, rate in zip(logged, r["logged_tokens_per_s"], strict=True)]
                r = {**steady(secs, tokens, args.warmup), "losses": r["train_loss"],
                     "peak_memory_gb": r["peak_memory_gb"], "wall_seconds": r["wall_seconds"],
                     "zero_stage": r["summary"]["zero_stage"], "stage_tokens": r["summary"]["tokens"]}
                assert r["stage_tokens"] == sum(tokens), (r["stage_tokens"], sum(tokens))
            else:
                r = run_child("trainer", name, {"config": str(config), "steps": args.throughput_steps,
                                                "work": str(work / "runs" / "trainer")}, work, timeout)
                marks = [r.pop("start"), *r.pop("step_ends")]
                r = {**r, **steady([b - a for a, b in zip(marks[:-1], marks[1:], strict=True)], tokens, args.warmup)}
            runs[method].append(r)
            print(f"[bench] {name:10s} {r['tokens_per_s']:9,.0f} tokens/s (median step {r['median_step_tokens_per_s']:,.0f})"
                  f"  ({r['measured_steps']} steps in {r['measured_seconds']:.1f} s; run {r['wall_seconds']:.0f} s)",
                  flush=True)
    shutil.rmtree(work / "runs" / "trainer", ignore_errors=True)
    throughput = {}
    for method, rs in runs.items():
        best = max(rs, key=lambda r: r["tokens_per_s"])
        throughput[method] = {**best, "tokens_per_s": round(best["tokens_per_s"], 1),
                              "median_step_tokens_per_s": round(best["median_step_tokens_per_s"], 1),
                              "all_rounds_tokens_per_s": [round(r["tokens_per_s"], 1) for r in rs]}
    trainer = throughput["trainer"]
    assert trainer["deepspeed_enabled"] and trainer["wrapped_by"] == "DeepSpeedEngine", trainer["wrapped_by"]
    assert trainer["zero_stage"] == throughput["lmforge"]["zero_stage"] == 2
    assert trainer["same_step_examples_as_lmforge"], "the Trainer's steps read other examples than lmforge's"
    ratio = round(throughput["lmforge"]["tokens_per_s"] / trainer["tokens_per_s"], 3)
    # same weights, head, examples and loss: the first step's loss agrees (round-off; the Trainer's forward has a mask)
    first_loss_diff = abs(throughput["lmforge"]["losses"][0] - trainer["losses"][0])

    # -- targets ----------------------------------------------------------------------------------------
    c, s = quality["classification"], quality["sft"]
    cp, cr = c["pretrained_full"]["scores"], c["random_full"]["scores"]
    sp, sr = s["pretrained_full"]["scores"], s["random_full"]["scores"]
    targets = {
        "classification_pretrained_beats_random": {
            "target": "test accuracy and macro-F1 above random init's",
            "measured": {"accuracy": [cp["test_accuracy"], cr["test_accuracy"]],
                         "macro_f1": [cp["test_macro_f1"], cr["test_macro_f1"]]},
            "met": cp["test_accuracy"] > cr["test_accuracy"] and cp["test_macro_f1"] > cr["test_macro_f1"]},
        "sft_pretrained_beats_random": {
            "target": "test exact match above and test loss below random init's",
            "measured": {"exact_match": [sp["test_exact_match"], sr["test_exact_match"]],
                         "test_loss": [sp["test_loss"], sr["test_loss"]]},
            "met": (sp["test_exact_match"] or 0) > (sr["test_exact_match"] or 0) and sp["test_loss"] < sr["test_loss"],
            "loss_lower": sp["test_loss"] < sr["test_loss"],
            "exact_match_higher": (sp["test_exact_match"] or 0) > (sr["test_exact_match"] or 0)},
        "lmforge_vs_trainer": {"target": f">= {TARGETS['lmforge_vs_trainer']}", "measured": ratio,
                               "met": ratio >= TARGETS["lmforge_vs_trainer"]},
    }
    resolved = {task: load_config(work / "configs" / f"{'cls' if task == 'classification' else 'sft'}-pretrained-full"
                                  ".yaml", FinetuneConfig).model_dump(mode="json") for task in TASKS}
    report = {
        "benchmark": "finetune",
        "mode": "smoke" if args.smoke else "full",
        "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "gpu": torch.cuda.is_available(), "ranks": WORLD,
                    "threads_per_rank": 1},
        "code": code,
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                     "transformers": transformers.__version__, "accelerate": accelerate.__version__,
                     "peft": peft.__version__},
        "config": {"steps": args.steps, "lora": LORA, "lora_lr": args.lora_lr, "exact_match_examples": args.exact_match,
                   "random_init_seed": RANDOM_SEED, "pretrained": str(pretrained),
                   "pretrain": None if pretrain_summary is None else
                   {k: pretrain_summary.get(k) for k in ("steps", "tokens", "val_loss", "seconds") if k in pretrain_summary},
                   "finetune_configs": resolved,
                   "throughput": {"steps": args.throughput_steps, "warmup_steps_skipped": args.warmup,
                                  "rounds": args.rounds, "micro_batch_size": micro, "grad_accum": accum,
                                  "global_batch_size": global_batch, "step_tokens": tokens,
                                  "train_examples": len(ex["train"]), "labels": ex["labels"]},
                   "majority_class": {"label": ex["labels"][majority],
                                      "test_accuracy": _majority_accuracy(c["pretrained_full"]["summary"], majority)}},
        "quality": quality,
        "throughput": throughput,
        "ratios": {"lmforge_vs_trainer": ratio, "first_loss_lmforge_minus_trainer": first_loss_diff},
        "targets": targets,
        "seconds": round(time.perf_counter() - began, 1),
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"[bench] wrote {out / 'finetune.json'} ({report['seconds']:.0f} s)")
    for key, t in targets.items():
        print(f"[bench] {key}: {t['measured']} (target {t['target']}) {'met' if t['met'] else 'NOT MET'}")
    if not (args.smoke or args.no_table):
        write_table(report, ROOT / "BENCHMARKS.md")
    return 0


def code_state() -> dict:
    """The commit the stages ran from, and whether their code differed from it (another change under way)."""
    def git(*cmd: str) -> str:
        run = subprocess.run(["git", *cmd], capture_output=True, text=True, cwd=ROOT)
        return run.stdout.strip() if run.returncode == 0 else "?"

    return {"commit": git("rev-parse", "HEAD"),
            "uncommitted_stage_changes": git("status", "--porcelain", "--", "finetune", "lmforge").splitlines()}


def _majority_accuracy(summary: dict, majority: int) -> float | None:
    """Test accuracy of always answering train's most frequent label (from the test confusion matrix's rows)."""
    confusion = (summary.get("test") or {}).get("test/confusion")
    if not confusion:
        return None
    return sum(confusion[majority]) / sum(sum(row) for row in confusion)


def write_table(report: dict, path: Path) -> None:
    """Replace the Fine-tuning section of BENCHMARKS.md (between its markers) with this run's tables."""
    q, tp, t, m, c, v = (report["quality"], report["throughput"], report["targets"], report["machine"],
                         report["config"], report["versions"])

    def met(key: str) -> str:
        return "met" if t[key]["met"] else "**NOT MET**"

    def pct(x) -> str:
        return "-" if x is None else f"{100 * x:.1f}%"

    def diff(a, b, scale: float = 100.0, unit: str = " pts") -> str:
        return "-" if a is None or b is None else f"{scale * (a - b):+.{1 if scale == 100 else 3}f}{unit if scale == 100 else ''}"

    cq, sq = q["classification"], q["sft"]
    cp, cr = cq["pretrained_full"]["scores"], cq["random_full"]["scores"]
    sp, sr = sq["pretrained_full"]["scores"], sq["random_full"]["scores"]
    fc, sc = c["finetune_configs"]["classification"], c["finetune_configs"]["sft"]
    pre = c["pretrain"] or {}
    th = c["throughput"]
    confusion = cq["pretrained_full"]["summary"]["test"].get("test/confusion") or []
    cls_test = sum(sum(r) for r in confusion)
    present = sorted(((sum(row), th["labels"][i]) for i, row in enumerate(confusion) if sum(row)), reverse=True)
    lines = [
        BEGIN,
        f"Measured {report['date']} by `python bench/finetune.py` on **{m['cpus']} CPU cores** ({m['processor']}, "
        f"Python {m['python']}, torch {v['torch']}, DeepSpeed {v['deepspeed']}, transformers {v['transformers']}, "
        f"peft {v['peft']}), fp32, {m['ranks']} ranks under torchrun (gloo, one thread each), DeepSpeed ZeRO-2 "
        "(`configs/deepspeed/zero2.json`). Every figure comes from a real `torchrun -m finetune` launch (or a "
        "Trainer launch) of its own. Raw figures: `bench/results/finetune.json`.",
        "",
        f"**Pretrained vs random init** (same architecture, config, steps and examples). *Pretrained*: the demo "
        f"pretraining run's `final/` (`configs/pretrain/demo.yaml`: the 5.0M-parameter `demo` Llama, "
        f"{pre.get('steps', '?')} steps, {pre.get('tokens', 0) / 1e6:.1f}M tokens of the built-in corpus, val loss "
        f"{pre.get('val_loss', float('nan')):.3f}); *random init*: its `config.json` with fresh "
        f"weights (`AutoModelForCausalLM.from_config` after `torch.manual_seed({c['random_init_seed']})`). Both "
        f"fine-tuned in full for {c['steps']} steps with `configs/finetune/demo.yaml` (classification: a stdlib "
        f"docstring -> one of {len(th['labels'])} top-level packages, max {fc['task']['max_length']} tokens) and "
        f"`configs/finetune/demo_sft.yaml` (SFT: a public function's docstring -> its name, greedy, max "
        f"{sc['task']['max_length']} tokens), global batch {fc['batch']['global_batch_size']}, lr "
        f"{fc['optim']['lr']:g} -> {fc['optim']['min_lr']:g} (cosine, {fc['optim']['warmup_steps']} warm-up steps); "
        f"evaluation at the start and the end only; exact match over the first {c['exact_match_examples']} examples "
        f"of a split (the demo config says 64). Test split: files held out of pretraining by construction "
        f"({cls_test} classification examples).",
        "",
        "| task | test metric | pretrained | random init | pretrained - random |",
        "|---|---|---:|---:|---:|",
        f"| classification | accuracy | {pct(cp['test_accuracy'])} | {pct(cr['test_accuracy'])} | "
        f"{diff(cp['test_accuracy'], cr['test_accuracy'])} |",
        f"| classification | macro-F1 | {pct(cp['test_macro_f1'])} | {pct(cr['test_macro_f1'])} | "
        f"{diff(cp['test_macro_f1'], cr['test_macro_f1'])} |",
        f"| classification | loss | {cp['test_loss']:.3f} | {cr['test_loss']:.3f} | "
        f"{cp['test_loss'] - cr['test_loss']:+.3f} |",
        f"| SFT | exact match | {pct(sp['test_exact_match'])} | {pct(sr['test_exact_match'])} | "
        f"{diff(sp['test_exact_match'], sr['test_exact_match'])} |",
        f"| SFT | loss (response tokens) | {sp['test_loss']:.3f} | {sr['test_loss']:.3f} | "
        f"{sp['test_loss'] - sr['test_loss']:+.3f} |",
        f"| SFT | val loss | {sp['val_loss']:.3f} | {sr['val_loss']:.3f} | {sp['val_loss'] - sr['val_loss']:+.3f} |",
        "",
        f"The classification test split holds {cls_test} examples of {len(present)} of the {len(th['labels'])} "
        f"packages ({', '.join(f'`{name}` {n}' for n, name in present)}): a few held-out files, so a file's worth of "
        "examples moves accuracy by several points. Always answering train's most frequent package "
        f"(`{c['majority_class']['label']}`) scores {pct(c['majority_class']['test_accuracy'])} test accuracy."
        + (" Exact match is 0% for both starting points: at this size and length the model answers with generic "
           "names (the greedy answers are in the JSON, `val/answers`, `test/answers`); the SFT comparison rests on "
           "the loss." if not sp["test_exact_match"] and not sr["test_exact_match"] else ""),
        "",
        "| target | measured (pretrained / random) | |",
        "|---|---|---|",
        f"| classification: pretrained beats random init (test accuracy and macro-F1) | "
        f"{pct(cp['test_accuracy'])} / {pct(cr['test_accuracy'])}; {pct(cp['test_macro_f1'])} / "
        f"{pct(cr['test_macro_f1'])} | {met('classification_pretrained_beats_random')} |",
        f"| SFT: pretrained beats random init (test loss lower) | {sp['test_loss']:.3f} / {sr['test_loss']:.3f} | "
        f"{'met' if t['sft_pretrained_beats_random']['loss_lower'] else '**NOT MET**'} |",
        f"| SFT: pretrained beats random init (test exact match higher) | {pct(sp['test_exact_match'])} / "
        f"{pct(sr['test_exact_match'])} | {'met' if t['sft_pretrained_beats_random']['exact_match_higher'] else '**NOT MET**'} |",
        "",
        f"**Full fine-tuning vs LoRA**, both from the pretrained model, {c['steps']} steps: LoRA r={c['lora']['r']}, "
        f"alpha={c['lora']['alpha']:g}, every linear layer (`all-linear`; a classifier's new head trains in full), lr "
        f"{c['lora_lr']:g} -> {c['lora_lr'] / 10:g} (full: {fc['optim']['lr']:g} -> {fc['optim']['min_lr']:g}). "
        "*Peak memory*: the largest `train/memory_gb` in metrics.jsonl, the peak RSS of the worse rank since its "
        "start (on CPU: the Python/torch/DeepSpeed runtime included, some 0.4-0.5 GB of it). *Tokens/s*: real "
        "tokens, the median of the logged windows of "
        f"{report['config']['finetune_configs']['classification']['train']['log_every']} steps after the first.",
        "",
        "| task | method | test score | trainable parameters | peak memory GB | tokens/s | tokens/s vs full |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for task, label in (("classification", "classification"), ("sft", "SFT")):
        full = q[task]["pretrained_full"]
        for key, method in (("pretrained_full", "full"), ("pretrained_lora", f"LoRA r={c['lora']['r']}")):
            r, sc_ = q[task][key], q[task][key]["scores"]
            score = (f"accuracy {pct(sc_['test_accuracy'])}, macro-F1 {pct(sc_['test_macro_f1'])}"
                     if task == "classification" else
                     f"exact match {pct(sc_['test_exact_match'])}, loss {sc_['test_loss']:.3f}")
            share = r["trainable_params"] / full["trainable_params"]
            lines.append(f"| {label} | {method} | {score} | {r['trainable_params']:,} ({100 * share:.1f}%) | "
                         f"{r['peak_memory_gb']:.2f} | {r['tokens_per_s']:,.0f} | "
                         f"{r['tokens_per_s'] / full['tokens_per_s']:.2f}x |")
    lm, tr = tp["lmforge"], tp["trainer"]
    lines += [
        "",
        f"**Throughput beside the HF Trainer** (classification, the pretrained model): global batch "
        f"{th['global_batch_size']} = micro {th['micro_batch_size']} x accum {th['grad_accum']} x {m['ranks']} ranks, "
        f"right-padded to each micro-batch's longest example ({sum(th['step_tokens']) / len(th['step_tokens']):,.0f} real "
        f"tokens per step on average), the same examples in every step (lmforge's global order, checked; within a step "
        "lmforge sorts them by length over ranks and micro-batches, the Trainer keeps them in order), the same "
        "ZeRO-2 JSON. The Trainer: `TrainingArguments(deepspeed=<lmforge's DeepSpeed config>, use_cpu=True)`, "
        "`AutoModelForSequenceClassification` built as the stage builds it, `DataCollatorWithPadding` (it adds the "
        "attention mask; lmforge passes none: with right padding a causal model's real tokens never see the pads). "
        f"Tokens/s = real tokens of steps {th['warmup_steps_skipped'] + 1}-{th['steps']} / their seconds (the first "
        f"{th['warmup_steps_skipped']} are warm-up), best of {th['rounds']} interleaved runs of each method (every run's "
        "figures are in the JSON). The Trainer runs with `model_accepts_loss_kwargs = False` and "
        "`average_tokens_across_devices=False`: by default transformers 5 multiplies a sequence classifier's mean loss "
        "(and gradients) by accumulation steps x ranks; so set, the first step's losses agree to "
        f"{report['ratios']['first_loss_lmforge_minus_trainer']:.1e}.",
        "",
        "| method | what runs | tokens/s | s/step | vs Trainer |",
        "|---|---|---:|---:|---:|",
        f"| **lmforge** | `torchrun -m finetune`, DeepSpeed ZeRO-2 | {lm['tokens_per_s']:,.0f} | "
        f"{lm['mean_step_seconds']:.3f} | {lm['tokens_per_s'] / tr['tokens_per_s']:.2f}x |",
        f"| HF `Trainer` | same ZeRO-2 JSON via `TrainingArguments(deepspeed=...)`, `use_cpu=True` | "
        f"{tr['tokens_per_s']:,.0f} | {tr['mean_step_seconds']:.3f} | 1.00x |",
        "",
        "| ratio | measured | target | |",
        "|---|---:|---:|---|",
        f"| lmforge / HF Trainer (tokens/s) | {report['ratios']['lmforge_vs_trainer']:.2f}x | "
        f">= {TARGETS['lmforge_vs_trainer']}x | {met('lmforge_vs_trainer')} |",
        END,
    ]
    write_section(path, BEGIN, END, "Fine-tuning", "\n".join(lines))


if __name__ == "__main__":
    raise SystemExit(main())
