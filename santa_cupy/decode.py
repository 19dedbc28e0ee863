"""Public decode functions: NumPy arrays run the float64 reference, CuPy arrays the kernels."""
import importlib

import numpy

from . import _checks, reference, rng

_DLPACK_ROOTS = {"torch": "torch", "jax": "jax.numpy", "jaxlib": "jax.numpy"}


def _import_inputs(**arrays):
    """Bring DLPack tensors (PyTorch, JAX) in as CuPy arrays, zero-copy.

    Returns the converted arrays and a function that hands results back in the input's kind.
    """
    q = arrays["q"]
    root = type(q).__module__.split(".")[0]
    if root in ("numpy", "cupy") or not hasattr(q, "__dlpack__"):
        return arrays, lambda x: x
    try:
        import cupy
    except ImportError as e:
        raise TypeError("q is a DLPack tensor: converting it needs cupy") from e
    converted = {}
    for n, a in arrays.items():
        try:
            converted[n] = cupy.from_dlpack(a) if a is not None and hasattr(a, "__dlpack__") else a
        except Exception as e:
            raise TypeError(f"{n} could not be brought in through DLPack as a CUDA array: {e}") from e
    back = importlib.import_module(_DLPACK_ROOTS.get(root, root)).from_dlpack
    return converted, lambda x: back(x) if hasattr(x, "__dlpack__") else x


K_LAYOUTS = ("standard", "feature_major")


def _standard_view(k, k_layout):
    """``k`` seen in the standard layout (a view, no copy) when it is feature-major."""
    _checks.scheme_name("k_layout", k_layout, K_LAYOUTS)
    if k_layout == "standard":
        return k
    _checks.array_kind("k", k)
    if k.ndim != 4:
        raise ValueError("k (feature_major) must have shape (batch, kv_heads, head_dim, capacity) or "
                         f"(num_pages, kv_heads, head_dim, page_size), got {k.shape}")
    return reference.get_array_module(k).moveaxis(k, 3, 1)


def _decode_inputs(q, k, v, kv_lens, page_table, out, k_layout):
    """Arrays (DLPack tensors brought in; ``k`` as given, ``k_view`` in the standard layout),
    their :class:`Geometry`, their kind, and the function that hands results back in the
    caller's kind."""
    arrays, back = _import_inputs(q=q, k=k, v=v, kv_lens=kv_lens, page_table=page_table, out=out)
    q, k, v, kv_lens, page_table, out = (arrays[n] for n in ("q", "k", "v", "kv_lens", "page_table", "out"))
    k_view = _standard_view(k, k_layout)
    geo = _checks.geometry(q, k_view, v, kv_lens, page_table)
    return (q, k, k_view, v, kv_lens, page_table, out), geo, _checks.array_kind("q", q), back


def _flags(**flags):
    return [_checks.flag(n, v) for n, v in flags.items()]


def _returns(out, lse, extra, back):
    results = [back(out)]
    if lse is not None:
        results.append(back(lse))
    results.extend(back(x) for x in extra)
    return results[0] if len(results) == 1 else tuple(results)


def _kernel_path(kind, q, k, geo, key_draws, k_layout):
    """Which kernels run: ``'standard'``, ``'feature_major'``, or None for the reference.

    Ternary queries need a feature-major cache, whose token runs (``capacity`` or ``page_size``
    tokens) must split into 16-byte loads."""
    if kind != "cupy" or q.dtype.name not in ("float16", "bfloat16", "float32"):
        return None
    if geo.dim not in _checks.KERNEL_HEAD_DIMS or geo.group > _checks.MAX_GROUP_GPU:
        return None
    if k_layout == "standard":
        return None if key_draws is not None else "standard"
    aligned = (geo.page_size * q.dtype.itemsize) % 16 == 0 and k.data.ptr % 16 == 0
    return "feature_major" if aligned else None


