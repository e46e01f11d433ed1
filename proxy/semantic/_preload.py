"""Load the system C++ runtime before usearch, so usearch and onnxruntime can share a process.

The usearch wheel links libstdc++ statically and its compiled module exports that copy's symbols,
among them GNU_UNIQUE ones (locale facet ids, ...), which the dynamic loader binds process-wide
whatever the RTLD_LOCAL of a Python extension. Loaded first, usearch's copy then serves
onnxruntime, which links the system libstdc++ dynamically, and onnxruntime's import segfaults
(usearch 2.26, onnxruntime 1.32, x86_64 glibc). With the system libstdc++ loaded globally
first, the unique symbols bind to it and both libraries run on one runtime: this is the one
place that knows, so no module imports a library it does not use for the sake of load order.
tests/test_semcache.py::test_onnxruntime_and_usearch_load_together checks the order.
"""

from __future__ import annotations

import ctypes
import os
import sys


def preload_libstdcxx() -> bool:
    """Load libstdc++.so.6 with RTLD_GLOBAL (Linux); False where there is none to load."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        ctypes.CDLL("libstdc++.so.6", mode=os.RTLD_GLOBAL)
    except OSError:
        return False
    return True


preload_libstdcxx()
