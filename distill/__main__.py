"""`python -m distill CONFIG.yaml [key=value ...]`: distill a teacher folder into a smaller student.

    torchrun --nproc_per_node=N -m distill configs/distill/demo.yaml             # a language model
    torchrun --nproc_per_node=N -m distill configs/distill/demo_classifier.yaml  # a classifier
    python -m distill CONFIG.yaml --dry-run                                      # resolved config and sizes; no work

Language models learn from token shards: loss = alpha x T^2 x divergence(teacher, student) + (1 - alpha) x the
next-token cross entropy (forward KL, reverse KL or JSD, chunked over the vocabulary), plus an optional loss on
hidden states. Classifiers learn a fine-tuning task's examples from a fine-tuned classifier: T^2 x KL over the
classes + cross entropy on the labels. The teacher is frozen, in eval mode, on every device in the training
dtype, or partitioned by its own ZeRO-3 engine (`teacher_zero3`). With `report.baseline` the same student is
first trained without distillation (RUN_DIR/baseline), and the end of the run writes RUN_DIR/report.md: sizes,
measured inference speed, scores, retention and speed-up.

Reads top to bottom: config -> teacher, data and student -> [the no-KD baseline's run] -> the distillation's
run: teacher -> student engine -> resume -> loop -> export -> report. The run's lifecycle, step mechanics and
checkpoints are the shared core (lmforge.run, .loop, .checkpoint); this file owns the data, the models, the
losses and the loop.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import sys
import time

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from distill import losses, report
from distill.student import Projections, from_teacher, identities, resolve
from distill.teacher_cache import CacheError, TeacherCache, data_identity
from lmforge import checkpoint as ckpt
from lmforge.config import to_yaml
from lmforge.config.base import result_digest
from lmforge.config.command import parse_command
from lmforge.config.distill import DistillConfig
from lmforge.data import examples as fd
from lmforge.data import tasks
from lmforge.data.sampler import GlobalOrder, WindowSampler, eval_windows
from lmforge.data.shards import ShardError, TokenShards, read_meta, split_digest
from lmforge.data.sources import DataError
from lmforge.models import ModelError, build, describe, folder_config, human
from lmforge.run import Plan, Run, RunError, catch_signals, fail, rank_seed
from lmforge.schedule import lr_at, schedule_change
from lmforge.throughput import Meter, device_peak, duration
from lmforge.tokenizer import folder_hash, vocabulary_hash

STAGE = "distill"
PROG = "python -m distill"


def main(argv: list[str] | None = None) -> int:
    launched = time.perf_counter()  # train.max_time counts start-up too
    stops = catch_signals()  # a SIGTERM during start-up is acted on at the first step
    argv = list(sys.argv[1:] if argv is None else argv)
    cfg, args = parse_command(PROG, DistillConfig, argv, __doc__.split("\n")[0],
                              extra={"--local_rank": {"type": int, "help": argparse.SUPPRESS}},  # deepspeed launcher
                              example="kd.temperature=4")
    if args.dry_run or not cfg.report.baseline:
        return distill(cfg, launched, stops, baseline=False, dry_run=args.dry_run)[0]
    code, finished = distill(cfg, launched, stops, baseline=True)  # the same student without a teacher, first
    if not finished:  # stopped (a signal, max_time) or failed: a rerun resumes the baseline
        return code
    if stops:  # a signal during the baseline's last step or export: it is done; a rerun starts the distillation
        from lmforge import engine as eng

        eng.teardown()
        return 0
    gc.collect()  # the baseline's engine (reference cycles) before the teacher and the student are built
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return distill(cfg, launched, stops, baseline=False)[0]


def distill(cfg: DistillConfig, launched: float, stops: list[int], baseline: bool, dry_run: bool = False
            ) -> tuple[int, bool]:
    """One run: the distillation into RUN_DIR, or (`baseline`) the same student trained alone into RUN_DIR/baseline
    with kd.alpha = 0, the process group kept for the distillation that follows. Returns (exit status, finished)."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from lmforge import engine as eng
    from lmforge import loop
    from lmforge.loss import lm_loss, token_loss

    lm, kd = cfg.data is not None, cfg.kd
    cached = lm and cfg.data.cache is not None  # the teacher's top-k logits from `python -m distill.cache`
    alpha = 0.0 if baseline else kd.alpha
    run_dir = cfg.run_dir / "baseline" if baseline else cfg.run_dir

    # -- the teacher, the data and the student: every error before any work ------------------------------
    try:
        if not (cfg.teacher / "config.json").is_file():
            raise ModelError(f"teacher: {cfg.teacher} is not a Hugging Face model folder (no config.json)")
        teacher_config = AutoConfig.from_pretrained(cfg.teacher)
        arch = (teacher_config.architectures or ["?"])[0]
        if lm != arch.endswith(("ForCausalLM", "LMHeadModel")) or not (lm or arch.endswith("ForSequenceClassification")):
            raise ModelError(f"teacher: {cfg.teacher} holds a {arch}; " + (
                "`data` (token shards) distils a causal LM teacher; for a classifier give `task` and `examples`"
                if lm else "`task` + `examples` distil a fine-tuned classifier (a ...ForSequenceClassification)"))
        teacher_vocab = vocabulary_hash(cfg.teacher)
        if lm:
            teacher_config = folder_config(cfg.teacher, cfg.data.seq_len, "data.seq_len")
            meta = read_meta(cfg.data.path)
            if vocabulary_hash(cfg.data.path / "tokenizer") != teacher_vocab:
                raise ModelError(f"the token shards in {cfg.data.path} were made with another tokenizer than the "
                                 f"teacher {cfg.teacher}'s (their tokenizer.json differ); tokenize with the teacher's "
                                 f"(tokenizer.pretrained: {cfg.teacher})")
            train, val = TokenShards(cfg.data.path, "train"), TokenShards(cfg.data.path, "val")
            sampler = WindowSampler(train, cfg.data.seq_len, cfg.train.seed)
            val_ids = eval_windows(val, cfg.data.seq_len, cfg.eval.windows)
            seq_len, labels, pad_id, test = cfg.data.seq_len, None, teacher_config.pad_token_id, None
            data_digest = hashlib.sha256(f"{meta['source_fingerprint']} {split_digest(meta)}".encode()).hexdigest()[:16]
            lineage_data = {"path": str(cfg.data.path.resolve()), "fingerprint": meta["source_fingerprint"],
                            "tokens": meta["splits"]["train"]["tokens"]}
        else:
            task, seq_len = cfg.task, cfg.task.max_length
            positions = getattr(teacher_config, "max_position_embeddings", None)
            if positions is not None and seq_len > positions:
                raise ModelError(f"task.max_length {seq_len} is longer than the teacher {cfg.teacher}'s {positions} "
                                 "positions (max_position_embeddings); use a shorter task.max_length")
            labels = [teacher_config.id2label[i] for i in range(teacher_config.num_labels)]
            tokenizer = AutoTokenizer.from_pretrained(cfg.teacher)
            pad_id = teacher_config.pad_token_id
            if cfg.examples.builtin:
                made = tasks.build(cfg.examples.builtin, cfg.examples.top_packages, cfg.examples.holdout)
                records = {s: [(f"{cfg.examples.builtin} {s} #{i}", r) for i, r in enumerate(made[s])]
                           for s in tasks.SPLITS}
            else:
                records = fd.load_records(cfg.examples, cfg.train.seed)
            encoded = {s: fd.encode_classification(r, tokenizer, task, cfg.examples, labels, s)
                       for s, r in records.items() if r is not None}
            train, val, test = encoded["train"], encoded["validation"], encoded.get("test")
            data_digest = hashlib.sha256(json.dumps([r for _, r in records["train"]], sort_keys=True, default=str)
                                         .encode()).hexdigest()[:16]
            lineage_data = {"source": cfg.examples.builtin or cfg.examples.train.describe(), "digest": data_digest,
                            "examples": len(train)}
        # the student's config and the folder it starts from (None: a fresh initialisation)
        student_config, student_init = resolve(cfg, teacher_config, teacher_vocab, labels, pad_id, seq_len)
        if student_config.vocab_size != teacher_config.vocab_size:
            raise ModelError(f"the student's vocabulary ({student_config.vocab_size} tokens) is not the teacher's "
                             f"({teacher_config.vocab_size}): a student must share the teacher's tokenizer")
        if kd.hidden:
            for s, t in kd.hidden.pairs:
                if not (0 <= s <= student_config.num_hidden_layers and 0 <= t <= teacher_config.num_hidden_layers):
                    raise ModelError(f"kd.hidden.pairs: [{s}, {t}] is out of range: hidden states go from 0 (the "
                                     f"embeddings) to {student_config.num_hidden_layers} in the student and "
                                     f"{teacher_config.num_hidden_layers} in the teacher")
        cache = TeacherCache(cfg.data.cache, seq_len) if cached and not baseline else None  # reads its meta.json
        if cache is not None and cache.meta["temperature"] != kd.temperature:
            raise CacheError(f"{cfg.data.cache} keeps the teacher's normaliser at temperature "
                             f"{cache.meta['temperature']:g}, this run distils at kd.temperature={kd.temperature:g}: set "
                             f"kd.temperature={cache.meta['temperature']:g}, or write a cache with temperature: "
                             f"{kd.temperature:g}")
        if cache is not None and len(val_ids) != cache.meta.get("teacher_val_windows"):
            raise CacheError(f"{cfg.data.cache} scored the teacher on {cache.meta.get('teacher_val_windows')} "
                             f"validation windows and eval.windows gives the student {len(val_ids)}: set "
                             f"eval.windows={cache.meta.get('teacher_val_windows')} so both are scored on the same ones")
        facts = describe(student_config, seq_len)
        teacher_facts = describe(teacher_config, seq_len)
        plan = Plan.make(cfg.batch, cfg.engine, cfg.optim)
    except (DataError, ModelError, ShardError, CacheError, ckpt.CheckpointError, eng.EngineError, OSError,
            ValueError) as e:  # ValueError: a config.json transformers cannot read
        return fail(PROG, e), False
    micro, accum, global_batch, dtype, ds = plan.micro, plan.accum, plan.global_batch, plan.dtype, plan.ds
    max_steps = cfg.train.max_steps
    # MFU counts the teacher's forward too (a third of its training FLOPs per token)
    flops_per_token = facts["flops_per_token"] + (teacher_facts["flops_per_token"] // 3 if alpha > 0 and not cached
                                                  else 0)
    if dry_run:
        plan.dry_run(to_yaml(cfg), facts, student_config, seq_len, max_steps,
                     f"teacher {cfg.teacher} ({arch}, {human(teacher_facts['total'])} parameters, "
                     f"{teacher_config.num_hidden_layers} layers); student {student_config.num_hidden_layers} layers")
        return 0, False

    # -- the run: process group, lease, the resume decision, checks before anything is overwritten ----------
    kd_record = {**kd.model_dump(mode="json"), "alpha": alpha,  # and where the teacher's distribution comes from
                 "teacher_source": None if baseline else f"cache top-{cache.top_k}" if cache else "live"}
    # this run's config; a baseline has its own W&B name beside the distillation's (not "baseline" for every one)
    shown = cfg.model_copy(update={"run_dir": run_dir, "kd": kd.model_copy(update={"alpha": alpha}), "tracking": (
        cfg.tracking.model_copy(update={"name": f"{cfg.tracking.name or cfg.run_dir.resolve().name}-baseline"})
        if baseline else cfg.tracking)})
    try:
        run = Run.open(STAGE, run_dir, launched, cfg.engine.collective_timeout, cfg.train.lease_timeout, stops)
        # the teacher's (and a folder student's) identity: rank 0 reads 16 MiB of each weight file, once
        teacher_id, init_identity = run.on_main(lambda: identities(cfg, teacher_config),
                                                (ckpt.CheckpointError, OSError))
        if cache is not None:  # built by this teacher over these windows, every shard whole: or refused now
            run.on_main(lambda: (cache.check(teacher_id, data_identity(meta, seq_len)), cache.verify()),
                        (CacheError, OSError))
        run.check_resume({
            **plan.resume_checks(student_config, cfg.train.seed),
            "data_digest": (data_digest, "was trained on other data; use a new run_dir or the original data"),
            "kd": (kd_record, "was trained with other kd settings; restore them (see its config.yaml) or use a new "
                   "run_dir"),
            "teacher": (None if baseline else teacher_id, "was distilled from another teacher (its config or weights "
                        "differ); restore that teacher or use a new run_dir"),
            "student_init": (init_identity, "started from another student (student.*); restore it or use a new run_dir"),
            "seq_len": (seq_len, "used another data.seq_len (task.max_length); restore it"),
            "task": (cfg.task.model_dump(mode="json") if cfg.task else None, "used other task settings; restore them")})
        if run.finished(max_steps):
            run.say(f"{run.dir} already finished {run.resume.step} steps; final model in {run.dir / 'final'}")
            if baseline:
                run.release()
                return 0, True
            run.leave()
            code = 0
            if run.dist.is_main and not (run.dir / "report.md").is_file():  # killed while writing it: write it now
                code = report.write_for(cfg, run, lm, teacher_config, run.resume.record, labels, pad_id, val,
                               val_ids if lm else None, test, dtype)
            return run.close(code), code == 0
        if cfg.student.from_teacher:  # one rank writes the student's first weights, once (the baseline's too)
            run.on_main(lambda: from_teacher(cfg.teacher, teacher_config, cfg.student.from_teacher.layers, student_init,
                                             init_identity), (ModelError, OSError, SafetensorError))
        if lm:
            run.on_main(lambda: (train.verify(), val.verify()), (ShardError,))
        run.publish(shown, cfg.teacher)
        resume_tag = run.resume_tag(ds, cfg.engine.universal_checkpoint)
    except RunError as e:
        return fail(PROG, e), False
    d, device = run.dist, run.dist.device
    run.say(("no-KD baseline (kd.alpha = 0, no teacher): " if baseline else "")
            + f"{arch} teacher {human(teacher_facts['total'])} ({teacher_config.num_hidden_layers} layers) -> "
            f"student {human(facts['total'])} ({student_config.num_hidden_layers} layers)")

    # -- the teacher: frozen; on every device, or partitioned by its own ZeRO-3 engine ----------------------
    teacher = None
    quiet = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # a classifier's "newly initialized: score.weight" is the point, not a warning
    hf_logging.disable_progress_bar()  # one bar per rank for a load that takes a second
    if not baseline and not cached:
        teacher_ds = eng.frozen_config(ds) if cfg.teacher_zero3 else None
        problem = None
        try:  # a damaged weight file on one rank's view of the filesystem: every rank stops, with the reason
            with eng.model_context(teacher_ds or {}):
                teacher = eng.freeze(build(teacher_config, cfg.teacher, dtype=dtype), teacher_ds, device)
        except (OSError, ValueError, SafetensorError) as e:
            problem = f"rank {run.dist.rank} could not load the teacher {cfg.teacher}: {type(e).__name__}: {e}"
        try:
            run.agree(problem)
        except RunError as e:
            return fail(PROG, e), False
        if cfg.teacher_zero3:
            held = sum(p.ds_tensor.numel() for p in teacher.module.parameters())
            whole = sum(p.ds_numel for p in teacher.module.parameters())
            run.say(f"teacher partitioned by ZeRO-3: {held:,} of its {whole:,} parameters held on each rank")

    # -- the student and its engine -------------------------------------------------------------------------
    torch.manual_seed(cfg.train.seed)  # the same fresh weights (or projections) on every rank and every run
    with eng.model_context(ds):
        model = build(student_config, student_init)
    hf_logging.set_verbosity(quiet)
    hf_logging.enable_progress_bar()
    pairs = kd.hidden.pairs if kd.hidden and alpha > 0 else []
    if pairs and student_config.hidden_size != teacher_config.hidden_size:  # trained, checkpointed, not exported
        model.distill_projections = Projections(len(pairs), student_config.hidden_size, teacher_config.hidden_size)
    if cfg.engine.activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    engine = eng.initialize(model, ds, cfg.optim.weight_decay)
    torch.manual_seed(rank_seed(cfg.train.seed, d.rank, 0))  # dropout: each rank draws its own

    # -- resume ----------------------------------------------------------------------------------------------
    step = position = tokens_seen = 0
    load_seconds = None
    teacher_eval = None
    last_eval: dict = {}
    tested: dict = {}
    if run.resume is not None:
        try:
            record, load_seconds = run.load(engine, resume_tag, cfg.train.seed)
        except RunError as e:
            return fail(PROG, e), False
        step, position, tokens_seen = record["step"], int(record["samples"]), int(record["tokens"])
        teacher_eval = record.get("teacher_eval")
        last_eval, tested = record.get("last_eval") or {}, record.get("tested") or {}  # a resume at max_steps exports them
        run.say(f"resumed from {run.resume.path} at step {step} ({tokens_seen:,} tokens seen)")
        if (change := schedule_change(record.get("max_steps"), max_steps, step, cfg.optim)):
            run.say(change)

    tracker = run.tracker(shown.tracking, shown.model_dump(mode="json") | {"baseline": baseline}, step)
    peak, peak_source = device_peak(device, dtype, cfg.engine.peak_flops)
    peak = eng.all_reduce_sum([peak], device)[0] / d.world
    run.say(f"{d.world} rank(s) on {device.type}, ZeRO-{plan.zero_stage} student, "
            + ("no teacher" if baseline else f"the teacher's top-{cache.top_k} logits from {cfg.data.cache}" if cached
               else "teacher " + ("partitioned (ZeRO-3)" if cfg.teacher_zero3 else "on every device"))
            + f", {plan.precision}; kd alpha {alpha:g}, T {kd.temperature:g}, {kd.divergence}"
            + (f", hidden {kd.hidden.loss} on {pairs}" if pairs else "") + f"; global batch {global_batch} "
            f"{'sequences' if lm else 'examples'}; {max_steps} steps")

    order = None if lm else GlobalOrder(len(train), cfg.train.seed)  # classifier examples: once per epoch

    def step_batches() -> tuple[list, int]:
        """This rank's micro-batches of the step at `position` as (inputs, targets), and the step's tokens."""
        if lm:
            positions = [sampler.rank_positions(position, micro, accum, d.rank, d.world, m) for m in range(accum)]
            rows = [sampler.batch(p) for p in positions]
            if cache is not None:  # the teacher's top-k at every input position of each row's window
                windows = [[sampler.window_at(q) for q in p] for p in positions]
                taught = [(*cache.rows(w), cache.lse(w)) for w in windows]
                return [(x[:, :-1], x[:, 1:], *t) for x, t in zip(rows, taught, strict=True)], global_batch * seq_len
            return [(x[:, :-1], x[:, 1:]) for x in rows], global_batch * seq_len
        items = [order.item_at(p) for p in range(position, position + global_batch)]
        by_length = sorted(items, key=lambda i: len(train.ids[i]))  # length-grouped: far less padding
        return ([fd.batch(train, by_length[(m * d.world + d.rank) * micro:][:micro], pad_id, False)
                 for m in range(accum)], sum(len(train.ids[i]) for i in items))

    def micro_loss(x: torch.Tensor, y: torch.Tensor, *top: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The micro-batch's loss, and the divergence from the teacher alone (None without a teacher). `top`: the
        cached teacher's top-k (indices, logits) and log-normaliser at each position."""
        if top:  # offline: the exact KL over the teacher's top-k and the rest of its mass
            logits = engine(input_ids=x, use_cache=False).logits
            soft = losses.topk_kd_loss(logits, top[0], top[1], kd.temperature, teacher_lse=top[2])
            return alpha * kd.temperature ** 2 * soft + (
                (1 - alpha) * token_loss(logits, y) if alpha < 1 else 0.0), soft.detach()
        if teacher is None:  # the no-KD baseline: the task loss alone
            if lm:
                return lm_loss(engine, x, y), None
            return F.cross_entropy(engine(input_ids=x, use_cache=False).logits.float(), y), None
        out = engine(input_ids=x, use_cache=False, output_hidden_states=bool(pairs))
        with torch.no_grad():  # under ZeRO-3 a collective: every rank runs the same micro-batches
            taught = teacher(input_ids=x, use_cache=False, output_hidden_states=bool(pairs))
        if lm:  # chunked over the vocabulary: no fp32 [tokens, vocab] tensor for either loss
            soft = losses.kd_loss(out.logits, taught.logits, kd.temperature, kd.divergence, kd.beta)
        else:
            soft = losses.class_kd_loss(out.logits, taught.logits, kd.temperature)
        loss = alpha * kd.temperature ** 2 * soft
        if alpha < 1:  # the hard labels (at alpha 1 not computed: a [tokens, vocab] gradient saved)
            loss = loss + (1 - alpha) * (token_loss(out.logits, y) if lm else F.cross_entropy(out.logits.float(), y))
        if pairs:
            mapped = getattr(engine.module, "distill_projections", None)
            term = sum(losses.hidden_loss(mapped(j, out.hidden_states[s]) if mapped else out.hidden_states[s],
                                          taught.hidden_states[t], kd.hidden.loss) for j, (s, t) in enumerate(pairs))
            loss = loss + kd.hidden.weight * term / len(pairs)
        return loss, soft.detach()

    def evaluate(net, prefix: str, ex=None) -> dict:
        """The student's (or the teacher's) score: validation loss and perplexity (language models), or loss,
        accuracy and macro-F1 over a split (classifiers). Every rank runs the same number of forwards."""
        classes = 0 if lm else len(labels)
        sums = torch.zeros(2 + classes * classes, dtype=torch.float64, device=device)  # loss, count, confusion
        net.eval()
        with torch.no_grad():
            for ids, real in loop.eval_slices(len(val_ids) if lm else len(ex), micro, d.rank, d.world):
                if lm:
                    x = torch.stack([torch.from_numpy(val.window(val_ids[i], seq_len).astype("int64"))
                                     for i in ids]).to(device)
                    loss, n = lm_loss(net, x[:, :-1], x[:, 1:], reduction="sum"), x[:, 1:].numel()
                else:
                    x, y = (t.to(device) for t in fd.batch(ex, ids, pad_id, False))
                    logits = net(input_ids=x, use_cache=False).logits.float()
                    loss, n = F.cross_entropy(logits, y, reduction="sum"), len(ids)
                    if real:
                        sums[2:] += torch.bincount(y * classes + logits.argmax(-1), minlength=classes ** 2).double()
                if real:
                    sums[0] += loss.double()
                    sums[1] += n
        if net is engine:
            engine.train()
        sums = torch.tensor(eng.all_reduce_sum(sums.tolist(), device), dtype=torch.float64)
        out = {f"{prefix}/loss": float(sums[0] / sums[1])}
        if lm:
            return out | {f"{prefix}/ppl": math.exp(min(out[f"{prefix}/loss"], 50))}
        return out | loop.classification_scores(sums[2:].view(classes, classes), prefix)

    def scores(metrics: dict) -> dict:
        return {k: v for k, v in metrics.items() if isinstance(v, float)}

    def record(at_step: int) -> dict:
        """The checkpoint's commit record: the position, what a resume checks, lineage and model card."""
        return {"samples": position, "tokens": tokens_seen, "max_steps": max_steps, "zero_stage": plan.zero_stage,
                "global_batch_size": global_batch, "seed": cfg.train.seed, "dtype": plan.precision,
                "model_digest": ckpt.config_digest(student_config), "data_digest": data_digest, "kd": kd_record,
                "seq_len": seq_len, "task": cfg.task.model_dump(mode="json") if cfg.task else None,
                "teacher": None if baseline else teacher_id, "student_init": init_identity,
                "teacher_eval": teacher_eval, "last_eval": scores(last_eval), "tested": scores(tested),
                "export_skips": [Projections.PREFIX], "wandb_id": tracker.run_id, "skipped_steps": health.skipped,
                "lineage": ckpt.lineage(STAGE, run.dir, at_step, tokens_seen, shown.digest(), tok_hash,
                                        lineage_data, cfg.teacher, (cfg.data.path if lm else None, cfg.teacher,
                                                                    cfg.student.init_from),
                                        result_digest(shown)),
                "card": ckpt.card(STAGE, "text-generation" if lm else "text-classification", engine.module,
                                  **run.facts(), tokens_seen=tokens_seen, steps=at_step,
                                  metrics=scores(last_eval) | scores(tested), config_yaml=to_yaml(shown),
                                  parent=str(cfg.teacher), labels=labels, tokenizer_hash=tok_hash)}

    tok_hash = folder_hash(run.dir / "tokenizer")  # as the other stages record it: one hash along a chain
    retention = ckpt.Retention(cfg.train.keep_last, cfg.train.keep_every, (max_steps,))
    save_seconds: list[float] = []

    def save() -> None:
        save_seconds.append(ckpt.save(engine, run.checkpoints, step, d, record(step), retention, run.say, run.owns))
        meter.reset()  # a save is not training throughput

    # -- the loop ------------------------------------------------------------------------------------------
    first_eval = None
    if cache is not None and teacher_eval is None:  # scored by the cache pass (it ran the teacher)
        teacher_eval = {"teacher/loss": cache.meta["teacher_val_loss"], "teacher/ppl": cache.meta["teacher_val_ppl"]}
        run.say(f"teacher (scored by distill.cache on {cache.meta.get('teacher_val_windows')} validation windows): "
                + loop.metrics_line(teacher_eval))
    if teacher is not None and teacher_eval is None:  # once per run: the score the student is measured against
        teacher_eval = evaluate(teacher, "teacher", None if lm else val) | (
            evaluate(teacher, "teacher_test", test) if test is not None else {})
        run.say("teacher: val " + loop.metrics_line({k: v for k, v in teacher_eval.items() if k.startswith("teacher/")})
                + ("; test " + loop.metrics_line({k: v for k, v in teacher_eval.items() if k.startswith("teacher_test/")})
                   if test is not None else ""))
    if step == 0:
        last_eval = first_eval = evaluate(engine, "val", None if lm else val)
        tracker.log(0, scores(last_eval) | scores(teacher_eval or {}))
        run.say("step 0: " + loop.metrics_line(last_eval))
    meter = Meter(flops_per_token, peak, d.world, 0)
    stepper, window, soft_window = loop.Stepper(engine, accum), loop.Window(device), loop.Window(device)
    health = loop.Health(cfg.train.max_bad_steps, int(run.resume.record.get("skipped_steps", 0)) if run.resume else 0)
    started, start_tokens = time.perf_counter(), tokens_seen
    engine.train()
    while step < max_steps:
        eng.set_lr(engine, lr := lr_at(step, max_steps, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps,
                                       cfg.optim.schedule, cfg.optim.decay_fraction))
        batches, step_tokens = step_batches()
        soft_sum = torch.zeros((), device=device)
        for batch in loop.prefetch(batches, device):
            loss, soft = micro_loss(*batch)
            stepper.backward(loss)
            if soft is not None:
                soft_sum += soft / accum
        step_loss, norm = stepper.result()
        step, position, tokens_seen = step + 1, position + global_batch, tokens_seen + step_tokens
        meter.step(step_tokens)
        logged: dict = {}
        verdict = health.check(norm, step, logged, run.say)
        if verdict == "abort":
            tracker.log(step, logged)
            tracker.finish(exit_code=1)
            return run.close(1), False
        if verdict == "ok":
            window.add(step_loss)
            soft_window.add(soft_sum)
        if step % cfg.train.log_every == 0 or step == max_steps:
            rate = meter.report()
            divergence = soft_window.reduce()
            logged.update({"train/loss": window.reduce(), "train/lr": lr, "train/grad_norm": norm,
                           "train/tokens_per_s": rate["tokens_per_s"], "train/mfu": rate["mfu"],
                           "train/tokens": tokens_seen, **loop.memory(device)}
                          | ({"train/divergence": divergence} if not baseline else {}))
            run.say(loop.status(step, max_steps, logged, duration((max_steps - step) * rate["step_seconds"])))
        if step % cfg.train.eval_every == 0 or step == max_steps:
            last_eval = evaluate(engine, "val", None if lm else val)
            logged.update(scores(last_eval))
            run.say(f"step {step}: " + loop.metrics_line(last_eval))
            if step == max_steps and not lm and test is not None:  # the test split, once, before the last save
                tested = evaluate(engine, "test", test)
                logged.update(scores(tested))
                run.say("test: " + loop.metrics_line(tested))
            meter.reset()
        if logged:
            tracker.log(step, logged)
        code = run.save_or_stop(step, step % cfg.train.save_every == 0, step == max_steps, save, tracker,
                                cfg.train.max_time, PROG)
        if code is not None:
            return code, False

    # -- export: final/, checked against the engine's own logits (the projections are training aids) --------
    elapsed = time.perf_counter() - started
    state_dict = eng.full_state_dict(engine)  # a collective under ZeRO-3
    if state_dict is not None:
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(Projections.PREFIX)}
    probe = torch.stack([torch.from_numpy(val.window(val_ids[i], seq_len).astype("int64"))
                         for i in range(min(2, len(val_ids)))])[:, :-1] if lm else \
        fd.batch(val, list(range(min(2, len(val)))), pad_id, False)[0]
    engine.eval()
    with torch.no_grad():
        engine_logits = engine(input_ids=probe.to(device), use_cache=False).logits.float().cpu()
    engine = model = stepper = teacher = None  # their memory goes before rank 0 reloads the export
    if cache is not None:
        cache.close()
    tracker.finish()
    summary = {"steps": step, "tokens": tokens_seen, "seconds": round(elapsed, 2),
               "tokens_per_s": round((tokens_seen - start_tokens) / max(elapsed, 1e-9), 1), "world_size": d.world,
               "zero_stage": plan.zero_stage, "skipped_steps": health.skipped, "baseline": baseline, "labels": labels,
               "val_start": first_eval, "val": last_eval, "test": tested, "teacher": teacher_eval,
               "checkpoint_save_seconds": save_seconds, "checkpoint_load_seconds": load_seconds}

    def export() -> float:
        return ckpt.publish_final(run.dir, student_config, state_dict, probe, engine_logits, device, dtype,
                                  cfg.eval.parity_tolerance, summary)

    if baseline:  # rank 0 exports while the others wait: the distillation follows in this launch
        try:
            diff = run.on_main(export, (ckpt.CheckpointError, ModelError))
        except RunError as e:
            return fail(PROG, e, code=1), False
        run.say(f"baseline done: {step} steps in {duration(elapsed)}; val {loop.metrics_line(last_eval)}; "
                f"{run.dir / 'final'} (logits match the engine's to {diff:.1e})")
        run.release()
        return 0, True
    run.leave()  # rank 0's export and report from here: no collective left to time out
    if not d.is_main:
        return run.close(0), True
    try:
        diff = export()
    except (ckpt.CheckpointError, ModelError) as e:
        return run.close(fail(PROG, e, code=1)), False
    run.say(f"done: {step} steps in {duration(elapsed)}; val {loop.metrics_line(last_eval)}"
            + (f"; test {loop.metrics_line(tested)}" if tested else "")
            + f"\n[{STAGE}] Hugging Face model: {run.dir / 'final'} (logits match the engine's to {diff:.1e})")
    code = report.write_for(cfg, run, lm, teacher_config, {"teacher_eval": teacher_eval}, labels, pad_id, val,
                   val_ids if lm else None, None if lm else test, dtype)
    return run.close(code), code == 0


if __name__ == "__main__":
    raise SystemExit(main())
