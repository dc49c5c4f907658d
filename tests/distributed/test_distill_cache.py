"""`torchrun --nproc_per_node=2 -m distill.cache`: the ranks split the shards and write the same bytes one rank
writes; a run killed mid-shard leaves whole shards and temporaries, and its rerun deletes the temporaries, skips
the whole shards (it says how many) and ends byte-identical to an uninterrupted run."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from ..harness import launch
from ..unit.test_distill_cache import cache_config, small_shards


def files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((folder / "train").iterdir()) if not p.name.startswith(".")}


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_data) -> Path:
    return small_shards(tiny_data, tmp_path_factory.mktemp("small") / "data")


@pytest.fixture(scope="module")
def one_rank(tmp_path_factory, tiny_lm, small) -> Path:
    root = tmp_path_factory.mktemp("one")
    done = launch("distill.cache", cache_config(root / "c.yaml", tiny_lm, small, root / "cache"), nproc=1)
    assert done.returncode == 0, done.stderr
    return root / "cache"


def test_two_ranks_write_what_one_writes(tmp_path, tiny_lm, small, one_rank):
    done = launch("distill.cache", cache_config(tmp_path / "c.yaml", tiny_lm, small, tmp_path / "cache"), nproc=2)
    assert done.returncode == 0, done.stderr
    assert "2 rank(s)" in done.stdout and "10 shard(s) written, 0 skipped" in done.stdout, done.stdout
    assert len(files(one_rank)) == 30
    assert files(tmp_path / "cache") == files(one_rank)
    meta, ref = (json.loads((f / "meta.json").read_text()) for f in (tmp_path / "cache", one_rank))
    assert meta["world_size"] == 2 and meta["tokens_computed"] == ref["tokens_computed"] == 40 * 32
    assert meta["shards"] == ref["shards"] and meta["teacher"] == ref["teacher"] and meta["data"] == ref["data"]
    assert meta["teacher_val_loss"] == pytest.approx(ref["teacher_val_loss"], rel=1e-5)


def test_killed_run_resumes_byte_identical(tmp_path, tiny_lm, small, one_rank):
    cfg = cache_config(tmp_path / "c.yaml", tiny_lm, small, tmp_path / "cache")
    # rank 1 owns shards 1, 3, 5, ...: it dies halfway through shard 5, after writing 1 and 3 whole
    killed = launch("distill.cache", cfg, nproc=2, env={"LMFORGE_FAULT": "cache-shard-mid:5:1"}, timeout=120)
    assert killed.returncode != 0
    train = tmp_path / "cache" / "train"
    assert not (tmp_path / "cache" / "meta.json").exists()
    assert list(train.glob(".shard-00005.*.tmp")), sorted(p.name for p in train.iterdir())  # its temporaries
    whole = {1, 3} | {s for s in range(0, 10, 2) if (train / f"shard-{s:05d}.val").exists()}
    kept = files(tmp_path / "cache")
    assert {f"shard-{s:05d}.{k}" for s in whole for k in ("idx", "val", "lse")} == set(kept)
    assert all(kept[n] == data for n, data in files(one_rank).items() if n in kept)

    rerun = launch("distill.cache", cfg, nproc=2, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    skipped = re.search(r"skipping (\d+) shard\(s\) already written; (\d+) to write", rerun.stdout)
    assert skipped and (int(skipped[1]), int(skipped[2])) == (len(whole), 10 - len(whole)), rerun.stdout
    assert f"{10 - len(whole)} shard(s) written, {len(whole)} skipped" in rerun.stdout
    assert not [p for p in train.iterdir() if p.name.endswith(".tmp")]
    assert files(tmp_path / "cache") == files(one_rank)
    meta = json.loads((tmp_path / "cache" / "meta.json").read_text())
    assert meta["shards_skipped"] == len(whole) and meta["tokens_computed"] == (40 - 4 * len(whole)) * 32


def test_offline_distillation_resumes_bit_for_bit_and_refuses_a_cache_of_another_teacher(tmp_path, tiny_lm, small,
                                                                                         one_rank):
    """The student trains from the cached top-k (no teacher in memory), a run killed after a save resumes to the
    uninterrupted run's weights bit for bit, and a cache made by another teacher is refused before any work."""
    import shutil

    import torch
    from safetensors.torch import load_file

    from ..harness import distill_config

    common = {"cache": one_rank, "eval": {"windows": 64}}  # the 10 windows of the slice's val split, as the cache
    straight = distill_config(tmp_path / "a.yaml", tiny_lm, tmp_path / "straight", small, **common)
    done = launch("distill", straight, nproc=2)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "the teacher's top-8 logits from" in done.stdout and "scored by distill.cache" in done.stdout
    broken = distill_config(tmp_path / "b.yaml", tiny_lm, tmp_path / "broken", small, **common)
    killed = launch("distill", broken, nproc=2, env={"LMFORGE_FAULT": "save-committed:3:0"})
    assert killed.returncode != 0 and not (tmp_path / "broken" / "final").exists()
    resumed = launch("distill", broken, nproc=2)
    assert resumed.returncode == 0 and "at step 3" in resumed.stdout, resumed.stderr[-3000:]
    a, b = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in ("straight", "broken"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), "resumed weights differ"
    report = json.loads((tmp_path / "straight" / "report.json").read_text())
    assert report["models"]["teacher"]["score"]["ppl"] == json.loads((one_rank / "meta.json").read_text())[
        "teacher_val_ppl"]
    # another teacher (same architecture and tokenizer, other weights): its cache does not fit
    other = tmp_path / "other-teacher"
    shutil.copytree(tiny_lm, other)
    weights = load_file(str(other / "model.safetensors"))
    from safetensors.torch import save_file

    save_file({k: v * 1.01 for k, v in weights.items()}, str(other / "model.safetensors"), metadata={"format": "pt"})
    cfg = distill_config(tmp_path / "o.yaml", other, tmp_path / "other", small, **common)
    refused = launch("distill", cfg)
    assert refused.returncode == 2 and "another teacher" in refused.stderr, refused.stderr[-2000:]
    assert not (tmp_path / "other" / "checkpoints").exists() and not (tmp_path / "other" / "final").exists()
    # the student scored on other validation windows than the teacher: refused, with the setting to use
    cfg = distill_config(tmp_path / "w.yaml", tiny_lm, tmp_path / "windows", small, cache=one_rank, eval={"windows": 4})
    refused = launch("distill", cfg)
    assert refused.returncode == 2 and "set eval.windows=10" in refused.stderr, refused.stderr[-2000:]
    # a damaged shard stops the run before any step, on every rank
    victim = sorted((one_rank / "train").glob("*.val"))[-1]
    saved = victim.read_bytes()
    victim.write_bytes(saved[:-2])
    try:
        cfg = distill_config(tmp_path / "d.yaml", tiny_lm, tmp_path / "damaged", small, **common)
        refused = launch("distill", cfg, nproc=2)
        assert refused.returncode != 0 and f"{victim}: expected" in refused.stderr, refused.stderr[-2000:]
        assert not (tmp_path / "damaged" / "checkpoints").exists()
    finally:
        victim.write_bytes(saved)
