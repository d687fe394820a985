"""`edge-cbn evaluate TASK --workers N | --ray ADDRESS`: the labelled sweep cut into units that run on
local processes or a Ray cluster (`edge_cbn.cluster`), merged into exactly the records one process gives.

Units (`sweep_worker`): per (model, noise preset, eta, chip seed) and method,
- the method's statistics once (`Statistics`): streaming calibration is sequential by nature, so a
  (chip, eta) stream is one unit that runs its calibration frames in order, as on a board; it is never
  split.  `original` has none;
- then the evaluation set in shards of `shard_size` consecutive images (`Shard`), each with the
  statistics, each sample at its own inference index.  Only evaluation images are sharded.
A calibration's shards are queued when it finishes (the pool's follow-ups), behind the units already
waiting, so the workers stay busy with other settings' shards meanwhile.

Merge (`metrics`): a result's shard states are merged in evaluation order: per-image top-1 / top-5 hits and
confusion matrices concatenated, detections concatenated and evaluated once by pycocotools; the metrics
and their bootstrap resamples are those of one scorer over all samples.  Every finished unit is on disk (`cluster.ShardCache`: statistics
and shard states, keyed by the result's cache key and the shard's range), every merged result in the
sweep's JSON-lines cache as one process writes it, so an interrupted sweep resumes where it stopped."""
from __future__ import annotations

import dataclasses
import hashlib
import sys
from pathlib import Path

import click

from ...cluster.shard_cache import ShardCache, unit_key
from ...convert.model_transfer import model_spec
from ...runtime.bundle import sidecar_path
from . import labelled
from .sweep_worker import Setting, Shard, Statistics, SweepPayload, run_unit

SHARD_SIZE = 100  # evaluation images per shard


@dataclasses.dataclass
class Result:
    """One (setting, method) result being assembled from its units."""
    key: str
    setting: Setting
    method: str
    ranges: list  # (start, stop) of its shards
    states: dict = dataclasses.field(default_factory=dict)  # start -> shard state
    seconds: float = 0.0


class ShardedSweep:
    """`run(settings, seeds, noise_options, cache)` -> the sweep's records, as `labelled.sweep` returns them."""

    def __init__(self, setup, pool, shard_cache: ShardCache, shard_size: int = SHARD_SIZE, task=run_unit):
        self.setup, self.pool, self.shards, self.task = setup, pool, shard_cache, task
        self.ranges = shard_ranges(len(setup.dataset.samples), shard_size)
        self.units_done = 0

    def run(self, settings, seeds, noise_options: dict, cache: labelled.ResultCache) -> list[dict]:
        plan = labelled.sweep_plan(self.setup, settings, seeds, noise_options, cache)
        self.cache, self.results, units = cache, {}, []
        for preset, eta, seed, keys, missing in plan:
            for method in missing:
                result = Result(keys[method], Setting(preset, eta, seed, noise_options[preset]), method, self.ranges)
                units += self.first_units(result)
        # a statistics unit stands for itself and its shards, whose count is known
        total = sum(1 + len(self.ranges) if isinstance(u, Statistics) else 1 for u in units)
        label = f"evaluating on {self.pool.describe()} ({total} units to go)"
        with click.progressbar(length=total, label=label, file=sys.stderr, hidden=total == 0) as self.bar:
            if units:
                self.pool.run(self.task, payload_of(self.setup), units, self.on_done)
        return labelled.planned_records(self.setup, plan, cache)

    def first_units(self, result: Result) -> list:
        """What `result` needs first: its statistics (unless cached), else its shards not cached yet."""
        self.results[result.key] = result
        if result.method == "original":
            return self.shard_units(result, None)
        stats_key = unit_key({"result": result.key, "unit": "statistics"})
        stats = self.shards.get_stats(stats_key)
        if stats is None:
            return [Statistics(result.setting, result.method, stats_key, result.key)]
        return self.shard_units(result, stats, stats_key)

    def shard_units(self, result: Result, stats, stats_key=None) -> list:
        units = []
        for start, stop in result.ranges:
            key = self.shard_key(result, start, stop)
            done = self.shards.get(key)
            if done is not None:
                self.add_state(result, start, done)
                continue
            samples = tuple((str(s.path), s.truth) for s in self.setup.dataset.samples[start:stop])
            units.append(Shard(result.setting, result.method, start, samples, key, result.key, stats, stats_key))
        return units

    def shard_key(self, result: Result, start: int, stop: int) -> str:
        scorer = self.setup.new_scorer()
        return unit_key({"result": result.key, "unit": "shard", "start": start, "stop": stop,
                         "categories": getattr(scorer, "categories", None)})

    def on_done(self, unit, outcome: dict) -> list:
        """A unit finished somewhere: on disk at once; a statistics unit's shards are the follow-ups."""
        self.bar.update(1)
        self.units_done += 1
        if isinstance(unit, Statistics):
            self.shards.put_stats(unit.key, outcome["stats"])
            result = self.results[unit.result]
            result.seconds += outcome["seconds"]
            return self.shard_units(result, outcome["stats"], unit.key)
        self.shards.put(unit.key, {"state": outcome["state"], "seconds": outcome["seconds"]})
        self.add_state(self.results[unit.result], unit.start, outcome)
        return []

    def add_state(self, result: Result, start: int, done: dict) -> None:
        """One shard's state in; when the last is, the merged result goes to the sweep's cache."""
        result.states[start] = done["state"]
        result.seconds += done["seconds"]
        if len(result.states) < len(result.ranges):
            return
        scorer = self.setup.new_scorer()
        for begin in sorted(result.states):  # evaluation order: detections concatenate as one process adds them
            scorer.merge(result.states[begin])
        s = result.setting
        self.cache.put(labelled.result_record(result.key, s.preset, s.eta, s.seed, result.method, scorer,
                                              round(result.seconds, 2)))


