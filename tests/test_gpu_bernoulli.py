"""Ternary-query score kernels over feature-major caches against the float64 reference (marker ``gpu``)."""
import numpy
import pytest
from scipy import stats

import santa_cupy as sc
from santa_cupy import layout, reference
from gpu_helpers import TOL, host, problem, rel_err, to_gpu

pytestmark = pytest.mark.gpu
cupy = pytest.importorskip("cupy")

CASES = [  # dtype, dim, q_heads, kv_heads, page_size (page sizes split into 16-byte loads)
    ("bfloat16", 128, 32, 8, None), ("float16", 64, 8, 2, None), ("float32", 256, 4, 1, None),
    ("bfloat16", 128, 16, 1, 16), ("float32", 64, 6, 3, 4), ("float16", 256, 8, 8, 256),
]


def _ids(c):
    return "-".join(str(x) for x in c)


def _feature_major(p):
    return {**p, "k": layout.to_feature_major(p["k"])}


def _heavy_query(p, seed):
    """Queries with a few large channels, as real models have: ternary draws then skip features."""
    r = numpy.random.default_rng(seed)
    q = p["q"].astype(numpy.float32)
    q *= numpy.exp(r.standard_normal(q.shape[-1]).astype(numpy.float32))
    return {**p, "q": q.astype(p["q"].dtype)}


@pytest.mark.parametrize("group", ("mean", "head"))
@pytest.mark.parametrize("key_scheme", ("stratified", "iid"))
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_scores_equal_reference(case, key_scheme, group):
    """Same draws (a different draw would move a score by ~norm/B) and equal scores."""
    dt, dim, hq, hk, ps = case
    p = _heavy_query(problem(21, 3, hq, hk, dim, 1000, dt, lens=[1000, 1, 517], page_size=ps), 1)
    f = _feature_major(p)
    kw = dict(draws=4, scheme=key_scheme, seed=7, key_group=group)
    ref = sc.bernoulli_scores(p["q"], p["k"], kv_lens=p["kv_lens"], page_table=p.get("page_table"), **kw)
    g = to_gpu(f)
    got = sc.bernoulli_scores(g["q"], g["k"], kv_lens=g["kv_lens"], page_table=g.get("page_table"),
                              k_layout="feature_major", **kw)
    assert got.dtype == cupy.float32 and got.shape == ref.shape
    got = host(got)
    finite = numpy.isfinite(ref)
    assert (numpy.isfinite(got) == finite).all()
    tol = 1e-4 * numpy.abs(ref[finite]).max()
    assert numpy.abs(got[finite] - ref[finite]).max() < tol


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_feature_major_exact_and_santa_match_reference(case):
    dt, dim, hq, hk, ps = case
    p = problem(22, 3, hq, hk, dim, 1300, dt, lens=[1300, 1, 700], page_size=ps)
    g = to_gpu(_feature_major(p))
    K, V, lens = reference.dense_cache(p["k"], p["v"], p["kv_lens"], p.get("page_table"))
    o64, lse64 = reference.decode_exact(p["q"], K, V, lens)
    out, lse = sc.decode_exact(**g, k_layout="feature_major", return_lse=True)
    assert rel_err(host(out), o64) < TOL[dt]
    assert numpy.allclose(host(lse), lse64, rtol=1e-4, atol=1e-4)
    # SANTA over the feature-major score kernel draws what the standard kernels draw
    std = sc.decode(**to_gpu(p), samples=64, seed=3, return_counts=True)[1].get()
    fm = sc.decode(**g, samples=64, seed=3, k_layout="feature_major", return_counts=True)[1].get()
    assert (std == fm).all(axis=-1).mean() >= 0.95
    assert numpy.abs(std - fm).sum() / 2 <= max(1, 1e-3 * std.sum())


@pytest.mark.parametrize("scheme", ("systematic", "iid", "tile"))
@pytest.mark.parametrize("case", CASES[::2] + CASES[3:4], ids=_ids)
def test_combined_estimator_matches_reference(case, scheme):
    """Ternary scores with SANTA on top, and with exact p V: same draws and output as the reference."""
    dt, dim, hq, hk, ps = case
    p = _heavy_query(problem(23, 3, hq, hk, dim, 1300, dt, lens=[1300, 1, 700], page_size=ps), 2)
    g = to_gpu(_feature_major(p))
    kw = dict(key_draws=8, seed=11)
    ref, ref_counts = sc.decode(**p, samples=64, scheme=scheme, return_counts=True, **kw)
    out, counts = sc.decode(**g, samples=64, scheme=scheme, k_layout="feature_major", return_counts=True, **kw)
    counts = counts.get()
    same = (counts == ref_counts).all(axis=-1)
    assert same.mean() >= 0.95
    assert numpy.abs(counts - ref_counts).sum() / 2 <= max(1, 1e-3 * counts.sum())
    ref64 = ref.astype(numpy.float64)
    err = numpy.linalg.norm((host(out) - ref64)[same]) / numpy.linalg.norm(ref64[same])
    assert err < 2 * TOL[dt]
    ex_ref = sc.decode_exact(**p, **kw).astype(numpy.float64)
    ex = sc.decode_exact(**g, k_layout="feature_major", **kw)
    assert rel_err(host(ex), ex_ref) < 2 * TOL[dt]


