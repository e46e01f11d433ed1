# cython: language_level=3
"""Native scoring kernels: query . matrix rows (float16 or float32) with top-k selection.

The specification is proxy/scoring.py (the ``_py_*`` twins); read its module docstring for the
contract (argument layout, tie rule: higher score first, then lower row index). This module knows
nothing of the application: buffers in, Python lists out.

Dot products accumulate in float32. On x86-64 with AVX2+FMA+F16C (checked once at import with
``__builtin_cpu_supports``) an 8-lane SIMD loop is used; elsewhere a portable scalar loop. The
setup.py flags are plain -O3 (no -march), so the SIMD functions carry a ``target`` attribute
instead, and the binary stays runnable on any x86-64.
"""

from cpython.buffer cimport (
    PyBUF_C_CONTIGUOUS,
    PyBUF_FORMAT,
    PyBUF_SIMPLE,
    PyBuffer_Release,
    PyObject_GetBuffer,
)
from libc.stdint cimport uint16_t
from libc.stdlib cimport free, malloc

cdef extern from *:
    """
    #include <stdint.h>
    #include <string.h>
    #include <stdlib.h>

    #define EP_F32 0
    #define EP_F16 1

    /* IEEE 754 binary16 -> binary32, exact for every input (normals, subnormals, inf, nan). */
    static inline float ep_half_to_float(uint16_t h) {
        uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
        uint32_t exp = (h >> 10) & 0x1fu;
        uint32_t man = h & 0x3ffu;
        uint32_t bits;
        if (exp == 0) {
            if (man == 0) {
                bits = sign;
            } else {               /* subnormal: renormalise */
                exp = 127 - 15 + 1;
                while ((man & 0x400u) == 0) { man <<= 1; exp--; }
                man &= 0x3ffu;
                bits = sign | (exp << 23) | (man << 13);
            }
        } else if (exp == 0x1f) {
            bits = sign | 0x7f800000u | (man << 13);
        } else {
            bits = sign | ((exp + 127 - 15) << 23) | (man << 13);
        }
        float f;
        memcpy(&f, &bits, sizeof f);
        return f;
    }

    static float ep_dot_f32_scalar(const float *q, const void *row, Py_ssize_t d) {
        const float *r = (const float *)row;
        float s = 0.0f;
        for (Py_ssize_t i = 0; i < d; i++) s += q[i] * r[i];
        return s;
    }

    static float ep_dot_f16_scalar(const float *q, const void *row, Py_ssize_t d) {
        const uint16_t *r = (const uint16_t *)row;
        float s = 0.0f;
        for (Py_ssize_t i = 0; i < d; i++) s += q[i] * ep_half_to_float(r[i]);
        return s;
    }

    typedef float (*ep_dot_fn)(const float *, const void *, Py_ssize_t);

    #if (defined(__x86_64__) || defined(__i386__)) && (defined(__GNUC__) || defined(__clang__))
    #include <immintrin.h>
    #define EP_HAVE_X86 1

    __attribute__((target("avx2,fma")))
    static inline float ep_hsum256(__m256 v) {
        __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
        lo = _mm_add_ps(lo, hi);
        lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
        lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
        return _mm_cvtss_f32(lo);
    }

    __attribute__((target("avx2,fma")))
    static float ep_dot_f32_avx2(const float *q, const void *row, Py_ssize_t d) {
        const float *r = (const float *)row;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        Py_ssize_t i = 0;
        for (; i + 16 <= d; i += 16) {
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(r + i), a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), _mm256_loadu_ps(r + i + 8), a1);
        }
        for (; i + 8 <= d; i += 8)
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(r + i), a0);
        float s = ep_hsum256(_mm256_add_ps(a0, a1));
        for (; i < d; i++) s += q[i] * r[i];
        return s;
    }

    __attribute__((target("avx2,fma,f16c")))
    static float ep_dot_f16_avx2(const float *q, const void *row, Py_ssize_t d) {
        const uint16_t *r = (const uint16_t *)row;
        __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
        Py_ssize_t i = 0;
        for (; i + 16 <= d; i += 16) {
            __m256 r0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i)));
            __m256 r1 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i + 8)));
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), r0, a0);
            a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), r1, a1);
        }
        for (; i + 8 <= d; i += 8) {
            __m256 r0 = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(r + i)));
            a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), r0, a0);
        }
        float s = ep_hsum256(_mm256_add_ps(a0, a1));
        for (; i < d; i++) s += q[i] * ep_half_to_float(r[i]);
        return s;
    }

    static int ep_cpu_simd(void) {
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")
            && __builtin_cpu_supports("f16c");
    }
    #else
    #define EP_HAVE_X86 0
    static float ep_dot_f32_avx2(const float *q, const void *row, Py_ssize_t d) {
        return ep_dot_f32_scalar(q, row, d);
    }
    static float ep_dot_f16_avx2(const float *q, const void *row, Py_ssize_t d) {
        return ep_dot_f16_scalar(q, row, d);
    }
    static int ep_cpu_simd(void) { return 0; }
    #endif

    static ep_dot_fn ep_dot_table[2] = {ep_dot_f32_scalar, ep_dot_f16_scalar};

    static void ep_init_dispatch(int use_simd) {
        if (use_simd && ep_cpu_simd()) {
            ep_dot_table[EP_F32] = ep_dot_f32_avx2;
            ep_dot_table[EP_F16] = ep_dot_f16_avx2;
        } else {
            ep_dot_table[EP_F32] = ep_dot_f32_scalar;
            ep_dot_table[EP_F16] = ep_dot_f16_scalar;
        }
    }

    /* (score desc, index asc): the documented tie rule. */
    typedef struct { float s; Py_ssize_t i; } ep_pair;
    static int ep_pair_cmp(const void *a, const void *b) {
        const ep_pair *x = (const ep_pair *)a, *y = (const ep_pair *)b;
        if (x->s > y->s) return -1;
        if (x->s < y->s) return 1;
        return (x->i > y->i) - (x->i < y->i);
    }

    /* Small k: keep a sorted window. Rows arrive in increasing index, so an equal score never
       displaces an earlier row: insert after every element with score >= s. */
    static Py_ssize_t ep_topk_insert(const float *q, const char *base, Py_ssize_t stride,
                                     int kind, Py_ssize_t n, Py_ssize_t d,
                                     const unsigned char *mask, Py_ssize_t k,
                                     Py_ssize_t *oi, float *os) {
        ep_dot_fn dot = ep_dot_table[kind];
        Py_ssize_t c = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (mask && !mask[i]) continue;
            float s = dot(q, base + i * stride, d);
            if (c == k && !(s > os[k - 1])) continue;
            Py_ssize_t p = c < k ? c++ : k - 1;
            while (p > 0 && os[p - 1] < s) { os[p] = os[p - 1]; oi[p] = oi[p - 1]; p--; }
            os[p] = s; oi[p] = i;
        }
        return c;
    }

    /* Large k: score every candidate, sort once. Returns -1 on allocation failure. */
    static Py_ssize_t ep_topk_sort(const float *q, const char *base, Py_ssize_t stride,
                                   int kind, Py_ssize_t n, Py_ssize_t d,
                                   const unsigned char *mask, Py_ssize_t k,
                                   Py_ssize_t *oi, float *os) {
        ep_dot_fn dot = ep_dot_table[kind];
        ep_pair *all = (ep_pair *)malloc((size_t)(n > 0 ? n : 1) * sizeof(ep_pair));
        if (!all) return -1;
        Py_ssize_t c = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            if (mask && !mask[i]) continue;
            all[c].s = dot(q, base + i * stride, d); all[c].i = i; c++;
        }
        qsort(all, (size_t)c, sizeof(ep_pair), ep_pair_cmp);
        if (c > k) c = k;
        for (Py_ssize_t j = 0; j < c; j++) { oi[j] = all[j].i; os[j] = all[j].s; }
        free(all);
        return c;
    }
    """
    int EP_F32
    int EP_F16
    int EP_HAVE_X86
    ctypedef float (*ep_dot_fn)(const float *, const void *, Py_ssize_t)
    ep_dot_fn ep_dot_table[2]
    float ep_half_to_float(uint16_t h)
    int ep_cpu_simd()
    void ep_init_dispatch(int use_simd)
    Py_ssize_t ep_topk_insert(const float *q, const char *base, Py_ssize_t stride, int kind,
                              Py_ssize_t n, Py_ssize_t d, const unsigned char *mask,
                              Py_ssize_t k, Py_ssize_t *oi, float *os)
    Py_ssize_t ep_topk_sort(const float *q, const char *base, Py_ssize_t stride, int kind,
                            Py_ssize_t n, Py_ssize_t d, const unsigned char *mask,
                            Py_ssize_t k, Py_ssize_t *oi, float *os)