def shard_ranges(n: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) of consecutive shards of at most `size` of `n` samples."""
    return [(start, min(start + size, n)) for start in range(0, n, max(1, size))]


def payload_of(setup) -> SweepPayload:
    """What the workers of this sweep receive once: bytes, settings and an empty scorer, no TensorFlow."""
    bundle = setup.bundle
    files = {bundle.path.name: bundle.model_bytes}
    side = sidecar_path(bundle.path)
    if side.is_file():
        files[side.name] = side.read_bytes()
    variant = (bundle.meta.get("calibration") or {}).get("file")
    if variant and (bundle.path.parent / variant).is_file():
        files[variant] = (bundle.path.parent / variant).read_bytes()
    keras = None
    if setup.keras_model is not None:
        keras = model_spec(setup.keras_model)
    key = hashlib.sha1(labelled.model_sha1(bundle).encode())
    key.update(repr((setup.options, setup.center_crop, setup.noise_states, setup.num_threads, setup.calibration,
                     setup.cal_options, setup.offline_calibration, setup.offline_batch, setup.momentum)).encode())
    return SweepPayload(key.hexdigest(), files, bundle.path.name, setup.dataset.task, dict(setup.options),
                        setup.center_crop, setup.noise_states, setup.num_threads or 1, tuple(map(str, setup.calibration)),
                        dict(setup.cal_options), setup.new_scorer(), keras, tuple(map(str, setup.offline_calibration)),
                        setup.offline_batch, setup.momentum)


def sweep(setup, settings, seeds, noise_options: dict, cache: labelled.ResultCache, pool, *,
          shard_size: int = SHARD_SIZE, shard_dir=None) -> list[dict]:
    """The sharded sweep on `pool` (`cluster.make_pool`); shards cached in `shard_dir` [the results
    cache's folder / shards]."""
    shard_dir = Path(shard_dir) if shard_dir else Path(cache.path).parent / "shards"
    return ShardedSweep(setup, pool, ShardCache(shard_dir), shard_size).run(settings, seeds, noise_options, cache)
