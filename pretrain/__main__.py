"""`python -m pretrain CONFIG.yaml [key=value ...]`: train a causal LM on token shards with DeepSpeed ZeRO.

    torchrun --nproc_per_node=N -m pretrain CONFIG.yaml     # N ranks (multi-node: torchrun's c10d rendezvous)
    deepspeed --num_gpus N --module pretrain CONFIG.yaml    # the same through DeepSpeed's launcher
    python -m pretrain CONFIG.yaml                           # one process, the same code path
    python -m pretrain CONFIG.yaml --dry-run                 # resolved config, DeepSpeed JSON, sizes; no work

Reads top to bottom: config -> distributed -> data -> model -> engine -> resume -> loop -> export.
Rerunning the same command resumes from the newest complete checkpoint in RUN_DIR/checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lmforge import atomic
from lmforge import checkpoint as ckpt
from lmforge.config import save_config, to_yaml
from lmforge.config.command import parse_command
from lmforge.config.pretrain import PretrainConfig
from lmforge.data.sampler import WindowSampler, eval_windows
from lmforge.data.shards import ShardError, TokenShards, read_meta
from lmforge.models import ModelError, flops_per_token, human, num_params
from lmforge.schedule import lr_at
from lmforge.throughput import Meter, device_peak, duration, memory_bytes

STAGE = "pretrain"
OUT_OF_TIME = 1000  # the stop flag's value for train.max_time (signal numbers are below 65)


def rank_seed(seed: int, rank: int, step: int) -> int:
    """A seed for rank `rank`'s random stream from `step` on, distinct across ranks and steps."""
    return (seed * 1_000_003 + rank * 7_919 + step) % 2**63


