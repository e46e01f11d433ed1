"""Build the Cython kernels of native/ as modules inside the proxy package.

Every native/NAME.pyx becomes proxy._NAME. Each has a pure-Python twin in proxy/ that is its
specification; the package works without them: EDGE_PROXY_NO_EXTENSIONS=1 at build time skips
them, and a build that fails (no compiler, no Cython) is reported and skipped, not fatal.
Set EDGE_PROXY_CYTHON_DEBUG=1 for annotated HTML and line tracing.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_ext import build_ext

DEBUG = os.environ.get("EDGE_PROXY_CYTHON_DEBUG") == "1"


class OptionalBuildExt(build_ext):
    """build_ext whose failures leave the pure-Python twins in charge instead of failing."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler at all: nothing could be built
            _warn(f"native kernels not built ({exc}); the pure-Python twins will be used")

    def build_extension(self, ext) -> None:  # type: ignore[no-untyped-def]
        try:
            super().build_extension(ext)
        except Exception as exc:  # a compiler error in one kernel: skip that one
            _warn(f"{ext.name} not built ({exc}); its pure-Python twin will be used")


def _warn(msg: str) -> None:
    print(f"WARNING: {msg}", file=sys.stderr)


def extensions() -> list:
    if os.environ.get("EDGE_PROXY_NO_EXTENSIONS") == "1":
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        _warn("Cython is not installed; the pure-Python twins will be used")
        return []
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


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
