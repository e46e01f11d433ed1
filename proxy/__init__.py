"""edge-proxy: an OpenAI-compatible caching and routing sidecar for vLLM."""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path
from typing import Final

__version__: Final = "0.1.0"

#: Set EDGE_PROXY_NO_EXTENSIONS=1 to run the pure-Python twins of the Cython kernels.
NO_EXTENSIONS: Final = os.environ.get("EDGE_PROXY_NO_EXTENSIONS", "") not in ("", "0")


def data_path(name: str) -> Path:
    """A runtime data file shipped in the package, ``proxy/data/NAME`` (router weights, the
    tokenizer), found with importlib.resources wherever the package is installed."""
    return Path(str(resources.files(__name__).joinpath("data", name)))
