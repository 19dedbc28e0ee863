"""Statistical tests of the estimators on the NumPy reference (SciPy).

False-failure budget
--------------------
The CPU suite may fail a correct implementation with probability at most ``ALPHA_SUITE =
1e-3`` (over a random choice of the fixed seeds below). The budget is split evenly
(Bonferroni) over ``N_STAT_ASSERTIONS = 40`` slots, ``ALPHA = 2.5e-5`` per statistical assertion
(``stat_budget.py``):

========================================================  =====
assertion                                                 slots
========================================================  =====
test_rng.py: KS uniformity                                    1
test_rng.py: stream correlations (key, head, sequence,        6
purpose, offset, index)
test_rng.py: 200,000 distinct doubles (about 2e-6), and       1
ternary variances within 15% of analytic (7 SE)
decode unbiased, Hotelling T^2, 4 schemes                     4
library tile scheme unbiased on the negative-control case     1
negative control rejected (type II error, see below)          1
MSE vs exact analytic value, {iid, strat, sys} x 2 cases      6
MSE below iid, Welch one-sided, {strat, sys} x 2 cases        4
ternary estimate of q unbiased, {iid, strat} x {head, mean}   6
(stratified: 2 each, see below)
ternary unbiasedness test detects a bias at its limit (iid)   2
Bernoulli scores unbiased, {iid, strat} x {head, mean}        4
Bernoulli scores test detects a bias at its limit             1
ternary variance slope over B, {iid, strat}                   2
spare                                                         1
========================================================  =====

Assertions that must *reject* (the negative controls; "significantly below iid") spend their
slot on the type II error: each first checks, from exact analytic values, that the expected
test statistic lies at least ``2 * z_ALPHA`` beyond the critical value, or shifts the estimate
by the bias that its test misses with probability ALPHA (noncentral chi-square or F), so a miss
has probability at most ALPHA. All seeds are fixed: the outcome is deterministic.

The ternary chi-square tests approximate binomial counts by normals; stratified draws leave
coordinates with as few as 3 expected hits over the replications, where a correct estimator
fails the test at about 4e-5 (simulated from the exact binomials, mean group; 2.5e-5 per head):
those two assertions take two slots each.

The GPU tests (marker ``gpu``) carry budgets of their own, stated in each: 1e-4 for the kernel
output t-tests and 1e-4 for the kernel score t-tests, each with a negative control; their
variance comparisons have margins checked on the reference, which draws the same rows.

Problems are small (a few hundred tokens, head_dim 8-16): the reference accepts any head_dim.
Replications come from the batch (a per-sequence seed array: distinct seeds) times the query
heads (distinct streams), all holding the same query and cache.
"""
import numpy
import pytest
from scipy import optimize, stats

import santa_cupy as sc
from stat_budget import ALPHA
Z_TWO = stats.norm.isf(ALPHA / 2)      # two-sided critical value
Z_ONE = stats.norm.isf(ALPHA)          # one-sided critical value


# ---------------------------------------------------------------- helpers

def chi2_limit_shift(k):
    """The shift, in standard errors of every coordinate, that a chi-square test on k of them
    misses with probability ALPHA (noncentrality k shift^2)."""
    crit = stats.chi2.isf(ALPHA, k)
    lam = optimize.brentq(lambda nc: stats.ncx2.cdf(crit, k, nc) - ALPHA, 1e-9, 1e4)
    return numpy.sqrt(lam / k)


def hotelling_limit_shift(X):
    """A shift of the first coordinate of rows X (R, d) that the Hotelling test misses with
    probability ALPHA (noncentrality R delta' Sigma^-1 delta, Sigma the sample covariance)."""
    R, d = X.shape
    crit = stats.f.isf(ALPHA, d, R - d)
    lam = optimize.brentq(lambda nc: stats.ncf.cdf(crit, d, R - d, nc) - ALPHA, 1e-9, 1e5)
    shift = numpy.zeros(d)
    shift[0] = numpy.sqrt(lam / (R * numpy.linalg.inv(numpy.cov(X, rowvar=False))[0, 0]))
    return shift


