"""ZeRO memory, the second half of the pretraining benchmark (`python bench/train.py` runs it).

Resident memory of each of 2 ranks, ZeRO 0/1/2/3, in bf16 mixed precision and in fp32, for one Llama built
here (micro batch 1, seq 32, 2 optimizer steps, torch's fused AdamW) through lmforge's own engine
(`lmforge.engine.ds_config` + `initialize`), one launch per stage and precision.

What is measured. RSS includes the Python/torch/DeepSpeed runtime, so a baseline launch that imports the same
libraries and joins the process group but builds nothing is measured too; model states = training peak -
baseline peak, per rank, the worse rank reported. The training peak is VmHWM over the steps: it is reset
(/proc/self/clear_refs) after `initialize`, whose own peak (the full fp32 model exists before ZeRO partitions
it) is reported beside it. Activations and DeepSpeed's runtime buffers count against the model states.

Theory: 16 bytes per parameter of model states, split as ZeRO divides them over W ranks.
  bf16 mixed precision (the ZeRO paper's account): 16-bit weights 2 + 16-bit grads 2 + fp32 master weights,
       Adam m and v 12. Stage 0: 16N; 1: 2N + 2N + 12N/W; 2: 2N + 14N/W; 3: 16N/W.
  fp32 (the CPU default): weights 4 + grads 4 + Adam m and v 8, no master copy needed.
       Stage 0: 16N; 1: 4N + 4N + 8N/W; 2: 4N + 12N/W; 3: 16N/W. DeepSpeed keeps an fp32 copy of each rank's
       partition all the same (a clone, +4N/W), so fp32 ZeRO-3 cannot come below 1.25x of this theory.
The 1.2x target of the pretraining issue is read on bf16 ZeRO-3, the configuration that theory describes.

Settings, all in the benchmark's own copies of configs/deepspeed/zero*.json and its environment, so that
buffers sized for GPU clusters, and allocator caching, do not pose as model states at this model's scale:
communication buckets of 1e6 elements (the shipped files say 5e7); for ZeRO-3, max_live_parameters and
max_reuse_distance the same (DeepSpeed's default, 1e9, keeps every gathered parameter between forward and
backward) and `sub_group_size` the same (the optimizer steps over the rank's partition in pieces of that many
elements, so the fp32 gradient of the step (and any optimizer temporaries) exists for one piece at a time: a 7B model on 8 GPUs
with the shipped 1e8 steps in 9 pieces); MALLOC_MMAP_THRESHOLD_=65536 (glibc hands freed blocks back at once,
so RSS follows the live tensors). The model is large enough (~214M parameters) that the runtime's fixed
buffers (DeepSpeed's shared-memory all-reduce workspace on CPU, 2 x 32 MB + 2 x 1 MB) are a few percent.

Memory at scale (`python bench/memory.py`, its own results file bench/results/memory.json and its own section
of BENCHMARKS.md; the ZeRO table above stays with bench/train.py):

  loss      one training step (forward, backward, AdamW step; the moments exist) of a GPT-2-124M-shaped model (configs/model/124m.yaml,
            vocab 50,257, seq 1,024, micro 4) on CPU in fp32, with `F.cross_entropy(logits.float())`, with
            lmforge's `token_loss` over the logits (DeepSpeed's chunked cross entropy) and with `lm_loss` (the
            stages' loss: no logits at all, the projection fused with the loss), each in a fresh process. Measured: the peak
            of torch's CPU allocator over the step above where it stood before (the torch profiler's memory
            events, every allocation and free, summed in order: live tensor bytes, nothing else), and the peak
            RSS over the step above the RSS before it (VmHWM reset first; glibc returns blocks over 64 KB at
            once, MALLOC_MMAP_THRESHOLD_=65536, so RSS follows the live tensors). The loss part alone is measured
            too, in the same processes: the output projection and the loss over [micro x seq, 768] hidden states
            (fp32, as the step), and the loss alone over bf16 logits (what a GPU step's loss holds; the fused
            loss has no logits to take, and a bf16 projection is too slow to run on these CPUs).
            The same comparison on a GPU (bf16, CUDA's own peak counter) is bench/gpu.py's, not this script's.
  startup   per-rank memory from process start through `engine.initialize` for a ~214M-parameter Llama (MODEL,
            vocab 8,192) on 2 ranks, ZeRO-3 (the ZeRO-3 JSON of the table above), fp32, built whole (today) and
            partitioned (`engine.model_context`), one launch each: peak RSS of the build and of the build plus
            `initialize`, and RSS after it, all above the rank's RSS before the build (imports and process
            group done), against the full model's fp32 bytes (4 x parameters).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Run as `python bench/memory.py`, this file's folder comes first on sys.path, where bench/tokenize.py would
# shadow the standard library's `tokenize` module; the project root takes its place.
if sys.path and Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
    sys.path[0] = str(ROOT)

from bench.report import free_port, parse_args, write_section  # noqa: E402

BUCKET = 1_000_000  # elements, for every bucket and ZeRO-3 sub-group in the memory runs' DeepSpeed JSON
MODEL = {"family": "llama", "hidden_size": 1024, "num_layers": 16, "num_heads": 16, "intermediate_size": 2816,
         "max_seq_len": 256}
SMOKE_MODEL = {"family": "llama", "hidden_size": 128, "num_layers": 2, "num_heads": 4, "intermediate_size": 256,
               "max_seq_len": 128}
SEQ_LEN, STEPS = 32, 2  # tokens per row, optimizer steps: activations stay small beside the model states
PRECISIONS = ("bf16", "fp32")


def status_bytes() -> dict:
    """This process's peak (VmHWM) and current (VmRSS) resident memory, bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmHWM", "VmRSS"):
                out["peak_rss_bytes" if key == "VmHWM" else "rss_bytes"] = int(line.split()[1]) * 1024
    return out


