"""The CI-sized soak of docs/RELIABILITY.md: 2,000 frames of the default noisy, calibrating stream, and
its memory stays flat after the warm-up (the 100,000-frame figures come from the same command)."""
import pytest

from edge_cbn.lab.bench.soak import soak

pytestmark = [pytest.mark.hardening, pytest.mark.slow]


def test_stream_memory_stays_flat_over_2000_frames():
    result = soak(["--noise", "relative", "--eta", "0.05"], frames=2000, every=100, warmup=400)
    assert len(result["rss_mb"]) == 20
    assert result["growth_after_warmup_pct"] < 5.0, result
