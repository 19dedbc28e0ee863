"""Philox4x32-10 counter-based RNG: the NumPy mirror of the stream the CUDA kernels draw.

Stream layout (the kernels in ``kernels_cu/philox.cuh`` implement the same, bit for bit)::

    key     = (seed & 0xffffffff, seed >> 32)             64-bit seed of the sequence
    counter = (block, head, sequence | purpose << 24, offset)

* ``block`` -- the i-th double of a stream comes from block ``i // 2``, words
  ``(2*(i % 2), 2*(i % 2) + 1)``: ``((w_a >> 5) * 2**26 + (w_b >> 6)) * 2**-53``, in [0, 1).
* ``head`` -- the query head (or the KV head for draws shared by a query group).
* ``sequence`` -- the batch index when one seed serves the whole batch, 0 when each sequence
  brings its own seed (so a request draws the same numbers wherever it sits in a batch).
* ``purpose`` -- :data:`VALUES` for value sampling, :data:`KEYS` for per-head ternary queries,
  :data:`GROUP_KEYS` for mean-group ternary queries.
* ``offset`` -- 0 for an explicit seed; a per-call counter when ``seed=None``.

Nothing in the layout depends on how a kernel is launched (grid, block or tile sizes).
Which double index each estimator uses is documented in :mod:`santa_cupy.reference`.
"""
import os
import threading

import numpy

VALUES = 0
KEYS = 1
GROUP_KEYS = 2

_M0, _M1 = numpy.uint64(0xD2511F53), numpy.uint64(0xCD9E8D57)
_W0, _W1 = numpy.uint32(0x9E3779B9), numpy.uint32(0xBB67AE85)
_MASK32 = numpy.uint64(0xFFFFFFFF)
_MAX_SEED = 2 ** 64


def philox4x32(counter, key, rounds=10):
    """Philox4x32 (Random123) on arrays.

    Parameters
    ----------
    counter : array_like of uint32, shape (..., 4)
    key : array_like of uint32, shape (..., 2), broadcastable against ``counter[..., :2]``

    Returns
    -------
    numpy.ndarray of uint32, shape (..., 4)
    """
    c = numpy.asarray(counter, dtype=numpy.uint32)
    k = numpy.asarray(key, dtype=numpy.uint32)
    shape = numpy.broadcast_shapes(c.shape[:-1], k.shape[:-1])
    c0, c1, c2, c3 = (numpy.broadcast_to(c[..., i], shape).astype(numpy.uint64) for i in range(4))
    k0 = numpy.broadcast_to(k[..., 0], shape).astype(numpy.uint32)
    k1 = numpy.broadcast_to(k[..., 1], shape).astype(numpy.uint32)
    with numpy.errstate(over="ignore"):
        for r in range(rounds):
            if r:
                k0 = k0 + _W0
                k1 = k1 + _W1
            p0 = _M0 * c0
            p1 = _M1 * c2
            c0, c1, c2, c3 = ((p1 >> numpy.uint64(32)) ^ c1 ^ k0.astype(numpy.uint64),
                              p1 & _MASK32,
                              (p0 >> numpy.uint64(32)) ^ c3 ^ k1.astype(numpy.uint64),
                              p0 & _MASK32)
    return numpy.stack([c0, c1, c2, c3], axis=-1).astype(numpy.uint32)


