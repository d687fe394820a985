"""`LocalPool`: units of work in N spawned worker processes on this machine.

Spawned, not forked: the driver may hold TensorFlow, LiteRT threads or a progress bar's terminal, none
of which survives a fork.  The shared value goes to each process once (the pool's initializer).  At most
N units are in flight, so a unit in flight is a unit running; when a worker dies (killed, out of memory)
the pool is broken, so the units in flight (and one whose submission met the broken pool) are run again
on a fresh pool, each at most `retries` more times.  An exception raised by a unit is not a death: it
ends the run, as it would in one process.  Workers end with their driver: each watches its parent and
exits when the driver is gone (killed included), instead of holding a model's memory as an orphan."""
from __future__ import annotations

import multiprocessing
import os
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from typing import Callable, Iterable

from . import shared


class WorkerDied(RuntimeError):
    """A unit's worker died more often than the retries allow."""


PARENT_POLL_S = 1.0  # how often a worker checks that its driver is alive


def _install(key: str, value) -> None:
    shared.install(key, value)
    parent = os.getppid()
    threading.Thread(target=_exit_with, args=(parent,), daemon=True, name="exit-with-driver").start()


def _exit_with(parent: int) -> None:
    """End this worker once `parent` (the driver) is gone: an orphan is re-parented, so its parent id
    changes."""
    while os.getppid() == parent:
        time.sleep(PARENT_POLL_S)
    os._exit(1)


def _call(fn: Callable, key: str, unit):
    return fn(shared.value(key), unit)


class LocalPool:
    def __init__(self, workers: int, *, retries: int = 3):
        self.workers, self.retries = max(1, int(workers)), retries
        self.restarts = 0  # pools rebuilt after a worker died (reported by the sweep)

    def describe(self) -> str:
        return f"{self.workers} local worker process{'es' if self.workers > 1 else ''}"

    def run(self, fn: Callable, value, units: Iterable, on_done: Callable[[object, object], Iterable]) -> None:
        """`fn(value, unit)` for every unit and every follow-up unit that `on_done(unit, result)` returns."""
        key = shared.key_of(value)
        todo, attempts = deque(units), {}
        while todo:
            with self._executor(key, value) as ex:
                died = self._drain(ex, fn, key, todo, on_done)
            if died:
                self.restarts += 1
                for unit in died:
                    attempts[id(unit)] = attempts.get(id(unit), 0) + 1
                    if attempts[id(unit)] > self.retries:
                        raise WorkerDied(f"a worker died {attempts[id(unit)]} times running {unit}")
                todo.extendleft(reversed(died))

    def _executor(self, key, value) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_install, initargs=(key, value))

    def _drain(self, ex, fn, key, todo: deque, on_done) -> list:
        """Run units from `todo` (N at a time) until it is empty or a worker dies; the units then in
        flight (to be run again), else []."""
        running, died = {}, []
        while (todo or running) and not died:
            while todo and len(running) < self.workers:
                unit = todo.popleft()
                try:
                    running[ex.submit(_call, fn, key, unit)] = unit
                except BrokenProcessPool:  # a worker died since the last wait: this unit runs again too
                    died.append(unit)
                    break
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                unit = running.pop(future)
                try:
                    result = future.result()
                except BrokenProcessPool:  # its worker, or another, died: every unit in flight fails so
                    died.append(unit)
                    continue
                todo.extend(on_done(unit, result) or ())
        return died + list(running.values())
