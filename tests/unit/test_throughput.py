"""Throughput: the GPU peak table matches device names exactly, MFU without a peak is NaN, and the
status line's per-window memory (CUDA peaks reset after each read; CPU peak RSS)."""

from __future__ import annotations

import math

import pytest
import torch

from lmforge import throughput
from lmforge.throughput import GPU_PEAK, Meter, device_peak, gpu_peak, memory_window

TF = 1e12


@pytest.mark.parametrize("name, bf16, fp32", [
    # names as torch.cuda.get_device_name() returns them; neighbours that a substring match confuses
    ("NVIDIA H100 80GB HBM3", 989 * TF, 67 * TF),  # SXM
    ("NVIDIA H100 PCIe", 756 * TF, 51 * TF),
    ("NVIDIA H100 NVL", 835 * TF, 60 * TF),  # not SXM
    ("NVIDIA H200", 989 * TF, 67 * TF),
    ("NVIDIA H200 NVL", 835 * TF, 60 * TF),
    ("NVIDIA GH200 480GB", 989 * TF, 67 * TF),
    ("NVIDIA L40", 181 * TF, 90.5 * TF),  # not L4
    ("NVIDIA L40S", 362 * TF, 91.6 * TF),
    ("NVIDIA L4", 121 * TF, 30.3 * TF),
    ("NVIDIA A100-SXM4-40GB", 312 * TF, 19.5 * TF),
    ("NVIDIA A100-SXM4-80GB", 312 * TF, 19.5 * TF),
    ("NVIDIA A100-PCIE-40GB", 312 * TF, 19.5 * TF),
    ("NVIDIA A100 80GB PCIe", 312 * TF, 19.5 * TF),
    ("NVIDIA A10", 125 * TF, 31.2 * TF),
    ("NVIDIA A10G", 70 * TF, 35 * TF),  # not A10
    ("NVIDIA RTX A6000", 154.8 * TF, 38.7 * TF),
    ("NVIDIA RTX 6000 Ada Generation", 364.2 * TF, 91.1 * TF),  # not the RTX A6000
    ("NVIDIA GeForce RTX 4090", 165.2 * TF, 82.6 * TF),
    ("AMD Instinct MI300X", 1307.4 * TF, 163.4 * TF),
])
def test_known_gpus_get_their_own_datasheet_figures(name, bf16, fp32):
    assert gpu_peak(name, "bf16") == (pytest.approx(bf16), f"{name} datasheet, dense bf16")
    assert gpu_peak(name, "fp32")[0] == pytest.approx(fp32)


@pytest.mark.parametrize("name", [
    "NVIDIA H100",  # no such driver string: a guess would pick SXM or PCIe
    "NVIDIA A100-SXM4-40GB MIG 3g.20gb",  # a MIG slice has a fraction of the chip's peak
    "NVIDIA L40S-48Q",  # a vGPU profile
    "NVIDIA GeForce RTX 4090 Laptop GPU",  # a different chip behind a similar name
    "NVIDIA B100",
    "",
])
def test_an_unknown_gpu_gets_nan_and_the_key_to_set(name):
    peak, source = gpu_peak(name, "bf16")
    assert math.isnan(peak)
    assert source.startswith(f"unknown GPU '{name}'") and "set engine.peak_flops" in source


def test_volta_has_fp32_but_no_bf16_figure():
    assert gpu_peak("Tesla V100-SXM2-32GB", "fp32")[0] == pytest.approx(15.7 * TF)
    peak, source = gpu_peak("Tesla V100-SXM2-32GB", "bf16")
    assert math.isnan(peak) and "no native bf16" in source and "engine.peak_flops" in source


def test_every_table_entry_is_dense_and_plausible():
    # Guards against a sparse ("with sparsity") figure or a unit slip creeping into the table.
    for name, (bf16, fp32) in GPU_PEAK.items():
        assert 1 * TF < fp32 < 200 * TF, name
        assert bf16 is None or 2 * fp32 <= bf16 < 2600 * TF, name


def test_device_peak_reads_the_cuda_name_and_prefers_the_config(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA L40")
    cuda = torch.device("cuda", 0)
    assert device_peak(cuda, torch.bfloat16) == (181 * TF, "NVIDIA L40 datasheet, dense bf16")
    assert device_peak(cuda, torch.float32)[0] == 90.5 * TF
    assert device_peak(cuda, torch.bfloat16, configured=5e14) == (5e14, "engine.peak_flops")
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA Future GPU")
    assert math.isnan(device_peak(cuda, torch.bfloat16)[0])


def test_mfu_is_nan_without_a_peak_and_a_fraction_with_one(monkeypatch):
    clock = iter([0.0, 2.0, 2.0, 0.0, 1.0, 1.0])  # perf_counter seconds: (start, report, reset) per Meter
    monkeypatch.setattr(throughput.time, "perf_counter", lambda: next(clock))
    known = Meter(flops_per_token=6, peak_flops=100.0, world=2, tokens_per_step=10)
    for _ in range(4):
        known.step()
    rate = known.report()  # 40 tokens in 2 s = 20 tokens/s x 6 FLOPs / (100 x 2 devices)
    assert rate["tokens_per_s"] == 20 and rate["mfu"] == pytest.approx(0.6) and rate["step_seconds"] == 0.5
    unknown = Meter(flops_per_token=6, peak_flops=float("nan"), world=2, tokens_per_step=10)
    unknown.step()
    assert math.isnan(unknown.report()["mfu"])


def test_memory_window_on_cpu_is_the_peak_rss():
    window = memory_window(torch.device("cpu"))
    assert set(window) == {"allocated", "reserved"}
    assert window["allocated"] == window["reserved"] > 10 * 2**20  # a Python with torch holds > 10 MiB
    # the peak (VmHWM) is this long-lived pytest process's whole history: an earlier test may have left it far
    # above what is resident now. A tensor larger than that peak is resident in full once touched, whatever freed
    # memory the allocator reuses for it (sizing it from the gap to VmRSS was flaky: reuse covered part of it)
    big = torch.ones(window["reserved"] + 64 * 2**20, dtype=torch.uint8)  # touched: the peak must grow
    assert memory_window(torch.device("cpu"))["reserved"] >= window["reserved"] + 32 * 2**20
    del big


def test_memory_window_on_cuda_reads_both_peaks_then_resets_them(monkeypatch):
    calls = []
    peaks = {"allocated": 3 * 2**30, "reserved": 5 * 2**30}

    def reader(key):
        def read(device=None):
            calls.append(f"max_{key}")
            return peaks[key]
        return read

    def reset(device=None):
        calls.append("reset")
        peaks.update(allocated=2**30, reserved=2**31)  # what the next window starts from

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", reader("allocated"))
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", reader("reserved"))
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    cuda = torch.device("cuda", 0)
    assert memory_window(cuda) == {"allocated": 3 * 2**30, "reserved": 5 * 2**30}
    assert calls == ["max_allocated", "max_reserved", "reset"]  # read before reset, so nothing is lost
    assert memory_window(cuda) == {"allocated": 2**30, "reserved": 2**31}  # the next window's own peaks


def test_measuring_the_cpu_peak_draws_nothing_from_the_global_rng():
    """It runs after a resume restored the RNG streams: a draw there would change the dropout masks of the
    resumed steps (a resumed run with dropout would no longer match an uninterrupted one bit for bit)."""
    import torch

    from lmforge.throughput import measure_cpu_peak

    torch.manual_seed(3)
    before = torch.get_rng_state()
    assert measure_cpu_peak(seconds=0.01, size=32) > 0
    assert torch.equal(torch.get_rng_state(), before)
