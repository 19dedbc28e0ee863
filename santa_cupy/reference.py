"""Float64 reference of every estimator: the oracle the kernels are tested against.

Every function takes NumPy or CuPy arrays (``get_array_module``) and computes in float64, so on
CuPy arrays it doubles as a slow GPU path. Conventions shared with the kernels:

* A sequence of ``n`` valid tokens is split into tiles of :data:`TILE` tokens (the last one may be
  short). Tiles matter only to the ``tile`` scheme; the global schemes draw over the whole CDF.
* Draw positions ``u`` in [0, 1) pick row ``J = F^-1(u)``, the first row whose inclusive CDF
  ``F_J`` exceeds ``u`` (``searchsorted(F, u, side="right")``), never a row of zero probability.
* Random doubles come from :func:`santa_cupy.rng.uniforms` with purpose ``VALUES``, head = query
  head, and the double index below:

  ============  ==============================================  ========================
  scheme        draw positions                                  double index
  ============  ==============================================  ========================
  iid           ``u_m = U_m``, m = 0..S-1                        m
  stratified    ``u_m = (m + U_m) / S``                         m
  systematic    ``u_m = (m + U) / S``                           0 (one U per head)
  tile          tile t: ``u_k = (k + U_t) / b``, k = 0..b-1,     t
                ``b = max(1, S // T)``, T tiles, over the
                tile's own CDF; draws weigh ``mass_t / b``
  ============  ==============================================  ========================

  The global schemes weigh every draw ``1 / S``.
"""
import math

import numpy

from . import rng

TILE = 256
SCHEMES = ("iid", "stratified", "systematic", "tile")


def get_array_module(*arrays):
    for a in arrays:
        if a is not None and type(a).__module__.split(".")[0] == "cupy":
            import cupy
            return cupy
    return numpy


def _to_numpy(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, numpy.ndarray) else numpy.asarray(x)


# ---------------------------------------------------------------- cache and scores