def hotelling_pvalue(X, mu):
    """One-sample Hotelling T^2 test of E[X] = mu for rows X (R, d)."""
    R, d = X.shape
    diff = X.mean(axis=0) - mu
    cov = numpy.cov(X, rowvar=False)
    t2 = R * diff @ numpy.linalg.solve(cov, diff)
    f = (R - d) / (d * (R - 1)) * t2
    return stats.f.sf(f, d, R - d)


def replicated_problem(q1, K1, V1, batch, heads):
    """The same (query, cache) in every sequence and query head: (q, k, v) for decode."""
    n, d = K1.shape
    q = numpy.ascontiguousarray(numpy.broadcast_to(q1, (batch, heads, d)))
    k = numpy.ascontiguousarray(numpy.broadcast_to(K1[None, :, None, :], (batch, n, 1, d)))
    v = numpy.ascontiguousarray(numpy.broadcast_to(V1[None, :, None, :], (batch, n, 1, d)))
    return q, k, v


def replications(q1, K1, V1, scheme, S, batch, heads, base_seed):
    """(batch * heads, d) independent SANTA outputs (scale 1) and the exact output (d,)."""
    q, k, v = replicated_problem(q1, K1, V1, batch, heads)
    seeds = (base_seed + numpy.arange(batch)).astype(numpy.uint64)
    out = sc.decode(q, k, v, samples=S, scheme=scheme, seed=seeds, scale=1.0)
    exact = sc.decode_exact(q[:1, :1], k[:1], v[:1], scale=1.0)[0, 0]
    return out.reshape(batch * heads, -1), exact


def softmax(s):
    e = numpy.exp(s - s.max())
    return e / e.sum()


def mse_iid(p, V):
    mu = p @ V
    return (p @ (V * V).sum(axis=1) - mu @ mu)


def mse_stratified(p, V, S):
    """(1/S^2) sum_m tr Sigma^(m), Sigma^(m) the covariance of V_{F^-1(T)}, T ~ U[m/S, (m+1)/S)."""
    F = numpy.cumsum(p)
    F_prev = numpy.concatenate([[0.0], F[:-1]])
    lo = numpy.arange(S)[:, None] / S
    hi = (numpy.arange(S)[:, None] + 1) / S
    W = numpy.clip(numpy.minimum(F[None], hi) - numpy.maximum(F_prev[None], lo), 0, None) * S   # (S, n)
    means = W @ V
    second = W @ (V * V).sum(axis=1)
    return (second - (means * means).sum(axis=1)).sum() / S ** 2


def mse_systematic(p, V, S):
    """Exact: the estimate is piecewise constant in the one uniform U; integrate over U."""
    F = numpy.cumsum(p)
    F = F / F[-1]
    breaks = numpy.unique(numpy.concatenate([[0.0, 1.0], numpy.mod(S * F, 1.0)]))
    mid = 0.5 * (breaks[1:] + breaks[:-1])
    length = numpy.diff(breaks)
    u = (numpy.arange(S)[None, :] + mid[:, None]) / S
    j = numpy.minimum(numpy.searchsorted(F, u, side="right"), len(p) - 1)
    est = V[j].mean(axis=1)                                    # (pieces, d)
    mu = p @ V
    return (length * ((est - mu) ** 2).sum(axis=1)).sum()


def welch_z(a, b):
    return (a.mean() - b.mean()) / numpy.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))


# ---------------------------------------------------------------- unbiasedness of decode

UNBIASED_N, UNBIASED_D, UNBIASED_S = 520, 8, 16      # 520 tokens: tiles of 256, 256 and 8


@pytest.fixture(scope="module")
def unbiased_case():
    r = numpy.random.default_rng(2024)
    K1 = r.standard_normal((UNBIASED_N, UNBIASED_D))
    q1 = r.standard_normal(UNBIASED_D)
    q1 *= 1.5 / numpy.linalg.norm(q1)                  # logits ~ N(0, 1.5^2)
    V1 = r.standard_normal((UNBIASED_N, UNBIASED_D))
    V1 += 0.5 * numpy.sign(K1 @ q1)[:, None]           # values correlated with the scores
    return q1, K1, V1


