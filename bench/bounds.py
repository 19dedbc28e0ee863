"""Lower bounds behind the performance targets: how fast SANTA could be on this card under the
benchmark's own timing, from a results file of ``bench.decode`` and two measurements.

    python -m bench.bounds bench/results/results_<card>_<date>_full.json [--out DIR]

Measured here, with the L2 flushed before each launch as in the benchmark: an empty kernel, and
the fastest read of each target configuration's keys (a grid-stride streaming read with 1, 4 or 8
loads of 16 bytes in flight per thread, or per-warp `cp.async` rings through shared memory as the
decode kernels stream rows; the best of several grid shapes). SANTA must read every key, so no
SANTA kernel beats that read. Taken from the results file: the best dense kernel's time and read
rate, and SANTA's bytes with and without the fp32 score stash.
"""
import argparse
import datetime
import json
import sys
from pathlib import Path

from . import report, timing

#: (configuration, speedup over the best dense kernel that SANTA systematic S=256 should reach)
TARGETS = (("b1-n32k", 2.5), ("b8-n32k", 1.9), ("b16-n32k", 1.7), ("b32-n8k", 1.7))
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
NOISE_PCT = 3      # run-to-run spread of the times compared: within it, a bound is "at the limit"


def key_bytes(row):
    """Bytes of the keys of a contiguous configuration (every token valid)."""
    return row["batch"] * row["n"] * row["kv_heads"] * row["dim"] * ITEMSIZE[row["dtype"]]


def bounds(rows, key_read_us, targets=TARGETS, scheme="systematic", samples=256):
    """One dict per target: the target time, and SANTA's time at the best dense kernel's read
    rate with and without the score stash, as times and as % of the target.

    ``key_read_us``: configuration -> measured µs of the fastest read of its keys.
    """
    out = []
    for config, ratio in targets:
        rs = [r for r in rows if r["config"] == config]
        dense = min((r for r in rs if r["method"] in report.DENSE_BASELINES and r["us"] and not r["error"]),
                    key=lambda r: r["us"])
        santa = next(r for r in rs if r["method"] == "santa" and r["scheme"] == scheme and r["samples"] == samples)
        rate = dense["bytes"] / dense["us"]                     # bytes per µs
        target = dense["us"] / ratio
        stash = santa.get("stash_bytes")
        if stash is None:           # results files before the stash read was counted: all of it read back
            scores = santa["batch"] * santa["n"] * santa["q_heads"]
            stash = report.stash_bytes(scores, scores)
        b = dict(config=config, ratio=ratio, dense=dense["method"], dense_us=dense["us"], rate_tbps=rate / 1e6,
                 target_us=target, key_read_us=key_read_us[config], santa_us=santa["us"],
                 with_stash_us=santa["bytes"] / rate, no_stash_us=(santa["bytes"] - stash) / rate)
        b["with_stash_pct"] = 100 * b["with_stash_us"] / target
        b["no_stash_pct"] = 100 * b["no_stash_us"] / target
        read_pct = 100 * b["key_read_us"] / target
        if read_pct >= 100 + NOISE_PCT:
            b["verdict"] = f"out of reach: reading the keys alone takes {read_pct:.0f}% of the target"
        elif read_pct >= 100 - NOISE_PCT:
            b["verdict"] = f"at the limit: reading the keys alone takes {read_pct:.0f}% of the target"
        elif b["with_stash_us"] > target:
            b["verdict"] = (f"out of reach with the score stash; without it, {b['no_stash_pct']:.0f}% of the "
                            "target at the best dense read rate")
        else:
            b["verdict"] = f"needs {b['with_stash_pct']:.0f}% of the best dense read rate, both passes overlapped"
        out.append(b)
    return out


def markdown(card, date, empty_us, results_name, table, flush_mode="read"):
    """The table of :func:`bounds` as markdown, with the measurements it rests on."""
    lines = [f"# SANTA bounds: {card}, {date}", "",
             f"- from `{results_name}` (SANTA systematic S=256 and the best dense kernel of each configuration);",
             f"- measured here, L2 flushed ({flush_mode}) before each launch as there: an empty kernel "
             f"{empty_us:.1f} µs; the fastest read of the keys (column 'keys read': a streaming load loop "
             "or per-warp cp.async rings);",
             "- 'with stash' / 'no stash': SANTA's bytes (keys, fp32 score stash written and the part of it read "
             "back, distinct V rows) at the best dense kernel's read rate, with and without the stash.", "",
             "| config | target | best dense µs | target µs | keys read µs | with stash µs | no stash µs "
             "| SANTA measured µs | verdict |",
             "|---|--:|--:|--:|--:|--:|--:|--:|---|"]
    for b in table:
        lines.append(f"| {b['config']} | {b['ratio']}× | {b['dense_us']:.1f} ({b['dense']}, {b['rate_tbps']:.2f} TB/s) "
                     f"| {b['target_us']:.1f} | {b['key_read_us']:.1f} | {b['with_stash_us']:.1f} "
                     f"({b['with_stash_pct']:.0f}%) | {b['no_stash_us']:.1f} ({b['no_stash_pct']:.0f}%) "
                     f"| {b['santa_us']:.1f} | {b['verdict']} |")
    return "\n".join(lines) + "\n"


