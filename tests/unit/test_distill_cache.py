"""`python -m distill.cache` and `TeacherCache`: the cached top-k is the teacher's own top-k of those windows, a
full-vocabulary cache gives the live teacher's KD loss, reruns are no-ops, a cache of another teacher or seq_len
is refused, bad inputs are one-line errors, and the reader holds at most `max_open` maps.

The cache is written in this process (`distill.cache.main`: a process group of one), over a 40-window slice of
`tiny_data` (seq_len 32) so that top_k = the whole 512-token vocabulary stays small.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from distill import cache as dc
from distill import teacher_cache as tc
from distill.losses import kd_loss, topk_kd_loss
from lmforge import atomic
from lmforge.data.sampler import eval_windows
from lmforge.data.shards import TokenShards, read_meta, write_shard

from ..harness import write_yaml

SEQ, WINDOWS, VAL_WINDOWS = 32, 40, 10


def small_shards(src: Path, dst: Path, windows: int = WINDOWS, val_windows: int = VAL_WINDOWS) -> Path:
    """The first `windows` windows of `src`'s train split (and `val_windows` of val) as a token folder of their
    own, two shards per split (so windows cross a shard boundary), same tokenizer."""
    meta = read_meta(src)
    splits = {}
    for split, count in (("train", windows), ("val", val_windows)):
        tokens = TokenShards(src, split).tokens(0, count * SEQ + 1)
        halves = (tokens[:tokens.size // 2], tokens[tokens.size // 2:])
        splits[split] = {"tokens": int(tokens.size), "documents": 2,
                         "shards": [write_shard(dst, split, i, t, np.array([t.size], dtype=np.uint64))
                                    for i, t in enumerate(halves)]}
    shutil.copytree(src / "tokenizer", dst / "tokenizer")
    atomic.write_json(dst / "meta.json", {**meta, "splits": splits,
                                          "source_fingerprint": f"{meta['source_fingerprint']}-first{windows}"})
    return dst


def cache_config(path: Path, teacher: Path, data: Path, out: Path, **extra) -> Path:
    return write_yaml(path, {"teacher": str(teacher), "data": {"path": str(data), "seq_len": SEQ},
                             "out_dir": str(out), "top_k": 8, "windows_per_shard": 4, "micro_batch_size": 3,
                             "temperature": 2.0, "progress": False, **extra})  # distill_config's kd.temperature


def run_cache(*argv) -> tuple[int, str]:
    """`python -m distill.cache ARGV` in this process: (exit status, its output). The process group's variables
    and the signal handlers the run installs are put back afterwards."""
    env, handlers = dict(os.environ), {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGUSR1)}
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            try:
                code = dc.main([str(a) for a in argv])
            except SystemExit as e:  # a config error exits from argparse's level
                code = e.code
    finally:
        os.environ.clear()
        os.environ.update(env)
        for s, h in handlers.items():
            signal.signal(s, h)
    return code, out.getvalue()


def teacher_logits(teacher: Path, data: Path, windows) -> torch.Tensor:
    """The teacher's fp32 logits at every input position of `windows`, computed here."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    train = TokenShards(data, "train")
    x = torch.from_numpy(np.stack([train.window(w, SEQ)[:-1] for w in windows]).astype(np.int64))
    with torch.no_grad():
        return model(input_ids=x, use_cache=False).logits.float()


