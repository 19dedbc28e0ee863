"""Inputs and reference comparisons shared by the GPU tests."""
import numpy

from santa_cupy import reference

try:
    import ml_dtypes
    BF16 = numpy.dtype(ml_dtypes.bfloat16)
except ImportError:  # pragma: no cover
    BF16 = None

DTYPES = {"float32": numpy.dtype(numpy.float32), "float16": numpy.dtype(numpy.float16), "bfloat16": BF16}
# relative L2 error of an output rounded to the dtype (plus float32 accumulation)
TOL = {"float32": 1e-4, "float16": 3e-3, "bfloat16": 1.5e-2}


def problem(seed, batch, q_heads, kv_heads, dim, capacity, dtype, lens=None, page_size=None, peaked=False):
    """Random NumPy inputs (never zeros); with page_size, a shuffled paged copy of the cache."""
    r = numpy.random.default_rng(seed)
    dt = DTYPES[dtype]
    q = r.standard_normal((batch, q_heads, dim), dtype=numpy.float32)
    if peaked:
        q *= 3.0
    k = r.standard_normal((batch, capacity, kv_heads, dim), dtype=numpy.float32)
    v = r.standard_normal((batch, capacity, kv_heads, dim), dtype=numpy.float32) + 0.5
    if lens is None:
        lens = r.integers(1, capacity + 1, size=batch)
    lens = numpy.asarray(lens, dtype=numpy.int32)
    q, k, v = q.astype(dt), k.astype(dt), v.astype(dt)
    if page_size is None:
        return dict(q=q, k=k, v=v, kv_lens=lens)
    pages_per_seq = -(-capacity // page_size)
    n_pages = batch * pages_per_seq + 3
    perm = r.permutation(n_pages)[: batch * pages_per_seq].reshape(batch, pages_per_seq).astype(numpy.int32)
    kp = r.standard_normal((n_pages, page_size, kv_heads, dim), dtype=numpy.float32).astype(dt)
    vp = r.standard_normal((n_pages, page_size, kv_heads, dim), dtype=numpy.float32).astype(dt)
    pad = pages_per_seq * page_size - capacity
    kk = numpy.concatenate([k, numpy.zeros((batch, pad, kv_heads, dim), dt)], 1) if pad else k
    vv = numpy.concatenate([v, numpy.zeros((batch, pad, kv_heads, dim), dt)], 1) if pad else v
    kp[perm] = kk.reshape(batch, pages_per_seq, page_size, kv_heads, dim)
    vp[perm] = vv.reshape(batch, pages_per_seq, page_size, kv_heads, dim)
    return dict(q=q, k=kp, v=vp, kv_lens=lens, page_table=perm)


def to_gpu(p):
    import cupy
    return {n: cupy.asarray(x) for n, x in p.items()}


def rel_err(a, b):
    a = numpy.asarray(a, dtype=numpy.float64)
    b = numpy.asarray(b, dtype=numpy.float64)
    return float(numpy.linalg.norm(a - b) / numpy.linalg.norm(b))


def host(x):
    return x.get().astype(numpy.float64) if hasattr(x, "get") else numpy.asarray(x, dtype=numpy.float64)


def reference_from_counts(p, counts, samples):
    """(1/S) sum_j counts_j V_j on the float64 cache: the output the kernel's draws imply."""
    K, V, lens = reference.dense_cache(p["k"], p["v"], p["kv_lens"], p.get("page_table"))
    n = K.shape[1]
    return reference.weighted_values(counts[..., :n].astype(numpy.float64) / samples, V)