def _key_codes(key_draws, key_scheme, key_group):
    """Kernel arguments of the score stage: (draws, stratified, group); 0 draws = exact scores."""
    from ._gpu import KEY_GROUP_CODES
    return (key_draws or 0, int(key_scheme == "stratified"), KEY_GROUP_CODES[key_group])


def _reference_inputs(q, k, v, kv_lens, page_table, key_draws, key_scheme, key_group, geo, seed_plan):
    K, V, lens = reference.dense_cache(k, v, kv_lens, page_table)
    xp = reference.get_array_module(q)
    qq = q.astype(xp.float64)
    if key_draws is not None:
        kv = geo.kv_heads if key_group == "mean" else None
        est, _, _ = reference.ternary_query(qq, key_draws, key_scheme, seed_plan, kv)
        qq = xp.asarray(est)
    return qq, K, V, lens


def _key_args(key_draws, key_scheme, key_group, names=("key_draws", "key_scheme")):
    _checks.scheme_name(names[1], key_scheme, ("iid", "stratified"))
    _checks.scheme_name("key_group", key_group, ("mean", "head"))
    if key_draws is not None:
        _checks.positive_int(names[0], key_draws)


EXACT_BELOW_BYTES = 64 << 20
"""Key bytes under which ``decode(..., dispatch='auto')`` computes exact attention (measured on an
H200: README, Performance)."""


def _exact_is_faster(geo, dtype):
    return geo.batch * geo.capacity * geo.kv_heads * geo.dim * dtype.itemsize < EXACT_BELOW_BYTES


