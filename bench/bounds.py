"""Lower bounds behind the performance targets: how fast SANTA could be on this card under the
benchmark's own timing, from a results file of ``bench.decode`` and two measurements.

    python -m bench.bounds bench/results/results_<card>_<date>_full.json [--out DIR]

Measured here, with the L2 flushed before each launch as in the benchmark: an empty kernel, and
the fastest plain read of each target configuration's keys (a grid-stride streaming read with
1, 4 or 8 loads of 16 bytes in flight per thread, the best of several grid shapes). SANTA must
read every key, so no SANTA kernel beats that read. Taken from the results file: the best dense
kernel's time and read rate, and SANTA's bytes with and without the fp32 score stash.
"""
import argparse
import datetime
import json
import sys
from pathlib import Path

from . import report

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

    ``key_read_us``: configuration -> measured µs of the fastest plain read of its keys.
    """
    out = []
    for config, ratio in targets:
        rs = [r for r in rows if r["config"] == config]
        dense = min((r for r in rs if r["method"] in report.DENSE_BASELINES and r["us"] and not r["error"]),
                    key=lambda r: r["us"])
        santa = next(r for r in rs if r["method"] == "santa" and r["scheme"] == scheme and r["samples"] == samples)
        rate = dense["bytes"] / dense["us"]                     # bytes per µs
        target = dense["us"] / ratio
        stash = report.STASH_BYTES_PER_SCORE * santa["batch"] * santa["n"] * santa["q_heads"]
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


def markdown(card, date, empty_us, results_name, table):
    """The table of :func:`bounds` as markdown, with the measurements it rests on."""
    lines = [f"# SANTA bounds: {card}, {date}", "",
             f"- from `{results_name}` (SANTA systematic S=256 and the best dense kernel of each configuration);",
             f"- measured here, L2 flushed before each launch: an empty kernel {empty_us:.1f} µs; the fastest plain "
             "read of the keys (column 'keys read');",
             "- 'with stash' / 'no stash': SANTA's bytes (keys, fp32 score stash written and read back, distinct V "
             "rows) at the best dense kernel's read rate, with and without the stash.", "",
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
__global__ void empty_kernel(int* sink) { if (sink && threadIdx.x == 1024) *sink = 1; }
'''
_UNROLLS = (1, 4, 8)
_SHAPES = ((1, 1024), (2, 512), (4, 512), (8, 256), (16, 128))   # (blocks per SM, threads)


def measure(nbytes_list, flush_mib=256, reps=60):
    """(empty kernel µs, {nbytes: fastest plain read µs}) on the current device."""
    import cupy
    import numpy

    from . import timing
    mod = cupy.RawModule(code=_READER, options=("-std=c++17",),
                         name_expressions=[f"plain_read<{u}>" for u in _UNROLLS] + ["empty_kernel"])
    flush = timing.L2Flush(flush_mib)
    t = lambda f: timing.time_launches(f, flush, reps, 5)["median"]
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    buf = cupy.ones(max(nbytes_list) // 4 + 4, dtype=cupy.int32)
    empty = mod.get_function("empty_kernel")
    empty_us = t(lambda: empty((2 * sms,), (256,), (buf,)))
    reads = {}
    for nbytes in sorted(set(nbytes_list)):
        n16 = numpy.int64(nbytes // 16)
        reads[nbytes] = min(t(lambda k=mod.get_function(f"plain_read<{u}>"), g=bpsm * sms, th=th: k((g,), (th,), (buf, n16, buf)))
                            for u in _UNROLLS for bpsm, th in _SHAPES)
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
    empty_us, reads = measure([key_bytes(r) for r in first.values()], data["meta"].get("flush_mib", 256))
    table = bounds(rows, {c: reads[key_bytes(r)] for c, r in first.items()})
    meta = {"card": card, "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "suite": "bounds"}
    text = markdown(card, meta["date"], empty_us, Path(args.results).name, table)
    print(text)
    if args.out:
        out = Path(args.out) / f"{report.file_stem(meta)}.md"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)


if __name__ == "__main__":
    main()
