"""Cyclic-GC pauses on the event loop: measured (``gc.callbacks``) and exported as a metric.

Every collection runs on whichever thread allocated past the threshold, which is the loop thread
almost always, and stops it: a request that arrives then waits. ``GcWatch`` times each
collection by generation into ``edge_proxy_gc_pause_seconds{generation}`` (histogram) and keeps
the largest pause per generation (``/admin/stats``), so the load suite can report them beside
its latencies.

``server.gc_thresholds`` sets ``gc.set_threshold`` at start (see config.py): the start-up heap
is frozen (``server.freeze_startup_heap``), so what the collector walks is what requests
allocate and what the caches keep.
"""

from __future__ import annotations

import gc
import time
from typing import Any

from proxy.metrics import Metrics


class GcWatch:
    """Times every collection; install() once per process, uninstall() at shutdown."""

    def __init__(self, metrics: Metrics | None) -> None:
        self.metrics = metrics
        self.started: float | None = None
        self.count = [0, 0, 0]
        self.total_s = [0.0, 0.0, 0.0]
        self.max_s = [0.0, 0.0, 0.0]

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self.started = time.perf_counter()
            return
        if self.started is None:
            return
        dt = time.perf_counter() - self.started
        self.started = None
        g = int(info.get("generation", 2))
        self.count[g] += 1
        self.total_s[g] += dt
        if dt > self.max_s[g]:
            self.max_s[g] = dt
        if self.metrics is not None:
            self.metrics.gc_pause.labels(str(g)).observe(dt)

    def install(self) -> None:
        if self not in gc.callbacks:
            gc.callbacks.append(self)

    def uninstall(self) -> None:
        if self in gc.callbacks:
            gc.callbacks.remove(self)

    def stats(self) -> dict[str, Any]:
        return {f"gen{g}": {"collections": self.count[g],
                            "total_ms": round(1000 * self.total_s[g], 3),
                            "max_ms": round(1000 * self.max_s[g], 3)} for g in range(3)}


#: The process's watch (Server.serve installs it); /admin/stats reports it.
current: GcWatch | None = None


def install(metrics: Metrics | None, thresholds: tuple[int, ...] = ()) -> GcWatch:
    """Time collections from now on (one watch per process) and apply ``thresholds``."""
    global current
    if thresholds:
        gc.set_threshold(*thresholds)
    if current is None:
        current = GcWatch(metrics)
        current.install()
    return current
