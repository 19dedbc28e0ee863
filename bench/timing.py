"""GPU timing helpers: CUDA events, L2 flush, copy bandwidth, progress bar.

Everything runs on CuPy's current stream; :func:`share_stream` puts PyTorch (and so FlashInfer)
on the same stream, so one pair of CUDA events brackets a launch from either library.
"""
import functools
import statistics
import sys

HOLD_US = 300   # GPU time queued before each start event: more than any method's host cost per call

_HOLD_SOURCE = r"""
extern "C" __global__ void hold(unsigned long long ns) {
  unsigned long long t0, t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
  do {
    __nanosleep(1000);
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  } while (t - t0 < ns);
}
"""


@functools.cache
def _hold_kernel():
    import cupy
    return cupy.RawKernel(_HOLD_SOURCE, "hold")


def hold(us):
    """Keep the GPU busy for ``us`` microseconds (one thread sleeping on the global timer)."""
    import cupy
    import numpy
    _hold_kernel()((1,), (1,), (numpy.uint64(int(us * 1000)),))


def share_stream():
    """Make PyTorch's current stream CuPy's current stream (a no-op when both are the legacy
    default stream, as they are out of the box). Returns the stream's handle."""
    import cupy
    ptr = cupy.cuda.get_current_stream().ptr
    try:
        import torch
    except ImportError:
        return ptr
    if torch.cuda.current_stream().cuda_stream != ptr:
        torch.cuda.set_stream(torch.cuda.ExternalStream(ptr))
    return ptr


def flush_mode(meta):
    """How the L2 was flushed for a results file's ``meta``: results from before the read flush
    (bench/NOTES.md, version 76) carry no ``flush`` field and were flushed by writing."""
    return meta.get("flush", "write")


class L2Flush:
    """Evicts the L2 cache by streaming a buffer much larger than it (H100: 50 MB, H200: 60 MB).

    ``mode="read"`` (the default) reads the buffer, so the timed launch finds the L2 full of clean
    lines, as a decode step's attention finds it after kernels that read weights.
    ``mode="write"`` fills the buffer, which leaves the L2 full of dirty lines that are written
    back while the timed launch runs, traffic that is not its own (7-10 µs on every method at
    batch 8 / 32k on an H200: bench/NOTES.md, version 76).

    Parameters
    ----------
    mib : int
        Buffer size in MiB, at least 256.
    mode : {"read", "write"}
    """

    def __init__(self, mib=256, mode="read"):
        if mode not in ("read", "write"):
            raise ValueError(f"mode must be 'read' or 'write', got {mode!r}")
        import cupy
        self.mode = mode
        self.buf = cupy.ones(max(256, int(mib)) << 18, dtype=cupy.uint32)
        self._value = 0

    def __call__(self):
        if self.mode == "read":
            self.buf.max()          # a reduction: every line of the buffer passes through the L2
            return
        # A changing non-zero value keeps this an elementwise write kernel (0 may become a memset).
        self._value = self._value % 1000 + 1
        self.buf.fill(self._value)


def time_launches(fn, flush, reps=100, warmup=10, hold_us=HOLD_US):
    """Time ``fn()`` on the GPU with CUDA events, the L2 flushed (untimed) before each launch.

    The flush and a ``hold_us`` hold (:func:`hold`) are queued before the start event, so the
    host-side cost of ``fn`` is spent while the GPU is still busy and only device time between
    the events is measured (plus any idle gap when ``fn`` issues several kernels more slowly than
    the device runs them).

    Returns
    -------
    dict
        ``median``, ``min``, ``p10``, ``p90``, ``mean`` in microseconds and ``reps``.
    """
    import cupy
    stream = cupy.cuda.get_current_stream()
    for _ in range(warmup):
        flush()
        fn()
    events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(reps)]
    for start, end in events:
        flush()
        if hold_us:
            hold(hold_us)
        start.record(stream)
        fn()
        end.record(stream)
    events[-1][1].synchronize()
    us = sorted(cupy.cuda.get_elapsed_time(s, e) * 1e3 for s, e in events)
    return summarize(us)


def summarize(us):
    """Median, min, 10th/90th percentile and mean of a list of times (µs)."""
    us = sorted(us)
    p10, p90 = (us[round(f * (len(us) - 1))] for f in (0.1, 0.9))
    return {"median": statistics.median(us), "min": us[0], "p10": p10, "p90": p90,
            "mean": statistics.fmean(us), "reps": len(us)}


def copy_bandwidth(mib=1024, reps=20):
    """Device-to-device copy bandwidth in bytes/s: (bytes read + bytes written) / median time.

    A ``mib`` MiB ``cudaMemcpyAsync`` between two device buffers, timed with CUDA events.
    """
    import cupy
    nbytes = int(mib) << 20
    seconds = _median_copy_seconds(nbytes, reps)
    cupy.get_default_memory_pool().free_all_blocks()
    return 2 * nbytes / seconds


def _median_copy_seconds(nbytes, reps):
    import cupy
    src = cupy.ones(nbytes, dtype=cupy.uint8)
    dst = cupy.empty_like(src)
    stream = cupy.cuda.get_current_stream()
    for _ in range(3):
        dst.data.copy_from_device_async(src.data, nbytes, stream)
    events = [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(reps)]
    for start, end in events:
        start.record(stream)
        dst.data.copy_from_device_async(src.data, nbytes, stream)
        end.record(stream)
    events[-1][1].synchronize()
    return statistics.median(cupy.cuda.get_elapsed_time(s, e) for s, e in events) * 1e-3


class _Counter:
    """Minimal stand-in for tqdm: ``[done/total] text`` on stderr."""

    def __init__(self, total, desc=""):
        self.total, self.n, self.desc, self.text = total, 0, desc, ""

    def set_postfix_str(self, text):
        self.text = text
        self._show()

    def update(self, n=1):
        self.n += n
        self._show()

    def _show(self):
        sys.stderr.write(f"\r{self.desc} [{self.n}/{self.total}] {self.text[:70]:<70}")
        sys.stderr.flush()

    def close(self):
        sys.stderr.write("\n")


def progress(total, desc="bench"):
    """A progress bar over ``total`` steps: tqdm if importable, else a stderr counter."""
    try:
        from tqdm import tqdm
    except ImportError:
        return _Counter(total, desc)
    return tqdm(total=total, desc=desc, dynamic_ncols=True)
