"""proxy.gcwatch: collections are timed per generation, into the metric and the stats."""

from __future__ import annotations

import gc

from proxy import gcwatch
from proxy.metrics import Metrics


def test_collections_are_timed_per_generation() -> None:
    metrics = Metrics()
    watch = gcwatch.GcWatch(metrics)
    watch.install()
    try:
        gc.collect(0)
        gc.collect(2)
    finally:
        watch.uninstall()
    st = watch.stats()
    assert st["gen0"]["collections"] >= 1 and st["gen2"]["collections"] >= 1
    assert st["gen2"]["max_ms"] > 0
    text = metrics.render().decode()
    assert 'edge_proxy_gc_pause_seconds_count{generation="2"}' in text
    assert watch not in gc.callbacks


def test_install_applies_thresholds_once() -> None:
    old = gc.get_threshold()
    prev = gcwatch.current
    try:
        gcwatch.current = None
        w = gcwatch.install(None, (50_000, 20, 100))
        assert gc.get_threshold() == (50_000, 20, 100)
        assert gcwatch.install(None) is w and w in gc.callbacks
    finally:
        if gcwatch.current is not None:
            gcwatch.current.uninstall()
        gcwatch.current = prev
        gc.set_threshold(*old)