ep_init_dispatch(1)

#: True when the AVX2/FMA/F16C loops are in use (the CPU has them and they were compiled in).
SIMD = bool(ep_cpu_simd())

# Above this k a full sort beats insertion into the sorted window.
DEF _INSERT_MAX_K = 64


def set_simd(bint enabled):
    """Use the SIMD loops (if the CPU has them) or force the scalar ones; for tests."""
    global SIMD
    ep_init_dispatch(enabled)
    SIMD = bool(enabled and ep_cpu_simd())


cdef inline const char *_fmt(const char *f) noexcept:
    # Native-order prefixes are the only ones numpy emits for C-contiguous little-endian data.
    while f[0] == b'@' or f[0] == b'=' or f[0] == b'<':
        f += 1
    return f


cdef int _get_query(object query, Py_buffer *qb) except -1:
    PyObject_GetBuffer(query, qb, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
    cdef const char *f = _fmt(qb.format)
    if qb.ndim != 1 or f[0] != b'f' or f[1] != 0:
        PyBuffer_Release(qb)
        raise TypeError("query must be a 1-D float32 buffer")
    return 0


cdef int _get_matrix(object matrix, Py_buffer *mb, Py_ssize_t d, int *kind) except -1:
    PyObject_GetBuffer(matrix, mb, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT)
    cdef const char *f = _fmt(mb.format)
    if f[0] == b'e' and f[1] == 0:
        kind[0] = EP_F16
    elif f[0] == b'f' and f[1] == 0:
        kind[0] = EP_F32
    else:
        PyBuffer_Release(mb)
        raise TypeError(f"matrix must be float16 or float32, got format {mb.format.decode()!r}")
    if mb.ndim != 2:
        PyBuffer_Release(mb)
        raise ValueError("matrix must be a C-contiguous 2-D buffer")
    if mb.shape[0] and mb.shape[1] != d:
        cols = mb.shape[1]
        PyBuffer_Release(mb)
        raise ValueError(f"matrix has {cols} columns, query has {d}")
    return 0


def topk_dot(query, matrix, Py_ssize_t k, mask=None):
    """Top-k rows of ``matrix`` by dot product with ``query``: ``(indices, scores)`` lists.

    See proxy/scoring.py for the contract; ties go to the lower row index.
    """
    cdef Py_buffer qb, mb, kb
    cdef int kind = 0
    cdef bint have_mask = mask is not None
    cdef Py_ssize_t n, d, c, j
    cdef Py_ssize_t small_i[_INSERT_MAX_K]
    cdef float small_s[_INSERT_MAX_K]
    cdef Py_ssize_t *oi = small_i
    cdef float *os = small_s
    cdef const unsigned char *mp = NULL
    _get_query(query, &qb)
    d = qb.shape[0]
    try:
        _get_matrix(matrix, &mb, d, &kind)
        try:
            n = mb.shape[0]
            if have_mask:
                PyObject_GetBuffer(mask, &kb, PyBUF_SIMPLE)
                mp = <const unsigned char *>kb.buf
            try:
                if have_mask and kb.len != n:
                    raise ValueError("mask length must equal the number of rows")
                if k > n:
                    k = n
                if k <= 0:
                    return [], []
                if k <= _INSERT_MAX_K:
                    c = ep_topk_insert(<const float *>qb.buf, <const char *>mb.buf,
                                       mb.strides[0], kind, n, d, mp, k, oi, os)
                else:
                    oi = <Py_ssize_t *>malloc(k * sizeof(Py_ssize_t))
                    os = <float *>malloc(k * sizeof(float))
                    if oi == NULL or os == NULL:
                        raise MemoryError()
                    c = ep_topk_sort(<const float *>qb.buf, <const char *>mb.buf,
                                     mb.strides[0], kind, n, d, mp, k, oi, os)
                    if c < 0:
                        raise MemoryError()
                return [oi[j] for j in range(c)], [<double>os[j] for j in range(c)]
            finally:
                if oi != small_i:
                    free(oi)
                    free(os)
                if have_mask:
                    PyBuffer_Release(&kb)
        finally:
            PyBuffer_Release(&mb)
    finally:
        PyBuffer_Release(&qb)


def rescore_dot(query, matrix, rows):
    """Exact dot products of ``query`` with ``matrix[r]`` for each ``r`` in ``rows``, in order."""
    cdef Py_buffer qb, mb
    cdef int kind = 0
    cdef Py_ssize_t n, d, r
    cdef ep_dot_fn dot
    _get_query(query, &qb)
    d = qb.shape[0]
    try:
        _get_matrix(matrix, &mb, d, &kind)
        try:
            n = mb.shape[0]
            dot = ep_dot_table[kind]
            out = []
            for row in rows:
                r = row
                if r < 0 or r >= n:
                    raise IndexError(f"row {r} out of range for {n} rows")
                out.append(<double>dot(<const float *>qb.buf,
                                       <const char *>mb.buf + r * mb.strides[0], d))
            return out
        finally:
            PyBuffer_Release(&mb)
    finally:
        PyBuffer_Release(&qb)


def half_to_float(uint16_t bits):
    """Decode one IEEE binary16 bit pattern (the conversion the scalar loop uses); for tests."""
    return <double>ep_half_to_float(bits)