def other_teacher(tiny_lm: Path, out: Path, seed: int = 1) -> Path:
    """tiny_lm's architecture and tokenizer with other weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    shutil.copytree(tiny_lm, out, ignore=shutil.ignore_patterns("*.safetensors"))
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(tiny_lm)).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def small(tmp_path_factory, tiny_data) -> Path:
    return small_shards(tiny_data, tmp_path_factory.mktemp("small") / "data")


@pytest.fixture(scope="module")
def top8(tmp_path_factory, tiny_lm, small) -> tuple[Path, Path, str]:
    """(config, cache folder, output of the run) of the top-8 fp16 cache."""
    root = tmp_path_factory.mktemp("top8")
    cfg = cache_config(root / "cache.yaml", tiny_lm, small, root / "cache")
    code, out = run_cache(cfg)
    assert code == 0, out
    return cfg, root / "cache", out


def test_cache_is_the_teachers_topk(top8, tiny_lm, small):
    _, folder, out = top8
    meta = json.loads((folder / "meta.json").read_text())
    assert (meta["windows"], meta["seq_len"], meta["top_k"], meta["index_dtype"], meta["dtype"]) == \
        (WINDOWS, SEQ, 8, "uint16", "fp16")
    assert meta["bytes_per_token"] == 2 * 8 + 2 * 8 + 4  # uint16 ids, fp16 logits, the fp32 log-normaliser
    assert [s["windows"] for s in meta["shards"]] == [4] * 10
    assert (folder / "train" / "shard-00009.idx").stat().st_size == 4 * SEQ * 8 * 2
    assert meta["teacher_tokens_per_s"] > 0 and meta["tokens_computed"] == WINDOWS * SEQ
    assert "40 windows" in out and "36 bytes per token" in out and "tokens/s" in out

    cache = tc.TeacherCache(folder, SEQ)
    indices, values = cache.rows(list(range(WINDOWS)))
    assert indices.dtype == torch.int64 and values.dtype == torch.float32
    assert tuple(indices.shape) == tuple(values.shape) == (WINDOWS, SEQ, 8)
    logits = teacher_logits(tiny_lm, small, range(WINDOWS))
    # the log-normaliser at the cache's temperature, over the whole vocabulary
    assert meta["temperature"] == 2.0 and (folder / "train" / "shard-00009.lse").stat().st_size == 4 * SEQ * 4
    torch.testing.assert_close(cache.lse(list(range(WINDOWS))), torch.logsumexp(logits.float() / 2.0, dim=-1),
                               atol=1e-4, rtol=1e-5)
    ref_values, ref_indices = torch.topk(logits, 8, dim=-1)
    torch.testing.assert_close(values, ref_values.half().float(), atol=2e-3, rtol=1e-3)
    # the ids hold the logits stored beside them (ties may order differently), and equal the reference's where
    # the values around them are not tied
    torch.testing.assert_close(logits.gather(-1, indices), values, atol=2e-3, rtol=1e-3)
    gaps = ref_values.diff(dim=-1).abs()
    untied = torch.ones_like(ref_values, dtype=torch.bool)
    untied[..., 1:] &= gaps > 1e-4
    untied[..., :-1] &= gaps > 1e-4
    assert untied.float().mean() > 0.5
    assert torch.equal(indices[untied], ref_indices[untied])
    # the same windows in another order, and any subset, come back row for row
    order = [17, 3, 39, 0, 4]
    again_i, again_v = cache.rows(order)
    assert torch.equal(again_i, indices[order]) and torch.equal(again_v, values[order])

    # the teacher's validation score, as `python -m distill` would measure it on the same windows
    val = TokenShards(small, "val")
    ids = eval_windows(val, SEQ, 64)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    x = torch.from_numpy(np.stack([val.window(i, SEQ) for i in ids]).astype(np.int64))
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(input_ids=x[:, :-1]).logits.flatten(0, 1), x[:, 1:].flatten())
    assert meta["teacher_val_windows"] == len(ids) == VAL_WINDOWS
    assert meta["teacher_val_loss"] == pytest.approx(float(loss), rel=1e-4)
    assert meta["teacher_val_ppl"] == pytest.approx(float(loss.exp()), rel=1e-4)


def test_full_vocabulary_cache_gives_the_live_teachers_kd_loss(tmp_path, tiny_lm, small):
    cfg = cache_config(tmp_path / "full.yaml", tiny_lm, small, tmp_path / "full", top_k=512, dtype="fp32")
    code, out = run_cache(cfg)
    assert code == 0, out
    cache = tc.TeacherCache(tmp_path / "full", SEQ)
    assert cache.meta["bytes_per_token"] == 2 * 512 + 4 * 512 + 4
    windows = [0, 5, 22, 39]
    indices, values = cache.rows(windows)
    logits = teacher_logits(tiny_lm, small, windows)
    student = torch.randn(logits.shape, generator=torch.Generator().manual_seed(0)) * 2
    for temperature in (1.0, 2.0):
        live = kd_loss(student, logits, temperature, "forward")
        cached = topk_kd_loss(student, indices, values, temperature)
        assert float(cached) == pytest.approx(float(live), abs=1e-3)
    # a top-8 cache is not the whole distribution: the same check tells them apart
    top = topk_kd_loss(student, indices[..., :8], values[..., :8], 1.0)
    assert abs(float(top) - float(kd_loss(student, logits, 1.0, "forward"))) > 1e-2


def test_bf16_values_round_trip(tmp_path, tiny_lm, small):
    cfg = cache_config(tmp_path / "bf16.yaml", tiny_lm, small, tmp_path / "bf16", dtype="bf16",
                       windows_per_shard=64)
    code, out = run_cache(cfg, "data.seq_len=16")  # another seq_len: 80 windows in one shard
    assert code == 0, out
    cache = tc.TeacherCache(tmp_path / "bf16", 16)
    assert cache.meta["value_dtype"] == "uint16" and len(cache) == 80
    _, values = cache.rows([0, 79])
    train = TokenShards(small, "train")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_lm, dtype=torch.float32).eval()
    x = torch.from_numpy(np.stack([train.window(w, 16)[:-1] for w in (0, 79)]).astype(np.int64))
    with torch.no_grad():
        ref = torch.topk(model(input_ids=x).logits, 8, dim=-1).values
    torch.testing.assert_close(values, ref.bfloat16().float(), atol=2e-2, rtol=1e-2)
    assert not torch.equal(values, ref)  # bf16 keeps 8 bits of mantissa: some are rounded


def test_rerun_is_a_no_op(top8):
    cfg, folder, _ = top8
    before = {p.name: p.stat().st_mtime_ns for p in [folder / "meta.json", *sorted((folder / "train").iterdir())]}
    code, out = run_cache(cfg)
    assert code == 0, out
    assert "already complete" in out
    assert {p.name: p.stat().st_mtime_ns for p in [folder / "meta.json", *sorted((folder / "train").iterdir())]} \
        == before


def test_another_teacher_or_seq_len_is_refused(tmp_path, top8, tiny_lm, tiny_data, small):
    cfg, folder, _ = top8
    cache = tc.TeacherCache(folder, SEQ)
    meta = read_meta(small)
    mine = tc.teacher_identity(tiny_lm)
    # the identity `python -m distill` records for its teacher (teacher_id in distill/__main__.py)
    from lmforge import checkpoint as ckpt
    from lmforge.models import folder_config

    assert mine == {"config": ckpt.config_digest(folder_config(tiny_lm, SEQ, "data.seq_len")),
                    "weights": ckpt.weights_digest(tiny_lm)}
    cache.check(mine, tc.data_identity(meta, SEQ))  # its own teacher and data: accepted
    cache.check(None, tc.data_identity(meta, SEQ))

    other = other_teacher(tiny_lm, tmp_path / "other")
    with pytest.raises(tc.CacheError, match="built from another teacher"):
        cache.check(tc.teacher_identity(other), tc.data_identity(meta, SEQ))
    with pytest.raises(tc.CacheError, match="built for another seq_len"):
        cache.check(mine, tc.data_identity(meta, 16))
    with pytest.raises(tc.CacheError, match="built from other data"):
        cache.check(mine, tc.data_identity(read_meta(tiny_data), SEQ))
    with pytest.raises(tc.CacheError, match="another seq_len"):
        tc.TeacherCache(folder, 16)

    # the CLI into the same out_dir: refused, nothing touched
    before = sorted((p.name, p.stat().st_mtime_ns) for p in (folder / "train").iterdir())
    code, out = run_cache(cfg, f"teacher={other}")
    assert code == 2, out
    assert "another teacher" in out and "use another out_dir" in out and "Traceback" not in out
    code, out = run_cache(cfg, "data.seq_len=16")
    assert code == 2 and "another seq_len" in out, out
    assert sorted((p.name, p.stat().st_mtime_ns) for p in (folder / "train").iterdir()) == before

    # a partial cache (no meta.json yet) is not finished with another teacher either
    partial = tmp_path / "partial"
    shutil.copytree(folder, partial, ignore=shutil.ignore_patterns("lease"))
    (partial / "meta.json").unlink()
    code, out = run_cache(cfg, f"out_dir={partial}", f"teacher={other}")
    assert code == 2 and "partial teacher cache built from another teacher" in out, out
    with pytest.raises(tc.CacheError, match="not a finished teacher cache.*rerun"):
        tc.TeacherCache(partial, SEQ)


def test_bad_inputs_are_clear_errors(tmp_path, tiny_lm, small):
    out_dir = tmp_path / "cache"
    cfg = cache_config(tmp_path / "c.yaml", tiny_lm, small, out_dir)
    code, out = run_cache(cfg, f"teacher={small}")
    assert code == 2 and "is not a Hugging Face model folder (no config.json)" in out, out

    foreign = tmp_path / "foreign"  # the same model with another tokenizer
    shutil.copytree(tiny_lm, foreign)
    tok = json.loads((foreign / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    first = next(k for k, v in vocab.items() if v == 300)
    vocab["zz" + first] = vocab.pop(first)
    (foreign / "tokenizer.json").write_text(json.dumps(tok))
    code, out = run_cache(cfg, f"teacher={foreign}")
    assert code == 2 and "another tokenizer than the teacher" in out, out

    code, out = run_cache(cfg, "data.seq_len=256")
    assert code == 2 and "longer than" in out and "128 positions" in out, out
    code, out = run_cache(cfg, "top_k=600")
    assert code == 2 and "more than the teacher's vocabulary" in out, out
    code, out = run_cache(cfg, "dtype=fp8")
    assert code == 2 and "dtype" in out, out
    for text in out.splitlines():
        assert "Traceback" not in text
    assert not out_dir.exists()  # refused before any work


def test_reader_holds_at_most_max_open_maps(tmp_path, top8):
    _, folder, _ = top8
    reference = tc.TeacherCache(folder, SEQ).rows(list(range(WINDOWS)))

    def open_files() -> tuple[int, int]:
        """(descriptors, mappings) this process holds on the cache's shard files."""
        root = str(folder / "train")
        fds = sum(os.readlink(f"/proc/self/fd/{fd}").startswith(root) for fd in os.listdir("/proc/self/fd")
                  if os.path.exists(f"/proc/self/fd/{fd}"))
        maps = {line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                if line.split()[-1].startswith(root)}
        return fds, len(maps)

    cache = tc.TeacherCache(folder, SEQ, max_open=3)
    rng = np.random.default_rng(0)
    most = (0, 0)
    for _ in range(30):
        windows = rng.choice(WINDOWS, size=6, replace=False).tolist()
        indices, values = cache.rows(windows)
        assert torch.equal(indices, reference[0][windows]) and torch.equal(values, reference[1][windows])
        held = open_files()
        assert cache.open_maps <= 3 and held[0] <= 3 and held[1] <= 3, held
        most = max(most, held)
    assert most == (3, 3)  # it did use them all
    cache.close()
    assert open_files() == (0, 0)

    # a damaged shard is named, not read
    damaged = tmp_path / "damaged"
    shutil.copytree(folder, damaged)
    with open(damaged / "train" / "shard-00002.val", "r+b") as f:
        f.truncate(100)
    cache = tc.TeacherCache(damaged, SEQ)
    cache.rows([0, 7])  # other shards read fine
    with pytest.raises(tc.CacheError, match=r"shard-00002\.val: expected 2048 bytes, found 100"):
        cache.rows([9])
    (damaged / "train" / "shard-00003.idx").unlink()
    with pytest.raises(tc.CacheError, match=r"shard-00003\.idx: missing"):
        cache.rows([12])
    with pytest.raises(tc.CacheError, match="outside"):
        cache.rows([WINDOWS])
    with pytest.raises(tc.CacheError, match="no meta.json"):
        tc.TeacherCache(tmp_path / "nowhere", SEQ)


