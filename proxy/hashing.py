"""Canonical encoding and digest of JSON-like request parts (Python twin of native/hashing.pyx).

This module is the specification; ``proxy._hashing`` (Cython) must produce identical bytes.

Canonical encoding (type-tagged and length-prefixed, so no two values share an encoding):

- ``None`` -> ``n``;  ``True`` -> ``t``;  ``False`` -> ``f``
- ``int`` (and a finite float with an integral value, so ``1`` and ``1.0`` are equal as in JSON)
  -> ``i<decimal>;``
- other ``float`` -> ``d<repr(x)>;``  (repr is the shortest round-trip form, same in C and Python)
- ``str`` -> ``s<len of UTF-8 bytes>:<UTF-8 bytes>``
- ``list`` / ``tuple`` -> ``l<count>:`` then each item
- ``dict`` (string keys) -> ``m<count>:`` then for each key in order of its UTF-8 bytes: the key
  as a string, then the value

The digest is BLAKE2b with a 16-byte output: a cache key collision would serve one tenant's
answer to another question, so the hash must be collision resistant, not just fast.

``request_digests(scope_part, last_part)`` encodes both parts in one pass and returns
``(blake2b(enc(scope_part)), blake2b(enc(scope_part) + enc(last_part)))``: the scope digest and
the exact key of a request.
"""

from __future__ import annotations

import math
from hashlib import blake2b
from typing import Any, Final

from proxy import NO_EXTENSIONS

DIGEST_SIZE: Final = 16


def _encode(obj: Any, out: list[bytes]) -> None:
    if obj is None:
        out.append(b"n")
    elif obj is True:
        out.append(b"t")
    elif obj is False:
        out.append(b"f")
    elif isinstance(obj, str):
        raw = obj.encode("utf-8", "surrogatepass")
        out.append(b"s%d:" % len(raw))
        out.append(raw)
    elif isinstance(obj, int):
        out.append(b"i%d;" % obj)
    elif isinstance(obj, float):
        if math.isfinite(obj) and obj == int(obj):
            out.append(b"i%d;" % int(obj))
        else:
            out.append(b"d" + repr(obj).encode("ascii") + b";")
    elif isinstance(obj, list | tuple):
        out.append(b"l%d:" % len(obj))
        for item in obj:
            _encode(item, out)
    elif isinstance(obj, dict):
        items = []
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"canonical: dict keys must be str, got {type(k).__name__}")
            items.append((k.encode("utf-8", "surrogatepass"), v))
        items.sort(key=lambda kv: kv[0])
        out.append(b"m%d:" % len(items))
        for kraw, v in items:
            out.append(b"s%d:" % len(kraw))
            out.append(kraw)
            _encode(v, out)
    else:
        raise TypeError(f"canonical: unsupported type {type(obj).__name__}")


def _py_canonical(obj: Any) -> bytes:
    """The canonical encoding of ``obj`` (see the module docstring)."""
    out: list[bytes] = []
    _encode(obj, out)
    return b"".join(out)


def _py_digest(obj: Any) -> bytes:
    """16-byte BLAKE2b of the canonical encoding of ``obj``."""
    return blake2b(_py_canonical(obj), digest_size=DIGEST_SIZE).digest()


def _py_request_digests(scope_part: Any, last_part: Any) -> tuple[bytes, bytes]:
    """(scope digest, exact key) from one encoding pass; see the module docstring."""
    h = blake2b(_py_canonical(scope_part), digest_size=DIGEST_SIZE)
    scope = h.digest()
    h.update(_py_canonical(last_part))
    return scope, h.digest()


canonical = _py_canonical
digest = _py_digest
request_digests = _py_request_digests
NATIVE = False

try:
    from proxy._hashing import canonical as _c_canonical
    from proxy._hashing import digest as _c_digest
    from proxy._hashing import request_digests as _c_request_digests

    if not NO_EXTENSIONS:
        canonical = _c_canonical
        digest = _c_digest
        request_digests = _c_request_digests
        NATIVE = True
except ImportError:  # extension not built: the twin serves
    pass