def decode(q, k, v, samples=256, scheme="systematic", seed=None, kv_lens=None, page_table=None,
           scale=None, out=None, return_lse=False, return_counts=False, key_draws=None,
           key_scheme="stratified", key_group="mean", k_layout="standard", dispatch="sample", validate=True):
    """Decode attention with the value stage estimated from ``samples`` sampled value rows.

    The scores ``s = q K^T * scale`` and ``p = softmax(s)`` are exact; ``p V`` is replaced by
    an unbiased Monte-Carlo estimate that reads only the sampled rows of ``V``.

    Parameters
    ----------
    q : array (batch, q_heads, head_dim)
        One query token per sequence. float16, bfloat16, float32 (float64 on the reference).
    k, v : array
        Contiguous cache (batch, capacity, kv_heads, head_dim), or paged cache
        (num_pages, page_size, kv_heads, head_dim) with ``page_table``. ``q_heads`` must be a
        multiple of ``kv_heads`` (grouped-query attention, any group size).
    samples : int
        Draws per query head, S >= 1 (at most 4096 on the GPU).
    scheme : {'systematic', 'stratified', 'iid', 'tile'}
        How the S draws are made; all are unbiased. ``iid``: independent draws, variance
        ``tr(Sigma)/S``. ``stratified``: one uniform in each of S equal strata of the global CDF,
        variance never above iid's. ``systematic``: one shared uniform offset for all strata,
        in practice as good as stratified. ``tile``: every tile of 256 tokens gets the same
        budget ``max(1, S // tiles)`` and tiles are merged by their softmax mass; it spends
        draws on low-mass tiles and is kept for comparison with the paper.
    seed : int, int array (batch,), or None
        Same seed and inputs give bitwise identical output. ``None`` draws fresh randomness from
        a library counter on every call (kept on the device for CuPy inputs, so a captured CUDA
        graph draws new samples on each replay). A per-sequence array makes each sequence's draws
        independent of its position in the batch.
    kv_lens : int array (batch,), optional
        Valid tokens per sequence, 1 <= kv_lens <= capacity; required with ``page_table``.
        Defaults to the full capacity of a contiguous cache.
    page_table : int32 array (batch, max_pages), optional
        Page indices of each sequence; entries past ``ceil(kv_lens / page_size)`` are ignored.
    scale : float, optional
        Score scale, default ``1 / sqrt(head_dim)``.
    out : array (batch, q_heads, head_dim), optional
        Written in place; dtype of ``q``.
    return_lse : bool
        Also return the natural log-sum-exp of the scores, float32 (batch, q_heads): exact, or
        of the estimated scores with ``key_draws``.
    return_counts : bool
        Also return int32 (batch, q_heads, capacity) counts of draws per cache row
        (logical positions). Meant for analysis: it costs a pass over a dense buffer.
    key_draws : int, optional
        Estimate the scores too, from ``key_draws`` stochastic ternary queries
        (see :func:`ternary_query`): only the key features some draw selects are read. The
        scores are then unbiased; their softmax, and so the output, is not. The kernels need
        ``k_layout='feature_major'``; with a standard cache the reference runs (slowly).
    key_scheme : {'stratified', 'iid'}
    key_group : {'mean', 'head'}
        ``'mean'``: one feature set per query group (mean-group query); ``'head'``: per head.
    k_layout : {'standard', 'feature_major'}
        Layout of ``k``; ``'feature_major'`` is the layout of :mod:`santa_cupy.layout`
        (``v`` stays standard). On the GPU its token runs (``capacity``, or ``page_size`` for a
        paged cache) must be a multiple of 8 tokens for 16-bit types, 4 for float32; otherwise
        the reference runs.
    dispatch : {'sample', 'auto'}
        ``'auto'``: on the GPU, compute exact attention instead when the keys of the cache
        (``batch * capacity * kv_heads * head_dim * itemsize``, ``capacity`` of a paged cache being
        ``max_pages * page_size``) are under :data:`EXACT_BELOW_BYTES`: there, sampling's second
        launch and its pass over the scores cost more than the value rows it does not read. Not
        with ``return_counts`` or ``key_draws``, which need the draws. ``'sample'`` always samples.
    validate : bool
        Check values too: ``kv_lens`` range, page indices, NaN/Inf in ``q`` and in the cache rows
        within ``kv_lens``. On CuPy arrays this reads the whole cache and synchronises with the
        host; pass ``False`` in decode loops and CUDA graph capture (shapes and dtypes are always
        checked, and the kernels never read out of bounds whatever the values).

    Returns
    -------
    out : array (batch, q_heads, head_dim), dtype of ``q``
    lse : float32 array (batch, q_heads), if ``return_lse``
    counts : int32 array (batch, q_heads, capacity), if ``return_counts``
    """
    (q, k, k_view, v, kv_lens, page_table, out), geo, kind, back = _decode_inputs(
        q, k, v, kv_lens, page_table, out, k_layout)
    return_lse, return_counts, validate = _flags(return_lse=return_lse, return_counts=return_counts,
                                                 validate=validate)
    _checks.seed(seed, geo.batch, validate)
    _checks.scheme_name("scheme", scheme)
    _checks.scheme_name("dispatch", dispatch, ("sample", "auto"))
    _key_args(key_draws, key_scheme, key_group)
    path = _kernel_path(kind, q, k, geo, key_draws, k_layout)
    samples = _checks.positive_int("samples", samples, _checks.MAX_SAMPLES_GPU if path else None)
    scale = _checks.scale_value(scale, geo.dim)
    _checks.output(out, q.shape, q.dtype, kind)
    if validate or kind == "numpy":
        _checks.values(q, k_view, v, kv_lens, page_table, geo)
    if path == "standard" and dispatch == "auto" and not return_counts and _exact_is_faster(geo, q.dtype):
        from . import _gpu
        res, lse = _gpu.decode_exact(q, k, v, kv_lens, page_table, geo, scale, out, return_lse)
        return _returns(res, lse, [], back)
    if path:
        from . import _gpu
        keys = _key_codes(key_draws, key_scheme, key_group) if path == "feature_major" else None
        res, lse, counts = _gpu.decode(q, k, v, kv_lens, page_table, geo, scale, samples, scheme,
                                       seed, out, return_lse, return_counts, keys)
    else:
        plan = rng.resolve_seed(seed, geo.batch)
        qq, K, V, lens = _reference_inputs(q, k_view, v, kv_lens, page_table, key_draws, key_scheme,
                                           key_group, geo, plan)
        o, lse, counts = reference.decode(qq, K, V, lens, samples, scheme, plan, scale)
        res = _store(o, out, q.dtype)
        xp = reference.get_array_module(q)
        lse = lse.astype(numpy.float32) if return_lse else None
        if return_counts:
            full = numpy.zeros((geo.batch, geo.q_heads, geo.capacity), dtype=numpy.int32)
            full[..., :counts.shape[-1]] = counts
            counts = xp.asarray(full)
    extra = [counts] if return_counts else []
    return _returns(res, lse if return_lse else None, extra, back)