def test_dry_run_and_the_distill_schema(tmp_path, tiny_lm, small):
    from pydantic import ValidationError

    from lmforge.config.distill import DistillConfig

    cfg = cache_config(tmp_path / "c.yaml", tiny_lm, small, tmp_path / "cache")
    code, out = run_cache(cfg, "top_k=64", "--dry-run")
    assert code == 0 and "top_k: 64" in out and "260 bytes per token" in out, out  # uint16 + fp16, fp32 normaliser
    assert not (tmp_path / "cache").exists()

    base = {"run_dir": str(tmp_path / "run"), "teacher": str(tiny_lm), "student": {"from_teacher": {"layers": [1]}},
            "data": {"path": str(small), "seq_len": SEQ, "cache": str(tmp_path / "cache")}}
    assert DistillConfig.model_validate(base).data.cache == tmp_path / "cache"
    for extra, words in (({"kd": {"divergence": "reverse"}}, "reverse KL and JSD need the whole distribution"),
                         ({"kd": {"divergence": "jsd"}}, "use the live teacher"),
                         ({"kd": {"hidden": {"pairs": [[1, 2]]}}}, "kd.hidden"),
                         ({"teacher_zero3": True}, "teacher_zero3")):
        with pytest.raises(ValidationError, match=words):
            DistillConfig.model_validate({**base, **extra})
        DistillConfig.model_validate({**base, **extra, "data": {"path": str(small), "seq_len": SEQ}})  # live: fine
