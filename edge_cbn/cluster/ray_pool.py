"""`RayPool`: units of work as Ray tasks on a cluster (`ray start --head`, then `ray start --address …` on
every other node; `auto` finds the cluster this machine belongs to).

One CPU a task, so a node runs as many units at once as it has CPUs.  The shared value is put in Ray's
object store once and fetched by each worker process the first time it needs it (`shared`), not with
every unit.  A worker that dies mid-unit (killed, out of memory, its node lost) is Ray's to retry:
`max_retries` re-runs the task elsewhere; an exception a unit raises is not retried and ends the run."""
from __future__ import annotations

from typing import Callable, Iterable

from . import shared


def _call(fn: Callable, key: str, boxed_ref: list, unit):
    """The task body: the shared value from the object store once per worker process (the ref is boxed in
    a list so that Ray does not fetch it for every task), then the unit."""
    if not shared.installed(key):
        import ray  # lazy: Ray is optional (the [cluster] extra)

        shared.install(key, ray.get(boxed_ref[0]))
    return fn(shared.value(key), unit)


class RayPool:
    def __init__(self, address: str, *, retries: int = 3):
        # lazy: Ray is optional (the [cluster] extra)
        import ray  # without it: ModuleNotFoundError('ray'), one line naming the extra at the CLI
        self.ray, self.address, self.retries = ray, address, retries
        if not ray.is_initialized():  # a driver that is connected already (a test) stays so
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        self.restarts = 0  # Ray counts its own retries; none are visible here

    def describe(self) -> str:
        nodes = [n for n in self.ray.nodes() if n.get("Alive")]
        cpus = int(sum(n.get("Resources", {}).get("CPU", 0) for n in nodes))
        return f"Ray cluster at {self.address}: {len(nodes)} node{'s' if len(nodes) != 1 else ''}, {cpus} CPUs"

    def run(self, fn: Callable, value, units: Iterable, on_done: Callable[[object, object], Iterable]) -> None:
        """`fn(value, unit)` for every unit and every follow-up unit that `on_done(unit, result)` returns."""
        ray = self.ray
        key, ref = shared.key_of(value), ray.put(value)
        task = ray.remote(num_cpus=1, max_retries=self.retries, retry_exceptions=False)(_call)
        running = {task.remote(fn, key, [ref], unit): unit for unit in units}
        while running:
            (done,), _ = ray.wait(list(running), num_returns=1)
            unit = running.pop(done)
            try:
                result = ray.get(done)
            except ray.exceptions.RayTaskError as e:  # the unit's own exception, as one process raises it
                raise e.cause from None
            for follow_up in on_done(unit, result) or ():
                running[task.remote(fn, key, [ref], follow_up)] = follow_up