def child(spec: dict) -> dict:
    """One rank's record (run under torchrun): peak RSS after imports and the process group only (baseline),
    or also after building, wrapping and training the model."""
    import torch
    import torch.nn.functional as F
    import transformers.models.llama.modeling_llama  # noqa: F401  (the baseline loads what the run loads)
    from transformers import AutoModelForCausalLM  # noqa: F401

    from lmforge import engine as eng
    from lmforge.config.model import ModelConfig
    from lmforge.config.pretrain import OptimConfig
    from lmforge.data.sampler import WindowSampler
    from lmforge.data.shards import TokenShards
    from lmforge.models import build_model

    d = eng.setup_distributed()
    sampler = WindowSampler(TokenShards(Path(spec["data"]), "train"), spec["seq_len"], 1234)
    eng.barrier()
    record = {"rank": d.rank, "before_build": status_bytes()}
    if not spec["baseline"]:
        torch.manual_seed(1234)
        model = build_model(ModelConfig(**spec["model"]), *spec["ids"])
        record["params"] = sum(p.numel() for p in model.parameters())
        record["after_build"] = status_bytes()
        micro, dtype = spec["micro"], {"bf16": torch.bfloat16, "fp32": torch.float32}[spec["precision"]]
        ds = eng.ds_config(json.loads(Path(spec["ds_json"]).read_text()), micro, 1, micro * d.world, dtype,
                           OptimConfig(lr=1e-4, min_lr=0.0), d.device)
        engine = eng.initialize(model, ds, 0.1)
        record["after_initialize"] = status_bytes()  # its peak: the start-up transient (the full model first)
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS: from here on, the training peak
        for step in range(spec["steps"]):
            x = sampler.batch(sampler.rank_positions(step * micro * d.world, micro, 1, d.rank, d.world, 0))
            logits = engine(input_ids=x[:, :-1]).logits
            loss = F.cross_entropy(logits.float().flatten(0, 1), x[:, 1:].flatten())
            engine.backward(loss)
            engine.step()
        record["loss"] = float(loss.item())
    record["end"] = status_bytes()
    box = [None] * d.world
    torch.distributed.all_gather_object(box, record)
    eng.teardown()
    return {"ranks": box}


def zero_json(stage: int, work: Path) -> Path:
    """The shipped zero{stage}.json with every communication bucket (and ZeRO-3 sub-group) at BUCKET elements."""
    zero = json.loads((ROOT / "configs" / "deepspeed" / f"zero{stage}.json").read_text())
    z = zero["zero_optimization"]
    # stage 0 too: DeepSpeed's own default bucket is 5e8 elements (it would flatten every gradient at once)
    z.update(reduce_bucket_size=BUCKET, allgather_bucket_size=BUCKET)
    if stage == 3:
        z.update(stage3_prefetch_bucket_size=BUCKET, stage3_max_live_parameters=BUCKET,
                 stage3_max_reuse_distance=BUCKET, sub_group_size=BUCKET)
    path = work / "memory" / f"zero{stage}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(zero, indent=2))
    return path


def theory(n: int, world: int, precision: str) -> dict[int, dict]:
    """Bytes per rank for `n` parameters on `world` ranks: the textbook split of model states (see the module
    docstring) and, in fp32, what DeepSpeed with torch's AdamW holds on top of it by design."""
    if precision == "bf16":
        return {s: {"theory_bytes": round(b), "deepspeed_expected_bytes": None} for s, b in
                {0: 16 * n, 1: 4 * n + 12 * n / world, 2: 2 * n + 14 * n / world, 3: 16 * n / world}.items()}
    textbook = {0: 16 * n, 1: 8 * n + 8 * n / world, 2: 4 * n + 12 * n / world, 3: 16 * n / world}
    extra = {
        # stage 0: DeepSpeed all-reduces the gradients through one flat copy
        0: 4 * n,
        # stages 1-3: DeepSpeed's own fp32 copy of the rank's partition (a clone, in fp32 training too);
        # torch's fused AdamW, which lmforge injects, updates in place and allocates nothing more
        1: 4 * n / world, 2: 4 * n / world, 3: 4 * n / world,
    }
    return {s: {"theory_bytes": round(b), "deepspeed_expected_bytes": round(b + extra[s])} for s, b in textbook.items()}


