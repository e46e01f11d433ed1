"""edge-proxy: an OpenAI-compatible caching and routing sidecar for vLLM."""

from __future__ import annotations

import os
from typing import Final

__version__: Final = "0.1.0"

#: Set EDGE_PROXY_NO_EXTENSIONS=1 to run the pure-Python twins of the Cython kernels.
NO_EXTENSIONS: Final = os.environ.get("EDGE_PROXY_NO_EXTENSIONS", "") not in ("", "0")
