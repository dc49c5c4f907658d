"""Atomic publishing of files and folders: a reader sees the whole thing or nothing.

Everything is written under a temporary name beside its destination (`.NAME.XXXX.tmp`, which no
reader looks at and a rerun deletes), flushed to disk, then renamed into place. Permissions follow
the umask like any ordinary file, so a team sharing a cluster can read each other's outputs
(Python's temporary files would otherwise stay private to their owner).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

TMP_SUFFIX = ".tmp"


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def share(path: str | os.PathLike) -> None:
    """Give a file written with private permissions (Python's and safetensors' temporary files) the mode an
    ordinary file gets under the umask."""
    os.chmod(path, 0o666 & ~_umask())


def write_bytes(path: str | os.PathLike, data: bytes | memoryview) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX,
                                     delete=False) as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())  # the bytes are on disk before the name says they are complete
    share(f.name)
    os.replace(f.name, path)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def publish_folder(out: str | os.PathLike, fill: Callable[[Path], object]) -> None:
    """Call `fill(tmp)` on a fresh temporary folder beside `out`, then put it in `out`'s place."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=TMP_SUFFIX))
    try:
        fill(tmp)
        os.chmod(tmp, 0o777 & ~_umask())
        for root, _, files in os.walk(tmp):  # what fill() wrote through libraries that create files 0600
            for name in files:
                share(os.path.join(root, name))
        sync_tree(tmp)
        # the old folder steps aside by a rename (atomic) and is deleted only once the new one is in
        # place: a kill at any point leaves `out` whole (old or new) or absent, never half-deleted
        old = out.parent / f".{out.name}.old.{os.getpid()}{TMP_SUFFIX}" if out.exists() else None
        if old:
            os.replace(out, old)
        os.replace(tmp, out)
        if old:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def fsync_path(path: str | os.PathLike) -> None:
    """fsync one file, or a folder (its entries: the names of what was renamed into it)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sync_tree(folder: str | os.PathLike) -> None:
    """fsync every file under `folder`, then the folders themselves.
    Ranks call it on a folder others may still be writing to: a file renamed away meanwhile is skipped
    (its writer syncs it under its final name)."""
    folders = []
    for root, _, files in os.walk(folder):
        folders.append(root)
        for name in files:
            try:
                fsync_path(os.path.join(root, name))
            except FileNotFoundError:
                continue
    for root in reversed(folders):
        fsync_path(root)


def remove_leftovers(folder: str | os.PathLike) -> int:
    """Delete the temporary files and folders a crashed writer left in `folder` and its subfolders."""
    count = 0
    for path in [*Path(folder).glob(f".*{TMP_SUFFIX}"), *Path(folder).glob(f"*/.*{TMP_SUFFIX}")]:
        shutil.rmtree(path) if path.is_dir() else path.unlink()
        count += 1
    return count
