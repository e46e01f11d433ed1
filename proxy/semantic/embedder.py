"""Sentence embeddings for the semantic cache: int8 all-MiniLM-L6-v2 in a worker thread.

The model (minilm-l6-int8.onnx, built by proxy/semantic/build_model.py) outputs the final
mean-pooled, L2-normalised 384-d vector. ``workers`` threads (default: the cores the process may
use, cgroup CPU quota included) share one onnxruntime session (one intra-op thread per run); the
event loop only puts requests in a queue and awaits futures. A worker drains what is queued (up
to ``max_batch``) per wake-up.

No micro-batching by default, not even of equal token lengths: dynamic int8 quantization picks
one activation scale per tensor, i.e. per *batch*, so a text's vector changes with its batch
neighbours even when no padding is needed (max |diff| ~0.017 measured for five 9-token
questions; tests/test_embedder.py checks it). A cache needs a text's vector not to depend on its
neighbours, so ``padded_batches=False`` (default) runs texts one by one; identical texts in
flight share one run (coalesced). ``padded_batches=True`` pads them into one run (~1.5x
throughput under load, vectors within cosine ~0.99 of the unbatched ones).

Deadline: ``estimate_s()`` is what a new text would wait for its vector now (texts ahead of it
per worker times the recent time per embedding, or the age of the oldest queued text if the
workers are not getting the CPU). The semantic layer skips its lookup when that exceeds
``semantic.embed_deadline_s`` rather than queue (counted in
``edge_proxy_semantic_skipped_total{reason="deadline"}``).

Finding the model: proxy.semantic.model (``EDGE_PROXY_MODEL``, a checkout's models/, the cache
directory, built there on first use). The tokenizer: ``EDGE_PROXY_TOKENIZER``, else
``tokenizer.json`` next to the model if there is one, else the package's (proxy/data/).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import os
import queue
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np

from proxy import data_path
from proxy.cpus import available_cores
from proxy.semantic.model import (
    CHECKOUT_MODELS,
    MODEL_FILE,
    MODEL_SHA256,
    ensure_model,
    model_path,
)

#: The model file of a source checkout (see proxy.semantic.model for an installed package).
DEFAULT_MODEL_PATH: Final[Path] = CHECKOUT_MODELS / MODEL_FILE
#: The model keeps Add + LayerNormalization unfused (faster here than onnxruntime's
#: SkipLayerNormalization kernel, see models/build_model.py): stop the session re-fusing them.
DISABLED_OPTIMIZERS: Final = ("SkipLayerNormFusion",)
TOKENIZER_ENV: Final = "EDGE_PROXY_TOKENIZER"
_STOP: Final = object()
#: Niceness of the embedding threads with priority "nice" (see lower_thread_priority).
WORKER_NICE: Final = 5
#: Weight of the newest embedding in the moving average of the time per embedding.
EWMA_ALPHA: Final = 0.2


def default_model_path() -> Path:
    """$EDGE_PROXY_MODEL, a checkout's models/ file, or the cache directory's (see
    proxy.semantic.model)."""
    return model_path()


class ModelChecksumError(RuntimeError):
    """The model file is not the pinned one."""


def text_key(text: str, scope: str = "") -> bytes:
    """The LRU's key of a text: a 16-byte digest, so the LRU's memory does not grow with
    prompt length (whole prompts as keys: +920 MiB for 300 long prompts, issue 11).

    ``scope`` (the tenant's namespace) is part of the key: a vector in the LRU, or one being
    computed, answers only the tenant that asked for it. Shared, an LRU hit (or joining a text
    in flight) would tell another tenant by its response time that someone asked that text."""
    data = text.encode("utf-8", "surrogatepass")
    if not scope:
        return hashlib.blake2b(data, digest_size=16).digest()
    s = scope.encode("utf-8", "surrogatepass")
    h = hashlib.blake2b(len(s).to_bytes(4, "little"), digest_size=16)
    h.update(s)
    h.update(data)
    return h.digest()


@dataclass
class EmbedderStats:
    """Counters for metrics; mutated on the loop (calls, hits) and the worker (batches)."""

    calls: int = 0
    cache_hits: int = 0
    coalesced: int = 0  # awaited a text already in flight
    texts: int = 0  # texts embedded by the model
    batches: int = 0  # worker wake-ups
    skipped: int = 0  # lookups skipped: the estimate was over the deadline
    dropped: int = 0  # queued texts dropped: their waiters timed out
    batch_sizes: Counter[int] = field(default_factory=Counter)


class Embedder:
    """Tokenizer + onnxruntime session in one worker thread, with an LRU of text digest ->
    vector."""

    dim: int = 384

    def __init__(
        self,
        model_path: str | Path | None = None,
        tokenizer_path: str | Path | None = None,
        *,
        threads: int = 1,
        workers: int | None = None,
        max_batch: int = 32,
        cache_size: int = 10_000,
        max_tokens: int = 128,
        expected_sha256: str | None = MODEL_SHA256,
        padded_batches: bool = False,
        priority: str = "nice",
        nice: int = WORKER_NICE,
    ) -> None:
        self.model_path = Path(model_path) if model_path is not None else default_model_path()
        if tokenizer_path is None:
            env = os.environ.get(TOKENIZER_ENV)
            beside = self.model_path.with_name("tokenizer.json")
            tokenizer_path = env or (beside if beside.exists() else data_path("tokenizer.json"))
        self.tokenizer_path = Path(tokenizer_path)
        self.threads = threads  # intra-op threads per session.run
        #: worker threads (parallel session.run calls); None: the cores this process may use
        self.workers = max(1, workers if workers else available_cores())
        self.max_batch = max_batch
        self.cache_size = cache_size
        self.max_tokens = max_tokens
        self.expected_sha256 = expected_sha256
        self.padded_batches = padded_batches
        self.wanted_priority = priority
        self.nice = nice
        self.stats = EmbedderStats()
        #: moving average of the wall time of one embedding in a worker (s); 0 until measured
        self.service_s = 0.0
        # text digest -> loop time it was queued (oldest first)
        self._enqueued: dict[bytes, float] = {}
        self.ready = False
        self._session: Any = None
        self._tokenizer: Any = None
        self._cache: OrderedDict[bytes, np.ndarray] = OrderedDict()
        self._pending: dict[bytes, asyncio.Future[np.ndarray]] = {}
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        #: CPU policy the worker threads got ("idle", "nice+5", "normal"); set when they start.
        self.priority = ""

    # -- synchronous core -------------------------------------------------------------------

    def load(self) -> None:
        """Verify the model's sha256, then create the session and the tokenizer (blocking)."""
        import onnxruntime as ort
        from tokenizers import Tokenizer

        self.model_path = ensure_model(self.model_path)
        if self.expected_sha256 is not None:
            got = _sha256(self.model_path)
            if got != self.expected_sha256:
                raise ModelChecksumError(
                    f"{self.model_path}: sha256 {got}, expected {self.expected_sha256}; "
                    "rebuild it with `edge-proxy models build`"
                )
        so = ort.SessionOptions()
        so.intra_op_num_threads = self.threads
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self._session = ort.InferenceSession(
            str(self.model_path),
            so,
            providers=["CPUExecutionProvider"],
            disabled_optimizers=list(DISABLED_OPTIMIZERS),
        )
        tok = Tokenizer.from_file(str(self.tokenizer_path))
        tok.no_padding()  # the shipped tokenizer.json pads every text to 128 tokens
        tok.enable_truncation(self.max_tokens)
        self._tokenizer = tok
        # the first run of a session allocates its buffers and kernels (tens of ms): pay it here,
        # not in the first request's deadline
        ids = np.asarray([tok.encode("warm up").ids], np.int64)
        self._run(ids, np.ones_like(ids))
        self.ready = True

    def embed_batch(self, texts: list[str]) -> np.ndarray:
        """Embed texts (blocking): (n, 384) float32, each row L2-normalised."""
        if not self.ready:
            self.load()
        out = np.empty((len(texts), self.dim), np.float32)
        if not texts:
            return out
        encs = self._tokenizer.encode_batch(texts)
        if not self.padded_batches:
            for i, e in enumerate(encs):
                ids = np.asarray([e.ids], np.int64)
                out[i] = self._run(ids, np.ones_like(ids))[0]
            return out
        for group in _length_groups([len(e.ids) for e in encs]):
            width = max(len(encs[i].ids) for i in group)
            ids = np.zeros((len(group), width), np.int64)
            mask = np.zeros((len(group), width), np.int64)
            for row, i in enumerate(group):
                n = len(encs[i].ids)
                ids[row, :n] = encs[i].ids
                mask[row, :n] = 1
            out[group] = self._run(ids, mask)
        return out

    def _run(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self._session.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    # -- asyncio front ----------------------------------------------------------------------

    async def start(self) -> None:
        """Load the model off the loop and start the worker threads."""
        self._loop = asyncio.get_running_loop()
        if not self.ready:
            await asyncio.to_thread(self.load)
        self._threads = [threading.Thread(target=self._worker, name=f"embedder-{i}", daemon=True)
                         for i in range(self.workers)]
        for t in self._threads:
            t.start()

    def cached(self, text: str, scope: str = "") -> np.ndarray | None:
        """The text's vector if the LRU has it for ``scope`` (no worker, no wait; counted as a
        call and a cache hit), else None (not counted: ``embed`` follows)."""
        key = text_key(text, scope)
        vec = self._cache.get(key)
        if vec is not None:
            self._cache.move_to_end(key)
            self.stats.calls += 1
            self.stats.cache_hits += 1
        return vec

    def has(self, text: str, scope: str = "") -> bool:
        """Is the text's vector in the LRU for ``scope`` (no wait for it)?"""
        return text_key(text, scope) in self._cache

    def estimate_s(self, text: str | None = None, scope: str = "") -> float:
        """Seconds a text queued now would wait before a worker starts on it (0 for one in the
        LRU or already in flight, and whenever a worker is free).

        The texts ahead of it beyond one per worker, per worker, times the moving average of
        one embedding's wall time; at least the age of the oldest queued text when every worker
        is taken, so workers that do not get the CPU (a busy neighbour, a saturated core) show
        as a growing wait even before any of them finishes. The text's own embedding is not
        counted: with an idle queue a lookup is always tried (and the moving average stays
        current), ``semantic.embed_timeout_s`` bounds the rest.
        """
        if text is not None and (
            (key := text_key(text, scope)) in self._cache or key in self._pending
        ):
            return 0.0
        ahead = len(self._pending)
        if ahead < self.workers:
            return 0.0
        est = ((ahead - self.workers) // self.workers + 1) * self.service_s
        if self._enqueued and self._loop is not None:
            oldest = next(iter(self._enqueued.values()))
            est = max(est, self._loop.time() - oldest)
        return est

    async def embed(self, text: str, timeout: float | None = None, scope: str = ""
                    ) -> np.ndarray:
        """The text's (384,) vector (read-only); cache hits return without the worker.

        ``timeout``: seconds to wait for the worker, then TimeoutError; the embedding still
        completes and lands in the cache. ``scope``: the tenant (``text_key``); the same text
        in another scope is embedded again, never joined or served from the LRU.
        """
        self.stats.calls += 1
        # keyed by a digest, not the text: the LRU's memory does not grow with prompt length
        key = text_key(text, scope)
        vec = self._cache.get(key)
        if vec is not None:
            self._cache.move_to_end(key)
            self.stats.cache_hits += 1
            return vec
        fut = self._pending.get(key)
        if fut is None:
            if not self._threads or self._loop is None:
                raise RuntimeError("Embedder.start() has not been awaited")
            fut = self._loop.create_future()
            self._pending[key] = fut
            self._enqueued[key] = self._loop.time()
            fut.add_done_callback(functools.partial(self._done, key))
            self._queue.put((text, fut))
        else:
            self.stats.coalesced += 1
        # shield: one cancelled caller must not cancel the shared future of the others; wait_for
        # on a future adds only a timer, no task
        try:
            return await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError:
            # Past its timeout nobody wants this vector any more (identical texts waiting on it
            # share about the same deadline): drop it from the queue, so that under overload the
            # workers spend the CPU on texts still awaited and the queue drains instead of
            # growing. A worker skips a cancelled entry; one already running completes.
            if not fut.done():
                fut.cancel()
                self.stats.dropped += 1
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if fut.cancelled() and (task is None or not task.cancelling()):
                raise TimeoutError from None  # another waiter's timeout dropped the text
            raise

    @property
    def queued(self) -> int:
        """Texts waiting for (or in) the worker: the embed queue."""
        return len(self._pending)

    def _done(self, key: bytes, fut: asyncio.Future[np.ndarray]) -> None:
        self._pending.pop(key, None)
        self._enqueued.pop(key, None)
        if not fut.cancelled() and fut.exception() is None:
            self._cache[key] = fut.result()
            if len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)

    async def close(self) -> None:
        """Stop the workers after the queued requests; pending futures still resolve."""
        if self._threads:
            for _ in self._threads:
                self._queue.put(_STOP)
            for t in self._threads:
                await asyncio.to_thread(t.join)
            self._threads = []
        self.ready = False
        self._session = None

    def _worker(self) -> None:
        loop = self._loop
        assert loop is not None
        self.priority = lower_thread_priority(self.wanted_priority, self.nice)
        while True:
            item = self._queue.get()
            stop = item is _STOP
            items = [] if stop else [item]
            # a worker takes at most one stop marker: each of the others needs its own
            while not stop and len(items) < self.max_batch:
                try:
                    nxt = self._queue.get_nowait()
                except queue.Empty:
                    break
                if nxt is _STOP:
                    stop = True
                    break
                items.append(nxt)
            if items:
                self._process(loop, items)
            if stop:
                return

    def _process(self, loop: asyncio.AbstractEventLoop, items: list[tuple[str, Any]]) -> None:
        self.stats.batches += 1
        self.stats.batch_sizes[len(items)] += 1
        if self.padded_batches:
            self._run_items(loop, items)
            return
        # one text per run (see the module docstring), each resolved as soon as it is ready:
        # a waiter does not wait for the rest of the drained batch
        for item in items:
            if item[1].cancelled():  # its waiters timed out: nobody wants it (read-only peek)
                continue
            self._run_items(loop, [item])

    def _run_items(self, loop: asyncio.AbstractEventLoop, items: list[tuple[str, Any]]) -> None:
        self.stats.texts += len(items)
        futs = [f for _, f in items]
        vecs: np.ndarray | None = None
        error: BaseException | None = None
        t0 = time.perf_counter()
        try:
            vecs = self.embed_batch([text for text, _ in items])
            vecs.setflags(write=False)  # rows are shared through the cache
        except Exception as exc:  # every waiter must hear about it
            error = exc
        per_text = (time.perf_counter() - t0) / len(items)
        # a float store is atomic; the loop reads it for estimate_s()
        self.service_s = per_text if self.service_s == 0.0 else (
            (1 - EWMA_ALPHA) * self.service_s + EWMA_ALPHA * per_text)
        # RuntimeError: the loop is closed, nobody is waiting any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(_resolve_all, futs, vecs, error)


def lower_thread_priority(wanted: str = "nice", nice: int = WORKER_NICE) -> str:
    """Put the calling thread behind the event loop for the CPU; returns the policy it got.

    Linux schedules threads individually. "nice" (default, +5): the loop (nice 0) has 3x the
    embedder's weight, so a waking loop gets the core ahead of a running embedding (EEVDF gives
    the heavier thread the earlier deadline), yet the embedder keeps about a quarter of a core
    against a busy neighbour process and misses keep moving. ``SCHED_IDLE`` ("idle") runs the
    thread only when nothing else at all wants the core: a hit never waits, but on a host shared
    with busy processes embeddings starve (measured: semantic hits waiting 0.5 s and more), so
    it is an option for a sidecar alone in its CPU cgroup. Either way the semantic layer sheds
    lookups whose estimated wait is over ``semantic.embed_deadline_s``.
    """
    if wanted == "normal":
        return "normal"
    tid = threading.get_native_id()
    if wanted == "idle":
        try:
            os.sched_setscheduler(tid, os.SCHED_IDLE, os.sched_param(0))
            return "idle"
        except (AttributeError, OSError):
            pass
    try:
        os.setpriority(os.PRIO_PROCESS, tid, nice)
        return f"nice+{nice}"
    except (AttributeError, OSError):
        return "normal"


def _resolve_all(
    futs: list[asyncio.Future[np.ndarray]], vecs: np.ndarray | None, exc: BaseException | None
) -> None:
    # One loop callback per batch, not per future.
    for i, fut in enumerate(futs):
        if fut.done():
            continue
        if exc is not None:
            fut.set_exception(exc)
        else:
            assert vecs is not None
            fut.set_result(vecs[i])


def _length_groups(lengths: list[int]) -> list[list[int]]:
    """Indices grouped by similar token length: padding to 1.5x the shortest + 8 at most."""
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    groups: list[list[int]] = []
    for i in order:
        if groups and lengths[i] <= lengths[groups[-1][0]] * 1.5 + 8:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