@pytest.mark.parametrize("scheme", sc.SCHEMES)
def test_decode_unbiased(unbiased_case, scheme):
    q1, K1, V1 = unbiased_case
    X, mu = replications(q1, K1, V1, scheme, UNBIASED_S, batch=64, heads=32,
                         base_seed=1000 * (1 + sc.SCHEMES.index(scheme)))
    p = hotelling_pvalue(X, mu)
    assert p > ALPHA, (scheme, p)
    # the replications are genuinely random (a constant estimator would pass trivially)
    assert X.std(axis=0).min() > 1e-3


# ---------------------------------------------------------------- negative control

NEG_TILES, NEG_S, NEG_D = 16, 8, 8


@pytest.fixture(scope="module")
def negative_case():
    """16 tiles of 256 tokens, logits ~ N(0, 3^2), a value offset per tile, S = 8: most tiles
    have little mass, so deterministic budgets drop several tiles entirely."""
    r = numpy.random.default_rng(77)
    n = NEG_TILES * sc.TILE
    K1 = r.standard_normal((n, NEG_D))
    q1 = r.standard_normal(NEG_D)
    q1 *= 3.0 / numpy.linalg.norm(q1)
    offsets = 2.0 * r.standard_normal((NEG_TILES, NEG_D))
    V1 = numpy.repeat(offsets, sc.TILE, axis=0) + 0.5 * r.standard_normal((n, NEG_D))
    return q1, K1, V1


def largest_remainder_budgets(W, S):
    """S_t = floor(S W_t) plus one for the tiles with the largest remainders (sum = S)."""
    raw = S * W
    budget = numpy.floor(raw).astype(int)
    rest = S - budget.sum()
    budget[numpy.argsort(-(raw - budget), kind="stable")[:rest]] += 1
    return budget


def paper_prop_estimator(p, V, S, R, rng):
    """The paper's 'prop' kernel: deterministic largest-remainder tile budgets, systematic
    inside each tile, output (1/S) sum_j counts_j V_j. Returns (R, d) outputs and the exact
    expectation of the estimator."""
    tiles = len(p) // sc.TILE
    P = p.reshape(tiles, sc.TILE)
    W = P.sum(axis=1)
    budget = largest_remainder_budgets(W / W.sum(), S)
    out = numpy.zeros((R, V.shape[1]))
    expectation = numpy.zeros(V.shape[1])
    for t in numpy.flatnonzero(budget):
        Vt = V[t * sc.TILE:(t + 1) * sc.TILE]
        pt = P[t] / W[t]
        F = numpy.cumsum(pt)
        U = rng.random(R)
        u = (numpy.arange(budget[t])[None, :] + U[:, None]) / budget[t]
        j = numpy.minimum(numpy.searchsorted(F, u, side="right"), sc.TILE - 1)
        out += Vt[j].sum(axis=1) / S
        expectation += budget[t] / S * (pt @ Vt)
    return out, expectation


def test_negative_control_largest_remainder_is_rejected(negative_case):
    q1, K1, V1 = negative_case
    p = softmax(K1 @ q1)
    mu = p @ V1
    R = 2048
    X, expectation = paper_prop_estimator(p, V1, NEG_S, R, numpy.random.default_rng(5))
    # design check (deterministic): tiles are dropped and the bias is large against the noise
    W = p.reshape(NEG_TILES, sc.TILE).sum(axis=1)
    dropped = largest_remainder_budgets(W, NEG_S) == 0
    assert W[dropped].sum() > 0.05                      # mass of tiles that are never sampled
    bias = expectation - mu
    cov = numpy.cov(X, rowvar=False)
    noncentrality = R * bias @ numpy.linalg.solve(cov, bias)
    crit = stats.chi2.isf(ALPHA, NEG_D)
    assert numpy.sqrt(noncentrality) > numpy.sqrt(crit) + 2 * Z_ONE
    # the assertion: the unbiasedness test rejects the paper's deterministic rounding
    assert hotelling_pvalue(X, mu) < ALPHA


