"""Input validation: every bad argument raises before any kernel launch, naming the argument."""
import math
import numbers

import numpy

from . import rng
from .reference import SCHEMES, get_array_module

FLOAT_KINDS = ("float16", "bfloat16", "float32", "float64")
KERNEL_HEAD_DIMS = (64, 128, 256)
MAX_SAMPLES_GPU = 4096
MAX_GROUP_GPU = 16


class Geometry:
    """Shapes of one decode problem, read off validated arguments."""

    def __init__(self, batch, q_heads, kv_heads, dim, paged, capacity, page_size):
        self.batch, self.q_heads, self.kv_heads, self.dim = batch, q_heads, kv_heads, dim
        self.group = q_heads // kv_heads
        self.paged, self.capacity, self.page_size = paged, capacity, page_size


def _kind(x):
    mod = type(x).__module__.split(".")[0]
    return mod if mod in ("numpy", "cupy") else None


def array_kind(name, x):
    kind = _kind(x)
    if kind:
        return kind
    raise TypeError(f"{name} must be a numpy or cupy array (convert DLPack tensors with "
                    f"cupy.from_dlpack), got {type(x).__name__}")


def same_kind(**arrays):
    """All given arrays are numpy, or all are cupy on one device. Returns the module name."""
    kinds = {n: array_kind(n, a) for n, a in arrays.items() if a is not None}
    first = next(iter(kinds))
    for n, k in kinds.items():
        if k != kinds[first]:
            raise TypeError(f"{n} is a {k} array but {first} is a {kinds[first]} array; "
                            "mix of array kinds")
    if kinds[first] == "cupy":
        devs = {n: a.device.id for n, a in arrays.items() if a is not None}
        for n, d in devs.items():
            if d != devs[first]:
                raise ValueError(f"{n} is on device {d} but {first} is on device {devs[first]}")
    return kinds[first]


def float_dtype(name, x):
    if x.dtype.name not in FLOAT_KINDS:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def positive_int(name, value, upper=None):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    if upper is not None and value > upper:
        raise ValueError(f"{name} must be <= {upper}, got {value}")
    return int(value)


def flag(name, value):
    if not isinstance(value, (bool, numpy.bool_)):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")
    return bool(value)


def scheme_name(name, value, allowed=SCHEMES):
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, allowed))}, got {value!r}")
    return value


