"""Atomic publishing: whole or nothing, readable like ordinary files, leftovers of a crash removed."""

from __future__ import annotations

import os
import stat

import pytest

from lmforge import atomic


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_files_and_folders_follow_the_umask_not_tempfiles_private_mode(tmp_path):
    old = os.umask(0o022)
    try:
        atomic.write_json(tmp_path / "a" / "x.json", {"k": 1})
        atomic.publish_folder(tmp_path / "folder", lambda d: (d / "f.txt").write_text("hi"))
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "x.json").read_text() == '{\n  "k": 1\n}\n'
    assert mode(tmp_path / "a" / "x.json") == 0o644
    assert mode(tmp_path / "folder") == 0o755 and (tmp_path / "folder" / "f.txt").read_text() == "hi"
    assert not list(tmp_path.rglob(f"*{atomic.TMP_SUFFIX}"))


def test_a_failed_fill_leaves_the_old_folder_and_no_temporary(tmp_path):
    atomic.publish_folder(tmp_path / "out", lambda d: (d / "v1").write_text("1"))

    def broken(d):
        (d / "v2").write_text("half")
        raise RuntimeError("crash mid-write")

    with pytest.raises(RuntimeError):
        atomic.publish_folder(tmp_path / "out", broken)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["v1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_remove_leftovers_deletes_only_temporaries(tmp_path):
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / ".000001.bin.abc.tmp").write_bytes(b"half")
    (tmp_path / ".tokenizer.xyz.tmp").mkdir()
    (tmp_path / "train" / "000000.bin").write_bytes(b"done")
    assert atomic.remove_leftovers(tmp_path) == 2
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == ["train", "train/000000.bin"]


def test_publishing_over_an_existing_folder_swaps_it_whole_and_leaves_nothing_behind(tmp_path):
    out = tmp_path / "final"
    atomic.publish_folder(out, lambda tmp: (tmp / "a.txt").write_text("old"))
    atomic.publish_folder(out, lambda tmp: (tmp / "b.txt").write_text("new"))
    assert sorted(p.name for p in out.iterdir()) == ["b.txt"] and (out / "b.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["final"]  # neither the temporary nor the old one
    # a kill between "old steps aside" and "new one in place" leaves the old folder under a temporary name,
    # which the next run's clean-up deletes
    aside = tmp_path / ".final.old.123.tmp"
    aside.mkdir()
    assert atomic.remove_leftovers(tmp_path) == 1 and not aside.exists()


def test_sync_tree_reaches_every_file(tmp_path, monkeypatch):
    (tmp_path / "d" / "e").mkdir(parents=True)
    for name in ("x", "d/y", "d/e/z"):
        (tmp_path / name).write_text(name)
    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.readlink(f"/proc/self/fd/{fd}")), real(fd)))
    atomic.sync_tree(tmp_path)
    assert {str(tmp_path / n) for n in ("x", "d/y", "d/e/z", "d", "d/e")} | {str(tmp_path)} == set(synced)


def test_files_a_library_writes_private_are_published_like_ordinary_files(tmp_path):
    """safetensors (model.safetensors, the RNG states) creates its files 0600: a team sharing runs could not
    read each other's exports."""
    import torch
    from safetensors.torch import save_file

    from lmforge import checkpoint

    old = os.umask(0o022)
    try:
        atomic.publish_folder(tmp_path / "final", lambda d: save_file({"w": torch.ones(2)}, str(d / "m.safetensors")))
        checkpoint.save_rng(tmp_path, rank=0)
    finally:
        os.umask(old)
    assert mode(tmp_path / "final" / "m.safetensors") == 0o644
    assert mode(tmp_path / "rng-rank0.safetensors") == 0o644
