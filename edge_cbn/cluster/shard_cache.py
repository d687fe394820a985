"""Finished units of a sweep on disk, one file each, named by the sha1 of everything that determines the
unit's result (the caller's key dict), so an interrupted sweep resumes where it stopped and a changed
input never meets an old result.  A file is written under a temporary name and renamed into place, so a
run killed mid-write leaves no partial file that a later run would read; an unreadable one is ignored."""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path

import numpy as np


def unit_key(what: dict) -> str:
    """sha1 of `what` (JSON with sorted keys; paths and other objects by their str)."""
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


class ShardCache:
    """JSON results (`put` / `get`) and BN statistics ({bn: (mean, var)}, `put_stats` / `get_stats`, an
    .npz beside them, exact float arrays)."""

    def __init__(self, folder):
        self.folder = Path(folder)

    def get(self, key: str):
        try:
            return json.loads((self.folder / f"{key}.json").read_text())
        except (OSError, ValueError):
            return None

    def put(self, key: str, result) -> None:
        self._write(f"{key}.json", json.dumps(result).encode())

    def get_stats(self, key: str) -> dict | None:
        try:
            with np.load(self.folder / f"{key}.npz", allow_pickle=False) as z:
                names = json.loads(str(z["names"]))
                return {bn: (z[f"{i}/mean"], z[f"{i}/var"]) for i, bn in enumerate(names)}
        except (OSError, ValueError, KeyError):
            return None

    def put_stats(self, key: str, stats: dict) -> None:
        arrays = {"names": np.array(json.dumps(list(stats)))}
        for i, (mean, var) in enumerate(stats.values()):
            arrays[f"{i}/mean"], arrays[f"{i}/var"] = np.asarray(mean), np.asarray(var)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self._write(f"{key}.npz", buf.getvalue())

    def _write(self, name: str, data: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(data)
        os.replace(tmp, self.folder / name)