def test_library_tile_scheme_passes_negative_control_case(negative_case):
    q1, K1, V1 = negative_case
    X, mu = replications(q1, K1, V1, "tile", NEG_S, batch=32, heads=64, base_seed=555)
    assert hotelling_pvalue(X, mu) > ALPHA


# ---------------------------------------------------------------- variance vs the analytic formulas

VAR_N, VAR_D, VAR_S = 512, 16, 32


def _variance_case(kind):
    r = numpy.random.default_rng(11 if kind == "peaked" else 12)
    K1 = r.standard_normal((VAR_N, VAR_D))
    q1 = r.standard_normal(VAR_D)
    if kind == "peaked":
        q1 *= 3.0 / numpy.linalg.norm(q1)          # logits ~ N(0, 3^2): a few rows hold the mass
        V1 = r.standard_normal((VAR_N, VAR_D))
    else:
        q1 *= 0.3 / numpy.linalg.norm(q1)          # nearly flat attention
        pos = numpy.arange(VAR_N)[:, None] / VAR_N  # values vary smoothly along the sequence
        freq = r.uniform(0.5, 3.0, VAR_D)
        phase = r.uniform(0, 2 * numpy.pi, VAR_D)
        V1 = numpy.sin(2 * numpy.pi * freq * pos + phase) + 0.3 * r.standard_normal((VAR_N, VAR_D))
    return q1, K1, V1


@pytest.fixture(scope="module", params=["peaked", "flat"])
def variance_case(request):
    q1, K1, V1 = _variance_case(request.param)
    p = softmax(K1 @ q1)
    analytic = {"iid": mse_iid(p, V1) / VAR_S,
                "stratified": mse_stratified(p, V1, VAR_S),
                "systematic": mse_systematic(p, V1, VAR_S)}
    errors = {}
    for i, scheme in enumerate(("iid", "stratified", "systematic")):
        X, mu = replications(q1, K1, V1, scheme, VAR_S, batch=64, heads=32, base_seed=50_000 + 10_000 * i)
        errors[scheme] = ((X - mu) ** 2).sum(axis=1)
    return request.param, analytic, errors


def test_analytic_ordering(variance_case):
    kind, analytic, _ = variance_case
    # Thm A.6: stratified <= iid always (Loewner); here both schemes beat iid clearly
    assert analytic["stratified"] <= analytic["iid"]
    assert analytic["stratified"] < 0.8 * analytic["iid"]
    assert analytic["systematic"] < 0.8 * analytic["iid"]


def test_stratified_formula_against_brute_force():
    """The within-stratum covariance formula, checked against direct enumeration of a tiny case."""
    r = numpy.random.default_rng(3)
    p = softmax(2 * r.standard_normal(7))
    V = r.standard_normal((7, 2))
    S = 3
    F = numpy.cumsum(p)
    grid = (numpy.arange(S)[:, None] + (numpy.arange(200_000)[None, :] + 0.5) / 200_000) / S
    j = numpy.minimum(numpy.searchsorted(F, grid, side="right"), 6)
    total = sum(V[j[m]].var(axis=0).sum() for m in range(S)) / S ** 2
    numpy.testing.assert_allclose(mse_stratified(p, V, S), total, rtol=1e-3)
    # and with one stratum it is the iid variance
    numpy.testing.assert_allclose(mse_stratified(p, V, 1), mse_iid(p, V), rtol=1e-12)
    numpy.testing.assert_allclose(mse_systematic(p, V, 1), mse_iid(p, V), rtol=1e-9)


@pytest.mark.parametrize("scheme", ["iid", "stratified", "systematic"])
def test_mse_matches_analytic(variance_case, scheme):
    """E||o - mu||^2 equals tr(Sigma)/S (iid), (1/S^2) sum_m tr Sigma^(m) (stratified) and the exact
    integral over U (systematic). Ratio test: z = (mean error - analytic) / SE, two-sided."""
    kind, analytic, errors = variance_case
    e = errors[scheme]
    z = (e.mean() - analytic[scheme]) / (e.std(ddof=1) / numpy.sqrt(len(e)))
    assert abs(z) < Z_TWO, (kind, scheme, e.mean() / analytic[scheme], z)


