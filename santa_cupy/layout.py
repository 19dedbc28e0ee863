"""Feature-major key caches: within each sequence or page, features outer and tokens inner.

A ternary query reads only the key features it draws; in this layout one feature of many tokens
is one contiguous run, so skipped features save whole memory transactions.

===========  ==========================================  ==========================================
cache        standard layout                             feature-major layout
===========  ==========================================  ==========================================
contiguous   ``(batch, capacity, kv_heads, head_dim)``   ``(batch, kv_heads, head_dim, capacity)``
paged        ``(num_pages, page_size, kv_heads, dim)``   ``(num_pages, kv_heads, dim, page_size)``
===========  ==========================================  ==========================================

Both are the token axis moved last, so one pair of functions serves both; page tables are
unchanged.
"""
from . import _checks
from .reference import get_array_module


def _cache(name, x):
    _checks.array_kind(name, x)
    _checks.float_dtype(name, x)
    if x.ndim != 4:
        raise ValueError(f"{name} must be a 4-D cache, got shape {x.shape}")
    return get_array_module(x)


def to_feature_major(k):
    """Copy a standard key cache into the feature-major layout (a new C-contiguous array)."""
    xp = _cache("k", k)
    return xp.ascontiguousarray(xp.moveaxis(k, 1, 3))


def from_feature_major(k_fm):
    """Copy a feature-major key cache back into the standard layout."""
    xp = _cache("k_fm", k_fm)
    return xp.ascontiguousarray(xp.moveaxis(k_fm, 3, 1))


def _in_range(name, x, end):
    """Values of ``x`` (batch,) in [0, end), else a ValueError naming the first bad sequence."""
    bad = _checks._host((x < 0) | (x >= end))
    if bad.any():
        b = int(bad.argmax())
        raise ValueError(f"{name} must be in [0, {end}), got {int(x[b])} for sequence {b}")


def append_feature_major(k_fm, k_new, positions, page_table=None):
    """Write one new key per sequence into a feature-major cache, in place.

    Parameters
    ----------
    k_fm : array, feature-major cache (see the module table)
    k_new : array (batch, kv_heads, head_dim), dtype of ``k_fm``
    positions : int array (batch,)
        Token position of the new key in each sequence (usually its length before the append).
    page_table : int array (batch, max_pages), optional
        For a paged cache: the page of position ``p`` is ``page_table[b, p // page_size]``.

    Returns
    -------
    k_fm
    """
    xp = _cache("k_fm", k_fm)
    _checks.same_kind(k_fm=k_fm, k_new=k_new, positions=positions, page_table=page_table)
    _checks.writeable("k_fm", k_fm)
    if k_new.dtype != k_fm.dtype:
        raise TypeError(f"k_new dtype {k_new.dtype} differs from k_fm dtype {k_fm.dtype}")
    batch = k_new.shape[0] if k_new.ndim == 3 else -1
    if k_new.ndim != 3 or k_new.shape[1:] != k_fm.shape[1:3]:
        raise ValueError(f"k_new must have shape (batch, {k_fm.shape[1]}, {k_fm.shape[2]}), got {k_new.shape}")
    if positions.dtype.kind not in "iu":
        raise TypeError(f"positions must be an integer array, got {positions.dtype}")
    if positions.shape != (batch,):
        raise ValueError(f"positions must have shape ({batch},), got {positions.shape}")
    pos = xp.asarray(positions).astype(xp.int64)
    width = k_fm.shape[3]
    if page_table is None:
        if k_fm.shape[0] != batch:
            raise ValueError(f"k_fm batch {k_fm.shape[0]} differs from k_new batch {batch}")
        _in_range("positions", pos, width)
        rows, cols = xp.arange(batch), pos
    else:
        if page_table.dtype.kind not in "iu":
            raise TypeError(f"page_table must be an integer array, got {page_table.dtype}")
        if page_table.ndim != 2 or page_table.shape[0] != batch:
            raise ValueError(f"page_table must have shape ({batch}, max_pages), got {page_table.shape}")
        _in_range("positions", pos, page_table.shape[1] * width)
        rows = xp.asarray(page_table).astype(xp.int64)[xp.arange(batch), pos // width]
        _in_range("page_table entries for the positions", rows, k_fm.shape[0])
        cols = pos % width
    k_fm[rows, :, :, cols] = k_new
    return k_fm
