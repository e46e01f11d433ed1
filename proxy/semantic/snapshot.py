"""The semantic index's snapshot file: format, writer and readers (no pickle: data, never code).

Format v2: ``MAGIC | u32 header length | header JSON | meta | vectors``. The header holds
version, dim, dtype, count, the section lengths and CRC-32s of meta and vectors. Meta: u32
length and JSON of the names (scopes as [hex digest, namespace], tiers), then little-endian
binary columns in entry order (oldest first): key lengths u32, text byte lengths u32, scope
index i32, tier index u8, max_tokens i64 (INT64_MIN = none), created f64, expires f64, then the
keys concatenated and the UTF-8 texts (surrogatepass) concatenated. Vectors: ``count x dim``
little-endian floats. Version 1 (JSON entry records) is still read.
"""

from __future__ import annotations

import os
import struct
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import numpy as np
import orjson

from proxy.semantic.scope import DTYPES, SCOPE_BYTES
from proxy.semantic.slots import NO_MAX_TOKENS

SNAPSHOT_MAGIC: Final = b"EPSEMIX\x00"
SNAPSHOT_VERSION: Final = 2  # 1: JSON entry records (still loaded); 2: binary columns


class SnapshotError(Exception):
    """A snapshot cannot be loaded: missing, corrupt, truncated or incompatible (dim, dtype)."""


@dataclass(slots=True)
class SnapshotData:
    """Entries as columns, oldest first: what ``SemanticIndex.snapshot_data`` copies out, what a
    snapshot file holds and what ``SemanticIndex`` inserts in bulk.

    Independent of the index: ``write_snapshot`` may encode and write it in another thread.
    """

    dim: int
    dtype: str
    scopes: list[tuple[bytes, str]]  # scope number in this snapshot -> (digest, namespace)
    tiers: list[str]
    keys: list[bytes]
    texts: list[str]
    scope_idx: np.ndarray  # int32, into ``scopes``
    tier_idx: np.ndarray  # uint8 or int64, into ``tiers``
    max_tokens: np.ndarray  # int64, NO_MAX_TOKENS for None
    created: np.ndarray  # float64
    expires: np.ndarray  # float64
    vectors: np.ndarray  # (count, dim) of dtype
    # dtype of the index that wrote it ("" = dtype); an i8 index snapshots f16 vectors
    index_dtype: str = ""

    def __len__(self) -> int:
        return len(self.keys)

    def select(self, rows: np.ndarray) -> SnapshotData:
        """The entries at ``rows`` (ascending), same names."""
        if len(rows) == len(self):
            return self
        picked = rows.tolist()
        return SnapshotData(
            self.dim, self.dtype, self.scopes, self.tiers,
            [self.keys[i] for i in picked], [self.texts[i] for i in picked],
            self.scope_idx[rows], self.tier_idx[rows], self.max_tokens[rows],
            self.created[rows], self.expires[rows], self.vectors[rows], self.index_dtype)


def write_snapshot(data: SnapshotData, path: str | Path) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename). Thread-safe with
    respect to the index it came from (it only reads ``data``)."""
    path = Path(path)
    meta = _encode_meta(data)
    vectors = np.ascontiguousarray(data.vectors, dtype=f"<{np.dtype(data.vectors.dtype).char}")
    vec_bytes = memoryview(vectors.reshape(-1).view(np.uint8))  # type: ignore[arg-type]
    header = orjson.dumps(
        {
            "format": "edge-proxy-semantic-index",
            "version": SNAPSHOT_VERSION,
            "dim": data.dim,
            "dtype": data.dtype,
            "index_dtype": data.index_dtype or data.dtype,
            "count": len(data),
            "meta_len": len(meta),
            "vec_len": vec_bytes.nbytes,
            "meta_crc32": zlib.crc32(meta),
            "vec_crc32": zlib.crc32(vec_bytes),
            "written": time.time(),
        }
    )
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{id(data)}")
    try:
        with open(tmp, "wb") as f:
            f.write(SNAPSHOT_MAGIC)
            f.write(struct.pack("<I", len(header)))
            f.write(header)
            f.write(meta)
            f.write(vec_bytes)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def read_snapshot(path: str | Path) -> SnapshotData:
    """Read and check a snapshot file; SnapshotError if unreadable, corrupt or truncated."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise SnapshotError(f"cannot read snapshot {path}: {exc}") from exc
    return parse_snapshot(raw, path)


