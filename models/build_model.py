"""Build models/minilm-l6-int8.onnx: the build lives in proxy/semantic/build_model.py, so that an
installed package can build its model too (``edge-proxy models build``). Same arguments."""

from proxy.semantic.build_model import main

if __name__ == "__main__":
    raise SystemExit(main())
