"""Throughput: tokens/s, model FLOPs utilisation (MFU) against a device's peak, memory, and the ETA.

MFU = achieved model FLOP/s / peak FLOP/s, with model FLOPs from `lmforge.models.flops_per_token`
(recomputation from activation checkpointing is not counted, as in PaLM). Peak FLOP/s come from a
table of dense (no sparsity) datasheet figures for GPUs, or, on CPU, from a short fp32 matmul measured
at start-up, or from `engine.peak_flops`.
"""

from __future__ import annotations

import math
import resource
import time

# Dense (no 2:4 sparsity) datasheet peak FLOP/s of ONE device, keyed by the exact name that
# `torch.cuda.get_device_name()` returns: (bf16 tensor-core FLOP/s with fp32 accumulate, fp32 FLOP/s).
# Exact names because variants of one family differ: "NVIDIA L40" is not "NVIDIA L4", and an H100 NVL
# or PCIe is not an H100 SXM ("NVIDIA H100 80GB HBM3"). A name not listed (a new SKU, a MIG slice such as
# "... MIG 3g.40gb", a renamed driver string) gets no figure rather than a neighbour's.
# fp32 is the plain (non-tensor) fp32 rate: lmforge leaves torch's default fp32 matmul precision
# ("highest", no TF32). bf16 None: no native bf16 (compute capability < 8.0; engine.precision refuses it).
GPU_PEAK: dict[str, tuple[float | None, float]] = {
    # Hopper / Grace Hopper: H100 SXM datasheet 989 TF bf16 / 67 fp32; PCIe 756 / 51; NVL 835 / 60
    "NVIDIA H100 80GB HBM3": (989e12, 67e12),  # SXM5
    "NVIDIA H100 PCIe": (756e12, 51e12),
    "NVIDIA H100 NVL": (835e12, 60e12),
    "NVIDIA H200": (989e12, 67e12),  # SXM: the H100 SXM's compute with more memory
    "NVIDIA H200 NVL": (835e12, 60e12),
    "NVIDIA GH200 480GB": (989e12, 67e12),
    # Blackwell: HGX B200 datasheet, per GPU 4.5 PF bf16 with sparsity -> 2.25 PF dense, 75 TF fp32
    "NVIDIA B200": (2250e12, 75e12),
    # Ampere: A100 SXM4 and PCIe have the same peaks, 312 TF bf16 / 19.5 fp32
    "NVIDIA A100-SXM4-40GB": (312e12, 19.5e12),
    "NVIDIA A100-SXM4-80GB": (312e12, 19.5e12),
    "NVIDIA A100-PCIE-40GB": (312e12, 19.5e12),
    "NVIDIA A100 80GB PCIe": (312e12, 19.5e12),
    "NVIDIA A10": (125e12, 31.2e12),
    "NVIDIA A10G": (70e12, 35e12),  # AWS's A10 variant: fewer tensor FLOP/s, more fp32 than the A10
    "NVIDIA RTX A6000": (154.8e12, 38.7e12),
    "NVIDIA GeForce RTX 3090": (71.2e12, 35.6e12),  # GeForce: bf16 with fp32 accumulate runs at half rate
    # Ada Lovelace
    "NVIDIA L4": (121e12, 30.3e12),
    "NVIDIA L40": (181e12, 90.5e12),
    "NVIDIA L40S": (362e12, 91.6e12),
    "NVIDIA RTX 6000 Ada Generation": (364.2e12, 91.1e12),
    "NVIDIA GeForce RTX 4090": (165.2e12, 82.6e12),
    # Volta / Turing: fp32 only (V100 SXM2 15.7 TF, PCIe 14 TF; T4 8.1 TF)
    "Tesla V100-SXM2-16GB": (None, 15.7e12),
    "Tesla V100-SXM2-32GB": (None, 15.7e12),
    "Tesla V100-PCIE-16GB": (None, 14e12),
    "Tesla V100-PCIE-32GB": (None, 14e12),
    "Tesla T4": (None, 8.1e12),
    # AMD (ROCm reports through torch.cuda): MI300X 1307 TF bf16, 163.4 TF fp32 matrix
    "AMD Instinct MI300X": (1307.4e12, 163.4e12),
}
UNKNOWN_GPU_HINT = "set engine.peak_flops (dense FLOP/s of one device) for MFU"


def gpu_peak(name: str, dtype_key: str) -> tuple[float, str]:
    """(peak FLOP/s, source) for a device name as `torch.cuda.get_device_name()` returns it and
    `dtype_key` "bf16" or "fp32"; NaN with the reason when the table has no figure for them."""
    if name not in GPU_PEAK:
        return float("nan"), f"unknown GPU '{name}' (not in lmforge.throughput.GPU_PEAK): {UNKNOWN_GPU_HINT}"
    bf16, fp32 = GPU_PEAK[name]
    peak = bf16 if dtype_key == "bf16" else fp32
    if peak is None:
        return float("nan"), f"{name} has no native {dtype_key}: {UNKNOWN_GPU_HINT}"
    return peak, f"{name} datasheet, dense {dtype_key}"


def measure_cpu_peak(seconds: float = 0.5, size: int = 512) -> float:
    """FLOP/s of fp32 matmuls on this process's threads: the CPU's practical peak for MFU."""
    import torch

    # its own generator: drawing from the global one would shift a resumed run's dropout masks (the RNG
    # state was just restored from the checkpoint) and break bitwise resume
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(size, size, generator=g), torch.randn(size, size, generator=g)
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
        return gpu_peak(torch.cuda.get_device_name(device), "bf16" if dtype == torch.bfloat16 else "fp32")
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


def memory_window(device) -> dict[str, int]:
    """Peak memory of this rank over the window since the previous call, in bytes, for the status line:
    {"allocated": peak bytes held by tensors, "reserved": peak bytes held by the allocator (allocated plus
    its cache; what the device actually lost, and what an out-of-memory error counts)}.

    CUDA: torch's peak counters, reset after reading (`torch.cuda.reset_peak_memory_stats`), so each call
    covers only its own window; anything else reading `max_memory_allocated` later sees the last window only.
    CPU: no allocator cache to tell apart, so both are the process's peak RSS (VmHWM), which is monotone:
    the peak since the process started, not per window.
    """
    if device.type == "cuda":
        import torch

        out = {"allocated": torch.cuda.max_memory_allocated(device),
               "reserved": torch.cuda.max_memory_reserved(device)}
        torch.cuda.reset_peak_memory_stats(device)
        return out
    rss = peak_rss()
    return {"allocated": rss, "reserved": rss}


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
        self.start, self.steps, self.tokens = time.perf_counter(), 0, 0

    def step(self, tokens: int | None = None) -> None:
        """One optimizer step of `tokens` (all ranks; default: the fixed tokens_per_step of packed windows)."""
        self.steps += 1
        self.tokens += self.tokens_per_step if tokens is None else tokens

    def report(self) -> dict:
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        tokens_per_s = self.tokens / elapsed
        # no peak figure (an unknown GPU): MFU is NaN, never a guess
        mfu = float("nan") if math.isnan(self.peak) else tokens_per_s * self.flops_per_token / (self.peak * self.world)
        out = {"tokens_per_s": tokens_per_s, "mfu": mfu, "step_seconds": elapsed / max(self.steps, 1)}
        self.reset()
        return out
