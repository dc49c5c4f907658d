"""DeepSpeed config injection, batch arithmetic, and the checkpoint commit / retention rules."""

from __future__ import annotations

import json

import pytest
import torch

from lmforge import checkpoint as ckpt
from lmforge.config.pretrain import OptimConfig
from lmforge.engine import EngineError, ds_config, resolve_batch


def test_batch_arithmetic():
    assert resolve_batch(4, None, None, 2) == (4, 1, 8)
    assert resolve_batch(4, 3, None, 2) == (4, 3, 24)
    assert resolve_batch(4, None, 32, 2) == (4, 4, 32)
    assert resolve_batch(4, 4, 32, 2) == (4, 4, 32)
    with pytest.raises(EngineError, match="not a multiple of batch.micro_batch_size 4 x 2 ranks = 8"):
        resolve_batch(4, None, 12, 2)
    with pytest.raises(EngineError, match="set one of grad_accum or global_batch_size"):
        resolve_batch(4, 2, 32, 2)


def test_deepspeed_config_injects_what_the_stage_owns():
    zero = {"zero_optimization": {"stage": 3}}
    cfg = ds_config(zero, 4, 2, 16, torch.bfloat16, OptimConfig(lr=1e-3, grad_clip=0.5), torch.device("cuda"))
    assert cfg["train_batch_size"] == 16 and cfg["train_micro_batch_size_per_gpu"] == 4
    assert cfg["gradient_accumulation_steps"] == 2 and cfg["gradient_clipping"] == 0.5
    assert cfg["bf16"] == {"enabled": True} and cfg["optimizer"]["params"]["lr"] == 1e-3
    # torch's fused AdamW kernel on GPU (DeepSpeed's FusedAdam would need nvcc at start-up) and on CPU
    assert cfg["optimizer"]["params"]["torch_adam"] is True and cfg["optimizer"]["params"]["fused"] is True
    assert cfg["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert zero == {"zero_optimization": {"stage": 3}}  # the file's dict is not modified
    cpu = ds_config({"zero_optimization": {"stage": 2}}, 1, 1, 2, torch.float32, OptimConfig(), torch.device("cpu"))
    assert cpu["optimizer"]["params"]["torch_adam"] is True and cpu["bf16"] == {"enabled": False}
    assert cpu["optimizer"]["params"]["fused"] is True
    # optimizer offload on a GPU: DeepSpeed's own multi-threaded CPU Adam
    offload = {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}}
    gpu_offload = ds_config(offload, 1, 1, 2, torch.bfloat16, OptimConfig(), torch.device("cuda"))
    assert "torch_adam" not in gpu_offload["optimizer"]["params"]
    assert ds_config(offload, 1, 1, 2, torch.float32, OptimConfig(), torch.device("cpu"))["optimizer"]["params"][
        "torch_adam"] is True


def fake_checkpoint(root, step, committed=True):
    folder = root / ckpt.tag_for(step)
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"x")
    if committed:
        ckpt.commit(folder, {"step": step})
    return folder


def test_only_committed_checkpoints_count_and_retention_keeps_the_newest(tmp_path):
    for step in (10, 20, 30):
        fake_checkpoint(tmp_path, step)
    fake_checkpoint(tmp_path, 40, committed=False)  # a save that was interrupted
    assert [c.step for c in ckpt.complete(tmp_path)] == [10, 20, 30]
    assert ckpt.latest(tmp_path).step == 30
    assert [p.name for p in ckpt.prune(tmp_path, keep_last=2)] == ["step-00000010"]
    assert [c.step for c in ckpt.complete(tmp_path)] == [20, 30]
    assert (tmp_path / "step-00000040").exists()  # prune never touches what may still be written
    assert [p.name for p in ckpt.remove_incomplete(tmp_path)] == ["step-00000040"]
    assert ckpt.prune(tmp_path, keep_last=5) == [] and len(ckpt.complete(tmp_path)) == 2


def test_a_foreign_or_corrupt_record_is_an_error_naming_the_folder(tmp_path):
    folder = fake_checkpoint(tmp_path, 5)
    (folder / ckpt.RECORD).write_text(json.dumps({"format": "other/9", "step": 5}))
    with pytest.raises(ckpt.CheckpointError, match=r"step-00000005/lmforge.json: format 'other/9'"):
        ckpt.latest(tmp_path)
    (folder / ckpt.RECORD).write_text("{half")
    with pytest.raises(ckpt.CheckpointError, match="unreadable commit record"):
        ckpt.latest(tmp_path)


def test_rng_state_round_trips_through_safetensors(tmp_path):
    torch.manual_seed(3)
    ckpt.save_rng(tmp_path, rank=1)
    expected = torch.rand(4)
    torch.manual_seed(99)
    assert ckpt.load_rng(tmp_path, rank=1) and torch.equal(torch.rand(4), expected)
    assert not ckpt.load_rng(tmp_path, rank=5)  # another world size: no state for this rank


def test_export_refuses_non_finite_weights(tmp_path):
    from lmforge.config.model import ModelConfig
    from lmforge.models import build_model

    model = build_model(ModelConfig(hidden_size=32, num_layers=1, num_heads=2), vocab_size=300)
    state = model.state_dict()
    state["model.norm.weight"] = state["model.norm.weight"].clone().fill_(float("nan"))
    with pytest.raises(ckpt.CheckpointError, match="non-finite weights"):
        ckpt.export_hf(tmp_path / "out", model.config, state, tmp_path, {}, None)
    assert not (tmp_path / "out").exists()


