import numpy as np
import pytest

from edge_cbn.runtime.moments import EMA, BatchStatsTracker, Moments

MU, TAU, SIGMA, HW = np.array([1.0, -2.0, 0.5]), np.array([0.5, 1.0, 0.0]), np.array([1.0, 0.3, 2.0]), 49


def frames(rng, n):
    """Per-frame (E[x], E[x^2]) of activations x = MU + TAU*z_frame + SIGMA*z_pixel over HW pixels."""
    x = MU + TAU * rng.standard_normal((n, 1, 3)) + SIGMA * rng.standard_normal((n, HW, 3))
    return x.mean(1), (x**2).mean(1)


def accumulate(means, sqmeans, **kw):
    acc = Moments(**kw)
    for m, q in zip(means, sqmeans):
        acc.update(m, q)
    return acc


def test_unbiased_at_batch_size_one_including_between_frame_variance():
    rng = np.random.default_rng(0)
    true_var = TAU**2 + SIGMA**2
    runs = [accumulate(*frames(rng, 8)) for _ in range(4000)]  # few frames: bias would show
    np.testing.assert_allclose(np.mean([r.var for r in runs], 0), true_var, rtol=0.02)
    np.testing.assert_allclose(np.mean([r.mean for r in runs], 0), MU, atol=0.02)
    m, q = frames(rng, 3000)
    acc = accumulate(m, q)
    assert acc.count == 3000
    np.testing.assert_allclose(acc.var, true_var, rtol=0.06)
    naive = (q - m**2).mean(0)  # averaging per-frame variances misses TAU^2
    assert np.all(naive[:2] < true_var[:2] - 0.2)


def test_merge_equals_sequential():
    m, q = frames(np.random.default_rng(1), 50)
    whole = accumulate(m, q)
    a, b = accumulate(m[:20], q[:20]), accumulate(m[20:], q[20:])
    a.merge(b)
    for attr in ("mean", "var", "count"):
        np.testing.assert_allclose(getattr(a, attr), getattr(whole, attr), rtol=1e-12)
    weighted = Moments()
    weighted.update(m[0], q[0], weight=2)
    twice = accumulate([m[0], m[0]], [q[0], q[0]])
    np.testing.assert_allclose(weighted.mean, twice.mean)


def test_warm_up_exact_then_ema_bias_free_for_constant_input():
    acc = Moments(window=10)
    for _ in range(100):
        acc.update([3.0, -1.0], [10.0, 2.0])
        np.testing.assert_array_equal(acc.mean, [3.0, -1.0])
        np.testing.assert_allclose(acc.var, [1.0, 1.0], rtol=1e-12)
    m, q = frames(np.random.default_rng(2), 10)
    np.testing.assert_allclose(accumulate(m, q, window=10).mean, m.mean(0), rtol=1e-12)


def test_ema_tracks_step_change():
    acc = Moments(window=20)
    for _ in range(200):
        acc.update([0.0], [1.0])
    for _ in range(200):
        acc.update([5.0], [26.0])
    assert acc.mean[0] == pytest.approx(5.0, abs=1e-3)
    assert acc.var[0] == pytest.approx(1.0, abs=1e-2)
    assert accumulate([[0.0]] * 200 + [[5.0]] * 200, [[1.0]] * 200 + [[26.0]] * 200).mean[0] \
        == pytest.approx(2.5)


def test_state_dict_round_trip():
    m, q = frames(np.random.default_rng(3), 30)
    acc, restored = accumulate(m[:15], q[:15], window=8), Moments(window=8)
    restored.load_state_dict({k: v.copy() for k, v in acc.state_dict().items()})
    for a in (acc, restored):
        for mm, qq in zip(m[15:], q[15:]):
            a.update(mm, qq)
    np.testing.assert_array_equal(acc.var, restored.var)
    ema = EMA(0.9)
    ema.update([1.0], [2.0])
    copy = EMA(0.9)
    copy.load_state_dict(ema.state_dict())
    assert copy.mean[0] == ema.mean[0] and copy.count == 1


def test_algorithm1_ema_and_cumulative():
    init = EMA(0.9, init=([0.0], [1.0]))
    init.update([1.0], [3.0])
    np.testing.assert_allclose([init.mean[0], init.var[0]], [0.1, 1.2])  # B <- m*B + (1-m)*x
    fresh = EMA(0.999)
    for _ in range(5):
        fresh.update([2.0], [4.0])
    np.testing.assert_allclose([fresh.mean[0], fresh.var[0]], [2.0, 4.0])  # bias-corrected
    cum = EMA(None)
    for x in (1.0, 2.0, 6.0):
        cum.update([x], [x])
    np.testing.assert_allclose(cum.mean, [3.0])
    with pytest.raises(ValueError):
        EMA(None, init=([0.0], [1.0]))
    tracker = BatchStatsTracker([0.0], [1.0], estimator="ema", momentum=0.9)
    tracker.update([1.0], [3.0])
    np.testing.assert_allclose(tracker.var, [1.2])
    assert BatchStatsTracker([9.0], [9.0], estimator="cumulative").momentum is None