def measure(data: Path, work: Path, smoke: bool, ids: tuple, run_child: Callable[..., dict]) -> dict:
    """Every stage in every precision, plus the baseline; `run_child(kind, name, spec)` launches 2 ranks."""
    from lmforge.config.model import ModelConfig
    from lmforge.models import num_params

    model = SMOKE_MODEL if smoke else MODEL
    n = num_params(ModelConfig(**model), ids[0])["total"]
    world = 2
    spec = {"data": str(data), "model": model, "ids": list(ids), "seq_len": SEQ_LEN, "micro": 1, "steps": STEPS}
    base = run_child("memory", "memory_baseline", {**spec, "baseline": True})
    baseline = [r["end"]["peak_rss_bytes"] for r in base["ranks"]]
    precisions = {}
    for precision in PRECISIONS:
        stages = {}
        for stage, t in theory(n, world, precision).items():
            r = run_child("memory", f"memory_{precision}_zero{stage}",
                          {**spec, "baseline": False, "precision": precision, "ds_json": str(zero_json(stage, work))})
            assert all(x["params"] == n for x in r["ranks"]), "parameter count differs from lmforge.models.num_params"
            peaks = [x["end"]["peak_rss_bytes"] for x in r["ranks"]]  # training: VmHWM was reset after initialize
            startup = [x["after_initialize"]["peak_rss_bytes"] for x in r["ranks"]]
            states = [p - b for p, b in zip(peaks, baseline, strict=True)]
            expected = t["deepspeed_expected_bytes"]
            stages[str(stage)] = {
                **t, "peak_rss_bytes": peaks, "model_states_bytes": states, "model_states_max_bytes": max(states),
                "vs_theory": round(max(states) / t["theory_bytes"], 3),
                "vs_deepspeed_expected": round(max(states) / expected, 3) if expected else None,
                "startup_peak_rss_bytes": startup, "startup_over_baseline_max_bytes":
                    max(p - b for p, b in zip(startup, baseline, strict=True)),
                "pre_build_peak_rss_bytes": [x["before_build"]["peak_rss_bytes"] for x in r["ranks"]],
                "after_initialize_rss_bytes": [x["after_initialize"]["rss_bytes"] for x in r["ranks"]],
                "final_loss": r["ranks"][0]["loss"], "wall_seconds": r["wall_seconds"]}
            print(f"[bench] memory {precision} ZeRO-{stage}: training peak RSS {max(peaks) / 1e6:.0f} MB, model states "
                  f"{max(states) / 1e6:.0f} MB (theory {t['theory_bytes'] / 1e6:.0f} MB, "
                  f"{stages[str(stage)]['vs_theory']:.2f}x); start-up peak {max(startup) / 1e6:.0f} MB", flush=True)
        precisions[precision] = {"stages": stages}
    return {"model": model, "params": n, "vocab_size": ids[0], "world_size": world, "micro_batch_size": 1,
            "seq_len": SEQ_LEN, "steps": STEPS, "bucket_elements": BUCKET, "baseline_peak_rss_bytes": baseline,
            "baseline_wall_seconds": base["wall_seconds"], "precisions": precisions}