def decode_exact(q, k, v, kv_lens=None, page_table=None, scale=None, out=None, return_lse=False,
                 key_draws=None, key_scheme="stratified", key_group="mean", seed=None,
                 k_layout="standard", validate=True):
    """Exact decode attention ``softmax(q K^T * scale) V``.

    Shapes, layouts, dtypes and the arguments are those of :func:`decode`; ``key_draws`` (with
    ``key_scheme``, ``key_group`` and ``seed``) estimates the scores from ternary queries.
    On CuPy arrays with a standard cache it runs a split-KV kernel: each query group shares
    every K/V tile load, and the splits are merged in a fixed order (bitwise reproducible).
    A feature-major cache runs the score kernel of :func:`decode` and an exact ``p V`` pass.

    Returns
    -------
    out : array (batch, q_heads, head_dim), dtype of ``q``
    lse : float32 array (batch, q_heads), if ``return_lse``
    """
    (q, k, k_view, v, kv_lens, page_table, out), geo, kind, back = _decode_inputs(
        q, k, v, kv_lens, page_table, out, k_layout)
    return_lse, validate = _flags(return_lse=return_lse, validate=validate)
    _checks.seed(seed, geo.batch, validate)
    _key_args(key_draws, key_scheme, key_group)
    scale = _checks.scale_value(scale, geo.dim)
    _checks.output(out, q.shape, q.dtype, kind)
    if validate or kind == "numpy":
        _checks.values(q, k_view, v, kv_lens, page_table, geo)
    path = _kernel_path(kind, q, k, geo, key_draws, k_layout)
    if path == "standard":
        from . import _gpu
        res, lse = _gpu.decode_exact(q, k, v, kv_lens, page_table, geo, scale, out, return_lse)
    elif path:
        from . import _gpu
        res, lse = _gpu.decode_exact_scored(q, k, v, kv_lens, page_table, geo, scale, seed, out, return_lse,
                                            _key_codes(key_draws, key_scheme, key_group))
    else:
        plan = rng.resolve_seed(seed, geo.batch)
        qq, K, V, lens = _reference_inputs(q, k_view, v, kv_lens, page_table, key_draws, key_scheme,
                                           key_group, geo, plan)
        o, lse = reference.decode_exact(qq, K, V, lens, scale)
        res = _store(o, out, q.dtype)
        lse = lse.astype(numpy.float32)
    return _returns(res, lse if return_lse else None, [], back)


def _store(o, out, dtype):
    if out is None:
        return o.astype(dtype)
    out[...] = o.astype(dtype)
    return out


