"""Property tests (hypothesis) of the public API on the NumPy reference.

Random shapes, dtypes, group sizes, lengths and page tables; the arrays themselves come from a
NumPy generator seeded by hypothesis (much faster than drawing every element). Derandomized
with a fixed number of examples, so CI sees the same cases every run.
"""
import math

import ml_dtypes
import numpy
from hypothesis import HealthCheck, given, settings, strategies as st

import santa_cupy as sc

BF16 = numpy.dtype(ml_dtypes.bfloat16)
DTYPES = [numpy.dtype(numpy.float16), BF16, numpy.dtype(numpy.float32), numpy.dtype(numpy.float64)]
RTOL = {numpy.dtype(numpy.float16): 2.0 ** -10, BF16: 2.0 ** -7, numpy.dtype(numpy.float32): 2.0 ** -23,
        numpy.dtype(numpy.float64): 1e-13}
GLOBAL = ("iid", "stratified", "systematic")

SETTINGS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


class Problem:
    def __init__(self, q, k, v, lens, paged, scheme, samples, seed, scale):
        self.q, self.k, self.v, self.lens = q, k, v, lens
        self.kp, self.vp, self.table = paged
        self.scheme, self.samples, self.seed, self.scale = scheme, samples, seed, scale

    def __repr__(self):
        return (f"Problem(q={self.q.shape} {self.q.dtype}, k={self.k.shape}, lens={self.lens.tolist()}, "
                f"pages={self.kp.shape}, scheme={self.scheme}, S={self.samples}, seed={self.seed}, "
                f"scale={self.scale})")


@st.composite
def problems(draw):
    batch = draw(st.integers(1, 3))
    kv_heads = draw(st.integers(1, 3))
    group = draw(st.sampled_from([1, 2, 3, 4, 8]))
    dim = draw(st.sampled_from([1, 3, 8, 16, 64]))
    cap = draw(st.one_of(st.integers(1, 48), st.integers(250, 600)))
    dtype = draw(st.sampled_from(DTYPES))
    page_size = draw(st.sampled_from([1, 3, 16, 64, 256]))
    lens = numpy.array([draw(st.integers(1, cap)) for _ in range(batch)], dtype=draw(
        st.sampled_from([numpy.int32, numpy.int64, numpy.uint32])))
    spread = draw(st.sampled_from([0.1, 1.0, 4.0]))
    scheme = draw(st.sampled_from(sc.SCHEMES))
    samples = draw(st.integers(1, 64))
    seed = draw(st.one_of(st.integers(0, 2 ** 64 - 1),
                          st.lists(st.integers(0, 2 ** 63 - 1), min_size=batch, max_size=batch).map(numpy.array)))
    scale = draw(st.one_of(st.none(), st.floats(0.01, 2.0)))
    r = numpy.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    q = (spread * r.standard_normal((batch, kv_heads * group, dim))).astype(dtype)
    k = r.standard_normal((batch, cap, kv_heads, dim)).astype(dtype)
    v = r.standard_normal((batch, cap, kv_heads, dim)).astype(dtype)
    # garbage past kv_lens must never matter
    for b in range(batch):
        k[b, lens[b]:] = numpy.nan
        v[b, lens[b]:] = numpy.inf
    paged = _paged(k, v, lens, page_size, r)
    return Problem(q, k, v, lens, paged, scheme, samples, seed, scale)


