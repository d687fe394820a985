"""What a worker process keeps between units: the pool's shared value (sent once per process), and
objects built from it (a loaded model) that the next unit of the same sweep reuses."""
from __future__ import annotations

import hashlib
import pickle
from typing import Callable

_VALUES: dict[str, object] = {}  # shared key -> the pool's shared value, in this process
_BUILT: dict[str, tuple] = {}  # slot -> (key, the object built for that key): the latest one per slot


def key_of(value) -> str:
    """A content key of a shared value: sha1 of its pickle (what the workers receive)."""
    return hashlib.sha1(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)).hexdigest()


def install(key: str, value) -> None:
    _VALUES[key] = value


def installed(key: str) -> bool:
    return key in _VALUES


def value(key: str):
    return _VALUES[key]


def memo(slot: str, key, build: Callable[[], object]):
    """`build()` for `key`, kept in `slot` until a different key asks for the slot (a worker serving
    consecutive shards of one setting builds its noisy model once, not once a shard).  The previous
    object is dropped before the next is built, so a slot never holds two."""
    held = _BUILT.get(slot)
    if held is None or held[0] != key:
        _BUILT.pop(slot, None)
        _BUILT[slot] = (key, build())
    return _BUILT[slot][1]