def dense_cache(k, v, kv_lens=None, page_table=None):
    """Gather a contiguous or paged cache into float64 (batch, n_max, kv_heads, dim) arrays.

    Returns ``(K, V, lens)``; rows at or beyond ``lens[b]`` are zero.
    """
    xp = get_array_module(k)
    if page_table is None:
        batch, cap = k.shape[:2]
        lens = xp.full(batch, cap, dtype=xp.int64) if kv_lens is None else xp.asarray(kv_lens).astype(xp.int64)
        K, V = k.astype(xp.float64), v.astype(xp.float64)
    else:
        page_size = k.shape[1]
        lens = xp.asarray(kv_lens).astype(xp.int64)
        batch, max_pages = page_table.shape
        pt = xp.asarray(page_table).astype(xp.int64)
        n_pages = max(1, -(-int(lens.max()) // page_size))
        pages = xp.clip(pt[:, :n_pages], 0, k.shape[0] - 1)
        K = k[pages].astype(xp.float64).reshape(batch, n_pages * page_size, *k.shape[2:])
        V = v[pages].astype(xp.float64).reshape(batch, n_pages * page_size, *v.shape[2:])
    n_max = int(lens.max())
    valid = xp.arange(n_max)[None, :] < lens[:, None]
    K = xp.where(valid[:, :, None, None], K[:, :n_max], 0.0)
    V = xp.where(valid[:, :, None, None], V[:, :n_max], 0.0)
    return K, V, lens


def scores(q, K, lens, scale=None):
    """Scaled scores ``q . K^T * scale`` as float64 (batch, q_heads, n), ``-inf`` past ``lens``."""
    xp = get_array_module(q, K)
    batch, q_heads, dim = q.shape
    kv_heads = K.shape[2]
    group = q_heads // kv_heads
    scale = 1.0 / math.sqrt(dim) if scale is None else float(scale)
    qg = q.astype(xp.float64).reshape(batch, kv_heads, group, dim)
    s = xp.einsum("bkgd,bnkd->bkgn", qg, K).reshape(batch, q_heads, -1) * scale
    valid = xp.arange(K.shape[1])[None, :] < lens[:, None]
    return xp.where(valid[:, None, :], s, -xp.inf)


def log_sum_exp(s):
    xp = get_array_module(s)
    m = s.max(axis=-1, keepdims=True)
    return (m + xp.log(xp.exp(s - m).sum(axis=-1, keepdims=True)))[..., 0]


def softmax(s):
    xp = get_array_module(s)
    return xp.exp(s - log_sum_exp(s)[..., None])


def weighted_values(weights, V):
    """``sum_j weights[b, h, j] * V[b, j, h // group]`` -> float64 (batch, q_heads, dim)."""
    xp = get_array_module(weights, V)
    batch, q_heads, n = weights.shape
    kv_heads = V.shape[2]
    w = weights.reshape(batch, kv_heads, q_heads // kv_heads, n)
    return xp.einsum("bkgn,bnkd->bkgd", w, V).reshape(batch, q_heads, -1)


# ---------------------------------------------------------------- sampling

def _stream(plan, batch, heads, index):
    """Doubles of shape (batch, heads, len(index)) from each (sequence, head) stream."""
    b = numpy.arange(batch)[:, None, None]
    h = numpy.arange(heads)[None, :, None]
    return rng.uniforms(plan.keys[b], h, plan.sequences[b], rng.VALUES, plan.offset,
                        numpy.asarray(index)[None, None, :])


def draw(log_w, samples, scheme, plan, lens):
    """Draw from the rows of ``log_w`` (batch, heads, n; ``-inf`` = never drawn).

    Returns ``(indices, weights)`` of shape (batch, heads, m) as NumPy arrays; the estimate of
    ``sum_j p_j V_j`` is ``sum_m weights[m] * V[indices[m]]``. For the global schemes ``m = S``
    and every weight is ``1/S``; for ``tile``, ``m = T_max * b_max`` and padding draws weigh 0.
    """
    s = _to_numpy(log_w).astype(numpy.float64)
    lens = _to_numpy(lens).astype(numpy.int64)
    batch, heads, n = s.shape
    S = int(samples)
    if scheme == "tile":
        return _draw_tile(s, S, plan, lens)
    m = numpy.arange(S)
    if scheme == "systematic":
        u = (m[None, None, :] + _stream(plan, batch, heads, [0])) / S
    elif scheme == "stratified":
        u = (m[None, None, :] + _stream(plan, batch, heads, m)) / S
    elif scheme == "iid":
        u = _stream(plan, batch, heads, m)
    else:
        raise ValueError(f"unknown scheme {scheme!r}")
    p = numpy.exp(s - log_sum_exp(s)[..., None])
    F = numpy.cumsum(p, axis=-1)
    positive = p > 0
    last = n - 1 - numpy.argmax(positive[..., ::-1], axis=-1)
    idx = numpy.empty((batch, heads, S), dtype=numpy.int64)
    for b in range(batch):
        for h in range(heads):
            idx[b, h] = numpy.minimum(numpy.searchsorted(F[b, h], u[b, h], side="right"), last[b, h])
    return idx, numpy.full(idx.shape, 1.0 / S)


def tile_budget(n, samples):
    """Tiles and per-tile draws of the ``tile`` scheme for a sequence of ``n`` tokens."""
    tiles = -(-int(n) // TILE)
    return tiles, max(1, int(samples) // tiles)


def _draw_tile(s, S, plan, lens):
    batch, heads, _ = s.shape
    shapes = [tile_budget(lens[b], S) for b in range(batch)]
    width = max(t * bb for t, bb in shapes)
    idx = numpy.zeros((batch, heads, width), dtype=numpy.int64)
    wts = numpy.zeros((batch, heads, width))
    for b, (T, bb) in enumerate(shapes):
        sb = numpy.full((heads, T * TILE), -numpy.inf)
        sb[:, :lens[b]] = s[b, :, :lens[b]]
        sb = sb.reshape(heads, T, TILE)
        mt = sb.max(axis=-1, keepdims=True)
        e = numpy.exp(sb - mt)
        tot = e.sum(axis=-1, keepdims=True)
        F = numpy.cumsum(e, axis=-1) / tot
        lse_t = (mt + numpy.log(tot))[..., 0]
        mass = numpy.exp(lse_t - log_sum_exp(lse_t)[..., None])          # (heads, T)
        U = _stream(plan, batch, heads, numpy.arange(T))[b]              # (heads, T)
        u = (numpy.arange(bb)[None, None, :] + U[..., None]) / bb        # (heads, T, bb)
        j = (F[:, :, None, :] <= u[..., None]).sum(axis=-1)
        last = TILE - 1 - numpy.argmax((e > 0)[..., ::-1], axis=-1)
        j = numpy.minimum(j, last[..., None])
        pos = j + (numpy.arange(T) * TILE)[None, :, None]
        idx[b, :, :T * bb] = pos.reshape(heads, T * bb)
        wts[b, :, :T * bb] = numpy.repeat(mass / bb, bb, axis=-1)
    return idx, wts


def row_weights(indices, weights, n):
    """Scatter draws into per-row ``(counts, weights)`` of shape (batch, heads, n)."""
    batch, heads, m = indices.shape
    flat = (numpy.arange(batch * heads)[:, None] * n + indices.reshape(batch * heads, m)).ravel()
    real = (weights.reshape(batch * heads, m) > 0).ravel()
    counts = numpy.bincount(flat[real], minlength=batch * heads * n).reshape(batch, heads, n)
    w = numpy.bincount(flat, weights=weights.ravel(), minlength=batch * heads * n)
    return counts, w.reshape(batch, heads, n)


# ---------------------------------------------------------------- Bernoulli (ternary) queries

def ternary_draws(a, draws, scheme, plan, purpose, heads_index):
    """Bernoulli draws ``b[n, ..., i] = 1[u < a_i]`` for probabilities ``a`` (batch, heads, dim).

    ``iid``: ``u = U_{n,i}``; ``stratified``: ``u = (n + U_{n,i}) / B``, so each element's draw
    count is ``floor(B a_i)`` or ``ceil(B a_i)``. Double index ``i * B + n``.
    Returns uint8 of shape (B, batch, heads, dim).
    """
    batch, heads, dim = a.shape
    B = int(draws)
    n = numpy.arange(B)
    index = numpy.arange(dim)[None, None, :, None] * B + n
    b = numpy.arange(batch)[:, None, None, None]
    h = numpy.asarray(heads_index)[None, :, None, None]
    U = rng.uniforms(plan.keys[b], h, plan.sequences[b], purpose, plan.offset, index)
    if scheme == "stratified":
        U = (n + U) / B
    elif scheme != "iid":
        raise ValueError(f"unknown key_scheme {scheme!r}; expected 'iid' or 'stratified'")
    return numpy.moveaxis((U < a[..., None]).astype(numpy.uint8), -1, 0)


def ternary_query(q, draws, scheme, plan, kv_heads=None):
    """Unbiased ternary estimate of ``q`` (batch, q_heads, dim).

    Per head (``kv_heads=None``): ``norm = max|q|``, ``q_hat = sign(q) * b`` with
    ``b ~ Bernoulli(|q| / norm)``, estimate ``(norm / B) * sum_n q_hat``.
    Mean group (``kv_heads`` given): ``m = mean_g |q_g|`` over each query group, ``norm = max m``,
    ``m_hat = (norm / B) * sum_n b`` with ``b ~ Bernoulli(m / norm)``, estimate
    ``m_hat * q_g / m`` (0 where ``m = 0``); the whole group reads one feature set.

    Returns ``(estimate float64 (batch, q_heads, dim), features bool, draws uint8)`` where
    ``features`` marks the key features read, (batch, q_heads, dim) per head or
    (batch, kv_heads, dim) per group.
    """
    qn = _to_numpy(q).astype(numpy.float64)
    batch, q_heads, dim = qn.shape
    B = int(draws)
    if kv_heads is None:
        norm = numpy.abs(qn).max(axis=-1, keepdims=True)
        a = numpy.divide(numpy.abs(qn), norm, out=numpy.zeros_like(qn), where=norm > 0)
        d = ternary_draws(a, B, scheme, plan, rng.KEYS, numpy.arange(q_heads))
        est = norm * numpy.sign(qn) * d.sum(axis=0) / B
        return est, d.any(axis=0), d
    group = q_heads // kv_heads
    mag = numpy.abs(qn).reshape(batch, kv_heads, group, dim)
    m = mag.mean(axis=2)
    norm = m.max(axis=-1, keepdims=True)
    a = numpy.divide(m, norm, out=numpy.zeros_like(m), where=norm > 0)
    d = ternary_draws(a, B, scheme, plan, rng.GROUP_KEYS, numpy.arange(kv_heads))
    m_hat = norm * d.sum(axis=0) / B
    ratio = numpy.divide(qn.reshape(batch, kv_heads, group, dim), m[:, :, None, :],
                         out=numpy.zeros_like(mag), where=m[:, :, None, :] > 0)
    est = (m_hat[:, :, None, :] * ratio).reshape(batch, q_heads, dim)
    return est, d.any(axis=0), d


# ---------------------------------------------------------------- decode

def decode(q, K, V, lens, samples, scheme, plan, scale=None):
    """SANTA decode on a dense float64 cache. Returns ``(out, lse, counts)``.

    ``counts`` (batch, q_heads, n) says how many draws hit each row.
    """
    xp = get_array_module(q, K)
    s = scores(q, K, lens, scale)
    idx, wts = draw(s, samples, scheme, plan, lens)
    counts, w = row_weights(idx, wts, s.shape[-1])
    out = weighted_values(xp.asarray(w), V)
    return out, log_sum_exp(s), counts


def decode_exact(q, K, V, lens, scale=None):
    """Exact decode attention ``softmax(q K^T * scale) V``. Returns ``(out, lse)``."""
    s = scores(q, K, lens, scale)
    return weighted_values(softmax(s), V), log_sum_exp(s)
