"""`python -m finetune CONFIG.yaml [key=value ...]`: fine-tune a Hugging Face causal LM folder on a task.

    torchrun --nproc_per_node=N -m finetune configs/finetune/demo.yaml      # N ranks, DeepSpeed ZeRO
    python -m finetune CONFIG.yaml --dry-run                                # resolved config and sizes; no work

Two kinds of task on one engine, with pretraining's guarantees (atomic checkpoints, exact resume, stop on a
signal): `classification` (text or a text pair -> label; transformers' `...ForSequenceClassification` with
the body from `init_from` and a new head) and `sft` (prompt -> response, or chat messages; loss on the
response tokens only, normalised by the step's response tokens over every micro-batch and rank).

Reads top to bottom: config -> data -> model config -> run -> model -> engine -> resume -> loop -> test ->
export. The run's lifecycle, step mechanics and checkpoints are the shared core (lmforge.run, .loop,
.checkpoint); this file owns the examples, the model, the losses, the metrics and the loop.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import shutil
import sys
import time
import warnings

import torch
import torch.nn.functional as F

from lmforge import checkpoint as ckpt
from lmforge.config import to_yaml
from lmforge.config.base import result_digest
from lmforge.config.command import parse_command
from lmforge.config.finetune import FinetuneConfig
from lmforge.data import examples as fd
from lmforge.data import tasks
from lmforge.data.sampler import GlobalOrder
from lmforge.data.sources import DataError
from lmforge.models import (
    ModelError,
    add_lora,
    build,
    classifier_config,
    describe,
    folder_config,
    human,
    merge_lora,
)
from lmforge.run import Plan, Run, RunError, catch_signals, fail, rank_seed
from lmforge.schedule import lr_at, schedule_change
from lmforge.throughput import Meter, device_peak, duration
from lmforge.tokenizer import folder_hash
from lmforge.tracking import plot_confusion

STAGE = "finetune"
PROG = "python -m finetune"


def main(argv: list[str] | None = None) -> int:
    launched = time.perf_counter()  # train.max_time counts start-up too
    stops = catch_signals()  # a SIGTERM during start-up is acted on at the first step
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse_command(PROG, FinetuneConfig, argv, __doc__.split("\n")[0],
                              extra={"--local_rank": {"type": int, "help": argparse.SUPPRESS}},  # deepspeed launcher
                              example="optim.lr=5e-5")
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lmforge import engine as eng
    from lmforge import loop
    from lmforge.loss import lm_loss

    sft, task = cfg.task.type == "sft", cfg.task

    # -- the examples and the model folder: every error before any work ----------------------------------
    try:
        base = folder_config(cfg.init_from, task.max_length, "task.max_length")
        tokenizer = AutoTokenizer.from_pretrained(cfg.init_from)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad_id is None:  # the one place the pad token is resolved: the folder's, else EOS
            raise ModelError(f"{cfg.init_from}: the tokenizer has neither a pad nor an EOS token")
        default_template = sft and tokenizer.chat_template is None
        if default_template:  # saved into the exported tokenizer, so apply_chat_template reproduces training
            tokenizer.chat_template = fd.DEFAULT_CHAT_TEMPLATE
        if cfg.data.builtin:  # from the stdlib on this node's disk, the same on every rank: no shared-FS reads
            made = tasks.build(cfg.data.builtin, cfg.data.top_packages, cfg.data.holdout)
            records = {s: [(f"{cfg.data.builtin} {s} #{i}", r) for i, r in enumerate(made[s])] for s in tasks.SPLITS}
        else:
            records = fd.load_records(cfg.data, cfg.train.seed)
        labels = None if sft else (made["labels"] if cfg.data.builtin else fd.label_set(records["train"], cfg.data))
        encoded = {}
        for split, recs in records.items():
            if recs is None:
                continue
            encoded[split] = fd.encode_sft(recs, tokenizer, task, cfg.data, task.exact_match_examples) if sft else \
                fd.encode_classification(recs, tokenizer, task, cfg.data, labels, split)
        train, val, test = encoded["train"], encoded["validation"], encoded.get("test")
        hf_config = base if sft else classifier_config(base, labels, pad_id)
        facts = describe(base, task.max_length)  # the body's counts: MFU against the tokens actually seen
        plan = Plan.make(cfg.batch, cfg.engine, cfg.optim)
    except (DataError, ModelError, eng.EngineError, OSError) as e:
        return fail(PROG, e)
    micro, accum, global_batch, dtype, ds = plan.micro, plan.accum, plan.global_batch, plan.dtype, plan.ds
    max_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * len(train) / global_batch)
    data_digest = hashlib.sha256(json.dumps([r for _, r in records["train"]], sort_keys=True, default=str)
                                 .encode()).hexdigest()[:16]
    truncated = {s: e.truncated for s, e in encoded.items()}
    summary_line = (f"{task.type}: {len(train):,} train / {len(val):,} validation / {len(test) if test else 0:,} test "
                    f"examples" + (f", {len(labels)} labels" if labels else "") + f"; truncated to "
                    f"{task.max_length} tokens ({task.truncation}): {truncated}")
    if args.dry_run:
        plan.dry_run(to_yaml(cfg), facts, hf_config, task.max_length, max_steps, f"{cfg.init_from}; {summary_line}")
        return 0

    # -- the run: process group, lease, the resume decision, checks before anything is overwritten ------
    try:
        run = Run.open(STAGE, cfg.run_dir, launched, cfg.engine.collective_timeout, cfg.train.lease_timeout, stops)
        run.check_resume({**plan.resume_checks(hf_config, cfg.train.seed),
                          "data_digest": (data_digest, "was trained on other examples; use a new run_dir or the "
                                          "original data"),
                          "task": (task.model_dump(mode="json"), "was trained with other task settings; restore them")})
        if run.finished(max_steps):
            run.say(f"{run.dir} already finished {run.resume.step} steps; final model in {run.dir / 'final'}")
            return run.close(0)
        run.publish(cfg, cfg.init_from)
        if default_template and run.dist.is_main:
            from lmforge import atomic

            atomic.write_text(run.dir / "tokenizer" / "chat_template.jinja", fd.DEFAULT_CHAT_TEMPLATE)
        resume_tag = run.resume_tag(ds, cfg.engine.universal_checkpoint)
    except RunError as e:
        return fail(PROG, e)
    d, device = run.dist, run.dist.device
    run.say(summary_line)

    # -- model and engine: the body from the folder; a classifier's head new, seeded alike on every rank --
    torch.manual_seed(cfg.train.seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "newly initialized: score.weight" is the point here, not a warning
    hf_logging.disable_progress_bar()  # one bar per rank for a load that takes a second
    with eng.model_context(ds):
        model = build(hf_config, cfg.init_from if cfg.init == "pretrained" else None)  # random: a fresh init
    hf_logging.set_verbosity(verbosity)
    hf_logging.enable_progress_bar()
    if cfg.lora:  # the base frozen; the adapters (and a classifier's head) train
        # peft (0.21) asks transformers' deprecated `is_gradient_checkpointing`: its warning, once per rank, is not ours
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        model = add_lora(model, cfg.lora, not sft)
    if cfg.engine.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = eng.initialize(model, ds, cfg.optim.weight_decay)
    torch.manual_seed(rank_seed(cfg.train.seed, d.rank, 0))  # dropout: each rank draws its own
    weights = None
    if task.class_weights and not sft:  # inverse frequency in train, mean 1
        counts = torch.bincount(torch.tensor(train.targets), minlength=len(labels)).double().clamp(min=1)
        weights = (counts.sum() / (len(labels) * counts)).float().to(device)

    # -- resume ------------------------------------------------------------------------------------------
    step = position = tokens_seen = 0
    load_seconds = None
    if run.resume is not None:
        try:
            record, load_seconds = run.load(engine, resume_tag, cfg.train.seed)
        except RunError as e:
            return fail(PROG, e)
        step, position, tokens_seen = record["step"], int(record["samples"]), int(record["tokens"])
        run.say(f"resumed from {run.resume.path} at step {step} ({position:,} examples seen)")
        if (change := schedule_change(record.get("max_steps"), max_steps, step, cfg.optim)):
            run.say(change)

    tracker = run.tracker(cfg.tracking, cfg.model_dump(mode="json"), step)
    peak, peak_source = device_peak(device, dtype, cfg.engine.peak_flops)
    peak = eng.all_reduce_sum([peak], device)[0] / d.world
    trainable = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters() if p.requires_grad)
    run.say(f"{hf_config.architectures[0]} {human(facts['total'])} parameters from {cfg.init_from}"
            f"{' (architecture only: random init)' if cfg.init == 'random' else ''} ({human(trainable)} "
            f"trained{', LoRA r=' + str(cfg.lora.r) if cfg.lora else ''}), {d.world} rank(s) "
            f"on {device.type}, ZeRO-{plan.zero_stage}, {plan.precision}; global batch {global_batch} examples "
            f"({len(train) / global_batch:.1f} steps per epoch); {max_steps} steps")

    order = GlobalOrder(len(train), cfg.train.seed)  # exactly once per epoch, resumable mid-epoch

    def forward_loss(x, y, scale: float) -> torch.Tensor:
        """The micro-batch's loss. SFT: summed over response tokens, times `scale` (see the loop)."""
        if sft:
            return lm_loss(engine, x, y, reduction="sum") * scale
        logits = engine(input_ids=x, use_cache=False).logits
        return F.cross_entropy(logits.float(), y, weight=weights)

    def evaluate(ex: fd.Examples, prefix: str) -> dict:
        """Loss (and accuracy, macro-F1 or exact match) over a whole split; equal forwards on every rank."""
        classes = 0 if sft else len(labels)
        sums = torch.zeros(2 + classes * classes + 2, dtype=torch.float64, device=device)  # loss, count, confusion, EM
        answers: dict[int, str] = {}  # SFT: this rank's greedy answers, by example
        engine.eval()
        with torch.no_grad():
            for ids, real in loop.eval_slices(len(ex), micro, d.rank, d.world):
                x, y = (t.to(device) for t in fd.batch(ex, ids, pad_id, sft))
                if sft:
                    loss, n = lm_loss(engine, x, y, reduction="sum"), (y != fd.IGNORE).sum()
                else:
                    logits = engine(input_ids=x, use_cache=False).logits.float()
                    loss, n = F.cross_entropy(logits, y, reduction="sum"), torch.tensor(len(ids), device=device)
                    if real:
                        sums[2:2 + classes * classes] += torch.bincount(
                            y * classes + logits.argmax(-1), minlength=classes * classes).double()
                if real:
                    sums[0] += loss.double()
                    sums[1] += n
            if sft:  # greedy answers to the first prompts, one at a time (generation is a collective under ZeRO-3)
                for ids, real in loop.eval_slices(len(ex.prompts), 1, d.rank, d.world):
                    prompt = torch.from_numpy(ex.prompts[ids[0]]).unsqueeze(0).to(device)
                    out = engine.module.generate(prompt, max_new_tokens=task.max_new_tokens, do_sample=False,
                                                 pad_token_id=pad_id, eos_token_id=tokenizer.eos_token_id,
                                                 synced_gpus=plan.zero_stage == 3)
                    answer = tokenizer.decode(out[0, prompt.shape[1]:], skip_special_tokens=True).strip()
                    if real:
                        sums[-2] += answer == ex.answers[ids[0]].strip()
                        sums[-1] += 1
                        answers[ids[0]] = answer
        engine.train()
        sums = torch.tensor(eng.all_reduce_sum(sums.tolist(), device), dtype=torch.float64)
        out = {f"{prefix}/loss": float(sums[0] / sums[1])}
        if sft:
            out[f"{prefix}/ppl"] = math.exp(min(out[f"{prefix}/loss"], 50))
            if sums[-1] > 0:
                out[f"{prefix}/exact_match"] = float(sums[-2] / sums[-1])
                gathered = {k: v for part in eng.gather_objects(answers) for k, v in part.items()}
                out[f"{prefix}/answers"] = [gathered[i] for i in sorted(gathered)]  # summary.json: what was scored
        else:
            out |= loop.classification_scores(sums[2:2 + classes * classes].view(classes, classes), prefix)
        return out

    def scalars(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if isinstance(v, float)}

    def record(at_step: int) -> dict:
        """The checkpoint's commit record: the position, what a resume checks, lineage and model card."""
        return {"samples": position, "tokens": tokens_seen, "max_steps": max_steps, "zero_stage": plan.zero_stage,
                "global_batch_size": global_batch, "seed": cfg.train.seed, "dtype": plan.precision,
                "model_digest": ckpt.config_digest(hf_config), "data_digest": data_digest,
                "task": task.model_dump(mode="json"), "wandb_id": tracker.run_id, "skipped_steps": health.skipped,
                "lineage": ckpt.lineage(STAGE, run.dir, at_step, tokens_seen, cfg.digest(), tok_hash,
                                        {"source": cfg.data.builtin or cfg.data.train.describe(),
                                         "digest": data_digest, "examples": len(train)}, cfg.init_from,
                                        (cfg.init_from,), result_digest(cfg)),
                "card": ckpt.card(STAGE, "text-generation" if sft else "text-classification",
                                  engine.module.get_base_model() if cfg.lora else engine.module,
                                  **run.facts(), tokens_seen=tokens_seen, steps=at_step,
                                  metrics=scalars(last_eval) | scalars(tested), config_yaml=to_yaml(cfg),
                                  parent=str(cfg.init_from), tokenizer_hash=tok_hash, labels=labels,
                                  lora=None if cfg.lora is None else (
                                      f"r={cfg.lora.r}, alpha={cfg.lora.alpha:g}, dropout={cfg.lora.dropout:g}, "
                                      f"target {cfg.lora.target_modules}; merged, adapter in adapter/"))}

    tok_hash = folder_hash(run.dir / "tokenizer")
    retention = ckpt.Retention(cfg.train.keep_last, cfg.train.keep_every, (max_steps,))
    save_seconds: list[float] = []

    def save() -> None:
        save_seconds.append(ckpt.save(engine, run.checkpoints, step, d, record(step), retention, run.say, run.owns))
        meter.reset()  # a save is not training throughput

    # -- the loop ----------------------------------------------------------------------------------------
    last_eval: dict = {}
    tested: dict = {}
    first_eval = None
    if step == 0:
        last_eval = first_eval = evaluate(val, "val")
        tracker.log(0, scalars(last_eval))
        run.say("step 0: " + loop.metrics_line(last_eval))
    meter = Meter(facts["flops_per_token"], peak, d.world, 0)
    stepper, window = loop.Stepper(engine, accum), loop.Window(device)
    health = loop.Health(cfg.train.max_bad_steps, int(run.resume.record.get("skipped_steps", 0)) if run.resume else 0)
    started, start_tokens = time.perf_counter(), tokens_seen
    real = padded = 0  # tokens of the examples, and what their micro-batches hold with padding (the log window)
    engine.train()
    while step < max_steps:
        eng.set_lr(engine, lr := lr_at(step, max_steps, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps,
                                       cfg.optim.schedule, cfg.optim.decay_fraction))
        # the step's examples, all ranks: every rank knows them, so the loss normaliser needs no collective
        step_items = [order.item_at(p) for p in range(position, position + global_batch)]
        step_tokens = sum(len(train.ids[i]) for i in step_items)
        # SFT: DeepSpeed averages over accum x world; summed losses times this give sum / the step's targets
        scale = accum * d.world / max(1, sum(train.target_tokens(i) for i in step_items)) if sft else 1.0
        # length-grouped: the step's examples sorted by length, micro-batch m of rank r takes slot m x W + r
        # (the update is the same whichever slot an example lands in; the padding is much less)
        by_length = sorted(step_items, key=lambda i: len(train.ids[i]))
        micro_batches = (fd.batch(train, by_length[(m * d.world + d.rank) * micro:][:micro], pad_id, sft)
                         for m in range(accum))
        padded += sum(micro * len(train.ids[by_length[min(k + micro, global_batch) - 1]])
                      for k in range(0, global_batch, micro))  # every slot is as long as its longest example
        for x, y in loop.prefetch(micro_batches, device):
            stepper.backward(forward_loss(x, y, scale))
        step_loss, norm = stepper.result()
        step, position, tokens_seen = step + 1, position + global_batch, tokens_seen + step_tokens
        real += step_tokens
        meter.step(step_tokens)
        logged: dict = {}
        verdict = health.check(norm, step, logged, run.say)
        if verdict == "abort":
            tracker.log(step, logged)
            tracker.finish(exit_code=1)
            return run.close(1)
        if verdict == "ok":
            window.add(step_loss)
        if step % cfg.train.log_every == 0 or step == max_steps:
            rate = meter.report()
            logged.update({"train/loss": window.reduce(), "train/lr": lr, "train/grad_norm": norm,
                           "train/tokens_per_s": rate["tokens_per_s"], "train/mfu": rate["mfu"],
                           "train/epoch": position / len(train), "train/padding": 1 - real / max(padded, 1),
                           **loop.memory(device)})
            real = padded = 0
            run.say(loop.status(step, max_steps, logged, duration((max_steps - step) * rate["step_seconds"])))
        if step % cfg.train.eval_every == 0 or step == max_steps:
            last_eval = evaluate(val, "val")
            logged.update(scalars(last_eval))
            run.say(f"step {step}: " + loop.metrics_line(last_eval))
            if step == max_steps and test is not None:  # the test split, once, before the last save (its card)
                tested = evaluate(test, "test")
                logged.update(scalars(tested))
                run.say("test: " + loop.metrics_line(tested))
            meter.reset()
        if logged:
            tracker.log(step, logged)
        code = run.save_or_stop(step, step % cfg.train.save_every == 0, step == max_steps, save, tracker,
                                cfg.train.max_time, PROG)
        if code is not None:
            return code

    # -- export: RUN_DIR/final, checked against the engine's own logits -------------------------------------
    elapsed = time.perf_counter() - started
    state_dict = eng.full_state_dict(engine)  # a collective under ZeRO-3
    probe = fd.batch(val, list(range(min(2, len(val)))), pad_id, sft)[0]
    engine.eval()
    with torch.no_grad():
        engine_logits = engine(input_ids=probe.to(device), use_cache=False).logits.float().cpu()
    engine = model = stepper = None
    run.leave()  # rank 0's export from here: no collective left to time out
    tracker.finish()
    if not d.is_main:
        return run.close(0)
    summary = {"task": task.type, "steps": step, "examples_seen": position, "tokens": tokens_seen,
               "seconds": round(elapsed, 2),
               "tokens_per_s": round((tokens_seen - start_tokens) / max(elapsed, 1e-9), 1),
               "world_size": d.world, "zero_stage": plan.zero_stage, "skipped_steps": health.skipped,
               "truncated": truncated, "labels": labels, "val_start": first_eval, "val": last_eval, "test": tested,
               "checkpoint_save_seconds": save_seconds, "checkpoint_load_seconds": load_seconds}
    extra = {}
    try:
        if cfg.lora:  # final/ is the merged model (a plain HF folder), final/adapter/ the adapter over init_from
            extra["adapter"] = run.dir / ".adapter.tmp"
            shutil.rmtree(extra["adapter"], ignore_errors=True)
            state_dict = merge_lora(hf_config, cfg.lora, not sft, state_dict, extra["adapter"], str(cfg.init_from))
        diff = ckpt.publish_final(run.dir, hf_config, state_dict, probe, engine_logits, device, dtype,
                                  cfg.eval.parity_tolerance, {**summary, "trainable_params": trainable}, extra)
    except (ckpt.CheckpointError, ModelError) as e:
        return run.close(fail(PROG, e, code=1))
    finally:
        for folder in extra.values():
            shutil.rmtree(folder, ignore_errors=True)
    if not sft:  # the per-class report and the confusion matrix of the last scored split
        scored, split = (tested, "test") if tested else (last_eval, "val")
        report = loop.per_class(scored[f"{split}/confusion"], labels)
        if cfg.tracking.plots:
            plot_confusion(scored[f"{split}/confusion"], labels, run.dir / "plots" / "confusion.png",
                           f"{split} split, step {step}")
        ckpt.write_summary(run.dir, {**json.loads((run.dir / "summary.json").read_text()), "per_class": report})
        run.say(f"per class ({split}): " + "; ".join(f"{r['label']} F1 {100 * r['f1']:.0f}% (n={r['support']})"
                                                   for r in report))
    run.say(f"done: {step} steps in {duration(elapsed)}; val {loop.metrics_line(last_eval)}"
            + (f"; test {loop.metrics_line(tested)}" if tested else "")
            + f"\n[{STAGE}] Hugging Face model: {run.dir / 'final'} (logits match the engine's to {diff:.1e})")
    return run.close(0)


if __name__ == "__main__":
    raise SystemExit(main())
