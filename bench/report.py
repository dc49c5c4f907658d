"""What the benchmark scripts share: their sections of BENCHMARKS.md (each script owns the text between its two
markers, and only that), and how a script starts and ends the child processes it measures in."""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Callable
from pathlib import Path


def write_section(path: Path, begin: str, end: str, heading: str, section: str) -> None:
    """Replace what lies between `begin` and `end` (markers included in `section`), or append the
    section under `## heading` when the markers are not there yet."""
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + section + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + f"\n\n## {heading}\n\n" + section + "\n"
    path.write_text(text)
    print(f"[bench] updated {path}")


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a launch's rendezvous (`--master_port`)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def parse_args(parser: argparse.ArgumentParser, children: dict[str, Callable[[dict], dict | None]]):
    """`parser.parse_args()`, where `--child NAME --spec FILE` (how a script relaunches itself for a measurement,
    under torchrun or alone) runs `children[NAME]` on the JSON spec instead and never returns: rank 0 (or the
    only process) writes what the child returns to spec["result"]; a child that returns None wrote its own."""
    parser.add_argument("--child", choices=sorted(children), help=argparse.SUPPRESS)
    parser.add_argument("--spec", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if not args.child:
        return args
    spec = json.loads(args.spec.read_text())
    result = children[args.child](spec)
    if result is not None and os.environ.get("RANK", "0") == "0":
        Path(spec["result"]).write_text(json.dumps(result))
    # The result is written and the process group is gone; what is left is interpreter shutdown, where a
    # DeepSpeed/gloo thread still alive can abort the process ("terminate called without an active exception",
    # about 1 run in 30 here) and fail a measurement that succeeded. Leave without it.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