@pytest.mark.parametrize("scheme", ["stratified", "systematic"])
def test_mse_below_iid(variance_case, scheme):
    kind, analytic, errors = variance_case
    e, e_iid = errors[scheme], errors["iid"]
    # power check from the exact values: the expected z lies 2 z_ALPHA past the critical value
    se = numpy.sqrt(e.var(ddof=1) / len(e) + e_iid.var(ddof=1) / len(e_iid))
    assert (analytic[scheme] - analytic["iid"]) / se < -2 * Z_ONE
    assert welch_z(e, e_iid) < -Z_ONE, (kind, scheme, e.mean(), e_iid.mean())


# ---------------------------------------------------------------- Bernoulli (ternary) queries

TQ_D = 16


def _ternary_q(seed):
    q = numpy.random.default_rng(seed).standard_normal(TQ_D)
    return q


def _ternary_var(a, norm, B, scheme):
    """Variance of (norm / B) * hits for hit probability a: Binomial (iid) or floor/ceil (stratified)."""
    if scheme == "iid":
        return norm ** 2 * a * (1 - a) / B
    f = B * a - numpy.floor(B * a)
    return norm ** 2 * f * (1 - f) / B ** 2


@pytest.mark.parametrize("scheme", ["iid", "stratified"])
def test_ternary_query_unbiased_per_head(scheme):
    B, batch, heads = 3, 256, 8
    q1 = _ternary_q(1)
    q = numpy.ascontiguousarray(numpy.broadcast_to(q1, (batch, heads, TQ_D)))
    seeds = 7000 + numpy.arange(batch)
    est, _, _ = sc.ternary_query(q, B, scheme, seed=seeds)
    X = est.reshape(-1, TQ_D)
    norm = numpy.abs(q1).max()
    var = _ternary_var(numpy.abs(q1) / norm, norm, B, scheme)
    fixed = var < 1e-15
    numpy.testing.assert_allclose(X[:, fixed], numpy.broadcast_to(q1[fixed], X[:, fixed].shape), rtol=1e-12)
    assert (~fixed).sum() >= TQ_D - 2
    z = (X[:, ~fixed].mean(axis=0) - q1[~fixed]) / numpy.sqrt(var[~fixed] / len(X))
    assert stats.chi2.sf((z ** 2).sum(), (~fixed).sum()) > ALPHA
    if scheme == "iid":     # negative control: an estimate biased at the test's limit fails it
        assert stats.chi2.sf(((z + chi2_limit_shift((~fixed).sum())) ** 2).sum(), (~fixed).sum()) <= ALPHA


@pytest.mark.parametrize("scheme", ["iid", "stratified"])
def test_ternary_query_unbiased_mean_group(scheme):
    B, batch, kv_heads, group = 3, 512, 2, 3
    r = numpy.random.default_rng(2)
    q1 = r.standard_normal((kv_heads * group, TQ_D))
    q = numpy.ascontiguousarray(numpy.broadcast_to(q1, (batch,) + q1.shape))
    est, _, _ = sc.ternary_query(q, B, scheme, seed=9000 + numpy.arange(batch), kv_heads=kv_heads)
    m = numpy.abs(q1).reshape(kv_heads, group, TQ_D).mean(axis=1)
    norm = m.max(axis=-1, keepdims=True)
    var_m = _ternary_var(m / norm, norm, B, scheme)                      # Var(m_hat), (kv_heads, d)
    # heads of one group share m_hat: test the first head of each group (independent coordinates)
    first = numpy.arange(kv_heads) * group
    X = est[:, first]                                                    # (batch, kv_heads, d)
    var = (q1[first] / m) ** 2 * var_m
    fixed = var < 1e-15
    numpy.testing.assert_allclose(X[:, fixed], numpy.broadcast_to(q1[first][fixed], X[:, fixed].shape),
                                  rtol=1e-12)
    z = (X.mean(axis=0)[~fixed] - q1[first][~fixed]) / numpy.sqrt(var[~fixed] / batch)
    assert stats.chi2.sf((z ** 2).sum(), (~fixed).sum()) > ALPHA
    if scheme == "iid":     # negative control, as per head
        assert stats.chi2.sf(((z + chi2_limit_shift((~fixed).sum())) ** 2).sum(), (~fixed).sum()) <= ALPHA
    # the group's other heads are the same draw, rescaled: est_g / q_g is shared within the group
    ratio = est.reshape(batch, kv_heads, group, TQ_D) / q1.reshape(kv_heads, group, TQ_D)
    numpy.testing.assert_allclose(ratio, numpy.broadcast_to(ratio[:, :, :1], ratio.shape), rtol=1e-12)