def table(mem: dict, target: float, met: str) -> list[str]:
    """The Memory part of the Pretraining section of BENCHMARKS.md."""
    n, w = mem["params"], mem["world_size"]
    fp32_z3 = mem["precisions"]["fp32"]["stages"]["3"]
    lines = [
        "",
        f"Memory: resident memory per rank for a {n / 1e6:.0f}M-parameter Llama ({mem['model']['hidden_size']} "
        f"hidden, {mem['model']['num_layers']} layers, vocab {mem['vocab_size']:,}), {w} ranks, micro batch 1, seq "
        f"{mem['seq_len']}, {mem['steps']} optimizer steps, torch's fused AdamW, through lmforge's engine (`bench/memory.py`). "
        "**Model states = training peak RSS - baseline**: the training peak is VmHWM over the steps (reset after "
        "DeepSpeed's initialize, whose start-up peak is its own column), the baseline the peak RSS of a launch that "
        "imports the same libraries and joins the process group but builds nothing "
        f"({max(mem['baseline_peak_rss_bytes']) / 1e6:.0f} MB); the worse rank is shown; activations and DeepSpeed's "
        "buffers are included. Theory: 16 bytes/param split as ZeRO divides it. In bf16 mixed precision (the ZeRO "
        "paper's account: 16-bit weights and grads, fp32 master weights and Adam moments) 0: 16N; 1: 4N + 12N/W; "
        "2: 2N + 14N/W; 3: 16N/W. In fp32 (weights, grads, moments) 0: 16N; 1: 8N + 8N/W; 2: 4N + 12N/W; "
        "3: 16N/W; *DeepSpeed expected* adds what DeepSpeed holds by design: stage 0 all-reduces every gradient "
        "through one flat copy (+4N); stages 1-3 keep an fp32 copy of the rank's partition even in fp32 training "
        "(+4N/W). The optimizer is torch's fused AdamW (what lmforge injects), which updates in place: no "
        "temporaries the size of the partition. Measurement settings (the benchmark's own "
        f"JSON copies): communication buckets, and for ZeRO-3 the live/reuse limits and `sub_group_size`, at "
        f"{mem['bucket_elements']:,} elements, the shipped files' values scaled to this model; glibc returns freed "
        "blocks over 64 KB at once (`MALLOC_MMAP_THRESHOLD_=65536`), so RSS follows the live tensors.",
    ]
    for precision in PRECISIONS:
        stages = mem["precisions"][precision]["stages"]
        lines += ["", f"**{precision}**" + (" (bf16 params and grads, fp32 master weights and moments)"
                                            if precision == "bf16" else " (the CPU default)"), "",
                  "| ZeRO stage | theory MB | DeepSpeed expected MB | training peak RSS MB (rank 0 / 1) | "
                  "model states MB | vs theory | vs DeepSpeed expected | start-up peak - baseline MB |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|"]
        for stage, s in stages.items():
            expected = s["deepspeed_expected_bytes"]
            expected_mb, vs_expected = ((f"{expected / 1e6:.0f}", f"{s['vs_deepspeed_expected']:.2f}x") if expected
                                        else ("-", "-"))
            lines.append(
                f"| {stage} | {s['theory_bytes'] / 1e6:.0f} | {expected_mb} | "
                f"{' / '.join(f'{p / 1e6:.0f}' for p in s['peak_rss_bytes'])} | {s['model_states_max_bytes'] / 1e6:.0f} "
                f"| {s['vs_theory']:.2f}x | {vs_expected} | {s['startup_over_baseline_max_bytes'] / 1e6:.0f} |")
    bf16_z3 = mem["precisions"]["bf16"]["stages"]["3"]["vs_theory"]
    lines += ["", "| target | measured | target | |", "|---|---:|---:|---|",
              f"| ZeRO-3 model states / theory, bf16 mixed precision | {bf16_z3:.2f}x | <= {target}x | {met} |",
              f"| ZeRO-3 model states / theory, fp32 (for reference) | {fp32_z3['vs_theory']:.2f}x | | |",
              "", f"In fp32, DeepSpeed's layout alone (its fp32 partition copy beside the fp32 weights) comes to "
              f"{fp32_z3['deepspeed_expected_bytes'] / fp32_z3['theory_bytes']:.2f}x the ZeRO-3 theory; measured "
              f"against what DeepSpeed is expected to hold there: {fp32_z3['vs_deepspeed_expected']:.2f}x."]
    return lines


# --------------------------------------------------------------------------------------------------
# Memory at scale: `python bench/memory.py` (the chunked loss; ZeRO-3 models built partitioned)

BEGIN, END = "<!-- bench:memory:begin -->", "<!-- bench:memory:end -->"
TARGETS = {"loss_step_saving": 0.40,          # chunked loss: at least this much less memory for a training step
           "zero3_startup_vs_fp32_model": 0.6}  # ZeRO-3 partitioned build: per-rank peak / full fp32 model, at most
LOSS_VOCAB, LOSS_SEQ, LOSS_MICRO = 50257, 1024, 4  # GPT-2's vocabulary and context; 4 x 1,024 = 4,096 tokens
STARTUP_VOCAB = 8192  # the demo tokenizer's: MODEL is ~214M parameters with it
WORLD = 2


def clear_peak() -> None:
    """VmHWM := VmRSS: what `status_bytes` calls the peak is the peak from here on."""
    Path("/proc/self/clear_refs").write_text("5")


def allocator_peak(fn: Callable[[], object]) -> tuple[int, object]:
    """(the highest point torch's CPU allocator reaches while `fn` runs above where it stood when `fn` started,
    in bytes; what `fn` returned). From the profiler's memory events: every allocation and free, in order."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        result = fn()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        if e.device_type() == DeviceType.CPU:  # the profiler also reports CUDA allocations where there are any
            live += e.nbytes()
            peak = max(peak, live)
    return peak, result


def cross_entropy(logits, targets):
    """What the stages did before `token_loss`: the baseline."""
    import torch.nn.functional as F

    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def loss_function(method: str):
    """The step's loss for `method`, as (model, x) -> loss, and its loss part over (hidden, weight, targets)."""
    import torch.nn.functional as F

    from lmforge.loss import head_loss, token_loss

    if method == "fused":
        return lm_loss_rows, head_loss
    over_logits = {"cross_entropy": cross_entropy, "chunked": token_loss}[method]
    return (lambda model, x: over_logits(model(input_ids=x[:, :-1], use_cache=False).logits, x[:, 1:]),
            lambda hidden, weight, y: over_logits(F.linear(hidden, weight), y))


