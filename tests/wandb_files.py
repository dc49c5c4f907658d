"""Reading an offline W&B run's `.wandb` file, for tests that check what W&B received."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path


def wandb_records(folder: Path) -> list:
    """Every record of an offline W&B run folder's .wandb file, once W&B's service has written it all
    (its `exit` record comes last; the service may still be writing when `finish()` returns)."""
    (path,) = folder.glob("run-*.wandb")
    deadline = time.monotonic() + 15  # seconds
    while not (records := parse_wandb_file(path.read_bytes())) or records[-1].WhichOneof("record_type") != "exit":
        assert time.monotonic() < deadline, f"{path} has no exit record"
        time.sleep(0.05)
    return records


def parse_wandb_file(data: bytes) -> list:
    """The records of a .wandb file: a LevelDB-style log of protobuf records."""
    from wandb.proto import wandb_internal_pb2 as pb

    assert data[:4] == b":W&B"
    records, pos, chunk = [], 7, b""  # 7-byte file header, then 7-byte record headers in 32 KiB blocks
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if pos + 7 + length > len(data):  # a record still being written
            break
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST fragment
            record = pb.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def history(records) -> list[dict]:
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            rows.append({"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in r.history.item})
    return rows
