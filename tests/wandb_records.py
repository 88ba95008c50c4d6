"""Read what W&B wrote offline: the records of ``offline-run-*/run-<id>.wandb`` files, through W&B's own
protobuf types (its Python reader of the file is gone since wandb-core took over writing it).

A ``.wandb`` file is a LevelDB-style log: a 7-byte header (``:W&B``, magic 0xBEE1, version), then 32 KiB
blocks of chunks, each with a 7-byte header (crc32, length, type: full / first / middle / last).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass, field
from pathlib import Path

BLOCK = 32 * 1024
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def _payloads(path: Path):
    data = path.read_bytes()
    ident, magic, _ = struct.unpack("<4sHB", data[:7])
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B log"
    pos, pending = 7, b""
    while pos + 7 <= len(data):
        left = BLOCK - pos % BLOCK
        if left < 7:  # a block's tail too short for a chunk header is padding
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:
            pos += left
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""


@dataclass
class OfflineRun:
    """Everything the offline sessions of one run id wrote (W&B merges them on ``wandb sync``)."""

    run_ids: set[str] = field(default_factory=set)
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # path in the run → the file on disk
    sessions: int = 0

    def series(self, key: str, step: str) -> list[tuple[float, float]]:
        """(step, value) of ``key`` over every history row that has both."""
        return [(row[step], row[key]) for row in self.history if key in row and step in row]


def read_offline(root: Path) -> OfflineRun:
    """Every offline session under ``root`` (the ``dir`` given to ``wandb.init``).

    ``run.finish()`` only tells W&B's service process that the session is over: the service writes the
    session's last buffered records when it closes the stream, which can come after ``finish()`` has returned.
    Sessions this process opened are read after ``wandb.teardown()``, which waits for the service to close
    them all and exit (sessions of processes that have exited were closed by their own exit)."""
    import wandb
    from wandb.proto import wandb_internal_pb2 as pb

    wandb.teardown()

    out = OfflineRun()
    for session in sorted((root / "wandb").glob("offline-run-*")):
        out.sessions += 1
        for log_file in session.glob("run-*.wandb"):
            for payload in _payloads(log_file):
                record = pb.Record()
                record.ParseFromString(payload)
                kind = record.WhichOneof("record_type")
                if kind == "run":
                    out.run_ids.add(record.run.run_id)
                    out.config.update({u.key: json.loads(u.value_json) for u in record.run.config.update})
                elif kind == "config":
                    out.config.update({u.key: json.loads(u.value_json) for u in record.config.update})
                elif kind == "history":
                    out.history.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                        for item in record.history.item})
        files = session / "files"
        out.files.update({str(p.relative_to(files)): p for p in files.rglob("*") if p.is_file()})
    return out