def lm_loss_rows(model, x):
    from lmforge.loss import lm_loss

    return lm_loss(model, x[:, :-1], x[:, 1:])


def gpt2_124m():
    import yaml

    from lmforge.config.model import ModelConfig

    return ModelConfig(**yaml.safe_load((ROOT / "configs" / "model" / "124m.yaml").read_text()))


def train_step(model, optimizer, x, loss_fn) -> float:
    """One optimizer step on the rows `x` [micro, seq + 1], as a stage runs it."""
    loss = loss_fn(model, x)
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def loss_child(spec: dict) -> dict:
    """One method, in a fresh process (no torchrun): the loss part first, then the training step."""
    import torch

    from lmforge.loss import token_loss
    from lmforge.models import build_model

    micro, seq = spec["micro"], spec["seq"]
    loss_fn, part_fn = loss_function(spec["method"])
    torch.manual_seed(0)
    model = build_model(gpt2_124m(), LOSS_VOCAB)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    x = torch.randint(0, LOSS_VOCAB, (micro, seq + 1), generator=torch.Generator().manual_seed(0))
    record = {"method": spec["method"], "params": sum(p.numel() for p in model.parameters())}

    def head_and_loss() -> int:
        """The loss part: the output projection and the loss over the step's hidden states, fp32 as the step."""
        hidden = torch.randn(micro, seq, model.config.n_embd, requires_grad=True)
        weight = model.lm_head.weight.detach().clone().requires_grad_(True)
        return allocator_peak(lambda: part_fn(hidden, weight, x[:, 1:]).backward())[0]

    def bf16_loss() -> int | None:
        """The loss alone over bf16 logits, as a bf16 GPU step computes it (the logits exist before)."""
        if spec["method"] == "fused":
            return None  # no logits to take
        logits = torch.randn(micro, seq, LOSS_VOCAB, generator=torch.Generator().manual_seed(1)).bfloat16()
        logits.requires_grad_(True)
        return allocator_peak(lambda: {"cross_entropy": cross_entropy, "chunked": token_loss}[spec["method"]](
            logits, x[:, 1:]).backward())[0]

    record["head_loss_alloc_peak_bytes"] = head_and_loss()
    # AdamW's moments exist before the measured step, as in every step but the first (zero gradients: the
    # update is weight decay alone, 1e-6 relative)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    record["bf16_loss_alloc_peak_bytes"] = bf16_loss()
    record["bf16_logits_bytes"] = micro * seq * LOSS_VOCAB * 2

    before = status_bytes()
    clear_peak()
    began = time.perf_counter()
    record["step_alloc_peak_bytes"], record["loss"] = allocator_peak(lambda: train_step(model, optimizer, x, loss_fn))
    record["step_seconds"] = round(time.perf_counter() - began, 1)
    record["step_rss_peak_over_start_bytes"] = status_bytes()["peak_rss_bytes"] - before["rss_bytes"]
    record["rss_before_step_bytes"] = before["rss_bytes"]
    return record


def startup_child(spec: dict) -> dict:
    """One rank of a start-up launch (under torchrun): memory before the build, after it, after `initialize`."""
    import torch
    import transformers.initialization  # noqa: F401  (the baseline loads what the build loads)
    import transformers.integrations.deepspeed  # noqa: F401
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    from lmforge import engine as eng
    from lmforge.config.model import ModelConfig
    from lmforge.config.pretrain import OptimConfig
    from lmforge.models import build_model

    d = eng.setup_distributed()
    ds = eng.ds_config(json.loads(Path(spec["ds_json"]).read_text()), 1, 1, d.world, torch.float32,
                       OptimConfig(lr=1e-4, min_lr=0.0), d.device)
    eng.barrier()
    record = {"rank": d.rank, "before_build": status_bytes()}
    clear_peak()  # the imports' own transient is not the model's
    torch.manual_seed(1234)
    began = time.perf_counter()
    with eng.model_context(ds) if spec["partitioned"] else contextlib.nullcontext():
        model = build_model(ModelConfig(**spec["model"]), spec["vocab"])
    record["build_seconds"] = round(time.perf_counter() - began, 2)
    record["after_build"] = status_bytes()
    eng.barrier()
    began = time.perf_counter()
    engine = eng.initialize(model, ds, 0.1)
    record["initialize_seconds"] = round(time.perf_counter() - began, 2)
    record["after_initialize"] = status_bytes()  # its peak: the whole start-up, build included
    record["params"] = sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters())
    box = [None] * d.world
    torch.distributed.all_gather_object(box, record)
    eng.teardown()
    return {"ranks": box}


