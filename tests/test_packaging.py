"""An installed edge-proxy runs from anywhere: `pip install .`, and a wheel built from the sdist by
`python -m build`, each in a fresh venv, give an `edge-proxy demo` run outside the checkout.

Each venv gets edge-proxy only from what was built (no editable path, no checkout on sys.path);
its dependencies come from this test's environment through a .pth line (no network, seconds
instead of a minute of installs per venv). The first demo finds no model and builds it into an
empty cache directory (when the build inputs are installed, as in CI); the second finds it
there. Builds run with isolation, as a user's would. About 2-3 minutes on 2 cores; deselect with
`-m "not packaging"`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from proxy.semantic import model
from tests.conftest import ROOT

pytestmark = pytest.mark.packaging

KERNELS = ("_hashing", "_scoring")


def _run(cmd: list[str], cwd: Path, env: dict[str, str] | None = None,
         timeout: float = 600) -> str:
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd}: {out.stdout[-2000:]}\n{out.stderr[-3000:]}"
    return out.stdout + out.stderr


def _venv(path: Path) -> Path:
    """A fresh venv whose dependencies are this environment's (appended after its own
    site-packages, without this environment's .pth files: not its editable edge-proxy)."""
    _run([sys.executable, "-m", "venv", "--without-pip", str(path)], cwd=path.parent)
    python = path / "bin" / "python"
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                cwd=path.parent).strip()
    Path(site, "zz_deps.pth").write_text(sysconfig.get_path("purelib") + "\n")
    return python


def _pip_install(python: Path, target: str, cwd: Path) -> None:
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
          target], cwd=cwd)


def _demo(python: Path, cwd: Path, cache: Path) -> str:
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "EDGE_PROXY_MODEL", "EDGE_PROXY_TOKENIZER")}
    env["EDGE_PROXY_CACHE_DIR"] = str(cache)
    where = _run([str(python), "-c", "import proxy, proxy._scoring, proxy._hashing, "
                  "proxy.scoring as s; print(proxy.__file__, s.NATIVE)"], cwd=cwd, env=env)
    assert str(ROOT) not in where and where.split()[-1] == "True", where
    exe = python.parent / "edge-proxy"
    return _run([str(exe), "demo", "--requests", "60", "--concurrency", "8"], cwd=cwd, env=env)


def _check_demo(out: str) -> None:
    assert "hit-exact" in out and "upstream calls" in out, out[-2000:]
    assert "errors 0" in out, out[-2000:]


def test_installed_package_and_wheel_from_sdist_run_the_demo(tmp_path: Path) -> None:
    work = tmp_path / "elsewhere"  # not the checkout: nothing found by relative paths
    work.mkdir()
    cache = tmp_path / "cache"  # empty: the first demo builds the model into it
    if not model.can_build():  # no build inputs here: the demos find the checkout's model
        cache.mkdir()
        shutil.copy(ROOT / "models" / model.MODEL_FILE, cache)

    # 1. `pip install .` (not editable) into a fresh venv
    py1 = _venv(tmp_path / "venv-pip")
    _pip_install(py1, str(ROOT), cwd=work)
    _check_demo(_demo(py1, work, cache))
    assert (cache / "minilm-l6-int8.onnx").exists()

    # 2. sdist, then a wheel built from the unpacked sdist, as `python -m build` does
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "build", "--sdist", "--outdir", str(dist), str(ROOT)], cwd=work)
    (sdist,) = dist.glob("*.tar.gz")
    with tarfile.open(sdist) as tf:
        names = tf.getnames()
        assert any(n.endswith("native/scoring.pyx") for n in names), names
        assert any(n.endswith("proxy/data/router.json") for n in names), names
        tf.extractall(tmp_path / "unpacked", filter="data")
    (src,) = (tmp_path / "unpacked").iterdir()
    _run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(src)], cwd=work)
    (wheel,) = dist.glob("*.whl")
    with zipfile.ZipFile(wheel) as zf:
        files = zf.namelist()
    for k in KERNELS:
        assert any(f.startswith(f"proxy/{k}.") and f.endswith(".so") for f in files), files
    for data in ("proxy/data/router.json", "proxy/data/tokenizer.json", "proxy/py.typed",
                 "proxy/semantic/data/opposites.txt"):
        assert data in files, data
    py2 = _venv(tmp_path / "venv-wheel")
    _pip_install(py2, str(wheel), cwd=work)
    _check_demo(_demo(py2, work, cache))  # finds the model the first venv built
