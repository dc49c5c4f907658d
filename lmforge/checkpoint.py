"""Checkpoints: publish a complete one atomically, find the newest complete one, keep the last K,
and export weights as a Hugging Face folder.

    RUN_DIR/checkpoints/step-00000100/          DeepSpeed's shards (every rank writes its own)
    RUN_DIR/checkpoints/step-00000100/rng-rank0.safetensors   each rank's RNG state
    RUN_DIR/checkpoints/step-00000100/lmforge.json            the commit record, written last

DeepSpeed writes shards straight to their final names and its `latest` tag before the last barrier,
so neither says a checkpoint is whole. Here a checkpoint exists only once rank 0 has written
`lmforge.json` (fsynced, renamed into place) after a barrier that every rank reaches after writing:
a folder without it is a crash's leftover and is never loaded. The record holds the training
position (step, samples and tokens consumed), the world size, and the fingerprints a resume checks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lmforge import atomic
from lmforge.config.base import DIGEST_VERSION

FORMAT = "lmforge-checkpoint/1"
RECORD = "lmforge.json"
TAG_PREFIX = "step-"


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the message names the folder and what is wrong."""


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    record: dict

    @property
    def step(self) -> int:
        return int(self.record["step"])

    @property
    def tag(self) -> str:
        return self.path.name


def tag_for(step: int) -> str:
    return f"{TAG_PREFIX}{step:08d}"