def test_retention_keeps_pinned_and_every_kth_and_never_the_newest(tmp_path):
    for step in (5, 10, 15, 20, 25, 30):
        fake_checkpoint(tmp_path, step)
    gone = ckpt.prune(tmp_path, keep_last=1, keep_every=10, pinned=(15,))
    assert [p.name for p in gone] == ["step-00000005", "step-00000025"]
    assert [c.step for c in ckpt.complete(tmp_path)] == [10, 15, 20, 30]
    ckpt.prune(tmp_path, keep_last=0)  # a zero is read as one: the newest complete checkpoint always stays
    assert [c.step for c in ckpt.complete(tmp_path)] == [30]


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_bf16_accumulates_and_reduces_gradients_in_fp32(stage):
    """DeepSpeed's default with bf16 on is bf16 for both; ZeRO-0 refuses an fp32 accumulator with a bf16
    model (see engine.bf16_reductions_in_fp32), so it gets the fp32 reduction only."""
    zero = {"zero_optimization": {"stage": stage}}
    for device in ("cpu", "cuda"):
        cfg = ds_config(zero, 2, 2, 8, torch.bfloat16, OptimConfig(), torch.device(device))
        assert cfg["communication_data_type"] == "fp32"
        assert cfg.get("data_types") == (None if stage == 0 else {"grad_accum_dtype": "fp32"})
    fp32 = ds_config(zero, 2, 2, 8, torch.float32, OptimConfig(), torch.device("cpu"))
    assert "communication_data_type" not in fp32 and "data_types" not in fp32  # fp32 already: nothing to ask
    assert zero == {"zero_optimization": {"stage": stage}}


def test_a_zero_json_that_sets_the_gradient_dtypes_wins():
    own = {"zero_optimization": {"stage": 2}, "communication_data_type": "bf16",
           "data_types": {"grad_accum_dtype": "bf16"}}
    cfg = ds_config(own, 2, 2, 8, torch.bfloat16, OptimConfig(), torch.device("cuda"))
    assert cfg["communication_data_type"] == "bf16" and cfg["data_types"] == {"grad_accum_dtype": "bf16"}
    # a data_types section about something else keeps it and gains the fp32 accumulator
    other = {"zero_optimization": {"stage": 3}, "data_types": {"keep_in_fp32_modules": []}}
    cfg = ds_config(other, 2, 2, 8, torch.bfloat16, OptimConfig(), torch.device("cuda"))
    assert cfg["data_types"] == {"keep_in_fp32_modules": [], "grad_accum_dtype": "fp32"}
    assert other["data_types"] == {"keep_in_fp32_modules": []}


# One process (a group of one), DeepSpeed's own engine for each stage: which optimizer it builds from the
# injected config and in which dtypes it accumulates and reduces (what the config above asks for).
BF16_ENGINES = """
import json, torch
from lmforge import engine as eng
from lmforge.config.pretrain import OptimConfig
d, out = eng.setup_distributed(), {}
for stage in (0, 1, 2, 3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    e = eng.initialize(model, eng.ds_config({"zero_optimization": {"stage": stage}}, 2, 2, 4, torch.bfloat16,
                                            OptimConfig(), d.device), 0.1)
    for _ in range(2):  # one optimizer step of two micro-batches
        e.backward(e(torch.randn(2, 16, dtype=torch.bfloat16)).float().pow(2).mean())
        e.step()
    o = e.optimizer
    accum = getattr(o, "gradient_accumulation_dtype", getattr(o, "grad_acc_dtype", None))
    buffer = getattr(o, "grad_partitions_flat_buffer", None)
    out[stage] = {"optimizer": type(o).__name__, "reduce": str(e.communication_data_type), "accum": str(accum),
                  "buffer": None if buffer is None else str(buffer.dtype),
                  "finite": all(bool(p.isfinite().all()) for p in e.module.parameters())}
try:
    eng.initialize(torch.nn.Linear(4, 4), eng.ds_config({"zero_optimization": {"stage": 0}, "data_types": {
        "grad_accum_dtype": "fp32"}}, 2, 2, 4, torch.bfloat16, OptimConfig(), d.device), 0.1)
    out["zero0_fp32_accumulator"] = "accepted"
except NotImplementedError as e:
    out["zero0_fp32_accumulator"] = str(e)
import sys
# DeepSpeed's ZeRO check would import its Muon optimizer, which imports Inductor (2-3 s a rank): not here
out["inductor_imported"] = "torch._inductor.compile_fx" in sys.modules
out["muon_stand_in"] = all(sys.modules[m].__doc__.startswith("lmforge's stand-in") for m in eng.MUON)
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_deepspeed_honours_the_injected_gradient_dtypes_in_every_stage():
    import os
    import subprocess
    import sys

    from ..conftest import ROOT

    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", BF16_ENGINES], capture_output=True, text=True, timeout=300,
                          cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.split("RESULT ", 1)[1])
    fp32 = "torch.float32"
    # ZeRO-0: FP16_UnfusedOptimizer in bf16 mode; fp32 all-reduce; the bf16 accumulator is DeepSpeed's only option
    assert result["0"]["optimizer"] == "FP16_UnfusedOptimizer" and result["0"]["reduce"] == fp32
    assert "unsupported mix" in result["zero0_fp32_accumulator"]
    # ZeRO-1: the fp32 accumulator makes DeepSpeed pick BF16_Optimizer
    assert result["1"] == {"optimizer": "BF16_Optimizer", "reduce": fp32, "accum": fp32, "buffer": None, "finite": True}
    assert result["2"] == {"optimizer": "DeepSpeedZeroOptimizer", "reduce": fp32, "accum": fp32, "buffer": None,
                           "finite": True}
    assert result["3"] == {"optimizer": "DeepSpeedZeroOptimizer_Stage3", "reduce": fp32, "accum": fp32,
                           "buffer": fp32, "finite": True}
    assert result["inductor_imported"] is False and result["muon_stand_in"] is True
