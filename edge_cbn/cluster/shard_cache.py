"""Finished units of a sweep on disk, one file each, named by the sha1 of everything that determines the
unit's result (the caller's key dict), so an interrupted sweep resumes where it stopped and a changed
input never meets an old result.  A file is written under a temporary name and renamed into place, so a
run killed mid-write leaves no partial file that a later run would read.

Nothing read back is trusted unchecked: each file starts with an HMAC-SHA256 of its key and content under
the folder's own secret (`.cache-secret`, readable by its owner only, made on first use), so an entry
that was edited, truncated or planted (the file names are predictable) fails the check; statistics must
also be finite with variances >= 0.  An entry that fails is counted (`rejected`) and computed again."""
from __future__ import annotations

import hashlib
import hmac
import io
import json
import os
import secrets
from pathlib import Path

import numpy as np

SECRET_NAME = ".cache-secret"
_MAC_HEX = 64  # hex digits of an HMAC-SHA256


def unit_key(what: dict) -> str:
    """sha1 of `what` (JSON with sorted keys; paths and other objects by their str)."""
    return hashlib.sha1(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


class FolderSecret:
    """A folder's own secret (`.cache-secret`, owner-only, made on first use) and the HMAC-SHA256 under it
    that vouches for an entry written there: a file edited, truncated or planted by someone without the
    secret fails `holds`.

    Args:
        folder: the cache's folder (made when the secret is).
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self._secret: bytes | None = None

    def mac(self, key: str, data: bytes) -> bytes:
        """The hex HMAC of `data` stored under `key` (making the secret when there is none)."""
        return hmac.new(self._load(), key.encode() + b"\0" + data, hashlib.sha256).hexdigest().encode()

    def holds(self, key: str, data: bytes, mac: bytes) -> bool:
        """Whether `mac` vouches for `data` under `key`; False when the folder has no secret (yet)."""
        if self._secret is None and not (self.folder / SECRET_NAME).is_file():
            return False
        return hmac.compare_digest(mac, self.mac(key, data))

    def _load(self) -> bytes:
        if self._secret is None:
            path = self.folder / SECRET_NAME
            try:
                self._secret = path.read_bytes()
            except FileNotFoundError:
                self.folder.mkdir(parents=True, exist_ok=True)
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                except FileExistsError:  # another process made it first
                    self._secret = path.read_bytes()
                else:
                    self._secret = secrets.token_bytes(32)
                    with os.fdopen(fd, "wb") as f:
                        f.write(self._secret)
        return self._secret


class ShardCache:
    """JSON results (`put` / `get`) and BN statistics ({bn: (mean, var)}, `put_stats` / `get_stats`, an
    .npz beside them, exact float arrays).

    Args:
        folder: where the entries live (made on the first write).
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.rejected = 0  # entries found on disk that failed their check (computed again)
        self.secret = FolderSecret(folder)

    def get(self, key: str):
        """The result stored under `key`, or None (none, or one that fails its check)."""
        data = self._read(f"{key}.json", key)
        try:
            return None if data is None else json.loads(data)
        except ValueError:
            return self._reject()

    def put(self, key: str, result) -> None:
        self._write(f"{key}.json", key, json.dumps(result).encode())

    def get_stats(self, key: str) -> dict | None:
        """The statistics stored under `key`, or None (none, or an entry that fails its check: not
        authentic, not an npz of 1-D float arrays, or values that are not finite or variances < 0)."""
        data = self._read(f"{key}.npz", key)
        if data is None:
            return None
        try:
            with np.load(io.BytesIO(data), allow_pickle=False) as z:
                names = json.loads(str(z["names"]))
                stats = {bn: (z[f"{i}/mean"], z[f"{i}/var"]) for i, bn in enumerate(names)}
        except (OSError, ValueError, KeyError, TypeError):
            return self._reject()
        return stats if all(_usable(mean, var) for mean, var in stats.values()) else self._reject()

    def put_stats(self, key: str, stats: dict) -> None:
        arrays = {"names": np.array(json.dumps(list(stats)))}
        for i, (mean, var) in enumerate(stats.values()):
            arrays[f"{i}/mean"], arrays[f"{i}/var"] = np.asarray(mean), np.asarray(var)
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        self._write(f"{key}.npz", key, buf.getvalue())

    # ------------------------------------------------------------------------------ integrity
    def _read(self, name: str, key: str) -> bytes | None:
        """The content of entry `name` when its MAC holds; None when there is none or it fails."""
        path = self.folder / name
        if not path.is_file():
            return None
        try:
            raw = path.read_bytes()
        except OSError:
            return self._reject()
        mac, data = raw[:_MAC_HEX], raw[_MAC_HEX + 1:]
        if raw[_MAC_HEX:_MAC_HEX + 1] != b"\n" or not self.secret.holds(key, data, mac):
            return self._reject()
        return data

    def _reject(self) -> None:
        self.rejected += 1
        return None

    def _write(self, name: str, key: str, data: bytes) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(self.secret.mac(key, data) + b"\n" + data)
        os.replace(tmp, self.folder / name)


def _usable(mean, var) -> bool:
    """BN statistics a model can take: 1-D float arrays of one length, finite, variances >= 0."""
    mean, var = np.asarray(mean), np.asarray(var)
    return (mean.ndim == 1 and mean.shape == var.shape and mean.dtype.kind == "f" and var.dtype.kind == "f"
            and bool(np.isfinite(mean).all() and np.isfinite(var).all() and (var >= 0).all()))