def _exact_scores(p):
    K, _, lens = reference.dense_cache(p["k"], p["v"], p["kv_lens"])
    return reference.scores(p["q"].astype(numpy.float64), K, lens)[0].ravel()


def _score_replicas(g, B, scheme, R, group="mean"):
    return numpy.stack([host(sc.bernoulli_scores(g["q"], g["k"], B, scheme, seed=500 + i, kv_lens=g["kv_lens"],
                                                 key_group=group, k_layout="feature_major"))[0].ravel()
                        for i in range(R)])


@pytest.mark.parametrize("group", ("mean", "head"))
@pytest.mark.parametrize("key_scheme", ("stratified", "iid"))
def test_kernel_scores_unbiased(key_scheme, group):
    """t-tests of R kernel score estimates against the exact scores; Bonferroni over positions and
    the 4 tests of this function, 1e-4 in all."""
    p = _heavy_query(problem(24, 1, 4, 1, 64, 300, "float32", lens=[300]), 3)
    g = to_gpu(_feature_major(p))
    exact = _exact_scores(p)
    est = _score_replicas(g, 4, key_scheme, 300, group)
    _, pval = stats.ttest_1samp(est, exact, axis=0)
    assert pval.min() > 1e-4 / 4 / est.shape[1]
    # negative control: the same test rejects scores shifted by 40% of their spread (t about 7)
    _, pval = stats.ttest_1samp(est + 0.4 * est.std(0), exact, axis=0)
    assert pval.min() < 1e-4 / 4 / est.shape[1]


def test_kernel_stratified_variance_falls_as_one_over_b_squared():
    """Gaussian queries, so most B a_i exceed 1, where stratified draws leave O(1/B^2) variance."""
    p = problem(25, 1, 4, 1, 128, 256, "float32", lens=[256])
    g = to_gpu(_feature_major(p))
    exact = _exact_scores(p)
    mse = {(s, B): ((_score_replicas(g, B, s, 40) - exact) ** 2).mean() for s in ("iid", "stratified") for B in (4, 16)}
    assert mse["stratified", 4] < mse["iid", 4] and mse["stratified", 16] < mse["iid", 16]
    assert mse["stratified", 4] / mse["stratified", 16] > 8      # O(1/B^2): about 16
    assert mse["iid", 4] / mse["iid", 16] < 8                    # O(1/B): about 4


def test_reproducible_fresh_and_layout_fallback():
    p = _heavy_query(problem(26, 2, 8, 2, 128, 1000, "bfloat16", lens=[1000, 999]), 5)
    g = to_gpu(_feature_major(p))
    kw = dict(samples=64, key_draws=8, k_layout="feature_major")
    a, b = sc.decode(**g, seed=4, **kw), sc.decode(**g, seed=4, **kw)
    assert (a.view(cupy.uint16) == b.view(cupy.uint16)).all()
    x, y = sc.decode(**g, **kw), sc.decode(**g, **kw)
    assert not (x == y).all()
    ekw = dict(key_draws=2, k_layout="feature_major")
    assert (sc.decode_exact(**g, seed=4, **ekw) == sc.decode_exact(**g, seed=4, **ekw)).all()
    assert not (sc.decode_exact(**g, **ekw) == sc.decode_exact(**g, **ekw)).all()
    s1 = sc.bernoulli_scores(g["q"], g["k"], 2, kv_lens=g["kv_lens"], k_layout="feature_major")
    s2 = sc.bernoulli_scores(g["q"], g["k"], 2, kv_lens=g["kv_lens"], k_layout="feature_major")
    assert not (s1 == s2).all()
    # page sizes that do not split into 16-byte loads run the reference, with the same draws
    pp = _heavy_query(problem(27, 2, 8, 2, 128, 300, "bfloat16", lens=[300, 41], page_size=7), 6)
    ref = sc.decode(**_feature_major(pp), seed=2, **kw)
    got = sc.decode(**to_gpu(_feature_major(pp)), seed=2, **kw)
    assert numpy.allclose(host(got), ref.astype(numpy.float64), rtol=2e-2, atol=2e-2)
