"""The learned pair verifier at run time: a MiniLM-L6 cross-encoder as int8 ONNX (issue 13).

``score(query, cached, cosine)`` returns the calibrated probability that serving the cached
entry's answer to ``query`` is right: ``sigmoid(a * logit + b * cosine + c)`` where ``logit`` is
the cross-encoder's head on ``[CLS] query [SEP] cached [SEP]``. ``cut(max_error_rate)`` is the
probability a hit needs so that, on the held-out calibration pairs, at most that share of hits
were wrong. Both come from ``models/pair_verifier.json`` (written by
``models/train_pair_verifier.py calibrate``); the model file is checked against its sha256.

It is CPU work (1-3 ms per pair): callers run it off the event loop (the semantic layer calls it
in the embedder's worker thread), and only for the nearest candidate that passed the similarity
floor and the hand guards.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from pathlib import Path
from typing import Any, Final

import numpy as np

from proxy import data_path
from proxy.semantic.features import question_form

REPO: Final = Path(__file__).resolve().parents[2]
DEFAULT_META: Final = REPO / "models" / "pair_verifier.json"
MAX_LEN: Final = 64


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class PairModel:
    """int8 cross-encoder + linear head + cosine fusion + error-budget cuts (thread-safe)."""

    def __init__(self, meta_path: str | Path = DEFAULT_META, *, threads: int = 1) -> None:
        self.meta_path = Path(meta_path)
        meta = json.loads(self.meta_path.read_text())
        self.meta = meta
        self.model_path = self.meta_path.parent / meta["model"]
        beside = self.meta_path.parent / meta.get("tokenizer", "tokenizer.json")
        # the embedder's tokenizer (same vocabulary): beside the model, else the package's
        self.tokenizer_path = beside if beside.exists() else data_path("tokenizer.json")
        self.w = np.asarray(meta["head"]["w"], np.float32)
        self.b = float(meta["head"]["b"])
        fuse = meta["fusion"]
        self.fa, self.fb, self.fc = float(fuse["a"]), float(fuse["b"]), float(fuse["c"])
        self.floor = float(meta["similarity_floor"])
        # (max_error_rate, cut) ascending by budget
        self.cuts: list[tuple[float, float]] = sorted(
            (float(r["max_error_rate"]), float(r["cut"])) for r in meta["cuts"]
        )
        # calibration curve: (cut, error among calibration hits at that cut), for the budget
        # controller's prior
        self.curve: list[tuple[float, float]] = [
            (float(c), float(e)) for c, e in meta.get("curve", [])
        ] or [(c, b) for b, c in self.cuts]
        self.threads = threads
        self._sess: Any = None
        self._tok: Any = None
        self._lock = threading.Lock()

    def load(self) -> None:
        """Open the session (checks the pinned sha256). Idempotent."""
        if self._sess is not None:
            return
        import onnxruntime as ort
        from tokenizers import Tokenizer

        got = _sha256(self.model_path)
        if got != self.meta["sha256"]:
            raise RuntimeError(f"{self.model_path}: sha256 {got}, expected {self.meta['sha256']}")
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self._sess = ort.InferenceSession(
            str(self.model_path),
            so,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=["SkipLayerNormFusion"],
        )
        tok = Tokenizer.from_file(str(self.tokenizer_path))
        tok.no_padding()
        tok.enable_truncation(MAX_LEN)
        self._tok = tok

    def logit(self, query: str, cached: str) -> float:
        """The cross-encoder's raw score of one pair (CPU work: not on the event loop)."""
        self.load()
        enc = self._tok.encode(query, cached)
        ids = np.asarray([enc.ids], np.int64)
        mask = np.ones_like(ids)
        with self._lock:  # one session, used from the worker thread(s)
            v = self._sess.run(None, {"input_ids": ids, "attention_mask": mask})[0]
        return float(v[0] @ self.w + self.b)

    def fuse(self, logit: float, cosine: float) -> float:
        """Calibrated probability that the hit is right, from the logit and the cosine."""
        z = self.fa * logit + self.fb * cosine + self.fc
        return 1.0 / (1.0 + math.exp(-max(min(z, 50.0), -50.0)))

    def score(self, query: str, cached: str, cosine: float, scope: bytes = b"") -> float:
        """fuse(logit(query, cached), cosine); 1.0 without running the model when the two are
        the same question spelled differently (``features.question_form``: "What's X?" /
        "What is X?", "How does a Y work?" / "How do Ys work?"). The cross-encoder scored
        such pairs 0.87-0.95, under the 1 % cut; on the evaluation split 2 of ~170 of them
        carry a different label, both label noise ("what is my pay" / "what's my pay")."""
        if self.same_form(query, cached, scope):
            return 1.0
        return self.model_score(query, cached, cosine)

    def model_score(self, query: str, cached: str, cosine: float) -> float:
        """fuse(logit(query, cached), cosine): one cross-encoder run."""
        return self.fuse(self.logit(query, cached), cosine)

    def same_form(self, query: str, cached: str, scope: bytes = b"") -> bool:
        """The same question spelled differently (``score`` is 1.0 without the model)."""
        return question_form(query, scope) == question_form(cached, scope)

    def cut(self, max_error_rate: float) -> float:
        """Probability cut for an error budget: the calibrated cut of the largest tabulated
        budget that is <= the requested one (conservative); stricter than every cut below it."""
        best = None
        for budget, c in self.cuts:
            if budget <= max_error_rate + 1e-12:
                best = c
        if best is None:  # tighter than the table: the strictest cut
            return max(c for _, c in self.cuts)
        return best