def complete(root: Path) -> list[Checkpoint]:
    """The complete checkpoints under `root`, oldest first (a folder without its record is skipped)."""
    found = []
    for folder in sorted(Path(root).glob(f"{TAG_PREFIX}*")):
        record_path = folder / RECORD
        if not folder.is_dir() or not record_path.is_file():
            continue
        try:
            record = json.loads(record_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CheckpointError(f"{record_path}: unreadable commit record ({e}); delete {folder} to resume "
                                  "from the one before") from None
        if record.get("format") != FORMAT:
            raise CheckpointError(f"{record_path}: format {record.get('format')!r}; this lmforge reads {FORMAT!r} "
                                  "(a run written by another version: use that version, or a new run_dir)")
        found.append(Checkpoint(folder, record))
    return sorted(found, key=lambda c: c.step)


def latest(root: Path) -> Checkpoint | None:
    found = complete(root)
    return found[-1] if found else None


def incomplete(root: Path) -> list[Path]:
    return [p for p in sorted(Path(root).glob(f"{TAG_PREFIX}*")) if p.is_dir() and not (p / RECORD).is_file()]


def commit(folder: Path, record: dict) -> None:
    """Rank 0, after every rank has written its shards: make the checkpoint visible."""
    atomic.write_json(folder / RECORD, {"format": FORMAT, "saved_at": time.time(), **record})
    for path in (folder, folder.parent):  # the record's rename (and the step folder's name) survive a power cut
        atomic.fsync_path(path)


@dataclass(frozen=True)
class Retention:
    """Which complete checkpoints to keep (see `prune`)."""

    keep_last: int
    keep_every: int | None = None
    pinned: tuple[int, ...] = ()


def save(engine, root: Path, step: int, dist, record: dict, retention: Retention, say=print, owned=None) -> float:
    """Save step `step` by the lmforge protocol, on every rank (a collective); returns its wall seconds.

    1. refuse non-finite weights (nothing to resume from); 2. every rank writes its DeepSpeed shards and
    its RNG state, and fsyncs **the files it wrote** (an fsync from a node that did not write a file
    flushes nothing, and W ranks syncing every file would be ~2W^2 fsyncs per save on a parallel
    filesystem); 3. a barrier; 4. rank 0 writes the HF config, fsyncs the folders, commits `record`
    (the checkpoint now exists) and prunes. `dist` is the run's `engine.Dist`; `owned()` (rank 0) says
    whether this launch still holds the run folder: a launch that lost it commits nothing."""
    from lmforge import engine as eng

    began = time.perf_counter()
    tag = tag_for(step)
    if not eng.weights_finite(engine):  # never write what could not be resumed from
        raise CheckpointError(f"non-finite weights at step {step}: not saving over {root}")
    fault("save-begin", step, dist.rank)
    if fault_requested("save-slow", step, dist.rank):  # tests: a save long enough for a signal to land in it
        time.sleep(float(os.environ.get("LMFORGE_FAULT_SECONDS", 5)))
    written = eng.save_checkpoint(engine, root, tag, die_mid_write=fault_requested("save-mid-shards", step, dist.rank))
    fault("save-shards", step, dist.rank)
    save_rng(root / tag, dist.rank)
    fault("save-rng", step, dist.rank)
    for path in written:  # DeepSpeed's torch.save does not fsync
        atomic.fsync_path(path)
    if dist.is_main:
        config = engine.module.config
        config.architectures = [type(engine.module).__name__]  # what `lmforge export` rebuilds from
        config.save_pretrained(root / tag)
        atomic.fsync_path(root / tag / "config.json")
    eng.barrier()  # ... and only once every rank's files are on disk does rank 0 commit
    if not eng.broadcast_object(owned() if dist.is_main and owned else True):
        raise CheckpointError(f"{root}: another launch took over this run folder; step {step} is not committed")
    fault("save-commit", step, dist.rank)
    problem = None
    if dist.is_main:
        try:  # a full quota (EDQUOT) must reach every rank as an error, not leave them in a barrier
            for folder, _, _ in os.walk(root / tag, topdown=False):  # the entries of the folders DeepSpeed made
                atomic.fsync_path(folder)
            commit(root / tag, {"step": step, "world_size": dist.world, **record})
        except OSError as e:
            problem = f"{root / tag}: the commit failed ({e}); step {step} is not saved"
        fault("save-committed", step, dist.rank)
        try:  # the checkpoint is committed: a failed prune costs disk, not the run
            for gone in [] if problem else prune(root, retention.keep_last, retention.keep_every, retention.pinned):
                say(f"removed old checkpoint {gone.name}")
        except OSError as e:
            say(f"warning: pruning old checkpoints in {root} failed ({e}); they stay on disk", file=sys.stderr)
        fault("save-pruned", step, dist.rank)
    if (problem := eng.broadcast_object(problem)) is not None:  # the others wait here for rank 0's outcome
        raise CheckpointError(problem)
    return time.perf_counter() - began


def exported_step(final: Path) -> int | None:
    """The step an HF folder written by this run was exported at (its lineage.json), or None if there is
    no complete export: a rerun that extends max_steps must export again."""
    try:
        return int(json.loads((Path(final) / "lineage.json").read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def prune(root: Path, keep_last: int, keep_every: int | None = None, pinned: tuple[int, ...] = ()) -> list[Path]:
    """Delete complete checkpoints beyond the `keep_last` newest, except those at multiples of
    `keep_every` and the `pinned` steps (rank 0 only); returns what went. The newest complete one is
    never deleted. Folders without a record are left to `remove_incomplete`, which runs only when
    nothing is being written.

    A doomed checkpoint first leaves the complete set by a rename (`.step-N.pruned.tmp`, which no reader
    looks at and the next start-up deletes) and only then is deleted: a kill mid-delete never leaves a
    folder that holds its commit record but not all of its shards."""
    found = complete(root)
    keep_last = max(1, keep_last)

    def kept(c: Checkpoint) -> bool:
        return c.step in pinned or (keep_every is not None and c.step % keep_every == 0)

    doomed = [c.path for c in found[:-keep_last] if not kept(c)]
    for path in doomed:
        aside = path.parent / f".{path.name}.pruned{atomic.TMP_SUFFIX}"
        os.replace(path, aside)
        atomic.fsync_path(path.parent)  # the rename is durable before any shard goes
        shutil.rmtree(aside, ignore_errors=True)
    return doomed


def remove_incomplete(root: Path) -> list[Path]:
    """Delete the leftovers of interrupted saves (rank 0, at start-up, before any rank writes)."""
    gone = incomplete(root)
    for path in gone:
        shutil.rmtree(path, ignore_errors=True)
    return gone


# --------------------------------------------------------------------------------------------------
# Fault injection (tests): LMFORGE_FAULT="POINT:STEP:RANK" SIGKILLs that rank when it reaches POINT
# while saving step STEP ("nan-loss" turns that rank's loss into NaN in the training loop; "export-slow"
# and "export-drift" delay or corrupt rank 0's final export; "load-vanish:STEP:0" deletes the checkpoint
# of step STEP after the resume chose it, before it is loaded; "load-fail:STEP:RANK" makes that rank's files of it unreadable).
# The save points, in the order a save passes them:
FAULT_POINTS = ("save-begin", "save-mid-shards", "save-shards", "save-rng", "save-commit", "save-committed",
                "save-pruned")


def fault_requested(point: str, step: int, rank: int) -> bool:
    """Whether LMFORGE_FAULT names this point, step and rank ("STEP+" means that step and every later one)."""
    spec = os.environ.get("LMFORGE_FAULT", "").split(":")
    if len(spec) != 3 or spec[0] != point or spec[2] != str(rank):
        return False
    return step >= int(spec[1][:-1]) if spec[1].endswith("+") else step == int(spec[1])


def unreadable(folder: Path, rank: int, step: int, zero_stage: int | None) -> str | None:
    """Why this rank cannot read its own files of the DeepSpeed checkpoint in `folder` (None: it can): the
    model states it loads and its ZeRO partition, each opened and a byte read (2-3 opens, no listing).
    Checked before DeepSpeed's load, whose own collectives a rank failing alone would leave unmatched."""
    model = f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt" if zero_stage == 3 else "mp_rank_00_model_states.pt"
    optim = (f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt", f"bf16_zero_pp_rank_{rank}_mp_rank_00_optim_states.pt")
    try:
        if fault_requested("load-fail", step, rank):  # tests: this rank's view of the checkpoint is broken
            raise OSError(f"injected read failure in {folder}")
        for name, required in ((model, True), *((n, False) for n in optim)):
            try:
                with open(folder / name, "rb") as f:
                    f.read(1)
            except FileNotFoundError:
                if required:
                    raise
    except OSError as e:
        return (f"rank {rank} cannot read the checkpoint {folder}: {type(e).__name__}: {e}. If this node sees the "
                "filesystem late, rerun; if the file is damaged, move this checkpoint out of checkpoints/ and rerun: "
                "the resume takes the one before")
    return None


def fault(point: str, step: int, rank: int) -> None:
    """A test hook: die here, as a node failure would (no handler, no cleanup), when asked to."""
    if fault_requested(point, step, rank):
        os.kill(os.getpid(), 9)


# --------------------------------------------------------------------------------------------------
# RNG state (per rank; safetensors, not pickles)


def save_rng(folder: Path, rank: int) -> None:
    from safetensors.torch import save_file

    tensors = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        tensors["cuda"] = torch.cuda.get_rng_state()
    tmp = folder / f".rng-rank{rank}.safetensors{atomic.TMP_SUFFIX}"
    save_file(tensors, str(tmp))
    atomic.share(tmp)  # safetensors creates it 0600: a team's runs are readable like any file (umask)
    atomic.fsync_path(tmp)  # this rank wrote it: this rank makes it durable (see `save`)
    os.replace(tmp, folder / f"rng-rank{rank}.safetensors")


def rng_ranks(folder: Path) -> set[int]:
    """The ranks that saved an RNG state in `folder` (read on rank 0 and broadcast: one view for all)."""
    return {int(p.stem.removeprefix("rng-rank")) for p in Path(folder).glob("rng-rank*.safetensors")}


def load_rng(folder: Path, rank: int, saved: set[int] | None = None) -> bool:
    """Restore this rank's RNG state; False when the checkpoint has none for this rank (world size changed).
    `saved` is `rng_ranks(folder)` as rank 0 saw it: every rank then decides from the same view."""
    from safetensors.torch import load_file

    path = folder / f"rng-rank{rank}.safetensors"
    if rank not in (rng_ranks(folder) if saved is None else saved):
        return False
    tensors = load_file(str(path))
    torch.set_rng_state(tensors["cpu"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])
    return True


# --------------------------------------------------------------------------------------------------
# Hugging Face export

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "chat_template.jinja", "vocab.json", "merges.txt", "tokenizer.model")


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the lmforge checkout (None when not a git checkout)."""
    here = path or Path(__file__).resolve().parent
    try:
        run = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here,
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if run.returncode != 0:
        return None
    return run.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def model_class(hf_config):
    """The transformers class that `hf_config` was saved from (`config.architectures`), e.g.
    `LlamaForCausalLM` or `GPT2ForSequenceClassification`: export and reload use the model's own task."""
    import transformers

    names = getattr(hf_config, "architectures", None) or []
    if not names:  # a config saved without it (checkpoints of lmforge before the task-generic export): a causal LM
        return transformers.MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)]
    cls = getattr(transformers, names[0], None)
    if cls is None:
        raise CheckpointError(f"model config names architectures {names!r}; expected one transformers class "
                              "(e.g. LlamaForCausalLM)")
    return cls


def generative(hf_config) -> bool:
    return model_class(hf_config).__name__.endswith(("ForCausalLM", "LMHeadModel"))  # GPT2LMHeadModel too


def export_hf(out: Path, hf_config, state_dict: dict, tokenizer_dir: Path, lineage: dict, card: dict | None,
              extra: dict[str, Path] | None = None) -> None:
    """Write `out` as a Hugging Face folder (safetensors, config, tokenizer, a generation config for
    generative models, lineage.json, model card), published atomically: `out` is whole or absent. The
    class comes from `hf_config.architectures`; special token ids from the config itself."""
    from transformers import GenerationConfig

    from lmforge.hub import write_model_card

    bad = [k for k, v in state_dict.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"refusing to export non-finite weights ({', '.join(bad[:5])}{'...' if len(bad) > 5 else ''})")
    dtypes = {v.dtype for v in state_dict.values() if v.is_floating_point()}
    dtype = next(iter(dtypes)) if len(dtypes) == 1 else torch.float32
    hf_config.dtype = str(dtype).removeprefix("torch.")  # (a config loaded by transformers may turn it into a torch.dtype)
    cls = model_class(hf_config)

    def fill(tmp: Path) -> None:
        with torch.device("meta"):  # no second copy of the weights: the state dict is what gets written
            model = cls(hf_config).to(dtype)  # save_pretrained records the model's dtype
        model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        for name in TOKENIZER_FILES:
            if (tokenizer_dir / name).is_file():
                shutil.copyfile(tokenizer_dir / name, tmp / name)
        if generative(hf_config):
            eos, pad = hf_config.eos_token_id, hf_config.pad_token_id
            GenerationConfig(bos_token_id=getattr(hf_config, "bos_token_id", None) or eos, eos_token_id=eos,
                             pad_token_id=pad if pad is not None else eos).save_pretrained(tmp)
        for name, folder in (extra or {}).items():  # e.g. adapter/: a LoRA run's adapter beside the merged model
            shutil.copytree(folder, tmp / name)
        (tmp / "lineage.json").write_text(json.dumps(lineage, indent=2, sort_keys=True) + "\n")
        if card is not None:
            write_model_card(tmp, card)

    atomic.publish_folder(out, fill)


def parity(folder: Path, input_ids: torch.Tensor, engine_logits: torch.Tensor, device: torch.device,
           dtype: torch.dtype) -> float:
    """Load the exported `folder` as a user would, on the engine's device and in its dtype (like with
    like), and return the largest |difference| between its logits and the engine's on `input_ids`.
    The inputs and the engine's logits are kept beside the folder (export_parity.safetensors)."""
    from safetensors.torch import save_file

    reloaded = model_class(_config(folder)).from_pretrained(folder, dtype=dtype)
    size = sum(p.numel() * p.element_size() for p in reloaded.parameters())
    if device.type == "cuda" and size > 0.8 * torch.cuda.mem_get_info(device)[0]:
        device = torch.device("cpu")  # a model larger than the free GPU memory (70B on one GPU): same dtype, on CPU
    reloaded = reloaded.to(device)
    reloaded.eval()
    with torch.no_grad():
        logits = reloaded(input_ids=input_ids.to(device), use_cache=False).logits.float().cpu()
    save_file({"input_ids": input_ids.contiguous(), "logits": engine_logits.contiguous()},
              str(folder.parent / "export_parity.safetensors"))
    del reloaded
    return float((logits - engine_logits).abs().max())


def _config(folder: Path):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(folder)


def publish_final(run_dir: Path, hf_config, state_dict: dict, probe: torch.Tensor, engine_logits: torch.Tensor,
                  device: torch.device, dtype: torch.dtype, tolerance: float | None, summary: dict,
                  extra: dict[str, Path] | None = None) -> float:
    """Rank 0, once the other ranks have left (nothing here may keep them waiting in a collective):
    RUN_DIR/final from the weights with the last checkpoint's lineage and card, its logits checked against
    the engine's on the same device and dtype, and summary.json. Past `tolerance` (default 1e-4 in fp32,
    5e-2 in bf16) the export is moved aside and CheckpointError fails the run. `extra` folders are copied into
    final/ under their names. Returns the difference."""
    run_dir, final = Path(run_dir), Path(run_dir) / "final"
    record = latest(run_dir / "checkpoints").record
    if fault_requested("export-slow", record["step"], 0):  # tests: a long export (a 70B model's) on rank 0 alone
        time.sleep(float(os.environ.get("LMFORGE_FAULT_SECONDS", 30)))
    if fault_requested("export-drift", record["step"], 0):  # tests: an export that does not match the engine
        state_dict = {k: v + 0.5 if v.is_floating_point() else v for k, v in state_dict.items()}
    export_hf(final, hf_config, state_dict, run_dir / "tokenizer", record["lineage"], record["card"], extra)
    diff = parity(final, probe, engine_logits, device, dtype)
    tolerance = tolerance or (1e-4 if dtype == torch.float32 else 5e-2)
    write_summary(run_dir, {**summary, "export_parity_max_abs_diff": diff, "export_parity_tolerance": tolerance})
    if not diff <= tolerance:
        aside = quarantine(final)  # a folder that does not reproduce the engine is not a finished run's export
        raise CheckpointError(f"the export's logits differ from the engine's by {diff:.3g} > {tolerance:.3g} "
                              f"(eval.parity_tolerance); kept aside as {aside} for inspection")
    return diff


def config_digest(hf_config) -> str:
    """A digest of a model's architecture (its transformers config without what varies between saves of the
    same model): a resume on a different model is refused."""
    import hashlib

    d = {k: v for k, v in hf_config.to_dict().items()
         if k not in ("transformers_version", "dtype", "torch_dtype", "architectures", "_name_or_path", "use_cache")}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


# One function under two names (GPT-2's gelu_new formula, torch's fused kernel): lmforge built GPT-2 with gelu_new
# before, so a checkpoint recorded under the other name is the same model.
SAME_ACTIVATION = {"gelu_new": "gelu_pytorch_tanh", "gelu_pytorch_tanh": "gelu_new"}


def config_digests(hf_config) -> tuple[str, ...]:
    """`config_digest(hf_config)` first, then the digest of the same model under another activation name."""
    digests = [config_digest(hf_config)]
    other = SAME_ACTIVATION.get(getattr(hf_config, "activation_function", None))
    if other:
        digests.append(config_digest(hf_config.__class__.from_dict({**hf_config.to_dict(), "activation_function": other})))
    return tuple(digests)


# A weights digest reads this many bytes at each of SAMPLES evenly spaced offsets of each file (16 MiB per file,
# whatever its size: a 140 GB teacher is identified in a second, not in the ~10 minutes a full hash takes on Lustre).
SAMPLE_BYTES, SAMPLES = 1 << 20, 16


def weights_digest(folder: Path) -> str:
    """Identity of a Hugging Face folder's weights: sha256 over each weight file's name, size and 16 evenly spaced
    1 MiB samples of its bytes (the first starts with the safetensors header: every tensor's name, dtype and
    shape). Training changes every tensor, so every sample shows it; 16 MiB per file keeps it cheap at 70B."""
    import hashlib

    files = sorted(p for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin") and p.is_file())
    if not files:
        raise CheckpointError(f"{folder} holds no weights (*.safetensors or *.bin)")
    h = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        h.update(f"{path.name}\0{size}\0".encode())
        with open(path, "rb") as f:
            for i in range(SAMPLES):
                f.seek(max(0, (size - SAMPLE_BYTES) * i // max(SAMPLES - 1, 1)))
                h.update(f.read(SAMPLE_BYTES))
    return h.hexdigest()[:16]


def write_summary(run_dir: Path, summary: dict) -> None:
    """RUN_DIR/summary.json (atomic; non-finite numbers as null: strict JSON)."""
    atomic.write_json(Path(run_dir) / "summary.json", json.loads(json.dumps(summary, default=str),
                                                                  parse_constant=lambda _: None))


def quarantine(folder: Path) -> Path:
    """Move an export that failed its check out of the way (`NAME.failed`), so nothing reads it as done."""
    aside = folder.with_name(folder.name + ".failed")
    shutil.rmtree(aside, ignore_errors=True)
    os.replace(folder, aside)
    return aside


def lineage(stage: str, run_dir: Path, step: int, tokens: int, config_digest: str, tokenizer_hash: str | None,
            data: dict | None, parent: Path | None, upstream: tuple[Path | None, ...] = (),
            result_digest: str | None = None) -> dict:
    """What `final/lineage.json` records: this stage's identity, and the lineage of every upstream folder
    (token data, parent model) read from their own lineage.json. Local paths are absolute here, for the
    tools that follow a chain on this cluster; `lmforge push` shortens them in what it uploads."""
    return {
        "stage": stage, "run_dir": str(Path(run_dir).resolve()), "step": step, "tokens": tokens,
        "config_digest": config_digest, "result_digest": result_digest, "digest_version": DIGEST_VERSION,
        "git_commit": git_commit(),
        "checkpoint": str((Path(run_dir) / "checkpoints" / tag_for(step)).resolve()),
        "parent": str(Path(parent).resolve()) if parent else None, "tokenizer_hash": tokenizer_hash,
        "data": data,
        "upstream": [json.loads((Path(u) / "lineage.json").read_text()) for u in upstream
                     if u is not None and (Path(u) / "lineage.json").is_file()],
    }


def count_params(model: torch.nn.Module) -> int:
    """Parameters of `model`, each once (tied ones once); ZeRO-3 partitions count whole (`ds_numel`)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())


def card(stage: str, task: str, model: torch.nn.Module, **facts) -> dict:
    """The model card's facts (see lmforge.hub.INFO_KEYS): the architecture read from the model itself
    (its config, its parameters), never from a YAML that may not describe it; `facts` add the run's
    (steps, tokens_seen, metrics, command, config_yaml, ...)."""
    c = model.config
    return {"stage": stage, "task": task, "architecture": type(model).__name__, "family": c.model_type,
            "num_params": count_params(model), "num_layers": c.num_hidden_layers, "hidden_size": c.hidden_size,
            "num_heads": c.num_attention_heads, "vocab_size": c.vocab_size,
            "context_length": getattr(c, "max_position_embeddings", None), **facts}


# --------------------------------------------------------------------------------------------------
# `lmforge export RUN_DIR OUT_DIR`


def export_checkpoint(run_dir: Path, out: Path, step: int | None = None) -> Checkpoint:
    """Build a Hugging Face folder from one of this run's checkpoints (default: the newest complete one).

    Only checkpoints inside RUN_DIR/checkpoints are read: their shards are pickles, and lmforge
    unpickles only files it wrote itself.
    """
    from transformers import AutoConfig

    from lmforge import engine

    root = Path(run_dir) / "checkpoints"
    found = complete(root)
    if not found:
        hint = " (only interrupted saves there)" if incomplete(root) else ""
        raise CheckpointError(f"{root}: no complete checkpoint{hint}; is {run_dir} a pretraining run directory?")
    chosen = found[-1] if step is None else next((c for c in found if c.step == step), None)
    if chosen is None:
        raise CheckpointError(f"{root}: no complete checkpoint at step {step}; have steps {[c.step for c in found]}")
    r = chosen.record
    state_dict = engine.state_dict_from_checkpoint(root, chosen.tag)
    skipped = tuple(r.get("export_skips", ()))  # training aids saved with the model (a distillation's projections)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(skipped)} if skipped else state_dict
    dtype = getattr(torch, r.get("dtype", "float32"))
    state_dict = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}
    tokenizer_dir = Path(run_dir) / "tokenizer"
    if not (tokenizer_dir / "tokenizer.json").is_file():
        raise CheckpointError(f"{tokenizer_dir}: the run's tokenizer is missing")
    lineage = {**r["lineage"], "exported_from": str(chosen.path.resolve())}
    export_hf(Path(out), AutoConfig.from_pretrained(chosen.path), state_dict, tokenizer_dir, lineage, r.get("card"))
    return chosen


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="lmforge export", description="Build a Hugging Face folder (safetensors, "
                                     "config, tokenizer, generation config, model card, lineage.json) from a "
                                     "training run's checkpoint.")
    parser.add_argument("run_dir", type=Path, help="a training stage's run directory (holds checkpoints/)")
    parser.add_argument("out_dir", type=Path, help="folder to write; replaced atomically if it exists")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step to export (default: the newest)")
    args = parser.parse_args(argv)
    try:
        chosen = export_checkpoint(args.run_dir, args.out_dir, args.step)
    except CheckpointError as e:
        print(f"lmforge export: error: {e}", file=sys.stderr)
        return 1
    print(f"[export] {chosen.path} (step {chosen.step}) -> {args.out_dir}")
    return 0
