"""The corpus harness itself: it tells a refusal, a load, a stray exception, a crash, a hang and a
memory blow-up apart."""
import os
import time

import numpy as np
import pytest

from edge_cbn.runtime.errors import BadInput

from .harness import run_case

pytestmark = pytest.mark.hardening


def _refuse(path):
    raise BadInput(path, "not a checkpoint")


def _crash():
    os.abort()


def _hog():
    return np.ones(2_000_000_000 // 8)  # 2 GB


def test_harness_tells_outcomes_apart():
    assert run_case(_refuse, "/x/y.pth").ok_refusal("/x/y.pth")
    assert run_case(lambda: None).kind == "loaded"
    r = run_case(lambda: {}["k"])
    assert r.kind == "error" and r.message.startswith("KeyError")
    assert run_case(_crash).kind == "killed"
    r = run_case(time.sleep, 5, time_limit=0.5)
    assert r.kind == "timeout" and r.seconds < 3
    r = run_case(_hog, rss_limit_mb=256)
    assert r.kind == "error" and "MemoryError" in r.message


def test_added_memory_is_the_case_s_own():
    keep = np.ones(300_000_000 // 8)  # a big parent: its pages must not count, nor make the figure negative
    r = run_case(lambda: np.ones(200_000_000 // 8).sum())
    assert r.kind == "loaded" and 150 < r.added_rss_mb < 260, r
    assert -5 < run_case(lambda: None).added_rss_mb < 20
    del keep