def parse_snapshot(data: bytes, path: Any = "snapshot") -> SnapshotData:
    """Decode a snapshot file's bytes (``path`` only names it in errors)."""
    header, start = _read_header(data, path)
    version, dim, dtype, count = header["version"], header["dim"], header["dtype"], header["count"]
    mstart = start
    vstart = mstart + header["meta_len"]
    meta_raw = memoryview(data)[mstart:vstart]
    vec_raw = memoryview(data)[vstart:]
    if zlib.crc32(meta_raw) != header["meta_crc32"] or zlib.crc32(vec_raw) != header["vec_crc32"]:
        raise SnapshotError(f"snapshot {path}: checksum mismatch (corrupt file)")
    vecs = np.frombuffer(vec_raw, dtype=np.dtype(DTYPES[dtype]).newbyteorder("<"))
    vecs = vecs.reshape(count, dim)
    try:
        if version == 1:
            snap = _parse_v1(orjson.loads(meta_raw), dim, dtype, count, vecs)
        else:
            snap = _parse_v2(meta_raw, dim, dtype, count, vecs)
    except (orjson.JSONDecodeError, KeyError, IndexError, TypeError, ValueError,
            struct.error) as exc:
        raise SnapshotError(f"snapshot {path}: malformed entry records ({exc})") from exc
    snap.index_dtype = header["index_dtype"]
    return snap


def _read_header(data: bytes, path: Any) -> tuple[dict[str, Any], int]:
    """The checked header and the offset of the meta section."""
    m = len(SNAPSHOT_MAGIC)
    if len(data) < m + 4 or data[:m] != SNAPSHOT_MAGIC:
        raise SnapshotError(f"{path} is not a semantic index snapshot (bad magic)")
    (hlen,) = struct.unpack_from("<I", data, m)
    start = m + 4
    try:
        header = orjson.loads(data[start : start + hlen])
        fields = {k: header[k] for k in ("version", "dim", "dtype", "meta_len", "vec_len",
                                         "count", "meta_crc32", "vec_crc32")}
        fields["index_dtype"] = header.get("index_dtype", fields["dtype"])  # absent before i8
    except (orjson.JSONDecodeError, KeyError, TypeError) as exc:
        raise SnapshotError(f"snapshot {path}: unreadable header ({exc})") from exc
    version, dtype, index_dtype = fields["version"], fields["dtype"], fields["index_dtype"]
    if version not in (1, SNAPSHOT_VERSION):
        raise SnapshotError(f"snapshot {path}: version {version}, expected {SNAPSHOT_VERSION}")
    if dtype not in DTYPES or index_dtype not in DTYPES:
        raise SnapshotError(f"snapshot {path}: unknown dtype {dtype!r} / {index_dtype!r}")
    if not _sizes_match(fields, len(data) - start - hlen):
        raise SnapshotError(f"snapshot {path}: truncated or wrong size")
    return fields, start + hlen


def _sizes_match(h: dict[str, Any], body_len: int) -> bool:
    count, dim, mlen, vlen = h["count"], h["dim"], h["meta_len"], h["vec_len"]
    if not all(isinstance(v, int) for v in (count, dim, mlen, vlen)):
        return False
    item = np.dtype(DTYPES[h["dtype"]]).itemsize
    return (dim > 0 and count >= 0 and mlen >= 0 and body_len == mlen + vlen
            and vlen == count * dim * item)


