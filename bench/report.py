"""BENCHMARKS.md: each benchmark script owns the text between its two markers, and only that."""

from __future__ import annotations

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