def scale_value(scale, dim):
    if scale is None:
        return 1.0 / math.sqrt(dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number, got {type(scale).__name__}")
    if not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and > 0, got {scale}")
    return float(scale)


def _host(x):
    return x.get() if hasattr(x, "get") and not isinstance(x, numpy.ndarray) else numpy.asarray(x)


def seed(value, batch, read_device):
    """Check ``seed`` (see :func:`rng.resolve_seed`) before any work. The values of a CuPy seed
    array are read (a synchronisation) only with ``read_device``."""
    if value is None:
        return
    if _kind(value) == "cupy":
        if value.dtype.kind not in "iu":
            raise TypeError(f"seed must be an int, an int array of shape (batch,) or None, got dtype {value.dtype}")
        if value.shape != (batch,):
            raise ValueError(f"seed array must have shape ({batch},), got {value.shape}")
        if read_device and value.dtype.kind == "i" and bool((value < 0).any()):
            raise ValueError("seed values must be non-negative")
        return
    rng.resolve_seed(value, batch)


def geometry(q, k, v, kv_lens, page_table):
    """Check shapes, dtypes and layout of a decode call; return its :class:`Geometry`."""
    same_kind(q=q, k=k, v=v, kv_lens=kv_lens, page_table=page_table)
    for n, x in (("q", q), ("k", k), ("v", v)):
        float_dtype(n, x)
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q and k must share one dtype, got {q.dtype}, {k.dtype}" if v is k else
                        f"q, k and v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.ndim != 3:
        raise ValueError(f"q must have shape (batch, q_heads, head_dim), got {q.shape}")
    if k.ndim != 4:
        raise ValueError("k must have shape (batch, capacity, kv_heads, head_dim) or "
                         f"(num_pages, page_size, kv_heads, head_dim), got {k.shape}")
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {k.shape}, got {v.shape}")
    batch, q_heads, dim = q.shape
    kv_heads = k.shape[2]
    if k.shape[3] != dim:
        raise ValueError(f"k head_dim {k.shape[3]} differs from q head_dim {dim}")
    if min(q.shape) < 1 or min(k.shape) < 1:
        raise ValueError(f"q and k must not be empty, got {q.shape} and {k.shape}")
    if q_heads % kv_heads:
        raise ValueError(f"q_heads ({q_heads}) must be a multiple of kv_heads ({kv_heads}) of k")
    if page_table is None:
        if k.shape[0] != batch:
            raise ValueError(f"k batch {k.shape[0]} differs from q batch {batch} "
                             "(pass page_table for a paged cache)")
        geo = Geometry(batch, q_heads, kv_heads, dim, False, k.shape[1], k.shape[1])
    else:
        if kv_lens is None:
            raise ValueError("kv_lens is required with page_table")
        if page_table.ndim != 2 or page_table.shape[0] != batch:
            raise ValueError(f"page_table must have shape (batch={batch}, max_pages), got {page_table.shape}")
        if page_table.dtype.kind not in "iu":
            raise TypeError(f"page_table must be an integer array, got {page_table.dtype}")
        if page_table.shape[1] < 1:
            raise ValueError(f"page_table must have at least one column, got {page_table.shape}")
        geo = Geometry(batch, q_heads, kv_heads, dim, True, page_table.shape[1] * k.shape[1], k.shape[1])
    if kv_lens is not None:
        if kv_lens.shape != (batch,):
            raise ValueError(f"kv_lens must have shape ({batch},), got {kv_lens.shape}")
        if kv_lens.dtype.kind not in "iu":
            raise TypeError(f"kv_lens must be an integer array, got {kv_lens.dtype}")
    return geo


def values(q, k, v, kv_lens, page_table, geo, check_cache=True):
    """Check the values of lengths, page indices and (with ``check_cache``) finiteness.

    On CuPy arrays this reads results back to the host (one synchronisation).
    """
    xp = get_array_module(q)
    lens = None
    if kv_lens is not None:
        lens = _host(kv_lens)             # compared in its own dtype: uint64 does not wrap
        if lens.min() < 1 or lens.max() > geo.capacity:
            bad = int(lens.min() if lens.min() < 1 else lens.max())
            raise ValueError(f"kv_lens values must be in [1, {geo.capacity}], got {bad}")
        lens = lens.astype(numpy.int64)
    if page_table is not None:
        pt = _host(page_table)
        used = numpy.arange(pt.shape[1])[None, :] < -(-lens[:, None] // geo.page_size)
        bad = used & ((pt < 0) | (pt >= k.shape[0]))
        if bad.any():
            b, j = map(int, numpy.argwhere(bad)[0])
            raise ValueError(f"page_table[{b}, {j}] = {pt[b, j]} is out of range [0, {k.shape[0]})")
    if not bool(xp.isfinite(q).all()):
        raise ValueError("q contains NaN or Inf")
    if check_cache:
        for name, x in (("k", k), ("v", v)):
            if not _used_rows_finite(x, lens, page_table, geo):
                raise ValueError(f"{name} contains NaN or Inf in rows within kv_lens")


def _used_rows_finite(x, lens, page_table, geo):
    xp = get_array_module(x)
    if page_table is None:
        if lens is None:
            return bool(xp.isfinite(x).all())
        ok = xp.isfinite(x).all(axis=(2, 3))
        valid = xp.arange(geo.capacity)[None, :] < xp.asarray(lens)[:, None]
        return bool((ok | ~valid).all())
    ok = xp.isfinite(x).all(axis=(2, 3))              # (num_pages, page_size)
    pt = xp.clip(xp.asarray(page_table).astype(xp.int64), 0, x.shape[0] - 1)
    rows = ok[pt].reshape(geo.batch, -1)               # (batch, max_pages * page_size)
    valid = xp.arange(rows.shape[1])[None, :] < xp.asarray(lens)[:, None]
    return bool((rows | ~valid).all())


def output(out, shape, dtype, kind):
    if out is None:
        return
    if array_kind("out", out) != kind:
        raise TypeError(f"out must be a {kind} array like q")
    if out.shape != shape or out.dtype != dtype:
        raise ValueError(f"out must have shape {shape} and dtype {dtype}, got {out.shape} {out.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous")
    writeable("out", out)


def writeable(name, x):
    if not getattr(x.flags, "writeable", True):      # (CuPy arrays always are)
        raise ValueError(f"{name} must be writeable")