def _encode_meta(data: SnapshotData) -> bytes:
    count = len(data)
    enc = [t.encode("utf-8", "surrogatepass") for t in data.texts]
    cols = [
        np.fromiter(map(len, data.keys), np.uint32, count).astype("<u4"),
        np.fromiter(map(len, enc), np.uint32, count).astype("<u4"),
        np.asarray(data.scope_idx, "<i4"),
        np.asarray(data.tier_idx, "u1"),
        np.asarray(data.max_tokens, "<i8"),
        np.asarray(data.created, "<f8"),
        np.asarray(data.expires, "<f8"),
    ]
    names = orjson.dumps({"scopes": [[d.hex(), ns] for d, ns in data.scopes],
                          "tiers": data.tiers})
    return b"".join([struct.pack("<I", len(names)), names, *(c.tobytes() for c in cols),
                     b"".join(data.keys), b"".join(enc)])


def _parse_v2(meta: memoryview, dim: int, dtype: str, count: int,
              vecs: np.ndarray) -> SnapshotData:
    (nlen,) = struct.unpack_from("<I", meta, 0)
    names = orjson.loads(meta[4 : 4 + nlen])
    scopes = [(bytes.fromhex(d), str(ns)) for d, ns in names["scopes"]]
    tiers = [str(t) for t in names["tiers"]]
    off = 4 + nlen

    def col(dt: str) -> np.ndarray:
        nonlocal off
        a = np.frombuffer(meta, dtype=dt, count=count, offset=off)
        off += a.nbytes
        return a

    key_len, text_len = col("<u4"), col("<u4")
    scope_idx, tier_idx = col("<i4").astype(np.int32), col("u1").copy()
    max_tokens, created, expires = col("<i8").astype(np.int64), col("<f8"), col("<f8")
    klen_total, tlen_total = int(key_len.sum(dtype=np.int64)), int(text_len.sum(dtype=np.int64))
    if off + klen_total + tlen_total != len(meta):
        raise ValueError("meta section length does not match its columns")
    if count and (scope_idx.min() < 0 or scope_idx.max() >= len(scopes)
                  or int(tier_idx.max()) >= len(tiers)):
        raise ValueError("scope or tier index out of range")
    if any(len(d) != SCOPE_BYTES for d, _ in scopes):
        raise ValueError("bad scope digest")
    blob = meta.tobytes()
    keys = _slices(blob, off, key_len)
    texts = [b.decode("utf-8", "surrogatepass") for b in _slices(blob, off + klen_total, text_len)]
    return SnapshotData(dim, dtype, scopes, tiers, keys, texts, scope_idx, tier_idx, max_tokens,
                        created.astype(np.float64), expires.astype(np.float64), vecs)


def _slices(blob: bytes, base: int, lengths: np.ndarray) -> list[bytes]:
    end = np.cumsum(lengths, dtype=np.int64) + base
    start = end - lengths
    return [blob[a:b] for a, b in zip(start.tolist(), end.tolist(), strict=True)]


def _parse_v1(meta: dict[str, Any], dim: int, dtype: str, count: int,
              vecs: np.ndarray) -> SnapshotData:
    digests = [bytes.fromhex(s) for s in meta["scopes"]]
    records = meta["entries"]
    if len(records) != count:
        raise ValueError("entry count differs from the header")
    scopes: dict[tuple[bytes, str], int] = {}
    tiers: dict[str, int] = {}
    scope_idx = np.fromiter((scopes.setdefault((digests[r[1]], r[2]), len(scopes))
                             for r in records), np.int32, count)
    tier_idx = np.fromiter((tiers.setdefault(r[4], len(tiers)) for r in records), np.uint8,
                           count)
    return SnapshotData(
        dim, dtype, list(scopes), list(tiers),
        [bytes.fromhex(r[0]) for r in records], [str(r[3]) for r in records],
        scope_idx, tier_idx,
        np.fromiter((NO_MAX_TOKENS if r[5] is None else int(r[5]) for r in records),
                    np.int64, count),
        np.fromiter((float(r[6]) for r in records), np.float64, count),
        np.fromiter((float(r[7]) for r in records), np.float64, count),
        vecs,
    )


def _fsync_dir(directory: Path) -> None:
    # the rename is durable only once the directory entry is on disk (POSIX)
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