def child_env() -> dict:
    # glibc returns freed blocks over 64 KB to the OS at once: RSS follows the live tensors
    return {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "MALLOC_MMAP_THRESHOLD_": "65536",
            "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def launch(kind: str, name: str, spec: dict, work: Path, ranks: int, timeout: float) -> dict:
    """Run `kind`'s child in processes of its own (torchrun for ranks > 1); returns rank 0's record."""
    spec = {**spec, "result": str(work / f"{name}.json")}
    spec_path = work / f"{name}.spec.json"
    spec_path.write_text(json.dumps(spec))
    Path(spec["result"]).unlink(missing_ok=True)
    target = [str(Path(__file__).resolve()), "--child", kind, "--spec", str(spec_path)]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={ranks}", f"--master_port={free_port()}",
               *target]
        env = {**child_env(), "OMP_NUM_THREADS": "1"}
    else:
        cmd, env = [sys.executable, *target], child_env()
    began = time.perf_counter()
    run = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    (work / f"{name}.log").write_text(f"$ {' '.join(cmd)}\n{run.stdout}\n--- stderr ---\n{run.stderr}")
    if run.returncode != 0:
        raise SystemExit(f"bench/memory.py: run '{name}' failed (log: {work / f'{name}.log'}):\n"
                         f"{run.stdout[-2000:]}\n{run.stderr[-4000:]}")
    return {**json.loads(Path(spec["result"]).read_text()), "wall_seconds": round(time.perf_counter() - began, 1)}


def measure_loss(work: Path, micro: int, seq: int, timeout: float) -> dict:
    from lmforge.models import num_params

    methods = {}
    for method in ("cross_entropy", "chunked", "fused"):
        methods[method] = launch("loss", f"loss_{method}", {"method": method, "micro": micro, "seq": seq}, work,
                                 1, timeout)
        r = methods[method]
        print(f"[bench] loss {method:13s}: step peak {r['step_alloc_peak_bytes'] / 1e9:.2f} GB allocated, "
              f"{r['step_rss_peak_over_start_bytes'] / 1e9:.2f} GB RSS; head + loss {r['head_loss_alloc_peak_bytes'] / 1e9:.2f} GB;"
              f" ({r['step_seconds']:.0f} s step)", flush=True)
    ce = methods["cross_entropy"]
    keys = ("step_alloc_peak_bytes", "step_rss_peak_over_start_bytes", "head_loss_alloc_peak_bytes",
            "bf16_loss_alloc_peak_bytes")
    saving = {m: {k.removesuffix("_bytes"): None if r[k] is None else round(1 - r[k] / ce[k], 3) for k in keys}
              for m, r in methods.items() if m != "cross_entropy"}
    tokens = micro * seq
    return {"model": gpt2_124m().model_dump(), "params": num_params(gpt2_124m(), LOSS_VOCAB)["total"],
            "vocab_size": LOSS_VOCAB, "seq_len": seq, "micro_batch_size": micro, "precision": "fp32",
            "logits_fp32_bytes": tokens * LOSS_VOCAB * 4, "methods": methods, "saving": saving,
            "same_loss": all(abs(ce["loss"] - r["loss"]) < 1e-4 for r in methods.values()),
            "target": {"target": f">= {TARGETS['loss_step_saving']:.0%} less (training step, the stages' loss)",
                       "measured": saving["fused"]["step_alloc_peak"],
                       "met": saving["fused"]["step_alloc_peak"] >= TARGETS["loss_step_saving"]}}


def measure_startup(work: Path, timeout: float) -> dict:
    from lmforge.config.model import ModelConfig
    from lmforge.models import num_params

    n = num_params(ModelConfig(**MODEL), STARTUP_VOCAB)["total"]
    full = 4 * n  # the full model's fp32 bytes
    spec = {"model": MODEL, "vocab": STARTUP_VOCAB, "ds_json": str(zero_json(3, work))}
    methods = {}
    for method in ("whole", "partitioned"):
        r = launch("startup", f"startup_{method}", {**spec, "partitioned": method == "partitioned"}, work, WORLD,
                   timeout)
        assert all(x["params"] == n for x in r["ranks"]), "parameter count differs from lmforge.models.num_params"

        def over(key: str, field: str, r=r) -> list[int]:
            return [x[key][field] - x["before_build"]["rss_bytes"] for x in r["ranks"]]

        build, startup, after = over("after_build", "peak_rss_bytes"), over("after_initialize", "peak_rss_bytes"), \
            over("after_initialize", "rss_bytes")
        methods[method] = {
            "build_peak_bytes": build, "startup_peak_bytes": startup, "after_initialize_bytes": after,
            "build_peak_vs_fp32_model": round(max(build) / full, 3),
            "startup_peak_vs_fp32_model": round(max(startup) / full, 3),
            "after_initialize_vs_fp32_model": round(max(after) / full, 3),
            "startup_transient_vs_fp32_model": round(max(s - a for s, a in zip(startup, after, strict=True)) / full, 3),
            "build_seconds": [x["build_seconds"] for x in r["ranks"]],
            "initialize_seconds": [x["initialize_seconds"] for x in r["ranks"]], "wall_seconds": r["wall_seconds"]}
        m = methods[method]
        print(f"[bench] ZeRO-3 start-up, {method:11s}: build peak {max(build) / 1e9:.2f} GB "
              f"({m['build_peak_vs_fp32_model']:.2f}x the fp32 model), through initialize {max(startup) / 1e9:.2f} GB, "
              f"after it {max(after) / 1e9:.2f} GB; build {max(m['build_seconds']):.1f} s", flush=True)
    measured = methods["partitioned"]["build_peak_vs_fp32_model"]
    return {"model": MODEL, "params": n, "vocab_size": STARTUP_VOCAB, "world_size": WORLD, "precision": "fp32",
            "fp32_model_bytes": full, "bucket_elements": BUCKET, "methods": methods,
            "target": {"target": f"<= {TARGETS['zero3_startup_vs_fp32_model']}x the fp32 model (build peak, per rank)",
                       "measured": measured, "met": measured <= TARGETS["zero3_startup_vs_fp32_model"]}}


