"""Build the Cython kernels of native/ as modules inside the proxy package.

Every native/NAME.pyx becomes proxy._NAME. Each has a pure-Python twin in proxy/ that is its
specification; the package works without them (EDGE_PROXY_NO_EXTENSIONS=1 or a failed build).
Set EDGE_PROXY_CYTHON_DEBUG=1 for annotated HTML and line tracing.
"""

from __future__ import annotations

import os
from pathlib import Path

from setuptools import setup

DEBUG = os.environ.get("EDGE_PROXY_CYTHON_DEBUG") == "1"


def extensions() -> list:
    if os.environ.get("EDGE_PROXY_NO_EXTENSIONS") == "1":
        return []
    from Cython.Build import cythonize
    from setuptools import Extension

    exts = [
        Extension(
            f"proxy._{pyx.stem}",
            [str(pyx)],
            extra_compile_args=["-O3"] if not DEBUG else ["-O0", "-g"],
            define_macros=[("CYTHON_TRACE", "1")] if DEBUG else [],
        )
        for pyx in sorted(Path("native").glob("*.pyx"))
    ]
    return cythonize(
        exts,
        language_level=3,
        annotate=DEBUG,
        compiler_directives={
            "boundscheck": DEBUG,
            "wraparound": False,
            "cdivision": True,
            "linetrace": DEBUG,
        },
    )


setup(ext_modules=extensions())