@pytest.mark.parametrize("key_group", ["head", "mean"])
@pytest.mark.parametrize("scheme", ["iid", "stratified"])
def test_bernoulli_scores_unbiased(scheme, key_group):
    B, batch, n, heads = 4, 2048, 6, 2
    r = numpy.random.default_rng(31)
    q1 = r.standard_normal((heads, TQ_D))
    K1 = r.standard_normal((n, TQ_D))
    q = numpy.ascontiguousarray(numpy.broadcast_to(q1, (batch, heads, TQ_D)))
    k = numpy.ascontiguousarray(numpy.broadcast_to(K1[None, :, None, :], (batch, n, 1, TQ_D)))
    scale = 0.25
    seeds = 123_456 + numpy.arange(batch)
    s = sc.bernoulli_scores(q, k, B, scheme, seed=seeds, scale=scale, key_group=key_group)
    exact = (q1 @ K1.T * scale).ravel()
    X = s.reshape(batch, -1)
    assert X.std(axis=0).min() > 1e-3
    assert hotelling_pvalue(X, exact) > ALPHA
    if (scheme, key_group) == ("iid", "head"):     # negative control: a bias at the test's limit
        assert hotelling_pvalue(X + hotelling_limit_shift(X), exact) <= ALPHA


@pytest.mark.parametrize("scheme,slope_range", [("iid", (-1.1, -0.9)), ("stratified", (-2.3, -1.7))])
def test_ternary_variance_scaling(scheme, slope_range):
    """Total variance of the estimate of q over B in {2,...,32}: O(1/B) iid, O(1/B^2) stratified."""
    Bs = numpy.array([2, 4, 8, 16, 32])
    batch, heads, d = 256, 4, 32
    q1 = numpy.random.default_rng(8).standard_normal(d)
    q = numpy.ascontiguousarray(numpy.broadcast_to(q1, (batch, heads, d)))
    norm = numpy.abs(q1).max()
    empirical, analytic = [], []
    for i, B in enumerate(Bs):
        est, _, _ = sc.ternary_query(q, int(B), scheme, seed=40_000 + 1000 * i + numpy.arange(batch))
        X = est.reshape(-1, d)
        empirical.append(X.var(axis=0, ddof=1).sum())
        analytic.append(_ternary_var(numpy.abs(q1) / norm, norm, int(B), scheme).sum())
    slope = numpy.polyfit(numpy.log(Bs), numpy.log(empirical), 1)[0]
    slope_exact = numpy.polyfit(numpy.log(Bs), numpy.log(analytic), 1)[0]
    assert slope_range[0] < slope_exact < slope_range[1]        # design check (deterministic)
    assert slope_range[0] < slope < slope_range[1], (scheme, slope, slope_exact)
    # empirical variance within 15% of the analytic one at every B (relative SE here is ~2%)
    numpy.testing.assert_allclose(empirical, analytic, rtol=0.15)
    if scheme == "stratified":
        iid_at_32 = _ternary_var(numpy.abs(q1) / norm, norm, 32, "iid").sum()
        assert empirical[-1] < iid_at_32 / 5