def uniforms(keys, heads, sequences, purpose, offset, index):
    """Doubles in [0, 1) of the documented stream.

    ``keys`` (uint64), ``heads``, ``sequences`` and ``index`` broadcast together; ``purpose``
    and ``offset`` are scalars. Returns float64 of the broadcast shape.
    """
    keys = numpy.asarray(keys, dtype=numpy.uint64)
    index = numpy.asarray(index, dtype=numpy.int64)
    heads = numpy.asarray(heads, dtype=numpy.int64)
    seq = numpy.asarray(sequences, dtype=numpy.int64)
    shape = numpy.broadcast_shapes(keys.shape, heads.shape, seq.shape, index.shape)
    counter = numpy.empty(shape + (4,), dtype=numpy.uint32)
    counter[..., 0] = index // 2
    counter[..., 1] = heads
    counter[..., 2] = (seq & 0xFFFFFF) | (int(purpose) << 24)
    counter[..., 3] = int(offset) & 0xFFFFFFFF
    key = numpy.empty(shape + (2,), dtype=numpy.uint32)
    key[..., 0] = keys & _MASK32
    key[..., 1] = keys >> numpy.uint64(32)
    words = philox4x32(counter, key).astype(numpy.uint64)
    second = numpy.broadcast_to(index % 2 == 1, shape)
    wa = numpy.where(second, words[..., 2], words[..., 0])
    wb = numpy.where(second, words[..., 3], words[..., 1])
    return ((wa >> numpy.uint64(5)).astype(numpy.float64) * 67108864.0
            + (wb >> numpy.uint64(6)).astype(numpy.float64)) * (1.0 / 9007199254740992.0)


class SeedPlan:
    """Per-sequence keys, sequence words and the call offset resolved from a ``seed`` argument."""

    def __init__(self, keys, sequences, offset, fresh):
        self.keys = keys            # uint64, (batch,)
        self.sequences = sequences  # int64, (batch,)
        self.offset = offset        # int, the counter word 3
        self.fresh = fresh          # True when drawn from the library counter (seed=None)


_lock = threading.Lock()
_base_key = int.from_bytes(os.urandom(8), "little")
_calls = 0


def _next_offset():
    global _calls
    with _lock:
        _calls += 1
        return _calls & 0xFFFFFFFF


def fresh_key():
    """The library's random base key (drawn from the OS once per process)."""
    return _base_key


def int_seed(seed):
    """A single int seed, checked to lie in [0, 2**64)."""
    if not 0 <= int(seed) < _MAX_SEED:
        raise ValueError(f"seed must be in [0, 2**64), got {seed}")
    return int(seed)


def resolve_seed(seed, batch):
    """Turn ``seed`` (int, per-sequence ints of shape (batch,), or None) into a :class:`SeedPlan`."""
    if seed is None:
        return SeedPlan(numpy.full(batch, _base_key, dtype=numpy.uint64),
                        numpy.arange(batch, dtype=numpy.int64), _next_offset(), True)
    if isinstance(seed, (bool, numpy.bool_)):
        raise TypeError("seed must be an int, an int array of shape (batch,) or None, not bool")
    if isinstance(seed, (int, numpy.integer)):
        return SeedPlan(numpy.full(batch, int_seed(seed), dtype=numpy.uint64),
                        numpy.arange(batch, dtype=numpy.int64), 0, False)
    if isinstance(seed, (list, tuple)):
        if not all(isinstance(x, (int, numpy.integer)) and not isinstance(x, bool) for x in seed):
            raise TypeError("seed must be an int, an int array of shape (batch,) or None")
        if any(not 0 <= int(x) < _MAX_SEED for x in seed):
            raise ValueError("seed values must be in [0, 2**64)")
        seed = numpy.array([int(x) for x in seed], dtype=numpy.uint64)
    arr = seed.get() if hasattr(seed, "get") and not isinstance(seed, numpy.ndarray) else numpy.asarray(seed)
    if arr.dtype.kind not in "iu":
        raise TypeError(f"seed must be an int, an int array of shape (batch,) or None, got dtype {arr.dtype}")
    if arr.shape != (batch,):
        raise ValueError(f"seed array must have shape ({batch},), got {arr.shape}")
    if arr.dtype.kind == "i" and (arr < 0).any():
        raise ValueError("seed values must be non-negative")
    return SeedPlan(arr.astype(numpy.uint64), numpy.zeros(batch, dtype=numpy.int64), 0, False)
