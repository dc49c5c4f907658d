"""`python -m pretrain CONFIG.yaml [key=value ...]`: train a causal LM on token shards with DeepSpeed ZeRO.

    torchrun --nproc_per_node=N -m pretrain CONFIG.yaml     # N ranks (multi-node: torchrun's c10d rendezvous)
    srun --ntasks-per-node=N python -m pretrain CONFIG.yaml # one task per GPU, ranks from Slurm's variables
    deepspeed --num_gpus N --module pretrain CONFIG.yaml    # the same through DeepSpeed's launcher
    python -m pretrain CONFIG.yaml                           # one process, the same code path
    python -m pretrain CONFIG.yaml --dry-run                 # resolved config, DeepSpeed JSON, sizes; no work

Reads top to bottom: config -> run -> data -> model -> engine -> resume -> loop -> export. The run's
lifecycle, step mechanics and checkpoints are the shared core (lmforge.run, .loop, .checkpoint); this
file owns the data, the model, the loss and the loop. Rerunning the same command resumes from the
newest complete checkpoint in RUN_DIR/checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

from lmforge import checkpoint as ckpt
from lmforge.config import to_yaml
from lmforge.config.base import result_digest
from lmforge.config.command import parse_command
from lmforge.config.pretrain import PretrainConfig
from lmforge.data.blend import Blend
from lmforge.data.shards import ShardError
from lmforge.models import ModelError, build, describe, human, model_config
from lmforge.run import Plan, Run, RunError, catch_signals, fail, rank_seed
from lmforge.schedule import lr_at, schedule_change
from lmforge.throughput import Meter, device_peak, duration
from lmforge.tokenizer import pad_token_id

STAGE = "pretrain"
PROG = "python -m pretrain"


def main(argv: list[str] | None = None) -> int:
    launched = time.perf_counter()  # train.max_time counts start-up too: the scheduler's clock already runs
    stops = catch_signals()  # a SIGTERM during start-up (imports, rendezvous) is acted on at the first step
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse_command(PROG, PretrainConfig, argv, __doc__.split("\n")[0],
                              extra={"--local_rank": {"type": int, "help": argparse.SUPPRESS}},  # deepspeed launcher
                              example="optim.lr=3e-4")
    from lmforge import engine as eng  # imports DeepSpeed: after the config is known to be good
    from lmforge import loop
    from lmforge.loss import lm_loss

    # -- what the data and the model say, and the batch arithmetic: errors before any work ---------
    try:
        # one token folder, or several blended by weight: a global, rank-free order of windows either way
        sampler = Blend(cfg.data.parts(), cfg.data.seq_len, cfg.train.seed)
        meta, tok = sampler.meta, sampler.meta["tokenizer"]
        hf_config = model_config(cfg.model, cfg.init_from, int(tok["vocab_size"]), int(tok["eos_id"]),
                                 pad_token_id(Path(cfg.data.first) / "tokenizer"), cfg.data.seq_len)
        facts = describe(hf_config, cfg.data.seq_len)  # parameters and FLOPs of the model actually trained
        plan = Plan.make(cfg.batch, cfg.engine, cfg.optim)
        val_ids = sampler.eval_set(cfg.eval.windows)  # a fixed validation set, shared among sources by weight
    except (ShardError, ModelError, eng.EngineError) as e:
        return fail(PROG, e)
    micro, accum, global_batch, dtype, ds = plan.micro, plan.accum, plan.global_batch, plan.dtype, plan.ds
    tokens_per_step = global_batch * cfg.data.seq_len
    if args.dry_run:
        plan.dry_run(to_yaml(cfg), facts, hf_config, cfg.data.seq_len, cfg.train.max_steps,
                     str(cfg.init_from or "model") + "; data " + ", ".join(
                         f"{p} ({w:.0%})" for p, w in zip(sampler.paths, sampler.weights, strict=True)))
        return 0

    # -- the run: process group, lease, the resume decision, checks before anything is overwritten --
    try:
        run = Run.open(STAGE, cfg.run_dir, launched, cfg.engine.collective_timeout, cfg.train.lease_timeout,
                       stops)
        run.check_resume({**plan.resume_checks(hf_config, cfg.train.seed),
                          "data_fingerprint": (sampler.fingerprint(), "was trained on different data "
                                               "(fingerprint, or blend weights); use a new run_dir or the original data"),
                          "tokenizer_hash": (tok["hash"], "was trained on data from another tokenizer; use a new run_dir"),
                          "data_split": (sampler.split_digest(), "was trained on another split of the data; use a new run_dir"),
                          "seq_len": (cfg.data.seq_len, "used another data.seq_len; restore it")})
        if run.finished(cfg.train.max_steps):
            run.say(f"{run.dir} already finished {run.resume.step} steps; final model in {run.dir / 'final'}")
            return run.close(0)
        run.on_main(lambda: [s.verify() for s in sampler.train + sampler.val], (ShardError,))  # one rank looks
        run.publish(cfg, Path(cfg.data.first) / "tokenizer")
        resume_tag = run.resume_tag(ds, cfg.engine.universal_checkpoint)
    except RunError as e:
        return fail(PROG, e)
    d, device = run.dist, run.dist.device

    def val_batch(ids: list[int]) -> torch.Tensor:
        return torch.stack([torch.from_numpy(sampler.val_window(val_ids[i]).astype("int64")) for i in ids])

    # -- model and engine (under ZeRO-3 the model is built partitioned, never whole on one rank) ----
    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every run
    with eng.model_context(ds):
        model = build(hf_config, cfg.init_from)
    if cfg.engine.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = eng.initialize(model, ds, cfg.optim.weight_decay)
    torch.manual_seed(rank_seed(cfg.train.seed, d.rank, 0))  # from here on (dropout) each rank draws its own
    if cfg.engine.compile:
        engine.compile()

    # -- resume --------------------------------------------------------------------------------------
    step = position = tokens_seen = 0
    load_seconds = None
    if run.resume is not None:
        try:
            record, load_seconds = run.load(engine, resume_tag, cfg.train.seed)
        except RunError as e:
            return fail(PROG, e)
        step, position, tokens_seen = record["step"], int(record["samples"]), int(record["tokens"])
        run.say(f"resumed from {run.resume.path} at step {step} ({tokens_seen:,} tokens seen"
                + (f"; saved on {record['world_size']} ranks, now {d.world})" if resume_tag != run.resume.tag else ")"))
        if (change := schedule_change(record.get("max_steps"), cfg.train.max_steps, step, cfg.optim)):
            run.say(change)

    tracker = run.tracker(cfg.tracking, cfg.model_dump(mode="json"), step)
    peak, peak_source = device_peak(device, dtype, cfg.engine.peak_flops)
    peak = eng.all_reduce_sum([peak], device)[0] / d.world  # CPU: the ranks' measurements, averaged
    run.say(f"{hf_config.model_type} {human(facts['total'])} parameters, {d.world} rank(s) on {device.type}, "
            f"ZeRO-{plan.zero_stage}, {plan.precision}"
            # read back from the model and the engine, not the config: an option that did not take shows here
            + (", activation checkpointing" if engine.module.is_activation_checkpointing else "")
            + (", torch.compile" if engine.is_compiled else "") + f"; global batch {global_batch} x "
            f"{cfg.data.seq_len} = {tokens_per_step:,} tokens/step; {sum(sampler.windows):,} train windows; "
            f"peak {peak / 1e12:.3g} TFLOP/s per device ({peak_source})")
    if len(sampler.paths) > 1:
        for part in sampler.describe(cfg.train.max_steps * global_batch):
            run.say(f"data: {part['path']}: {part['weight']:.1%} of the windows, {part['train_tokens']:,} train tokens "
                    f"({part['train_windows']:,} windows), {part['epochs']:.2f} epochs of it in {cfg.train.max_steps} "
                    "steps")

    def evaluate() -> dict:
        """Mean loss over the fixed validation windows; every rank runs the same number of forwards."""
        total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
        engine.eval()
        with torch.no_grad():
            for ids, real in loop.eval_slices(len(val_ids), micro, d.rank, d.world):
                x = val_batch(ids).to(device)
                loss = lm_loss(engine, x[:, :-1], x[:, 1:], reduction="sum")
                if real:
                    total += torch.stack([loss.double(), torch.tensor(float(x[:, 1:].numel()), device=device,
                                                                      dtype=torch.float64)])
        engine.train()
        loss_sum, count = eng.all_reduce_sum(total.tolist(), device)
        return {"val/loss": loss_sum / count, "val/ppl": math.exp(min(loss_sum / count, 50))}

    def record(at_step: int) -> dict:
        """The checkpoint's commit record: the position, what a resume checks, lineage and model card."""
        metrics = {k: v for k, v in last_eval.items() if isinstance(v, float)}
        return {"samples": position, "tokens": tokens_seen, "max_steps": cfg.train.max_steps,
                "zero_stage": plan.zero_stage, "global_batch_size": global_batch, "seq_len": cfg.data.seq_len,
                "seed": cfg.train.seed, "dtype": plan.precision, "model_digest": ckpt.config_digest(hf_config),
                "data_fingerprint": sampler.fingerprint(), "tokenizer_hash": tok["hash"],
                "data_split": sampler.split_digest(), "wandb_id": tracker.run_id, "skipped_steps": health.skipped,
                "lineage": ckpt.lineage(STAGE, run.dir, at_step, tokens_seen, cfg.digest(), tok["hash"], {
                    "path": str(Path(cfg.data.first).resolve()), "fingerprint": sampler.fingerprint(),
                    "config_digest": meta.get("config_digest"), "tokens": sampler.train_tokens(),
                    **({"mix": sampler.describe(0)} if len(sampler.paths) > 1 else {})},
                    cfg.init_from, (*sampler.paths, cfg.init_from), result_digest(cfg)),
                "card": ckpt.card(STAGE, "text-generation", engine.module, **run.facts(), tokens_seen=tokens_seen,
                                  steps=at_step, global_batch_tokens=tokens_per_step, metrics=metrics,
                                  data_fingerprint=sampler.fingerprint(), tokenizer_hash=tok["hash"],
                                  config_yaml=to_yaml(cfg), parent=str(cfg.init_from) if cfg.init_from else None)}

    retention = ckpt.Retention(cfg.train.keep_last, cfg.train.keep_every, (cfg.train.max_steps,))
    save_seconds: list[float] = []  # wall time of each save (all ranks, commit included)

    def save() -> None:
        save_seconds.append(ckpt.save(engine, run.checkpoints, step, d, record(step), retention, run.say, run.owns))
        meter.reset()  # a save is not training throughput

    # -- the loop ------------------------------------------------------------------------------------
    last_eval: dict = {}
    first_eval = None
    if step == 0:
        last_eval = first_eval = evaluate()
        tracker.log(0, {**last_eval, "train/tokens": 0})
        run.say(f"step 0: val loss {last_eval['val/loss']:.4f}, ppl {last_eval['val/ppl']:.2f}")
    meter = Meter(facts["flops_per_token"], peak, d.world, tokens_per_step)
    stepper, window = loop.Stepper(engine, accum), loop.Window(device)
    health = loop.Health(cfg.train.max_bad_steps, int(run.resume.record.get("skipped_steps", 0)) if run.resume else 0)
    train_seconds, started, start_step = 0.0, time.perf_counter(), step
    trace = loop.trace_file(d.rank)  # tests: the first tokens of every row each rank trains on
    engine.train()
    while step < cfg.train.max_steps:
        eng.set_lr(engine, lr := lr_at(step, cfg.train.max_steps, cfg.optim.lr, cfg.optim.min_lr,
                                       cfg.optim.warmup_steps, cfg.optim.schedule, cfg.optim.decay_fraction))
        step_began = time.perf_counter()
        rows = (sampler.batch(sampler.rank_positions(position, micro, accum, d.rank, d.world, m)) for m in range(accum))
        for m, x in enumerate(loop.prefetch(rows, device)):
            if trace:
                trace.write(json.dumps({"step": step + 1, "micro": m, "rows": x[:, :2].tolist()}) + "\n")
            loss = lm_loss(engine, x[:, :-1], x[:, 1:])
            if ckpt.fault_requested("nan-loss", step + 1, d.rank):  # tests: a rank's loss goes bad
                loss = loss * float("nan")
            stepper.backward(loss)
        step_loss, norm = stepper.result()
        train_seconds += time.perf_counter() - step_began  # steps only: no eval, no saves
        step, position, tokens_seen = step + 1, position + global_batch, tokens_seen + tokens_per_step
        meter.step()
        logged: dict = {}  # this step's metrics, sent once: training and validation together
        verdict = health.check(norm, step, logged, run.say)
        if verdict == "abort":
            tracker.log(step, logged)
            tracker.finish(exit_code=1)
            return run.close(1)
        if verdict == "ok":
            window.add(step_loss)
        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            rate = meter.report()
            logged.update({"train/loss": window.reduce(), "train/lr": lr, "train/grad_norm": norm,
                           "train/tokens_per_s": rate["tokens_per_s"], "train/mfu": rate["mfu"],
                           "train/tokens": tokens_seen, **loop.memory(device)})
            run.say(loop.status(step, cfg.train.max_steps, logged,
                                duration((cfg.train.max_steps - step) * rate["step_seconds"])))
        if step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
            last_eval = evaluate()
            text = loop.sample(engine, run.dir / "tokenizer" / "tokenizer.json", cfg.eval.prompt, cfg.eval.max_new_tokens,
                               hf_config.eos_token_id, plan.zero_stage == 3) if cfg.eval.prompt else None
            logged.update({**last_eval, "train/tokens": tokens_seen})
            if text is not None:
                tracker.log_text(step, "sample", text)
            run.say(f"step {step}: val loss {last_eval['val/loss']:.4f}, ppl {last_eval['val/ppl']:.2f}"
                    + (f"\n[{STAGE}] sample: {text!r}" if text is not None else ""))
            meter.reset()  # evaluation time is not training throughput
        if logged:
            tracker.log(step, logged)
        code = run.save_or_stop(step, step % cfg.train.save_every == 0, step == cfg.train.max_steps, save, tracker,
                                cfg.train.max_time, PROG)
        if code is not None:
            return code

    # -- export: RUN_DIR/final, checked against the engine's own logits ---------------------------
    elapsed = time.perf_counter() - started
    state_dict = eng.full_state_dict(engine)  # a collective under ZeRO-3
    probe = val_batch(list(range(min(2, len(val_ids)))))[:, :-1]
    engine.eval()
    with torch.no_grad():
        engine_logits = engine(input_ids=probe.to(device), use_cache=False).logits.float().cpu()
    module_config = engine.module.config
    engine = model = stepper = None  # the engine's device memory goes before rank 0 reloads the export there
    run.leave()  # the other ranks are done: what follows is rank 0's alone, with no collective to time out
    tracker.finish()
    if not d.is_main:
        return run.close(0)
    summary = {
        "steps": step, "tokens": tokens_seen, "seconds": round(elapsed, 2),
        "tokens_per_s": round((step - start_step) * tokens_per_step / max(elapsed, 1e-9), 1),
        "val_loss_start": first_eval["val/loss"] if first_eval else None,
        "val_ppl_start": first_eval["val/ppl"] if first_eval else None,
        "val_loss": last_eval.get("val/loss"), "val_ppl": last_eval.get("val/ppl"), "world_size": d.world,
        "zero_stage": plan.zero_stage, "skipped_steps": health.skipped, "checkpoint_save_seconds": save_seconds,
        "checkpoint_load_seconds": load_seconds, "train_seconds": train_seconds,
        "data_sources": [{**part, "windows_read": n, "share_read": round(n / max(position, 1), 6)} for part, n in
                         zip(sampler.describe(position), sampler.consumed(position), strict=True)]}
    try:
        diff = ckpt.publish_final(run.dir, module_config, state_dict, probe, engine_logits, device, dtype,
                                  cfg.eval.parity_tolerance, summary)
    except ckpt.CheckpointError as e:
        return run.close(fail(PROG, e, code=1))
    start = f"{first_eval['val/ppl']:.1f} -> " if first_eval else ""
    run.say(f"done: {step} steps, {tokens_seen:,} tokens in {duration(elapsed)} ({summary['tokens_per_s']:,.0f} "
            f"tok/s); val ppl {start}{last_eval.get('val/ppl', float('nan')):.1f}\n[{STAGE}] Hugging Face model: "
            f"{run.dir / 'final'} (logits match the engine's to {diff:.1e}); plots: {run.dir / 'plots'}")
    return run.close(0)


if __name__ == "__main__":
    raise SystemExit(main())
