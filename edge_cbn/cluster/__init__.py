"""Units of work on several local processes or on a Ray cluster (the `[cluster]` extra), for the
workstation side (`edge-cbn evaluate TASK --workers N | --ray ADDRESS`, `tools/convert.py --calibrate …
--workers N | --ray ADDRESS`).  The device side never imports it, nor Ray.

- `shared`: a value sent once per worker process (model bytes, weights), not once per unit;
- `local`: `LocalPool`, N spawned processes, a unit whose worker dies is run again;
- `ray_pool`: `RayPool`, Ray tasks with Ray's own retries of a dead worker;
- `shard_cache`: finished units on disk, keyed by everything that determines them.

A pool runs `fn(shared, unit)` (a module-level function, pickled by reference) for each unit and hands
each result to `on_done(unit, result)` in the driver, which may return follow-up units (a calibration's
evaluation shards).  Nothing a worker receives is a TensorFlow object: bytes, numpy arrays, JSON text."""
from __future__ import annotations

from .local import LocalPool
from .ray_pool import RayPool


def make_pool(workers: int | None = None, ray_address: str | None = None, *, retries: int = 3):
    """`RayPool(ray_address)` when an address is given (`auto`: the cluster this machine belongs to), else
    `LocalPool(workers)`.

    Args:
        workers: local worker processes (None: 1), when there is no `ray_address`.
        ray_address: a Ray cluster's address, or "auto".
        retries: how often a unit whose worker died runs again.

    Returns:
        The pool: `.run(fn, shared_value, units, on_done)` runs `fn(shared_value, unit)` for every unit and
        every follow-up unit `on_done(unit, result)` returns; `.describe()` names it.

    Raises:
        MissingDependency: a Ray address without Ray installed (the [cluster] extra), when the pool starts.
    """
    if ray_address:
        return RayPool(ray_address, retries=retries)
    return LocalPool(workers or 1, retries=retries)