def _paged(k, v, lens, page_size, r):
    batch, cap, kv_heads, dim = k.shape
    need = -(-lens.astype(numpy.int64) // page_size)
    max_pages = -(-cap // page_size) + int(r.integers(0, 2))      # sometimes a spare column
    num_pages = int(need.sum()) + int(r.integers(0, 3))
    perm = r.permutation(num_pages)
    kp = numpy.full((num_pages, page_size, kv_heads, dim), numpy.nan, dtype=k.dtype)
    vp = numpy.full_like(kp, numpy.nan)
    table = numpy.full((batch, max_pages), -1, dtype=numpy.int32)
    pos = 0
    for b in range(batch):
        for j in range(need[b]):
            page = perm[pos]
            pos += 1
            table[b, j] = page
            rows = slice(j * page_size, min((j + 1) * page_size, cap))
            kp[page, :rows.stop - rows.start] = k[b, rows]
            vp[page, :rows.stop - rows.start] = v[b, rows]
        table[b, need[b]:] = r.integers(-5, 2 * num_pages + 5, size=max_pages - need[b])   # ignored
    return kp, vp, table


def _logits(pr):
    """Exact scores, float64 (batch, q_heads, n_max), -inf past kv_lens; written independently."""
    q = pr.q.astype(numpy.float64)
    batch, q_heads, dim = q.shape
    group = q_heads // pr.k.shape[2]
    scale = 1.0 / math.sqrt(dim) if pr.scale is None else pr.scale
    n = int(pr.lens.max())
    s = numpy.full((batch, q_heads, n), -numpy.inf)
    for b in range(batch):
        L = int(pr.lens[b])
        for h in range(q_heads):
            s[b, h, :L] = pr.k[b, :L, h // group].astype(numpy.float64) @ q[b, h] * scale
    return s


def _values(pr, n):
    """float64 (batch, n, q_heads, dim) value rows seen by each query head, zero past kv_lens."""
    group = pr.q.shape[1] // pr.k.shape[2]
    vv = pr.v[:, :n].astype(numpy.float64)[:, :, numpy.arange(pr.q.shape[1]) // group]
    valid = numpy.arange(n)[None, :] < pr.lens[:, None].astype(numpy.int64)
    return numpy.where(valid[:, :, None, None], vv, 0.0)


def _assert_close(got, want, dtype):
    tol = 2 * RTOL[numpy.dtype(dtype)]
    numpy.testing.assert_allclose(numpy.asarray(got, dtype=numpy.float64), want, rtol=tol,
                                  atol=tol * max(1.0, numpy.abs(want).max()))


def _decode(pr, paged=False, **kw):
    k, v, table = (pr.kp, pr.vp, pr.table) if paged else (pr.k, pr.v, None)
    return sc.decode(pr.q, k, v, samples=pr.samples, scheme=pr.scheme, seed=pr.seed, kv_lens=pr.lens,
                     page_table=table, scale=pr.scale, **kw)


@SETTINGS
@given(problems())
def test_santa_output_is_the_weighted_sample(pr):
    """decode == sum_j w_j V_j with (counts, w) from sample() on the exact logits; w is a convex
    combination of the sampled rows; counts agree with decode's own; nothing past kv_len."""
    out, counts = _decode(pr, return_counts=True)
    s = _logits(pr)
    n = s.shape[-1]
    c, w = sc.sample(s, pr.samples, pr.scheme, seed=pr.seed, logits=True, counts=True, lengths=pr.lens)
    assert out.dtype == pr.q.dtype and out.shape == pr.q.shape
    numpy.testing.assert_array_equal(counts[..., :n], c)
    assert not counts[..., n:].any()
    # convex weights, supported on the sampled rows only
    assert (w >= 0).all()
    numpy.testing.assert_allclose(w.sum(axis=-1), 1.0, rtol=1e-9)
    assert not w[c == 0].any()
    want = numpy.einsum("bhn,bnhd->bhd", w, _values(pr, n))
    _assert_close(out, want, pr.q.dtype)
    # inside the per-coordinate hull of the sampled rows
    vv = numpy.moveaxis(_values(pr, n), 1, 2)                       # (b, h, n, d)
    used = (c > 0)[..., None]
    lo = numpy.where(used, vv, numpy.inf).min(axis=2)
    hi = numpy.where(used, vv, -numpy.inf).max(axis=2)
    slack = 2 * RTOL[numpy.dtype(pr.q.dtype)] * numpy.maximum(numpy.abs(lo), numpy.abs(hi)) + 1e-12
    o = out.astype(numpy.float64)
    assert (o >= lo - slack).all() and (o <= hi + slack).all()


@SETTINGS
@given(problems())
def test_counts_budget_and_support(pr):
    _, counts = _decode(pr, return_counts=True)
    lens = pr.lens.astype(numpy.int64)
    for b in range(len(lens)):
        assert not counts[b, :, lens[b]:].any()
        total = counts[b].sum(axis=-1)
        if pr.scheme in GLOBAL:
            assert (total == pr.samples).all()
        else:
            tiles = -(-int(lens[b]) // sc.TILE)
            assert (total <= tiles * max(1, pr.samples // tiles)).all()
            assert (total >= 1).all()


@SETTINGS
@given(problems())
def test_exact_decode_is_dense_softmax(pr):
    s = _logits(pr)
    p = numpy.exp(s - s.max(axis=-1, keepdims=True))
    lse = numpy.log(p.sum(axis=-1)) + s.max(axis=-1)
    p /= p.sum(axis=-1, keepdims=True)
    want = numpy.einsum("bhn,bnhd->bhd", p, _values(pr, s.shape[-1]))
    out, got_lse = sc.decode_exact(pr.q, pr.k, pr.v, kv_lens=pr.lens, scale=pr.scale, return_lse=True)
    _assert_close(out, want, pr.q.dtype)
    numpy.testing.assert_allclose(got_lse, lse, rtol=2e-6, atol=1e-6)
    outp = sc.decode_exact(pr.q, pr.kp, pr.vp, kv_lens=pr.lens, page_table=pr.table, scale=pr.scale)
    numpy.testing.assert_array_equal(out, outp)


@SETTINGS
@given(problems())
def test_paged_equals_contiguous_and_seed_reproducible(pr):
    a = _decode(pr, return_lse=True, return_counts=True)
    b = _decode(pr, paged=True, return_lse=True, return_counts=True)
    numpy.testing.assert_array_equal(a[0], b[0])
    numpy.testing.assert_array_equal(a[1], b[1])
    n = min(a[2].shape[-1], b[2].shape[-1])
    numpy.testing.assert_array_equal(a[2][..., :n], b[2][..., :n])
    assert not a[2][..., n:].any() and not b[2][..., n:].any()
    c = _decode(pr, return_lse=True, return_counts=True)
    for x, y in zip(a, c):
        numpy.testing.assert_array_equal(x, y)
    assert numpy.isfinite(a[0].astype(numpy.float64)).all()


@SETTINGS
@given(st.integers(1, 3), st.integers(1, 700), st.integers(1, 100), st.sampled_from(sc.SCHEMES),
       st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 32 - 1), st.booleans())
def test_sample_properties(rows, n, samples, scheme, seed, data_seed, sparse):
    r = numpy.random.default_rng(data_seed)
    p = r.random((rows, n))
    if sparse:
        p[r.random((rows, n)) < 0.7] = 0.0
        p[:, r.integers(0, n)] = 0.5                                  # every row keeps a positive entry
    lens = numpy.array([r.integers(1, n + 1) for _ in range(rows)])
    lens = numpy.maximum(lens, 1 + numpy.array([numpy.flatnonzero(p[i] > 0)[0] for i in range(rows)]))
    idx, w = sc.sample(p, samples, scheme, seed=seed, lengths=lens)
    c, rw = sc.sample(p, samples, scheme, seed=seed, lengths=lens, counts=True)
    for i in range(rows):
        real = idx[i][w[i] > 0]
        assert (real < lens[i]).all() and (p[i, real] > 0).all()
        numpy.testing.assert_array_equal(numpy.bincount(real, minlength=n), c[i])
    numpy.testing.assert_allclose(rw.sum(axis=-1), 1.0, rtol=1e-9)
    if scheme in GLOBAL:
        assert idx.shape == (rows, samples) and (c.sum(axis=-1) == samples).all()
    idx2, w2 = sc.sample(p, samples, scheme, seed=seed, lengths=lens)
    numpy.testing.assert_array_equal(idx, idx2)
    numpy.testing.assert_array_equal(w, w2)
