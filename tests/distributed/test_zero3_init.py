"""ZeRO-3 models built partitioned (`engine.model_context`) on 2 CPU ranks: no rank holds the whole model,
and the weights are the ones a whole build gives under the same seed (or, with `init_from`, the folder's).

The test launches this file under torchrun (`python -m torch.distributed.run --nproc_per_node=2 THIS OUT`);
every rank writes what it saw to OUT/rank{r}.json and the test reads them.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SEED, VOCAB, EOS, PAD = 1234, 301, 0, 1  # an odd vocabulary: partitions of 2 ranks need padding
CASES = {  # name: (model, precision); the Llama has GQA, untied embeddings and a padding row zeroed at init
    "gpt2-fp32": (dict(family="gpt2", hidden_size=32, num_layers=2, num_heads=4, max_seq_len=64), "fp32"),
    "llama-fp32": (dict(family="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=80, max_seq_len=64, tie_embeddings=False), "fp32"),
    "llama-bf16": (dict(family="llama", hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=80, max_seq_len=64, tie_embeddings=False), "bf16"),
}


def worker(out: Path) -> None:
    import torch
    from safetensors.torch import load_file

    from lmforge import engine as eng
    from lmforge.config.model import ModelConfig
    from lmforge.config.pretrain import OptimConfig
    from lmforge.models import build, build_model, hf_config

    d = eng.setup_distributed()
    zero3 = eng.read_zero_json(ROOT / "configs" / "deepspeed" / "zero3.json")
    # every parameter partitioned, however small (the shipped threshold keeps < 1e5-element ones whole)
    zero3["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    optim = OptimConfig(lr=1e-3, min_lr=0.0)
    record: dict = {"rank": d.rank}

    def ds_for(precision: str) -> dict:
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        return eng.ds_config(zero3, 1, 1, d.world, dtype, optim, d.device)

    def compare(full: dict | None, expected: dict) -> list[str]:
        """Keys whose gathered values differ from `expected` (bitwise); rank 0 only (None elsewhere)."""
        if full is None:
            return []
        bad = sorted(set(full) ^ set(expected))
        return bad + [k for k in sorted(set(full) & set(expected)) if not torch.equal(full[k], expected[k])]

    for name, (spec, precision) in CASES.items():
        cfg, ds = ModelConfig(**spec), ds_for(precision)
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        torch.manual_seed(SEED)
        whole = build_model(cfg, VOCAB, EOS, PAD)  # today's build: the whole fp32 model on every rank
        rng_after_whole = torch.get_rng_state()
        expected = {k: v.to(dtype) for k, v in whole.state_dict().items()}
        del whole
        torch.manual_seed(SEED)
        with eng.model_context(ds):
            model = build_model(cfg, VOCAB, EOS, PAD)
        params = list(model.parameters())
        entry = {"partitioned": all(eng.is_partitioned(p) for p in params),
                 "held": sum(p.ds_tensor.numel() for p in params if eng.is_partitioned(p)),
                 "total": sum(p.ds_numel for p in params if eng.is_partitioned(p)),
                 "dtype": str({p.ds_tensor.dtype for p in params if eng.is_partitioned(p)}),
                 "rng_in_step": torch.equal(torch.get_rng_state(), rng_after_whole)}
        engine = eng.initialize(model, ds, 0.1)
        entry["mismatched"] = compare(eng.full_state_dict(engine), expected)
        record[name] = entry
        del engine, model

    # the new entry point too (`models.build` from a transformers config), fresh and from a folder
    cfg, ds = ModelConfig(**CASES["gpt2-fp32"][0]), ds_for("fp32")
    torch.manual_seed(SEED)
    expected = build_model(cfg, VOCAB, EOS, PAD).state_dict()
    torch.manual_seed(SEED)
    with eng.model_context(ds):
        model = build(hf_config(cfg, VOCAB, EOS, PAD))
    record["build"] = {"partitioned": all(eng.is_partitioned(p) for p in model.parameters()),
                       "mismatched": compare(eng.full_state_dict(eng.initialize(model, ds, 0.1)), expected)}

    folder = out / "init_from"
    if d.is_main:  # a model no seed here would give: other seed, weights shifted
        torch.manual_seed(SEED + 1)
        saved = build_model(cfg, VOCAB, EOS, PAD)
        with torch.no_grad():
            for p in saved.parameters():
                p.add_(0.5)
        saved.save_pretrained(folder)
    eng.barrier()
    torch.manual_seed(SEED)
    with eng.model_context(ds):
        model = build(hf_config(cfg, VOCAB, EOS, PAD), init_from=folder)
    folder_weights = load_file(folder / "model.safetensors")
    full = eng.full_state_dict(eng.initialize(model, ds, 0.1))
    record["init_from"] = {
        "partitioned": all(eng.is_partitioned(p) for p in model.parameters()),
        "mismatched": [] if full is None else [k for k, v in folder_weights.items() if not torch.equal(full[k], v)],
        "compared": len(folder_weights),
        "tied": None if full is None else torch.equal(full["lm_head.weight"], full["transformer.wte.weight"])}
    (out / f"rank{d.rank}.json").write_text(json.dumps(record))
    eng.teardown()


@pytest.mark.slow
def test_zero3_partitioned_build_has_todays_weights(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
                          __file__, str(tmp_path)], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for name, (_, precision) in CASES.items():
        for r in ranks:
            e = r[name]
            assert e["partitioned"], (name, r["rank"])
            # each rank holds its half (rounded up per parameter), never the whole model
            assert e["total"] / 2 <= e["held"] <= e["total"] / 2 + 64, (name, e)
            assert e["dtype"] == ("{torch.bfloat16}" if precision == "bf16" else "{torch.float32}"), (name, e)
            assert e["rng_in_step"], f"{name}: rank {r['rank']} drew other random numbers than a whole build"
        assert ranks[0][name]["mismatched"] == [], f"{name}: weights differ from a whole build's"
    assert ranks[0]["build"]["partitioned"] and ranks[0]["build"]["mismatched"] == []
    init_from = ranks[0]["init_from"]
    assert init_from["partitioned"] and init_from["compared"] > 10
    assert init_from["mismatched"] == [], "the loaded weights are not the folder's"
    assert init_from["tied"] is True


if __name__ == "__main__":
    worker(Path(sys.argv[1]))
