"""Throughput: tokens/s, model FLOPs utilisation (MFU) against a device's peak, memory, and the ETA.

MFU = achieved model FLOP/s / peak FLOP/s, with model FLOPs from `lmforge.models.flops_per_token`
(recomputation from activation checkpointing is not counted, as in PaLM). Peak FLOP/s come from a
table of dense (no sparsity) datasheet figures for GPUs, or, on CPU, from a short fp32 matmul measured
at start-up, or from `engine.peak_flops`.
"""

from __future__ import annotations

import resource
import time

# Dense peak FLOP/s by (device-name substring, dtype). First match wins, so specific names come first.
GPU_PEAK = [
    ("H200", {"bf16": 989e12, "fp32": 67e12}),
    ("H100 PCIe", {"bf16": 756e12, "fp32": 51e12}),
    ("H100", {"bf16": 989e12, "fp32": 67e12}),
    ("GH200", {"bf16": 989e12, "fp32": 67e12}),
    ("B200", {"bf16": 2250e12, "fp32": 80e12}),
    ("A100", {"bf16": 312e12, "fp32": 19.5e12}),
    ("A10G", {"bf16": 70e12, "fp32": 31.2e12}),
    ("L40S", {"bf16": 362e12, "fp32": 91.6e12}),
    ("L4", {"bf16": 121e12, "fp32": 30.3e12}),
    ("A6000", {"bf16": 155e12, "fp32": 38.7e12}),
    ("4090", {"bf16": 165e12, "fp32": 82.6e12}),
    ("3090", {"bf16": 71e12, "fp32": 35.6e12}),
    ("V100", {"bf16": 125e12, "fp32": 15.7e12}),  # fp16 tensor cores; V100 has no bf16
    ("MI300X", {"bf16": 1307e12, "fp32": 163e12}),
    ("MI250X", {"bf16": 383e12, "fp32": 47.9e12}),
]


def measure_cpu_peak(seconds: float = 0.5, size: int = 512) -> float:
    """FLOP/s of fp32 matmuls on this process's threads: the CPU's practical peak for MFU."""
    import torch

    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: thread pool and caches
    count, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < seconds:
        a @ b
        count += 1
    return 2 * size**3 * count / elapsed


def device_peak(device, dtype, configured: float | None = None) -> tuple[float, str]:
    """(peak FLOP/s of one device, where the figure comes from) for a torch device and dtype."""
    import torch

    if configured:
        return configured, "engine.peak_flops"
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        key = "bf16" if dtype == torch.bfloat16 else "fp32"
        for pattern, peaks in GPU_PEAK:
            if pattern in name:
                return peaks[key], f"{name} datasheet, {key}"
        return float("nan"), f"{name} is not in the peak table: set engine.peak_flops for MFU"
    return measure_cpu_peak(), f"fp32 matmul measured on {torch.get_num_threads()} thread(s)"


def peak_rss() -> int:
    """This process's peak resident memory in bytes. VmHWM, not ru_maxrss: a spawned child's
    ru_maxrss still counts its parent's pages from before the exec."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def memory_bytes(device) -> int:
    """Peak memory of this rank: allocated GPU memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        import torch

        return torch.cuda.max_memory_allocated(device)
    return peak_rss()


def duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Meter:
    """Tokens/s and MFU over the steps since the last report (a window, so warm-up fades out)."""

    def __init__(self, flops_per_token: int, peak_flops: float, world: int, tokens_per_step: int):
        self.flops_per_token, self.peak, self.world = flops_per_token, peak_flops, world
        self.tokens_per_step = tokens_per_step
        self.reset()

    def reset(self) -> None:
        self.start, self.steps = time.perf_counter(), 0

    def step(self) -> None:
        self.steps += 1

    def report(self) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens_per_s = self.steps * self.tokens_per_step / elapsed
        mfu = tokens_per_s * self.flops_per_token / (self.peak * self.world) if self.peak == self.peak else float("nan")
        out = {"tokens_per_s": tokens_per_s, "mfu": mfu, "step_seconds": elapsed / max(self.steps, 1)}
        self.reset()
        return out