def memory_table(report: dict) -> list[str]:
    """The Memory at scale section of BENCHMARKS.md."""
    loss, start, m = report["loss"], report["startup"], report["machine"]

    def gb(x: float) -> str:
        return f"{x / 1e9:.2f}"

    def met(t: dict) -> str:
        return "met" if t["met"] else "**NOT MET**"

    ce, ch, fu = (loss["methods"][k] for k in ("cross_entropy", "chunked", "fused"))

    def row(label: str, key: str) -> str:
        cells = [gb(r[key]) if r[key] is not None else "n/a" for r in (ce, ch, fu)]
        saved = [f"{loss['saving'][m][key.removesuffix('_bytes')]:.0%}" if r[key] is not None else "n/a"
                 for m, r in (("chunked", ch), ("fused", fu))]
        return f"| {label} | {' | '.join(cells)} | {' | '.join(saved)} |"

    lines = [
        BEGIN,
        f"Measured {report['date']} by `python bench/memory.py` on **{m['cpus']} CPU cores** ({m['processor']}, torch "
        f"{report['versions']['torch']}, DeepSpeed {report['versions']['deepspeed']}, transformers "
        f"{report['versions']['transformers']}). Raw figures: `bench/results/memory.json`.",
        "",
        f"**The loss without fp32 [tokens, vocab] tensors.** One training step (forward, backward, AdamW step; its "
        "moments allocated before, as in every step but the first) of "
        f"GPT-2 124M ({loss['params'] / 1e6:.0f}M parameters, vocab {loss['vocab_size']:,}), micro "
        f"{loss['micro_batch_size']} x seq {loss['seq_len']:,}, fp32 on CPU, each loss in a fresh process: "
        "`F.cross_entropy(logits.float())` (before), `lmforge.loss.token_loss` over the model's logits (DeepSpeed's "
        "chunked cross entropy) and `lmforge.loss.lm_loss` (what the stages use: the model returns its last hidden "
        "states and the output projection is fused with the loss, a block of rows at a time, so no [tokens, vocab] "
        "tensor exists). *Allocated*: the peak of torch's CPU allocator above where it stood before (live tensor "
        "bytes, from the profiler's allocation events); *RSS*: the peak resident memory above the RSS before (glibc "
        "returning blocks over 64 KB at once). The fp32 logits alone are "
        f"{gb(loss['logits_fp32_bytes'])} GB. *Output projection + loss*: the last matmul and the loss over the "
        "step's hidden states, fp32; *bf16 loss*: the loss alone over bf16 logits, as a bf16 GPU step computes it "
        "(the fused loss takes no logits).",
        "",
        "| | cross entropy GB | chunked GB | fused GB | chunked saves | fused saves |",
        "|---|---:|---:|---:|---:|---:|",
        row("training step, allocated", "step_alloc_peak_bytes"),
        row("training step, RSS", "step_rss_peak_over_start_bytes"),
        row("output projection + loss (fp32), allocated", "head_loss_alloc_peak_bytes"),
        row("loss over bf16 logits, allocated", "bf16_loss_alloc_peak_bytes"),
        "",
        f"Step time {ce['step_seconds']:.0f} s (cross entropy), {ch['step_seconds']:.0f} s (chunked), "
        f"{fu['step_seconds']:.0f} s (fused); first-step losses {ce['loss']:.5f}, {ch['loss']:.5f}, {fu['loss']:.5f}. "
        f"Target: {loss['target']['target']}: {loss['target']['measured']:.0%}, {met(loss['target'])}. With fp32 "
        "logits cross entropy peaks with three fp32 [tokens, vocab] tensors (the log-softmax it saves, its "
        "gradient, the logits' gradient), the chunked loss with two (the logits it saves for backward, their "
        "gradient), the fused loss with none (one block of rows, about the hidden states' size, and the output "
        "weight's gradient, computed in the forward pass). The rest of the step is the model's own activations and "
        "gradients; lmforge builds GPT-2 with `gelu_pytorch_tanh` (gelu_new's tanh approximation in one kernel, "
        "within 5e-7), which saves three fp32 [tokens, 4 x hidden] tensors per layer that gelu_new's Python "
        "formula keeps for backward (the cross-entropy step measured 6.7 GB with gelu_new, 4.9 GB with it). Under ZeRO-3 the output layer's weight exists only inside its own forward, so the stages take "
        "the chunked loss over the model's logits there. GPU figures (bf16, `python bench/gpu.py`) need a GPU: not "
        "measured here.",
        "",
        f"**ZeRO-3 start-up.** Per rank, {start['world_size']} ranks, a {start['params'] / 1e6:.0f}M-parameter "
        f"Llama ({start['model']['hidden_size']} hidden, {start['model']['num_layers']} layers, vocab "
        f"{start['vocab_size']:,}; fp32 model {gb(start['fp32_model_bytes'])} GB), ZeRO-3 in fp32, from before the "
        "build through `engine.initialize`: RSS above the rank's RSS before the build (imports and process group "
        "done), the worse rank. *Whole*: `build_model` as before, then DeepSpeed partitions it; *partitioned*: "
        "built inside `engine.model_context(ds_config)` (`deepspeed.zero.Init`, same weights for the same seed). "
        "On CPU `initialize` then allocates ZeRO-3's optimizer states (fp32 partition copy, gradient partition, "
        "Adam moments) in the same host memory; on a GPU they, and the partitioned build itself, live on the GPU.",
        "",
        "| build | build peak GB | vs fp32 model | peak through initialize GB | after initialize GB | build s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method, r in start["methods"].items():
        lines.append(f"| {method} | {gb(max(r['build_peak_bytes']))} | {r['build_peak_vs_fp32_model']:.2f}x | "
                     f"{gb(max(r['startup_peak_bytes']))} | {gb(max(r['after_initialize_bytes']))} | "
                     f"{max(r['build_seconds']):.1f} |")
    embedding = start["vocab_size"] * start["model"]["hidden_size"] * 4
    lines += ["", f"Target: {start['target']['target']}: {start['target']['measured']:.2f}x, {met(start['target'])}. "
              f"A rank's own half is 0.50x; above it, the largest transient is the full tensor of the largest "
              f"parameter while it is initialised (the embedding, {embedding / 1e6:.0f} MB): every rank draws the "
              "same numbers into it and keeps its own partition (`engine.materialized`: no all-gather, no "
              "broadcast), then the LM head built and then tied to the embedding (as in the whole build). With 2 "
              "ranks on CPU the peak through `initialize` is DeepSpeed's own (its optimizer states): the same for "
              "both builds. Building partitioned costs the per-module partitioning of `zero.Init` (build time "
              "above; 2 busy cores).",
              END]
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description="Memory at scale: the chunked loss and ZeRO-3 start-up")
    parser.add_argument("--only", choices=["loss", "startup"], help="measure one part (the other is kept from OUT)")
    parser.add_argument("--micro", type=int, default=LOSS_MICRO, help="loss: micro batch (default 4)")
    parser.add_argument("--seq", type=int, default=LOSS_SEQ, help="loss: tokens per row (default 1,024)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results", help="folder for memory.json")
    parser.add_argument("--work", type=Path, default=ROOT / "bench" / "work" / "memory", help="scratch folder")
    parser.add_argument("--no-table", action="store_true", help="leave BENCHMARKS.md as it is")
    args = parse_args(parser, {"loss": loss_child, "startup": startup_child})

    import deepspeed
    import torch
    import transformers

    began = time.perf_counter()
    args.work.mkdir(parents=True, exist_ok=True)
    out = args.out / "memory.json"
    report = json.loads(out.read_text()) if args.only and out.exists() else {}
    if args.only != "startup":
        report["loss"] = measure_loss(args.work, args.micro, args.seq, timeout=1800)
    if args.only != "loss":
        report["startup"] = measure_startup(args.work, timeout=900)
    report.update({
        "benchmark": "memory", "date": time.strftime("%Y-%m-%d"),
        "machine": {"cpus": os.cpu_count(), "processor": platform.processor() or platform.machine(),
                    "python": platform.python_version(), "gpu": torch.cuda.is_available()},
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                     "transformers": transformers.__version__},
        "seconds": round(time.perf_counter() - began, 1)})
    report["targets"] = {k: report[k]["target"] for k in ("loss", "startup") if k in report}
    args.out.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"[bench] wrote {out} ({report['seconds']:.0f} s)")
    for key, t in report["targets"].items():
        print(f"[bench] {key}: {t['measured']} (target {t['target']}) {'met' if t['met'] else 'NOT MET'}")
    full_shapes = report.get("loss", {}).get("micro_batch_size") == LOSS_MICRO and \
        report.get("loss", {}).get("seq_len") == LOSS_SEQ
    if not args.no_table and {"loss", "startup"} <= report.keys() and full_shapes:
        write_section(ROOT / "BENCHMARKS.md", BEGIN, END, "Memory at scale", "\n".join(memory_table(report)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