_READER = r'''
template <int U> __global__ void plain_read(const int4* __restrict__ p, long long n, int* sink) {
  int4 a = make_int4(0, 0, 0, 0);
  const long long stride = (long long)gridDim.x * blockDim.x;
  for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += stride * U) {
    int4 x[U];
#pragma unroll
    for (int u = 0; u < U; ++u) x[u] = i + u * stride < n ? __ldcs(p + i + u * stride) : make_int4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < U; ++u) { a.x ^= x[u].x; a.y ^= x[u].y; a.z ^= x[u].z; a.w ^= x[u].w; }
  }
  if ((a.x ^ a.y ^ a.z ^ a.w) == 0x7fffffff) *sink = 1;   // keeps the loads
}
// The same bytes as the decode kernels stream them: each warp moves 8 KB chunks (16 cp.async of
// 16 bytes per lane) through its own 2-stage shared-memory ring, 16 KB per warp in flight.
__global__ void ring_read(const int4* __restrict__ p, long long n, int* sink) {
  extern __shared__ int4 ring[];                     // 2 x 512 int4 per warp
  const int lane = threadIdx.x & 31;
  int4* mine = ring + (threadIdx.x >> 5) * 1024;
  const long long warps = (long long)gridDim.x * (blockDim.x >> 5), chunks = (n + 511) / 512;
  auto issue = [&](long long c, int s) {
    if (c < chunks)
#pragma unroll
      for (int j = 0; j < 16; ++j) {
        const long long i = c * 512 + j * 32 + lane;
        const unsigned dst = (unsigned)__cvta_generic_to_shared(mine + s * 512 + j * 32 + lane);
        asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;" :: "r"(dst), "l"(p + (i < n ? i : 0)),
                     "r"(i < n ? 16 : 0));
      }
    asm volatile("cp.async.commit_group;" ::);
  };
  int a = 0;
  long long c = blockIdx.x * (long long)(blockDim.x >> 5) + (threadIdx.x >> 5);
  issue(c, 0);
  for (int s = 0; c < chunks; c += warps, s ^= 1) {
    issue(c + warps, s ^ 1);
    asm volatile("cp.async.wait_group 1;" ::);
    __syncwarp();
    a ^= mine[s * 512 + lane].x;
    __syncwarp();                                    // read before the stage is refilled
  }
  asm volatile("cp.async.wait_group 0;" ::);
  if (a == 0x7fffffff) *sink = 1;
}
__global__ void empty_kernel(int* sink) { if (sink && threadIdx.x == 1024) *sink = 1; }
'''
_UNROLLS = (1, 4, 8)
_SHAPES = ((1, 1024), (2, 512), (4, 512), (8, 256), (16, 128))   # (blocks per SM, threads)
_RING_SHAPES = ((3, 128), (2, 128), (6, 64), (12, 32))         # 16 KB of shared memory per warp


def measure(nbytes_list, flush_mib=256, flush_mode="read", reps=60):
    """(empty kernel µs, {nbytes: fastest read µs}) on the current device."""
    import cupy
    import numpy

    mod = cupy.RawModule(code=_READER, options=("-std=c++17",),
                         name_expressions=[f"plain_read<{u}>" for u in _UNROLLS] + ["ring_read", "empty_kernel"])
    flush = timing.L2Flush(flush_mib, flush_mode)
    t = lambda f: timing.time_launches(f, flush, reps, 5)["median"]
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    buf = cupy.ones(max(nbytes_list) // 4 + 4, dtype=cupy.int32)
    empty = mod.get_function("empty_kernel")
    empty_us = t(lambda: empty((2 * sms,), (256,), (buf,)))
    ring = mod.get_function("ring_read")
    ring.max_dynamic_shared_size_bytes = max(th // 32 * 16384 for _, th in _RING_SHAPES)
    reads = {}
    for nbytes in sorted(set(nbytes_list)):
        n16 = numpy.int64(nbytes // 16)
        plain = [t(lambda k=mod.get_function(f"plain_read<{u}>"), g=bpsm * sms, th=th: k((g,), (th,), (buf, n16, buf)))
                 for u in _UNROLLS for bpsm, th in _SHAPES]
        rings = [t(lambda g=bpsm * sms, th=th: ring((g,), (th,), (buf, n16, buf), shared_mem=th // 32 * 16384))
                 for bpsm, th in _RING_SHAPES]
        reads[nbytes] = min(plain + rings)
    return empty_us, reads


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.bounds", description=__doc__.splitlines()[0])
    p.add_argument("results", help="JSON file written by python -m bench.decode (the full suite)")
    p.add_argument("--out", help="folder for bounds_<card>_<date>.md (default: print only)")
    args = p.parse_args(argv)
    data = json.loads(Path(args.results).read_text())
    rows = data["rows"]
    first = {c: next(r for r in rows if r["config"] == c) for c, _ in TARGETS}
    import cupy
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    card = name.decode() if isinstance(name, bytes) else str(name)
    if card != data["meta"].get("card"):
        print(f"warning: results from {data['meta'].get('card')}, measuring on {card}", file=sys.stderr)
    flush_mode = timing.flush_mode(data["meta"])
    empty_us, reads = measure([key_bytes(r) for r in first.values()], data["meta"].get("flush_mib", 256),
                              flush_mode)
    table = bounds(rows, {c: reads[key_bytes(r)] for c, r in first.items()})
    meta = {"card": card, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "suite": "bounds"}
    text = markdown(card, meta["date"], empty_us, Path(args.results).name, table, flush_mode)
    print(text)
    if args.out:
        out = Path(args.out) / f"{report.file_stem(meta)}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


if __name__ == "__main__":
    main()