def main(argv: list[str] | None = None) -> int:
    launched = time.perf_counter()  # train.max_time counts start-up too: the scheduler's clock already runs
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse_command("python -m pretrain", PretrainConfig, argv, __doc__.split("\n")[0],
                              extra={"--local_rank": {"type": int, "help": argparse.SUPPRESS}},  # deepspeed launcher
                              example="optim.lr=3e-4")
    from lmforge import engine as eng  # imports DeepSpeed: after the config is known to be good

    # -- what the data says, and the batch arithmetic: errors here come before any work ------------
    try:
        meta = read_meta(cfg.data.path)
        tok = meta["tokenizer"]
        vocab, eos_id = int(tok["vocab_size"]), int(tok["eos_id"])
        if cfg.model.vocab_size is not None and cfg.model.vocab_size != vocab:
            raise ModelError(f"model.vocab_size is {cfg.model.vocab_size} but the data in {cfg.data.path} was "
                             f"tokenized with a {vocab}-token vocabulary (meta.json); remove model.vocab_size "
                             "or tokenize with a matching tokenizer")
        world = int(os.environ.get("WORLD_SIZE", 1))
        micro, accum, global_batch = eng.resolve_batch(cfg.batch.micro_batch_size, cfg.batch.grad_accum,
                                                       cfg.batch.global_batch_size, world)
        device_guess = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dtype = eng.resolve_precision(cfg.engine.precision, device_guess)
        ds = eng.ds_config(eng.read_zero_json(cfg.engine.deepspeed), micro, accum, global_batch, dtype, cfg.optim,
                           device_guess)
    except (ShardError, ModelError, eng.EngineError) as e:
        print(f"python -m pretrain: error: {e}", file=sys.stderr)
        return 2
    params = num_params(cfg.model, vocab)
    fpt = flops_per_token(cfg.model, vocab, cfg.data.seq_len)
    tokens_per_step = global_batch * cfg.data.seq_len
    if args.dry_run:
        print(to_yaml(cfg), end="")
        print("# DeepSpeed config (ZeRO file + injected batch, precision, optimizer, clipping):")
        print(json.dumps(ds, indent=2))
        print(f"# world size {world}: global batch {global_batch} sequences = micro {micro} x accum {accum} x "
              f"{world} ranks; {tokens_per_step:,} tokens per step, {tokens_per_step * cfg.train.max_steps:,} in all")
        print(f"# parameters: {params['total']:,} ({human(params['total'])}; non-embedding "
              f"{human(params['non_embedding'])}); vocab {vocab:,} from {cfg.data.path}")
        print(f"# FLOPs per token (training, 6N + attention): {fpt:,}; per step {fpt * tokens_per_step:.3e}; "
              f"precision {str(dtype).removeprefix('torch.')}")
        return 0

    # -- distributed -----------------------------------------------------------------------------
    d = eng.setup_distributed()
    run_dir, ckpt_root = Path(cfg.run_dir), Path(cfg.run_dir) / "checkpoints"
    say = print if d.is_main else (lambda *a, **k: None)
    # Slurm sends SIGTERM (or --signal=USR1@T) before a time limit or on preemption. The handler only
    # records it; the ranks agree at the next step boundary, save, and exit 0 together.
    stop_signal: list[int] = []
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, lambda num, frame: stop_signal.append(num))
    if d.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic.remove_leftovers(run_dir)
        for gone in ckpt.remove_incomplete(ckpt_root):
            say(f"[pretrain] removed an interrupted save: {gone}")
    resume = eng.broadcast_object(ckpt.latest(ckpt_root) if d.is_main else None)  # rank 0 decides for all
    model_digest = cfg.model.digest()
    if resume is not None:  # checked before anything in run_dir is overwritten: a refused rerun changes nothing
        problem = check_resume(resume, cfg, meta, model_digest, d.world, eng.zero_stage(ds), global_batch)
        if problem:
            say(f"python -m pretrain: error: {problem}", file=sys.stderr)
            eng.teardown()
            return 2
        if resume.step >= cfg.train.max_steps and ckpt.exported_step(run_dir / "final") == resume.step:
            say(f"[pretrain] {run_dir} already finished {resume.step} steps; final model in {run_dir / 'final'}")
            eng.teardown()
            return 0
    if d.is_main:
        save_config(cfg, run_dir / "config.yaml")
        # The run folder stands on its own. A fresh start takes the data's tokenizer, even over one an
        # earlier attempt (which died before its first checkpoint) copied from other data.
        if resume is None or not (run_dir / "tokenizer" / "tokenizer.json").exists():
            atomic.publish_folder(run_dir / "tokenizer", lambda tmp: [
                (tmp / n).write_bytes((Path(cfg.data.path) / "tokenizer" / n).read_bytes())
                for n in ckpt.TOKENIZER_FILES if (Path(cfg.data.path) / "tokenizer" / n).is_file()])
    eng.barrier()  # every rank reads the run's tokenizer below

    # A ZeRO-1/2/3 checkpoint from another world size: rank 0 converts it to DeepSpeed's universal
    # format (once, atomically) and every rank loads that; the data position is global and follows.
    resume_tag = resume.tag if resume else None
    if resume is not None and resume.record["world_size"] != d.world and eng.zero_stage(ds) > 0:
        if d.is_main:
            say(f"[pretrain] {resume.path} was saved on {resume.record['world_size']} ranks; converting it to a "
                f"universal checkpoint for {d.world}")
            resume_tag = eng.convert_to_universal(resume.path)
        resume_tag = eng.broadcast_object(resume_tag)
        eng.enable_universal_load(ds)

    # -- data: a global, rank-free order of windows; a fixed validation set ------------------------
    train = TokenShards(cfg.data.path, "train")
    val = TokenShards(cfg.data.path, "val")
    sampler = WindowSampler(train, cfg.data.seq_len, cfg.train.seed)
    val_ids = eval_windows(val, cfg.data.seq_len, cfg.eval.windows)

    # -- model and engine ------------------------------------------------------------------------
    from lmforge.models import build_model

    torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and every run
    pad_id = pad_token_id(run_dir / "tokenizer")
    model = build_model(cfg.model, vocab, eos_id, pad_id, cfg.init_from)
    if cfg.engine.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = eng.initialize(model, ds, cfg.optim.weight_decay)
    torch.manual_seed(rank_seed(cfg.train.seed, d.rank, 0))  # from here on (dropout) each rank draws its own
    if cfg.engine.compile:
        engine.compile()
    stage3 = eng.partitions_weights(engine)
    device = d.device

    # -- resume ----------------------------------------------------------------------------------
    step = position = tokens_seen = 0
    load_seconds = None
    if resume is not None:
        began = time.perf_counter()
        eng.load_checkpoint(engine, ckpt_root, resume_tag)
        if resume_tag != resume.tag:
            eng.fix_zero3_universal_load(engine, resume.path)
        load_seconds = time.perf_counter() - began
        if not ckpt.load_rng(resume.path, d.rank):  # a rank the saving run did not have: a stream of its own
            torch.manual_seed(rank_seed(cfg.train.seed, d.rank, resume.step))
        step, position, tokens_seen = resume.step, int(resume.record["samples"]), int(resume.record["tokens"])
        say(f"[pretrain] resumed from {resume.path} at step {step} ({tokens_seen:,} tokens seen"
            + (f"; saved on {resume.record['world_size']} ranks, now {d.world})" if resume_tag != resume.tag else ")"))

    from lmforge.tracking import Tracker

    tracker = Tracker(run_dir, cfg.tracking, STAGE, cfg.model_dump(mode="json"), d.rank,
                      run_id=resume.record.get("wandb_id") if resume else None,
                      resume_step=step + 1 if resume else None)
    peak, peak_source = device_peak(device, dtype, cfg.engine.peak_flops)
    peak = eng.all_reduce_sum([peak], device)[0] / d.world  # CPU: the ranks' measurements, averaged
    say(f"[pretrain] {cfg.model.family} {human(params['total'])} parameters, {d.world} rank(s) on {device.type}, "
        f"ZeRO-{eng.zero_stage(ds)}, {str(dtype).removeprefix('torch.')}"
        # read back from the model and the engine, not the config: an option that did not take shows here
        + (", activation checkpointing" if model.is_gradient_checkpointing else "")
        + (", torch.compile" if engine.is_compiled else "") + f"; global batch {global_batch} x "
        f"{cfg.data.seq_len} = {tokens_per_step:,} tokens/step; {sampler.num_windows:,} train windows; "
        f"peak {peak / 1e12:.3g} TFLOP/s per device ({peak_source})")

    def evaluate() -> dict:
        """Mean loss over the fixed validation windows; every rank runs the same number of forwards."""
        mine = val_ids[d.rank::d.world]
        batches = math.ceil(math.ceil(len(val_ids) / d.world) / micro)
        engine.eval()
        total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of token losses, tokens)
        with torch.no_grad():
            for b in range(batches):
                ids = mine[b * micro:(b + 1) * micro]
                x = torch.stack([torch.from_numpy(val.window(i, cfg.data.seq_len).astype("int64"))
                                 for i in (ids or val_ids[:1])]).to(device)  # a rank with none still joins ZeRO-3
                logits = engine(input_ids=x[:, :-1]).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten(), reduction="sum")
                if ids:
                    total += torch.stack([loss.double(), torch.tensor(x[:, 1:].numel(), dtype=torch.float64,
                                                                      device=device)])
        engine.train()
        loss = eng.all_reduce_sum(total.tolist(), device)
        mean = loss[0] / loss[1]
        return {"val/loss": mean, "val/ppl": math.exp(min(mean, 50))}

    def sample() -> str | None:
        if not cfg.eval.prompt:
            return None
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(run_dir / "tokenizer" / "tokenizer.json"))
        prompt = torch.tensor([tokenizer.encode(cfg.eval.prompt, add_special_tokens=False).ids], device=device)
        engine.eval()
        with torch.no_grad():
            # greedy (no RNG drawn: a resumed run stays exact), with a repetition penalty so a young
            # model's sample reads as text rather than one token over and over
            out = engine.module.generate(prompt, max_new_tokens=cfg.eval.max_new_tokens, do_sample=False,
                                         repetition_penalty=1.3, pad_token_id=eos_id, eos_token_id=eos_id,
                                         synced_gpus=stage3)
        engine.train()
        return tokenizer.decode(out[0].tolist(), skip_special_tokens=False)

    save_seconds: list[float] = []  # wall time of each save (all ranks, commit included)

    def save(at_step: int) -> None:
        began = time.perf_counter()
        tag = ckpt.tag_for(at_step)
        if not eng.weights_finite(engine):  # never write what could not be resumed from
            raise ckpt.CheckpointError(f"non-finite weights at step {at_step}: not saving over {ckpt_root}")
        ckpt.fault("save-begin", at_step, d.rank)
        eng.save_checkpoint(engine, ckpt_root, tag,  # every rank writes its shards
                            die_mid_write=ckpt.fault_requested("save-mid-shards", at_step, d.rank))
        ckpt.fault("save-shards", at_step, d.rank)
        ckpt.save_rng(ckpt_root / tag, d.rank)
        ckpt.fault("save-rng", at_step, d.rank)
        if d.is_main:
            engine.module.config.save_pretrained(ckpt_root / tag)  # what `lmforge export` rebuilds from
        # DeepSpeed's torch.save does not fsync: a node that dies after the barrier could otherwise take
        # shards still in its page cache with it, under a commit record that vouches for them
        atomic.sync_tree(ckpt_root / tag)
        eng.barrier()  # ... and only once all of them are on disk does rank 0 commit
        ckpt.fault("save-commit", at_step, d.rank)
        if d.is_main:
            ckpt.commit(ckpt_root / tag, {
                "step": at_step, "samples": position, "tokens": tokens_seen, "world_size": d.world,
                "zero_stage": eng.zero_stage(ds), "global_batch_size": global_batch, "seq_len": cfg.data.seq_len,
                "model_digest": model_digest, "data_fingerprint": meta["source_fingerprint"],
                "tokenizer_hash": tok["hash"], "vocab_size": vocab, "eos_id": eos_id, "pad_id": pad_id,
                "dtype": str(dtype).removeprefix("torch."), "wandb_id": tracker.run_id, "skipped_steps": skipped,
                "lineage": lineage(at_step), "card": card(at_step, last_eval)})
            ckpt.fault("save-committed", at_step, d.rank)
            for gone in ckpt.prune(ckpt_root, cfg.train.keep_last, cfg.train.keep_every, (cfg.train.max_steps,)):
                say(f"[pretrain] removed old checkpoint {gone.name}")
            ckpt.fault("save-pruned", at_step, d.rank)
        eng.barrier()
        save_seconds.append(time.perf_counter() - began)

    def lineage(at_step: int) -> dict:
        data_lineage = Path(cfg.data.path) / "lineage.json"
        parent = Path(cfg.init_from) / "lineage.json" if cfg.init_from else None
        return {
            "stage": STAGE, "run_dir": str(run_dir.resolve()), "step": at_step, "tokens": tokens_seen,
            "config_digest": cfg.digest(), "git_commit": ckpt.git_commit(),
            "checkpoint": str((ckpt_root / ckpt.tag_for(at_step)).resolve()),
            "parent": str(Path(cfg.init_from).resolve()) if cfg.init_from else None,
            "tokenizer_hash": tok["hash"],
            "data": {"path": str(Path(cfg.data.path).resolve()), "fingerprint": meta["source_fingerprint"],
                     "config_digest": meta.get("config_digest"), "tokens": meta["splits"]["train"]["tokens"]},
            "upstream": [json.loads(p.read_text()) for p in (data_lineage, parent) if p and p.is_file()],
        }

    def card(at_step: int, metrics: dict) -> dict:
        return {
            "stage": STAGE, "task": "text-generation", "architecture": type(engine.module).__name__,
            "family": cfg.model.family, "num_params": params["total"], "num_layers": cfg.model.num_layers,
            "hidden_size": cfg.model.hidden_size, "num_heads": cfg.model.num_heads, "vocab_size": vocab,
            "context_length": cfg.model.max_seq_len, "tokens_seen": tokens_seen, "steps": at_step,
            "global_batch_tokens": tokens_per_step, "world_size": d.world, "device": device_name(device),
            "data_fingerprint": meta["source_fingerprint"], "tokenizer_hash": tok["hash"],
            "metrics": {k: v for k, v in metrics.items() if isinstance(v, float)},
            "command": command_line(), "config_yaml": to_yaml(cfg), "name": run_dir.name,
            "parent": str(cfg.init_from) if cfg.init_from else None,
        }

    # -- the loop --------------------------------------------------------------------------------
    last_eval: dict = {}
    first_eval = None
    if step == 0:
        last_eval = first_eval = evaluate()
        tracker.log(0, {**last_eval, "train/tokens": 0})
        say(f"[pretrain] step 0: val loss {last_eval['val/loss']:.4f}, ppl {last_eval['val/ppl']:.2f}")
    meter = Meter(fpt, peak, d.world, tokens_per_step)
    window_loss = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of step losses, steps) since last log
    skipped = int(resume.record.get("skipped_steps", 0)) if resume else 0
    bad_streak, train_seconds = 0, 0.0
    started, start_step = time.perf_counter(), step
    # tests: LMFORGE_TRACE_DIR records the first tokens of every row each rank trains on
    trace_dir = os.environ.get("LMFORGE_TRACE_DIR")
    trace = open(Path(trace_dir) / f"trace-rank{d.rank}.jsonl", "a") if trace_dir else None  # noqa: SIM115
    engine.train()
    while step < cfg.train.max_steps:
        eng.set_lr(engine, lr := lr_at(step, cfg.train.max_steps, cfg.optim.lr, cfg.optim.min_lr,
                                       cfg.optim.warmup_steps, cfg.optim.schedule, cfg.optim.decay_fraction))
        step_loss, norm, step_began = 0.0, None, time.perf_counter()
        for m in range(accum):
            x = sampler.batch(sampler.rank_positions(position, micro, accum, d.rank, d.world, m)).to(device)
            if trace:
                trace.write(json.dumps({"step": step + 1, "micro": m, "rows": x[:, :2].tolist()}) + "\n")
                trace.flush()
            logits = engine(input_ids=x[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            if ckpt.fault_requested("nan-loss", step + 1, d.rank):  # tests: a rank's loss goes bad
                loss = loss * float("nan")
            engine.backward(loss)  # DeepSpeed scales by 1/accum and reduces across ranks at the boundary
            if m == accum - 1 and eng.zero_stage(ds) == 0:
                norm = eng.params_grad_norm(engine.module)  # stage 0 reports none; clipping happens in step()
            with eng.update_skipped(engine, skip=norm is not None and not math.isfinite(norm)):
                engine.step()
            step_loss += loss.item() / accum
        norm = eng.grad_norm(engine) if norm is None else norm
        train_seconds += time.perf_counter() - step_began  # steps only: no eval, no saves
        step, position, tokens_seen = step + 1, position + global_batch, tokens_seen + tokens_per_step
        meter.step()
        logged: dict = {}  # this step's metrics, sent once: training and validation together
        # A non-finite loss on any rank makes the all-reduced gradient norm non-finite on every rank,
        # and that step's update is skipped everywhere: the same decision without another collective.
        if norm is not None and not math.isfinite(norm):
            skipped, bad_streak = skipped + 1, bad_streak + 1
            logged["train/skipped_steps"] = skipped
            say(f"[pretrain] step {step}: non-finite gradient norm ({norm}); update skipped on all ranks "
                f"({bad_streak} in a row, {skipped} in all)", flush=True)
            if bad_streak >= cfg.train.max_bad_steps:
                say(f"python -m pretrain: error: {bad_streak} consecutive steps with a non-finite loss or gradient "
                    f"(train.max_bad_steps); stopping without saving. The last checkpoint holds finite weights: "
                    "lower optim.lr, raise warmup, or check the data, then rerun to resume", file=sys.stderr)
                tracker.log(step, logged)
                tracker.finish(exit_code=1)
                eng.teardown()
                return 1
        else:
            bad_streak = 0
            window_loss += torch.tensor([step_loss, 1.0], dtype=torch.float64, device=device)

        if step % cfg.train.log_every == 0 or step == cfg.train.max_steps:
            loss_sum, count = eng.all_reduce_sum(window_loss.tolist(), device)
            window_loss.zero_()
            rate = meter.report()
            mem = eng.all_reduce_max(float(memory_bytes(device)), device)
            eta = (cfg.train.max_steps - step) * rate["step_seconds"]
            # a window of only skipped steps has no loss to show: NaN, not 0
            metrics = {"train/loss": loss_sum / count if count else float("nan"), "train/lr": lr, "train/grad_norm": norm,
                       "train/tokens_per_s": rate["tokens_per_s"], "train/mfu": rate["mfu"],
                       "train/tokens": tokens_seen, "train/memory_gb": mem / 1e9}
            logged.update(metrics)
            say(f"[pretrain] step {step}/{cfg.train.max_steps} | loss {metrics['train/loss']:.4f} | lr {lr:.2e} | "
                f"gnorm {norm if norm is not None else float('nan'):.3f} | {rate['tokens_per_s']:,.0f} tok/s | "
                f"MFU {100 * rate['mfu']:.1f}% | mem {mem / 1e9:.2f} GB | ETA {duration(eta)}", flush=True)
        if step % cfg.train.eval_every == 0 or step == cfg.train.max_steps:
            last_eval = evaluate()
            text = sample()
            logged.update({**last_eval, "train/tokens": tokens_seen})
            if text is not None:
                tracker.log_text(step, "sample", text)
            say(f"[pretrain] step {step}: val loss {last_eval['val/loss']:.4f}, ppl {last_eval['val/ppl']:.2f}"
                + (f"\n[pretrain] sample: {text!r}" if text is not None else ""), flush=True)
            meter.reset()  # evaluation time is not training throughput
        if logged:
            tracker.log(step, logged)
        # every rank's signal flag and the time budget, agreed in one collective per step
        out_of_time = cfg.train.max_time is not None and time.perf_counter() - launched > cfg.train.max_time
        flag = max(stop_signal, default=0) or (OUT_OF_TIME if out_of_time else 0)
        stop = int(eng.all_reduce_max(float(flag), device)) if step < cfg.train.max_steps else 0
        if step % cfg.train.save_every == 0 or step == cfg.train.max_steps or stop:
            save(step)
            meter.reset()
        if stop:
            why = "train.max_time reached" if stop == OUT_OF_TIME else f"{signal.Signals(stop).name} received"
            say(f"[pretrain] {why}: checkpoint saved at step {step}; rerun the same command to resume", flush=True)
            tracker.finish()
            eng.teardown()
            return 0

    # -- export: RUN_DIR/final, checked against the engine's own logits ---------------------------
    elapsed = time.perf_counter() - started
    state_dict = eng.full_state_dict(engine)  # a collective under ZeRO-3
    probe = torch.stack([torch.from_numpy(val.window(i, cfg.data.seq_len).astype("int64"))
                         for i in val_ids[:2]])[:, :-1]
    engine.eval()
    with torch.no_grad():
        engine_logits = engine(input_ids=probe.to(device)).logits.float().cpu()
    if d.is_main:
        final = run_dir / "final"
        final_ckpt = ckpt.latest(ckpt_root)
        ckpt.export_hf(final, engine.module.config, state_dict, run_dir / "tokenizer", final_ckpt.record["lineage"],
                       final_ckpt.record["card"], eos_id, pad_id)
        parity = export_parity(final, probe, engine_logits)
        atomic.write_json(run_dir / "summary.json", {
            "steps": step, "tokens": tokens_seen, "seconds": round(elapsed, 2),
            "tokens_per_s": round((step - start_step) * tokens_per_step / max(elapsed, 1e-9), 1),
            "val_loss_start": first_eval["val/loss"] if first_eval else None,
            "val_ppl_start": first_eval["val/ppl"] if first_eval else None,
            "val_loss": last_eval.get("val/loss"), "val_ppl": last_eval.get("val/ppl"),
            "export_parity_max_abs_diff": parity, "world_size": d.world, "zero_stage": eng.zero_stage(ds),
            "skipped_steps": skipped, "checkpoint_save_seconds": save_seconds, "checkpoint_load_seconds": load_seconds,
            "train_seconds": train_seconds})
    tracker.finish()
    if d.is_main:
        start = f"{first_eval['val/ppl']:.1f} -> " if first_eval else ""
        say(f"[pretrain] done: {step} steps, {tokens_seen:,} tokens in {duration(elapsed)} "
            f"({(step - start_step) * tokens_per_step / max(elapsed, 1e-9):,.0f} tok/s); val ppl {start}"
            f"{last_eval.get('val/ppl', float('nan')):.1f}\n[pretrain] Hugging Face model: {run_dir / 'final'} "
            f"(logits match the engine's to {parity:.1e}); plots: {run_dir / 'plots'}")
    eng.teardown()
    return 0


def check_resume(resume: ckpt.Checkpoint, cfg: PretrainConfig, meta: dict, model_digest: str, world: int,
                 stage: int, global_batch: int) -> str | None:
    """Why `resume` cannot continue this run (None when it can)."""
    r = resume.record
    if r.get("model_digest") != model_digest:
        return (f"{resume.path} was saved by a different model config; use a new run_dir, or restore the "
                "model section it was trained with (see its config.yaml)")
    if r.get("data_fingerprint") != meta["source_fingerprint"]:
        return (f"{resume.path} was trained on different data (fingerprint {r.get('data_fingerprint')}, "
                f"{cfg.data.path} has {meta['source_fingerprint']}); use a new run_dir or the original data")
    if r.get("seq_len") != cfg.data.seq_len:
        return f"{resume.path} used data.seq_len {r.get('seq_len')}; this config says {cfg.data.seq_len}"
    if r.get("global_batch_size") != global_batch:
        return (f"{resume.path} trained with a global batch of {r.get('global_batch_size')} sequences; this launch "
                f"gives {global_batch}: set batch.global_batch_size={r.get('global_batch_size')} so the run's "
                "math stays the same on any number of ranks")
    if r.get("zero_stage") != stage:
        return (f"{resume.path} was saved with ZeRO-{r.get('zero_stage')}; this config uses ZeRO-{stage} "
                f"({cfg.engine.deepspeed}): resume with the original DeepSpeed config")
    if r.get("world_size") != world and stage > 0 and not cfg.engine.universal_checkpoint:
        return (f"{resume.path} was saved on {r.get('world_size')} ranks with ZeRO-{stage} and this run has "
                f"{world}: relaunch on {r.get('world_size')} ranks, or set engine.universal_checkpoint=true to "
                "convert it to DeepSpeed's universal checkpoint and resume on any number of ranks")
    return None


def export_parity(final: Path, input_ids: torch.Tensor, engine_logits: torch.Tensor) -> float:
    """Load the exported folder as a user would and compare its logits with the engine's (max |diff|)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(final, dtype=torch.float32)
    reloaded.eval()
    with torch.no_grad():
        logits = reloaded(input_ids=input_ids).logits.float()
    save_file({"input_ids": input_ids.contiguous(), "logits": engine_logits.contiguous()},
              str(final.parent / "export_parity.safetensors"))  # for tests and for users who want to check
    return float((logits - engine_logits).abs().max())


def pad_token_id(folder: Path) -> int | None:
    """The id of the tokenizer's pad token, if its tokenizer_config.json names one."""
    from tokenizers import Tokenizer

    config = folder / "tokenizer_config.json"
    pad = json.loads(config.read_text()).get("pad_token") if config.is_file() else None
    pad = pad.get("content") if isinstance(pad, dict) else pad
    return Tokenizer.from_file(str(folder / "tokenizer.json")).token_to_id(pad) if pad else None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()})"


def command_line() -> str:
    """How this run was launched, for the model card (the launcher's own flags are not visible here)."""
    if "TORCHELASTIC_RUN_ID" in os.environ:
        nodes = int(os.environ.get("WORLD_SIZE", 1)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1))
        launcher = (f"torchrun --nnodes={nodes} " if nodes > 1 else "torchrun ") \
            + f"--nproc_per_node={os.environ.get('LOCAL_WORLD_SIZE', 1)}"
    else:
        launcher = "python"
    return f"{launcher} -m pretrain " + " ".join(shlex.quote(a) for a in sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