def sample(p, samples, scheme="systematic", seed=None, *, logits=False, lengths=None, counts=False):
    """Draw ``samples`` indices from each row of a batch of probability vectors.

    Parameters
    ----------
    p : array (n,), (rows, n) or (batch, heads, n)
        Non-negative weights (normalised internally) or, with ``logits=True``, logits. Row
        ``(b, h)`` draws from the stream of sequence ``b``, head ``h`` (a 2-D input is
        ``(rows, 1, n)``), the same stream :func:`decode` uses for query head ``h``.
    samples : int
        S >= 1.
    scheme : {'systematic', 'stratified', 'iid', 'tile'}
        See :func:`decode`.
    seed : int, int array (batch,), or None
    lengths : int array (batch,), optional
        Valid entries per row; the rest are never drawn (and set the ``tile`` scheme's tiles).
    counts : bool
        Return per-entry ``(counts, weights)`` of shape ``p.shape`` instead of draws.

    Returns
    -------
    indices : int64 array (..., m)
        The drawn entries; ``m = S`` for the global schemes (in order of the draw positions, so
        sorted for ``systematic`` and ``stratified``), ``T * max(1, S // T)`` for ``tile``.
    weights : float64 array (..., m)
        ``sum_m weights[m] * V[indices[m]]`` is the unbiased estimate of ``sum_j p_j V_j``.
        ``1/S`` for the global schemes; ``tile_mass / budget`` for ``tile`` (0 for padding).
    """
    _checks.array_kind("p", p)
    xp = reference.get_array_module(p)
    _checks.scheme_name("scheme", scheme)
    samples = _checks.positive_int("samples", samples)
    logits, counts = _flags(logits=logits, counts=counts)
    if p.dtype.kind not in "biuf" and p.dtype.name != "bfloat16":
        raise TypeError(f"p must be a real array, got {p.dtype}")
    if p.ndim not in (1, 2, 3) or min(p.shape) < 1:
        raise ValueError(f"p must have shape (n,), (rows, n) or (batch, heads, n), none empty, got {p.shape}")
    shape = p.shape
    p3 = p.reshape((1, 1, -1) if p.ndim == 1 else (shape[0], 1, -1) if p.ndim == 2 else shape)
    batch, _, n = p3.shape
    _checks.seed(seed, batch, True)
    w = xp.asarray(p3, dtype=xp.float64)
    if not bool(xp.isfinite(w).all()) and not logits:
        raise ValueError("p contains NaN or Inf")
    if logits:
        if bool(xp.isnan(w).any()) or bool((w == xp.inf).any()):
            raise ValueError("p (logits) contains NaN or +Inf")
        log_w = w
    else:
        if bool((w < 0).any()):
            raise ValueError("p must be non-negative")
        with numpy.errstate(divide="ignore"):
            log_w = xp.log(w)
    if lengths is None:
        lens = numpy.full(batch, n, dtype=numpy.int64)
    else:
        _checks.same_kind(p=p, lengths=lengths)
        if lengths.dtype.kind not in "iu":
            raise TypeError(f"lengths must be an integer array, got {lengths.dtype}")
        lens = _checks._host(lengths).astype(numpy.int64)
        if lens.shape != (batch,) or lens.min() < 1 or lens.max() > n:
            raise ValueError(f"lengths must have shape ({batch},) with values in [1, {n}]")
        log_w = xp.where(xp.arange(n)[None, None, :] < xp.asarray(lens)[:, None, None], log_w, -xp.inf)
    if not bool((log_w > -numpy.inf).any(axis=-1).all()):
        raise ValueError("p has a row with no positive weight")
    plan = rng.resolve_seed(seed, batch)
    idx, wts = reference.draw(log_w, samples, scheme, plan, lens)
    if counts:
        c, rw = reference.row_weights(idx, wts, n)
        return xp.asarray(c.reshape(shape)), xp.asarray(rw.reshape(shape))
    lead = shape[:-1]
    return xp.asarray(idx.reshape(lead + idx.shape[-1:])), xp.asarray(wts.reshape(lead + wts.shape[-1:]))


