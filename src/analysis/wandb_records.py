"""Read an offline W&B run file (`run-<id>.wandb`) without a W&B server: what `logger=wandb` logged, for the
notebook and the tests (wandb 0.31's offline runs hold no `wandb-summary.json`, only this record log).

The file is wandb's record log: a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte header
(crc32, length, type: 1 full, 2 first, 3 middle, 4 last); chunks join into protobuf `Record`s. wandb-core
writes the file after `finish()` returns, so a reader may meet a half-written tail: `records` stops before it
(the tests wait for the run's `exit` record, `tests/wandb_records.py`).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

BLOCK = 32768
HEADER = 7


def records(path: Path) -> Iterator[Any]:
    """Every complete `wandb_internal_pb2.Record` of the file, in order; a half-written tail is left out."""
    from wandb.proto import wandb_internal_pb2

    data, pos, parts = Path(path).read_bytes(), HEADER, b""
    while pos + HEADER <= len(data):
        left = BLOCK - pos % BLOCK
        if left < HEADER:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if length == 0 and kind == 0:
            pos += left
            continue
        if pos + HEADER + length > len(data):  # the chunk is still being written
            return
        parts += data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            parts = b""
            yield record


def run_contents(path: Path) -> tuple[list[dict], dict, dict]:
    """(history rows, config, final summary) of an offline run file, values decoded from JSON."""
    history, config, summary = [], {}, {}
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append(
                {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            )
        elif kind == "config":
            config.update({item.key: json.loads(item.value_json) for item in record.config.update})
        elif kind == "summary":
            summary.update({item.key: json.loads(item.value_json) for item in record.summary.update if item.key})
    return history, config, summary
