"""The sweep's finished units on disk (`cluster.shard_cache.ShardCache`): only an entry this folder's
secret vouches for, and statistics a model can take, are used; anything else is computed again."""
import json
import stat

import numpy as np
import pytest

from edge_cbn.cluster.shard_cache import SECRET_NAME, ShardCache

pytestmark = pytest.mark.hardening
STATS = {"bn0": (np.array([0.5, -1.0], np.float32), np.array([1.0, 2.0], np.float32))}


def test_entries_round_trip_exactly_and_the_secret_is_the_owners(tmp_path):
    cache = ShardCache(tmp_path)
    cache.put("k1", {"map": 70.88, "n": [1, 2]})
    cache.put_stats("k2", STATS)
    again = ShardCache(tmp_path)  # another run, the same folder
    assert again.get("k1") == {"map": 70.88, "n": [1, 2]}
    got = again.get_stats("k2")
    assert list(got) == ["bn0"] and all(np.array_equal(a, b) for a, b in zip(got["bn0"], STATS["bn0"]))
    assert again.get("missing") is None and again.get_stats("missing") is None and again.rejected == 0
    assert stat.S_IMODE((tmp_path / SECRET_NAME).stat().st_mode) == 0o600


@pytest.mark.parametrize("damage", ["edited", "truncated", "planted", "old-format", "other-key", "secret-gone"])
def test_an_entry_that_fails_its_check_is_not_used(tmp_path, damage):
    cache = ShardCache(tmp_path)
    cache.put("k1", {"map": 70.88})
    path = tmp_path / "k1.json"
    raw = path.read_bytes()
    if damage == "edited":
        path.write_bytes(raw.replace(b"70.88", b"99.99"))
    elif damage == "truncated":
        path.write_bytes(raw[: len(raw) // 2])
    elif damage == "planted":  # the right name and layout, a MAC under another secret
        ShardCache(tmp_path / "elsewhere").put("k1", {"map": 99.99})
        path.write_bytes((tmp_path / "elsewhere" / "k1.json").read_bytes())
    elif damage == "old-format":  # an entry written before entries carried a MAC
        path.write_text(json.dumps({"map": 99.99}))
    elif damage == "other-key":  # a genuine entry of another unit copied under this unit's name
        cache.put("k2", {"map": 99.99})
        path.write_bytes((tmp_path / "k2.json").read_bytes())
    elif damage == "secret-gone":
        (tmp_path / SECRET_NAME).unlink()
    fresh = ShardCache(tmp_path)
    assert fresh.get("k1") is None and fresh.rejected == 1


@pytest.mark.parametrize("values", ["nan-mean", "inf-var", "negative-var", "2-d", "integers"])
def test_statistics_a_model_cannot_take_are_not_used_even_when_authentic(tmp_path, values):
    mean, var = STATS["bn0"]
    bad = {"nan-mean": (np.array([np.nan, 0.0], np.float32), var), "inf-var": (mean, np.array([np.inf, 1], np.float32)),
           "negative-var": (mean, np.array([-1.0, 1.0], np.float32)), "2-d": (mean[None], var[None]),
           "integers": (np.array([1, 2]), np.array([1, 2]))}[values]
    cache = ShardCache(tmp_path)
    cache.put_stats("k", {"bn0": bad})
    assert cache.get_stats("k") is None and cache.rejected == 1


def test_a_fifo_or_directory_under_an_entrys_name_is_no_entry(tmp_path):
    import os

    cache = ShardCache(tmp_path)
    cache.put("k0", 1)
    os.mkfifo(tmp_path / "k1.json")
    (tmp_path / "k2.npz").mkdir()
    assert cache.get("k1") is None and cache.get_stats("k2") is None
