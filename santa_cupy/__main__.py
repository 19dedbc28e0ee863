"""Demo: SANTA decode on a long context with structured attention.

    python -m santa_cupy [--cpu] [--context N] [--seeds R]

Runs the CUDA kernels on CuPy arrays when a GPU is present, the float64 NumPy reference
otherwise (or with --cpu). The attention pattern is built to look like a real decode step:
a few sink tokens at the start, a window of recent tokens with high scores, a few retrieval
spikes (keys aligned with the query) and background noise everywhere else.
"""
import argparse
import time

import numpy

import santa_cupy as sc

SAMPLES = (16, 64, 256, 1024)
KEY_DRAWS = (2, 4, 8, 16)
SINKS, WINDOW, SPIKES = 4, 512, 8
# score boost of each kind of token (background scores are ~N(0, 1.1^2))
SINK_SCORE, WINDOW_SCORES, SPIKE_SCORE = 9.5, (3.0, 5.5), 8.0


def backend(force_cpu):
    """(array module, description) of where the demo runs."""
    if not force_cpu:
        try:
            import cupy
            if cupy.cuda.runtime.getDeviceCount() > 0:
                name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
                return cupy, f"GPU: {name.decode()} (CuPy arrays -> CUDA kernels)"
        except Exception:   # no cupy, no driver, no device
            pass
    return numpy, "CPU: float64 NumPy reference" + (" (--cpu)" if force_cpu else " (no CUDA device)")


def make_problem(batch, q_heads, kv_heads, dim, n, seed=0):
    """q (batch, q_heads, dim), k, v (batch, n, kv_heads, dim) float32 and the score boosts (batch, n)."""
    g = numpy.random.default_rng(seed)
    group = q_heads // kv_heads
    u = g.standard_normal((batch, kv_heads, dim))
    u /= numpy.linalg.norm(u, axis=-1, keepdims=True)          # each query group's direction
    q = numpy.sqrt(dim) * u[:, :, None] + 0.5 * g.standard_normal((batch, kv_heads, group, dim))
    boost = numpy.zeros((batch, n), dtype=numpy.float32)
    boost[:, :SINKS] = SINK_SCORE
    boost[:, n - WINDOW:] = numpy.linspace(*WINDOW_SCORES, WINDOW)
    for b in range(batch):
        boost[b, g.choice(numpy.arange(SINKS, n - WINDOW), SPIKES, replace=False)] = SPIKE_SCORE
    k = g.standard_normal((batch, n, kv_heads, dim), dtype=numpy.float32)
    k += boost[:, :, None, None] * u[:, None].astype(numpy.float32)
    # value rows share a mean direction per KV head, as real value caches do
    v = g.standard_normal((batch, n, kv_heads, dim), dtype=numpy.float32)
    v += 0.5 * g.standard_normal((batch, 1, kv_heads, dim), dtype=numpy.float32)
    return q.reshape(batch, q_heads, dim).astype(numpy.float32), k, v, boost


def mass_breakdown(q, k, boost):
    """Softmax mass of sinks, window, spikes and background for sequence 0, head 0."""
    s = k[0, :, 0].astype(numpy.float64) @ q[0, 0].astype(numpy.float64) / numpy.sqrt(q.shape[-1])
    p = numpy.exp(s - s.max())
    p /= p.sum()
    n = len(p)
    sink, window = p[:SINKS].sum(), p[n - WINDOW:].sum()
    spike = p[SINKS:n - WINDOW][boost[0, SINKS:n - WINDOW] > 0].sum()
    return sink, window, spike, 1.0 - sink - window - spike


def errors(o, ref):
    """Mean relative L2 error and mean cosine similarity over (batch, head)."""
    o, ref = o.astype("float64"), ref.astype("float64")
    norm_o, norm_r = ((x * x).sum(-1) ** 0.5 for x in (o, ref))
    rel = ((o - ref) ** 2).sum(-1) ** 0.5 / norm_r
    cos = (o * ref).sum(-1) / (norm_o * norm_r)
    return float(rel.mean()), float(cos.mean())


def rows_read(counts, kv_heads, n):
    """Fraction of V rows read: rows hit by any head of a query group, over the context."""
    batch, q_heads, cap = counts.shape
    hit = (counts.reshape(batch, kv_heads, q_heads // kv_heads, cap) > 0).any(axis=2)
    return float(hit.sum()) / (batch * kv_heads * n)


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m santa_cupy", description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="use the NumPy reference even with a GPU")
    ap.add_argument("--context", type=int, default=32768, help="tokens per sequence (default 32768)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds averaged per cell (default 3)")
    args = ap.parse_args(argv)
    if args.context < SINKS + WINDOW + SPIKES + 1:
        ap.error(f"--context must be at least {SINKS + WINDOW + SPIKES + 1}")
    xp, where = backend(args.cpu)
    gpu = xp is not numpy
    batch, q_heads, kv_heads, dim = (4, 32, 8, 128) if gpu else (1, 8, 2, 128)
    dtype = "float16" if gpu else "float32"
    n, seeds = args.context, range(args.seeds)
    t0 = time.perf_counter()

    qn, kn, vn, boost = make_problem(batch, q_heads, kv_heads, dim, n)
    q, k, v = (xp.asarray(a).astype(dtype) for a in (qn, kn, vn))
    print(f"santa_cupy {sc.__version__} demo on {where}")
    print(f"batch {batch} x {q_heads} query heads ({kv_heads} KV heads, group {q_heads // kv_heads}) "
          f"x head_dim {dim}, {n} tokens, {dtype}; seeds averaged per cell: {len(seeds)}")
    print("attention mass (seq 0, head 0): sinks {:.0%}, recent window {:.0%}, "
          "retrieval spikes {:.0%}, background {:.0%}".format(*mass_breakdown(qn, kn, boost)))
    exact = sc.decode_exact(q, k, v)

    print("\nValue sampling: S draws per query head from the exact softmax")
    print(f"{'scheme':<11}{'S':>6}{'rel. L2 err':>13}{'cosine':>9}{'V rows read':>13}")
    for scheme in sc.SCHEMES:
        for S in SAMPLES:
            rel = cos = frac = 0.0
            for seed in seeds:
                o, counts = sc.decode(q, k, v, samples=S, scheme=scheme, seed=seed, return_counts=True)
                r, c = errors(o, exact)
                rel, cos, frac = rel + r, cos + c, frac + rows_read(counts, kv_heads, n)
            m = len(seeds)
            print(f"{scheme:<11}{S:>6}{rel / m:>13.4f}{cos / m:>9.4f}{frac / m:>13.3%}")
    print(f"(tile gives each of the {-(-n // sc.TILE)} tiles of {sc.TILE} tokens max(1, S // tiles) draws)")

    print("\nBernoulli scores: B ternary queries per query group (mean-group, stratified)")
    print(f"{'B':>3}{'K features read':>17}{'rel. err, exact V':>19}{'rel. err, S=256 systematic':>28}")
    for B in KEY_DRAWS:
        feats = rel_s = rel_sv = 0.0
        for seed in seeds:
            _, f, _ = sc.ternary_query(q, B, seed=seed, kv_heads=kv_heads)
            feats += float(f.mean())
            rel_s += errors(sc.decode_exact(q, k, v, key_draws=B, seed=seed), exact)[0]
            rel_sv += errors(sc.decode(q, k, v, samples=256, key_draws=B, seed=seed), exact)[0]
        m = len(seeds)
        print(f"{B:>3}{feats / m:>17.1%}{rel_s / m:>19.4f}{rel_sv / m:>28.4f}")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