def ternary_query(q, draws, scheme="stratified", seed=None, kv_heads=None):
    """Stochastic ternary queries: an unbiased estimate of ``q`` that reads few key features.

    Per head (``kv_heads=None``): with ``norm = max_i |q_i|`` each of ``draws`` ternary queries
    has entries ``sign(q_i) * Bernoulli(|q_i| / norm)`` in {-1, 0, +1}; the estimate is
    ``(norm / B) * sum`` of them, so ``estimate . k`` is an unbiased estimate of ``q . k`` made
    of signed additions of the key features with a non-zero draw. ``stratified`` draws give each
    element ``floor(B a)`` or ``ceil(B a)`` hits, cutting the variance from O(1/B) to O(1/B^2).

    Mean group (``kv_heads`` given): the query group of each KV head shares one draw of
    ``m = mean_g |q_g|``, so the group reads one feature set; ``estimate_g = m_hat * q_g / m``.

    Parameters
    ----------
    q : array (batch, q_heads, head_dim)
    draws : int
        B >= 1 ternary draws.
    scheme : {'stratified', 'iid'}
    seed : int, int array (batch,), or None
    kv_heads : int, optional

    Returns
    -------
    estimate : float64 array (batch, q_heads, head_dim)
        Unbiased for ``q``; scores ``estimate . K^T`` are unbiased, their softmax is not.
    features : bool array (batch, heads, head_dim)
        Key features read (``heads`` = q_heads per head, kv_heads for the mean group).
    draws : uint8 array (B, batch, heads, head_dim)
        The Bernoulli draws (multiply by ``sign(q)`` for the ternary queries per head).
    """
    _checks.array_kind("q", q)
    xp = reference.get_array_module(q)
    _checks.float_dtype("q", q)
    if q.ndim != 3 or min(q.shape) < 1:
        raise ValueError(f"q must have shape (batch, q_heads, head_dim), none empty, got {q.shape}")
    draws = _checks.positive_int("draws", draws)
    _checks.seed(seed, q.shape[0], True)
    _checks.scheme_name("scheme", scheme, ("iid", "stratified"))
    if kv_heads is not None:
        _checks.positive_int("kv_heads", kv_heads)
        if q.shape[1] % kv_heads:
            raise ValueError(f"q_heads ({q.shape[1]}) must be a multiple of kv_heads ({kv_heads})")
    if not bool(xp.isfinite(q).all()):
        raise ValueError("q contains NaN or Inf")
    plan = rng.resolve_seed(seed, q.shape[0])
    est, feats, d = reference.ternary_query(q, draws, scheme, plan, kv_heads)
    return xp.asarray(est), xp.asarray(feats), xp.asarray(d)


def bernoulli_scores(q, k, draws, scheme="stratified", seed=None, kv_lens=None, page_table=None,
                     scale=None, key_group="mean", k_layout="standard", validate=True):
    """Scores estimated from ternary queries: ``(estimate . K^T) * scale``.

    Unbiased for the exact scores (their softmax is not); ``-inf`` past ``kv_lens``. Shape
    (batch, q_heads, n_max) where ``n_max`` is the longest sequence; float64 from the reference,
    float32 from the kernels (CuPy arrays with ``k_layout='feature_major'``, see :func:`decode`).
    The draws are those :func:`ternary_query` returns for the same seed; see it for ``key_group``.
    ``validate`` as for :func:`decode`.
    """
    k_view = _standard_view(k, k_layout)
    geo = _checks.geometry(q, k_view, k_view, kv_lens, page_table)
    kind = _checks.array_kind("q", q)
    [validate] = _flags(validate=validate)
    _checks.seed(seed, geo.batch, validate)
    _checks.positive_int("draws", draws)
    _key_args(draws, scheme, key_group, names=("draws", "scheme"))
    scale = _checks.scale_value(scale, geo.dim)
    if validate or kind == "numpy":
        _checks.values(q, k_view, k_view, kv_lens, page_table, geo)
    if _kernel_path(kind, q, k, geo, draws, k_layout):
        from . import _gpu
        return _gpu.key_scores(q, k, kv_lens, page_table, geo, scale, seed, _key_codes(draws, scheme, key_group))
    plan = rng.resolve_seed(seed, geo.batch)
    qq, K, _, lens = _reference_inputs(q, k_view, k_view, kv_lens, page_table, draws, scheme, key_group,
                                       geo, plan)
    return reference.scores(qq, K, lens, scale)
