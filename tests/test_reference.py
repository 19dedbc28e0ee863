"""The NumPy reference path of the public API against independent float64 math written here.

Nothing in this file calls santa_cupy.reference to compute an expected value: the dense
attention, the paged cache and the Bernoulli estimate are rebuilt from their definitions.
"""
import math

import ml_dtypes
import numpy
import pytest

import santa_cupy as sc

BF16 = numpy.dtype(ml_dtypes.bfloat16)
DTYPES = [numpy.dtype(numpy.float16), BF16, numpy.dtype(numpy.float32)]
# relative rounding of one cast to the dtype (the reference computes in float64, rounds once)
RTOL = {numpy.dtype(numpy.float16): 2.0 ** -10, BF16: 2.0 ** -7, numpy.dtype(numpy.float32): 2.0 ** -23,
        numpy.dtype(numpy.float64): 1e-12}
GLOBAL = ("iid", "stratified", "systematic")


# ---------------------------------------------------------------- helpers (independent of santa_cupy)

def make_problem(seed, batch, q_heads, kv_heads, dim, cap, dtype=numpy.float32, spread=1.0):
    r = numpy.random.default_rng(seed)
    q = (spread * r.standard_normal((batch, q_heads, dim))).astype(dtype)
    k = r.standard_normal((batch, cap, kv_heads, dim)).astype(dtype)
    v = r.standard_normal((batch, cap, kv_heads, dim)).astype(dtype)
    return q, k, v


