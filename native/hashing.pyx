# cython: language_level=3
"""Canonical encoding + BLAKE2b digest of JSON-like request parts, in one pass.

Native twin of proxy/hashing.py, which is the specification (same bytes, same digests).
The encoder walks dicts/lists/str/int/float/bool/None with C-level type checks and writes into
one growing C buffer: that walk, not the hash, is what costs in Python.
"""

from cpython.bytes cimport PyBytes_FromStringAndSize
from cpython.mem cimport PyMem_Free, PyMem_Malloc, PyMem_Realloc
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.math cimport isfinite, floor
from libc.string cimport memcpy

from hashlib import blake2b

cdef Py_ssize_t DIGEST_SIZE = 16


cdef struct Buf:
    char* data
    Py_ssize_t size
    Py_ssize_t cap


cdef int buf_reserve(Buf* b, Py_ssize_t extra) except -1:
    cdef Py_ssize_t need = b.size + extra
    cdef Py_ssize_t cap
    cdef char* p
    if need <= b.cap:
        return 0
    cap = b.cap * 2 if b.cap else 256
    while cap < need:
        cap *= 2
    p = <char*>PyMem_Realloc(b.data, cap)
    if p == NULL:
        raise MemoryError()
    b.data = p
    b.cap = cap
    return 0


cdef inline int buf_put(Buf* b, const char* s, Py_ssize_t n) except -1:
    buf_reserve(b, n)
    memcpy(b.data + b.size, s, n)
    b.size += n
    return 0


cdef inline int buf_tag_num(Buf* b, char tag, long long n, char end) except -1:
    # tag, decimal, end char: "i42;", "s5:", "l3:", "m2:" (hand-rolled: snprintf is the slow part)
    cdef char tmp[24]
    cdef int i = 24
    cdef unsigned long long u
    cdef bint neg = n < 0
    buf_reserve(b, 24)
    b.data[b.size] = tag
    b.size += 1
    u = <unsigned long long>(-n) if neg else <unsigned long long>n
    while True:
        i -= 1
        tmp[i] = <char>(48 + u % 10)
        u //= 10
        if u == 0:
            break
    if neg:
        i -= 1
        tmp[i] = 45  # '-'
    memcpy(b.data + b.size, tmp + i, 24 - i)
    b.size += 24 - i
    b.data[b.size] = end
    b.size += 1
    return 0


cdef int put_str(Buf* b, str s) except -1:
    cdef Py_ssize_t n
    cdef const char* p
    cdef bytes raw
    try:
        p = PyUnicode_AsUTF8AndSize(s, &n)
    except UnicodeEncodeError:
        # lone surrogates: match the twin's "surrogatepass"
        raw = s.encode("utf-8", "surrogatepass")
        buf_tag_num(b, b"s", len(raw), b":")
        buf_put(b, raw, len(raw))
        return 0
    buf_tag_num(b, b"s", n, b":")
    buf_put(b, p, n)
    return 0


cdef int encode(Buf* b, object obj) except -1:
    cdef double d
    cdef bytes r
    if obj is None:
        buf_put(b, b"n", 1)
    elif obj is True:
        buf_put(b, b"t", 1)
    elif obj is False:
        buf_put(b, b"f", 1)
    elif type(obj) is str:
        put_str(b, <str>obj)
    elif type(obj) is dict:
        # Sorting str keys orders them by code point, which is the order of their UTF-8 bytes
        # (the spec's order), without encoding each key first.
        keys = list(<dict>obj)
        for k in keys:
            if type(k) is not str and not isinstance(k, str):
                raise TypeError(f"canonical: dict keys must be str, got {type(k).__name__}")
        keys.sort()
        buf_tag_num(b, b"m", len(keys), b":")
        for k in keys:
            put_str(b, <str>k)
            encode(b, (<dict>obj)[k])
    elif type(obj) is list or type(obj) is tuple:
        buf_tag_num(b, b"l", len(obj), b":")
        for item in obj:
            encode(b, item)
    elif type(obj) is int:
        put_int(b, obj)
    elif type(obj) is float:
        d = obj
        if isfinite(d) and floor(d) == d:
            put_int(b, int(d))
        else:
            r = repr(obj).encode("ascii")
            buf_put(b, b"d", 1)
            buf_put(b, r, len(r))
            buf_put(b, b";", 1)
    elif isinstance(obj, str):  # str subclass
        put_str(b, str(obj))
    elif isinstance(obj, int):  # int subclass (bool handled above)
        put_int(b, int(obj))
    elif isinstance(obj, float):
        encode(b, float(obj))
    elif isinstance(obj, (list, tuple)):
        encode(b, list(obj))
    elif isinstance(obj, dict):
        encode(b, dict(obj))
    else:
        raise TypeError(f"canonical: unsupported type {type(obj).__name__}")
    return 0


cdef int put_int(Buf* b, object n) except -1:
    cdef bytes r
    try:
        buf_tag_num(b, b"i", <long long>n, b";")
    except OverflowError:  # beyond 64 bits: decimal text, as the twin's %d
        r = str(n).encode("ascii")
        buf_put(b, b"i", 1)
        buf_put(b, r, len(r))
        buf_put(b, b";", 1)
    return 0


def canonical(obj) -> bytes:
    """The canonical encoding of ``obj`` (spec: proxy/hashing.py)."""
    cdef Buf b
    b.data = NULL
    b.size = 0
    b.cap = 0
    try:
        encode(&b, obj)
        return PyBytes_FromStringAndSize(b.data, b.size)
    finally:
        PyMem_Free(b.data)


def digest(obj) -> bytes:
    """16-byte BLAKE2b of the canonical encoding of ``obj``."""
    return blake2b(canonical(obj), digest_size=DIGEST_SIZE).digest()


def request_digests(scope_part, last_part):
    """(scope digest, exact key): BLAKE2b of enc(scope_part), and of enc(scope_part)+enc(last)."""
    cdef Buf b
    cdef Py_ssize_t split
    b.data = NULL
    b.size = 0
    b.cap = 0
    try:
        encode(&b, scope_part)
        split = b.size
        encode(&b, last_part)
        h = blake2b(PyBytes_FromStringAndSize(b.data, split), digest_size=DIGEST_SIZE)
        scope = h.digest()
        h.update(PyBytes_FromStringAndSize(b.data + split, b.size - split))
        return scope, h.digest()
    finally:
        PyMem_Free(b.data)