def dense_attention(q, k, v, kv_lens=None, scale=None):
    """softmax(q K^T scale) V and the log-sum-exp, one (sequence, head) at a time, float64."""
    batch, q_heads, dim = q.shape
    kv_heads = k.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else scale
    out = numpy.zeros((batch, q_heads, dim))
    lse = numpy.zeros((batch, q_heads))
    for b in range(batch):
        n = k.shape[1] if kv_lens is None else int(kv_lens[b])
        for h in range(q_heads):
            K = k[b, :n, h // group].astype(numpy.float64)
            V = v[b, :n, h // group].astype(numpy.float64)
            s = K @ q[b, h].astype(numpy.float64) * scale
            m = s.max()
            e = numpy.exp(s - m)
            out[b, h] = e @ V / e.sum()
            lse[b, h] = m + math.log(e.sum())
    return out, lse


def to_paged(k, v, kv_lens, page_size, seed, extra_pages=3, poison_unused=True):
    """A paged copy of a contiguous cache: pages in a random physical order, NaN garbage in
    unused pages and page padding, -1 in page-table entries past each sequence's length."""
    batch, cap, kv_heads, dim = k.shape
    max_pages = -(-cap // page_size)
    num_pages = batch * max_pages + extra_pages
    r = numpy.random.default_rng(seed)
    perm = r.permutation(num_pages)
    kp = numpy.full((num_pages, page_size, kv_heads, dim), numpy.nan, dtype=k.dtype)
    vp = numpy.full_like(kp, numpy.nan)
    table = perm[:batch * max_pages].reshape(batch, max_pages).astype(numpy.int32)
    for b in range(batch):
        for j in range(max_pages):
            rows = slice(j * page_size, min((j + 1) * page_size, cap))
            n = rows.stop - rows.start
            kp[table[b, j], :n] = k[b, rows]
            vp[table[b, j], :n] = v[b, rows]
    if poison_unused:
        need = -(-numpy.asarray(kv_lens) // page_size)
        for b in range(batch):
            table[b, need[b]:] = -1
    return kp, vp, table


def assert_close_dtype(got, want, dtype):
    got = numpy.asarray(got, dtype=numpy.float64)
    tol = 2 * RTOL[numpy.dtype(dtype)]
    numpy.testing.assert_allclose(got, want, rtol=tol, atol=tol * numpy.abs(want).max())


def rows_in_tile_scheme(n, S):
    tiles = -(-n // sc.TILE)
    return tiles * max(1, S // tiles)


# ---------------------------------------------------------------- exact decode

@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: d.name)
@pytest.mark.parametrize("dim", [64, 128, 256])
@pytest.mark.parametrize("group", [1, 2, 4, 8])
def test_exact_decode_matches_dense_softmax(group, dim, dtype):
    kv_heads = 2
    q, k, v = make_problem(10 * group + dim, 3, kv_heads * group, kv_heads, dim, 37, dtype, spread=3.0)
    lens = numpy.array([37, 1, 20], dtype=numpy.int32)
    want, want_lse = dense_attention(q, k, v, lens)
    out, lse = sc.decode_exact(q, k, v, kv_lens=lens, return_lse=True)
    assert out.dtype == dtype and out.shape == q.shape
    assert lse.dtype == numpy.float32 and lse.shape == q.shape[:2]
    assert_close_dtype(out, want, dtype)
    numpy.testing.assert_allclose(lse, want_lse, rtol=1e-6, atol=1e-6)
    # a length-1 sequence returns its only value row
    assert_close_dtype(out[1], v[1, 0].astype(numpy.float64)[numpy.arange(kv_heads * group) // group], dtype)


def test_exact_decode_float64_and_full_length_default():
    q, k, v = make_problem(1, 2, 6, 3, 16, 50, numpy.float64, spread=2.0)
    want, want_lse = dense_attention(q, k, v)
    out, lse = sc.decode_exact(q, k, v, return_lse=True)
    numpy.testing.assert_allclose(out, want, rtol=1e-12, atol=1e-12)
    numpy.testing.assert_allclose(lse, want_lse, rtol=1e-6)


@pytest.mark.parametrize("scale", [0.05, 0.3, 2.0])
def test_custom_scale(scale):
    q, k, v = make_problem(2, 2, 4, 2, 64, 30)
    lens = numpy.array([30, 11], dtype=numpy.int32)
    want, want_lse = dense_attention(q, k, v, lens, scale)
    out, lse = sc.decode_exact(q, k, v, kv_lens=lens, scale=scale, return_lse=True)
    assert_close_dtype(out, want, numpy.float32)
    numpy.testing.assert_allclose(lse, want_lse, rtol=1e-6)
    default = sc.decode_exact(q, k, v, kv_lens=lens)
    assert not numpy.allclose(out, default)
    # the SANTA path uses the same scale: its lse is the exact one
    _, lse2 = sc.decode(q, k, v, samples=8, seed=0, kv_lens=lens, scale=scale, return_lse=True)
    numpy.testing.assert_array_equal(lse, lse2)


@pytest.mark.parametrize("scheme", sc.SCHEMES)
def test_santa_lse_is_exact(scheme):
    q, k, v = make_problem(3, 2, 4, 1, 64, 300, numpy.float16)
    lens = numpy.array([300, 45], dtype=numpy.int32)
    _, want_lse = dense_attention(q, k, v, lens)
    out, lse = sc.decode(q, k, v, samples=16, scheme=scheme, seed=1, kv_lens=lens, return_lse=True)
    assert out.dtype == numpy.float16 and lse.dtype == numpy.float32
    numpy.testing.assert_allclose(lse, want_lse, rtol=1e-6)


# ---------------------------------------------------------------- paged vs contiguous

@pytest.mark.parametrize("page_size", [1, 16, 256])
def test_paged_equals_contiguous(page_size):
    q, k, v = make_problem(4, 3, 8, 2, 64, 300, numpy.float32, spread=2.0)
    lens = numpy.array([300, 1, 257], dtype=numpy.int32)
    kp, vp, table = to_paged(k, v, lens, page_size, seed=page_size)
    cap_paged = table.shape[1] * page_size
    a, la = sc.decode_exact(q, k, v, kv_lens=lens, return_lse=True)
    b, lb = sc.decode_exact(q, kp, vp, kv_lens=lens, page_table=table, return_lse=True)
    numpy.testing.assert_array_equal(a, b)
    numpy.testing.assert_array_equal(la, lb)
    assert_close_dtype(a, dense_attention(q, k, v, lens)[0], numpy.float32)
    for scheme in sc.SCHEMES:
        oa, la, ca = sc.decode(q, k, v, samples=24, scheme=scheme, seed=77, kv_lens=lens,
                               return_lse=True, return_counts=True)
        ob, lb, cb = sc.decode(q, kp, vp, samples=24, scheme=scheme, seed=77, kv_lens=lens,
                               page_table=table, return_lse=True, return_counts=True)
        numpy.testing.assert_array_equal(oa, ob)
        numpy.testing.assert_array_equal(la, lb)
        assert ca.shape == (3, 8, 300) and cb.shape == (3, 8, cap_paged)
        numpy.testing.assert_array_equal(ca, cb[..., :300])
        assert not cb[..., 300:].any()


def test_paged_ignores_garbage_in_unused_pages_and_table_entries():
    q, k, v = make_problem(5, 2, 2, 1, 64, 40)
    lens = numpy.array([9, 33], dtype=numpy.int32)
    kp, vp, table = to_paged(k, v, lens, 8, seed=0)
    table[0, 2:] = 10 ** 6            # out of range, but past ceil(9 / 8) = 2 pages
    out = sc.decode_exact(q, kp, vp, kv_lens=lens, page_table=table)
    assert numpy.isfinite(out).all()
    assert_close_dtype(out, dense_attention(q, k, v, lens)[0], numpy.float32)


# ---------------------------------------------------------------- out=, return_counts

@pytest.mark.parametrize("scheme", sc.SCHEMES)
def test_out_argument(scheme):
    q, k, v = make_problem(6, 2, 4, 2, 64, 30, numpy.float16)
    out = numpy.full(q.shape, numpy.nan, dtype=numpy.float16)
    res = sc.decode(q, k, v, samples=8, scheme=scheme, seed=3, out=out)
    assert res is out
    numpy.testing.assert_array_equal(out, sc.decode(q, k, v, samples=8, scheme=scheme, seed=3))
    out2 = numpy.full(q.shape, numpy.nan, dtype=numpy.float16)
    res2, lse = sc.decode_exact(q, k, v, out=out2, return_lse=True)
    assert res2 is out2
    numpy.testing.assert_array_equal(out2, sc.decode_exact(q, k, v))


@pytest.mark.parametrize("scheme", sc.SCHEMES)
@pytest.mark.parametrize("group", [1, 4])
def test_return_counts(scheme, group):
    S = 24
    q, k, v = make_problem(7, 3, 2 * group, 2, 64, 600, numpy.float32, spread=3.0)
    lens = numpy.array([600, 5, 300], dtype=numpy.int32)
    out, counts = sc.decode(q, k, v, samples=S, scheme=scheme, seed=11, kv_lens=lens, return_counts=True)
    assert counts.dtype == numpy.int32 and counts.shape == (3, 2 * group, 600)
    assert (counts >= 0).all()
    for b in range(3):
        assert not counts[b, :, lens[b]:].any()
        per_head = counts[b].sum(axis=-1)
        if scheme in GLOBAL:
            assert (per_head == S).all()
        else:
            assert (per_head == rows_in_tile_scheme(int(lens[b]), S)).all()
    if scheme in GLOBAL:
        # the value stage is (1/S) sum_j c_j V_j over the counted rows
        vv = v.astype(numpy.float64)[:, :, numpy.arange(2 * group) // group]     # (b, n, h, d)
        want = numpy.einsum("bhn,bnhd->bhd", counts / S, vv)
        numpy.testing.assert_allclose(out, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_systematic_counts_are_floor_or_ceil_of_s_p(seed):
    """Systematic draws are S points 1/S apart on the CDF: row j receives floor(S p_j) or
    ceil(S p_j) of them (stratified draws do not, a negative control)."""
    q, k, v = make_problem(8, 1, 2, 1, 64, 200, numpy.float64)
    S = 4096
    s = numpy.einsum("bhd,bnd->bhn", q, k[:, :, 0]) / 8.0
    p = numpy.exp(s - s.max(axis=-1, keepdims=True))
    sp = S * p / p.sum(axis=-1, keepdims=True)
    lo, hi = numpy.floor(sp * (1 - 1e-9)), numpy.ceil(sp * (1 + 1e-9))
    _, cnt = sc.decode(q, k, v, samples=S, scheme="systematic", seed=seed, return_counts=True)
    assert ((cnt >= lo) & (cnt <= hi)).all()
    _, cnt = sc.decode(q, k, v, samples=S, scheme="stratified", seed=seed, return_counts=True)
    assert not ((cnt >= lo) & (cnt <= hi)).all()


def test_single_row_context_is_exact_for_every_scheme():
    q, k, v = make_problem(9, 2, 2, 2, 64, 10, numpy.float32)
    lens = numpy.array([1, 1], dtype=numpy.int32)
    exact = sc.decode_exact(q, k, v, kv_lens=lens)
    for scheme in sc.SCHEMES:
        numpy.testing.assert_allclose(sc.decode(q, k, v, samples=3, scheme=scheme, seed=1, kv_lens=lens),
                                      exact, rtol=1e-6)


# ---------------------------------------------------------------- sample()

@pytest.mark.parametrize("scheme", sc.SCHEMES)
@pytest.mark.parametrize("shape", [(700,), (3, 700), (2, 3, 700)])
def test_sample_shapes(scheme, shape):
    S = 20
    p = numpy.random.default_rng(12).random(shape)
    idx, w = sc.sample(p, S, scheme, seed=5)
    m = S if scheme in GLOBAL else rows_in_tile_scheme(700, S)
    assert idx.shape == shape[:-1] + (m,) and w.shape == idx.shape
    assert idx.dtype == numpy.int64 and w.dtype == numpy.float64
    assert ((idx >= 0) & (idx < 700)).all()
    numpy.testing.assert_allclose(w.sum(axis=-1), 1.0, rtol=1e-12)
    if scheme in GLOBAL:
        assert (w == 1.0 / S).all()
    if scheme in ("systematic", "stratified"):
        assert (numpy.diff(idx, axis=-1) >= 0).all()
    c, rw = sc.sample(p, S, scheme, seed=5, counts=True)
    assert c.shape == shape and rw.shape == shape
    flat_idx = idx.reshape(-1, m)
    flat_w = w.reshape(-1, m)
    for r in range(flat_idx.shape[0]):
        numpy.testing.assert_array_equal(c.reshape(-1, 700)[r],
                                         numpy.bincount(flat_idx[r][flat_w[r] > 0], minlength=700))
        numpy.testing.assert_allclose(rw.reshape(-1, 700)[r],
                                      numpy.bincount(flat_idx[r], weights=flat_w[r], minlength=700))


@pytest.mark.parametrize("scheme", sc.SCHEMES)
def test_sample_logits_equals_probabilities(scheme):
    x = 2.0 * numpy.random.default_rng(13).standard_normal((2, 3, 600))
    p = numpy.exp(x - x.max(axis=-1, keepdims=True))
    p_unnormalised = 5.0 * p
    a = sc.sample(x, 32, scheme, seed=8, logits=True)
    b = sc.sample(p / p.sum(axis=-1, keepdims=True), 32, scheme, seed=8)
    c = sc.sample(p_unnormalised, 32, scheme, seed=8)
    numpy.testing.assert_array_equal(a[0], b[0])
    numpy.testing.assert_array_equal(a[0], c[0])
    numpy.testing.assert_allclose(a[1], b[1], rtol=1e-12)


def test_sample_zero_weights_and_lengths_never_drawn():
    p = numpy.random.default_rng(14).random((4, 50))
    p[:, ::2] = 0.0
    lens = numpy.array([50, 1, 2, 33])
    for scheme in sc.SCHEMES:
        p_l = p.copy()
        p_l[1, 0] = 0.3                       # a length-1 row needs one positive entry
        c, _ = sc.sample(p_l, 64, scheme, seed=1, counts=True, lengths=lens)
        for r in range(4):
            assert not c[r, lens[r]:].any()
            assert not c[r, :lens[r]][p_l[r, :lens[r]] == 0].any()
        assert c[1, 0] > 0


def test_sample_matches_decode_draws():
    """sample() on the exact logits draws what decode() draws (same stream per head)."""
    q, k, v = make_problem(15, 2, 4, 2, 64, 80, numpy.float64)
    lens = numpy.array([80, 31], dtype=numpy.int32)
    scale = 0.125
    s = numpy.full((2, 4, 80), -numpy.inf)
    for b in range(2):
        for h in range(4):
            s[b, h, :lens[b]] = k[b, :lens[b], h // 2] @ q[b, h] * scale
    for scheme in sc.SCHEMES:
        _, counts = sc.decode(q, k, v, samples=16, scheme=scheme, seed=21, kv_lens=lens, scale=scale,
                              return_counts=True)
        c, _ = sc.sample(s, 16, scheme, seed=21, logits=True, counts=True, lengths=lens)
        numpy.testing.assert_array_equal(counts, c)


# ---------------------------------------------------------------- ternary queries

def _qvec(seed, shape):
    q = numpy.random.default_rng(seed).standard_normal(shape)
    q[0, 0, 3] = 0.0          # an exact zero must never be read
    return q


@pytest.mark.parametrize("scheme", ["iid", "stratified"])
def test_ternary_query_per_head(scheme):
    B = 6
    q = _qvec(16, (2, 4, 32))
    est, feats, draws = sc.ternary_query(q, B, scheme, seed=3)
    assert est.shape == q.shape and est.dtype == numpy.float64
    assert feats.shape == q.shape and feats.dtype == numpy.bool_
    assert draws.shape == (B, 2, 4, 32) and draws.dtype == numpy.uint8
    assert set(numpy.unique(draws).tolist()) <= {0, 1}
    ternary = numpy.sign(q)[None] * draws                       # the B ternary queries
    assert set(numpy.unique(ternary).tolist()) <= {-1, 0, 1}
    norm = numpy.abs(q).max(axis=-1, keepdims=True)
    numpy.testing.assert_allclose(est, norm / B * ternary.sum(axis=0), rtol=1e-14)
    numpy.testing.assert_array_equal(feats, draws.any(axis=0))
    assert not draws[:, 0, 0, 3].any() and est[0, 0, 3] == 0.0
    # the largest element (probability 1) is hit by every draw; signs are preserved
    top = numpy.abs(q).argmax(axis=-1)
    for b in range(2):
        for h in range(4):
            assert draws[:, b, h, top[b, h]].all()
    assert (numpy.sign(est) * numpy.sign(q) >= 0).all()
    if scheme == "stratified":
        hits = draws.sum(axis=0)
        a = numpy.abs(q) / norm
        assert ((hits == numpy.floor(B * a)) | (hits == numpy.ceil(B * a))).all()


@pytest.mark.parametrize("scheme", ["iid", "stratified"])
def test_ternary_query_mean_group(scheme):
    B, kv_heads, group = 5, 2, 3
    q = _qvec(17, (2, kv_heads * group, 16))
    q[0, :group, 5] = 0.0     # a feature zero for a whole group is never read
    est, feats, draws = sc.ternary_query(q, B, scheme, seed=4, kv_heads=kv_heads)
    assert est.shape == q.shape
    assert feats.shape == (2, kv_heads, 16) and draws.shape == (B, 2, kv_heads, 16)
    numpy.testing.assert_array_equal(feats, draws.any(axis=0))
    m = numpy.abs(q).reshape(2, kv_heads, group, 16).mean(axis=2)
    norm = m.max(axis=-1, keepdims=True)
    m_hat = norm * draws.sum(axis=0) / B
    ratio = numpy.divide(q.reshape(2, kv_heads, group, 16), m[:, :, None], where=m[:, :, None] > 0,
                         out=numpy.zeros((2, kv_heads, group, 16)))
    numpy.testing.assert_allclose(est, (m_hat[:, :, None] * ratio).reshape(q.shape), rtol=1e-13, atol=1e-15)
    assert not draws[:, 0, 0, 5].any() and (est[0, :group, 5] == 0).all()
    if scheme == "stratified":
        hits = draws.sum(axis=0)
        a = m / norm
        assert ((hits == numpy.floor(B * a)) | (hits == numpy.ceil(B * a))).all()
    _, _, d_head = sc.ternary_query(q, B, scheme, seed=4)
    assert d_head.shape == (B, 2, kv_heads * group, 16)


@pytest.mark.parametrize("scheme", ["iid", "stratified"])
def test_mean_group_and_per_head_draws_use_different_streams(scheme):
    """With every head of a group equal, per-head and mean-group draws have the same
    probabilities: only their purpose words tell the streams apart."""
    q = numpy.repeat(_qvec(21, (2, 2, 16)), 2, axis=1)          # groups of 2 equal heads
    _, _, d_mean = sc.ternary_query(q, 8, scheme, seed=4, kv_heads=2)
    _, _, d_head = sc.ternary_query(q, 8, scheme, seed=4)
    assert not numpy.array_equal(d_mean[:, :, 0], d_head[:, :, 0])


def test_ternary_query_many_draws_converges():
    q = _qvec(18, (1, 2, 64))
    est, _, _ = sc.ternary_query(q, 4096, "stratified", seed=0)
    numpy.testing.assert_allclose(est, q, atol=numpy.abs(q).max() / 4096 * 1.0001)


@pytest.mark.parametrize("key_group", ["mean", "head"])
@pytest.mark.parametrize("scheme", ["iid", "stratified"])
def test_bernoulli_scores_equal_estimate_times_keys(scheme, key_group):
    B, scale = 4, 0.2
    q, k, _ = make_problem(19, 2, 4, 2, 64, 30, numpy.float32)
    lens = numpy.array([30, 12], dtype=numpy.int32)
    kvh = 2 if key_group == "mean" else None
    est, _, _ = sc.ternary_query(q, B, scheme, seed=9, kv_heads=kvh)
    s = sc.bernoulli_scores(q, k, B, scheme, seed=9, kv_lens=lens, scale=scale, key_group=key_group)
    assert s.shape == (2, 4, 30) and s.dtype == numpy.float64
    for b in range(2):
        for h in range(4):
            want = k[b, :lens[b], h // 2].astype(numpy.float64) @ est[b, h] * scale
            numpy.testing.assert_allclose(s[b, h, :lens[b]], want, rtol=1e-12, atol=1e-12)
            assert (s[b, h, lens[b]:] == -numpy.inf).all()
    # paged layout gives the same scores
    kp, _, table = to_paged(k, k, lens, 16, seed=1)
    sp = sc.bernoulli_scores(q, kp, B, scheme, seed=9, kv_lens=lens, page_table=table, scale=scale,
                             key_group=key_group)
    numpy.testing.assert_array_equal(s, sp)


@pytest.mark.parametrize("key_scheme", ["iid", "stratified"])
@pytest.mark.parametrize("key_group", ["mean", "head"])
def test_decode_with_key_draws(key_group, key_scheme):
    """Exact p V over the estimated scores; sampled decode draws from their softmax (the draws of
    sample() on them, not those of the other key scheme's scores)."""
    B = 8
    q, k, v = make_problem(20, 2, 4, 2, 64, 40, numpy.float32)
    lens = numpy.array([40, 17], dtype=numpy.int32)
    s = sc.bernoulli_scores(q, k, B, key_scheme, seed=5, kv_lens=lens, key_group=key_group)
    other = sc.bernoulli_scores(q, k, B, ({"iid", "stratified"} - {key_scheme}).pop(), seed=5, kv_lens=lens,
                                key_group=key_group)
    p = numpy.exp(s - s.max(axis=-1, keepdims=True))
    p /= p.sum(axis=-1, keepdims=True)
    vv = v.astype(numpy.float64)[:, :40][:, :, numpy.arange(4) // 2]
    want = numpy.einsum("bhn,bnhd->bhd", p, vv)
    got = sc.decode_exact(q, k, v, kv_lens=lens, key_draws=B, key_scheme=key_scheme,
                          key_group=key_group, seed=5)
    assert_close_dtype(got, want, numpy.float32)
    assert not numpy.allclose(got, sc.decode_exact(q, k, v, kv_lens=lens), rtol=1e-6, atol=0)
    for scheme in sc.SCHEMES:
        o, cnt = sc.decode(q, k, v, samples=16, scheme=scheme, seed=5, kv_lens=lens, key_draws=B,
                           key_scheme=key_scheme, key_group=key_group, return_counts=True)
        assert o.shape == q.shape and o.dtype == q.dtype and numpy.isfinite(o).all()
        want_cnt, _ = sc.sample(s, 16, scheme, seed=5, logits=True, counts=True, lengths=lens)
        numpy.testing.assert_array_equal(cnt, want_cnt)
        assert not numpy.array_equal(cnt, sc.sample(other, 16, scheme, seed=5, logits=True, counts=True,
                                                     lengths=lens)[0])
        numpy.testing.assert_array_equal(
            o, sc.decode(q, k, v, samples=16, scheme=scheme, seed=5, kv_lens=lens, key_draws=B,
                         key_scheme=key_scheme, key_group=key_group))
