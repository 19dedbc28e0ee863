"""Ternary-query decode: key features read, output error and speed, side by side with SANTA alone
and the dense baselines, in one process on one card.

Configurations: batch 1 and 8 at 32k tokens, bfloat16, 32 query / 8 KV heads, head_dim 128.
Queries are standard normal times per-channel scales ``exp(q_tail * N(0, 1))`` shared by the
heads of a group: a few large channels, as real models' queries have (``--q-tail 0`` is Gaussian,
where almost every feature gets a draw). Rows, all timed like ``bench.decode``:

* ``flashinfer``, ``sdpa``, ``santa exact``: the dense baselines and the exact kernel;
* ``santa S``: SANTA systematic over the standard cache, "SANTA alone";
* ``fm S``: the same over the feature-major cache with exact scores (the layout's own cost);
* ``bern B S``: B stratified mean-group ternary queries + SANTA systematic S;
* ``bern B exact``: B ternary queries + exact ``p V``.

Usage::

    python -m bench.bernoulli --out bench/results
"""
import argparse
import datetime
import sys
from pathlib import Path

from . import report, timing
from .decode import (SEED, Config, Inputs, _as_f32, _environment, _err, _flashinfer_candidates, _measure,
                     _rel_err, _sdpa_candidates, _unavailable)

CONFIGS = (Config(1, 32768), Config(8, 32768))
DRAWS = (2, 4, 8, 16)
SAMPLES = (64, 256)


def heavy_queries(inp, tail):
    """Replace ``inp.q`` by q times per-channel scales shared within each query group."""
    import cupy
    c = inp.cfg
    scales = cupy.exp(tail * cupy.random.RandomState(SEED + 1).standard_normal((c.batch, c.kv_heads, 1, c.dim)))
    q32 = inp.q.astype(cupy.float32).reshape(c.batch, c.kv_heads, -1, c.dim) * scales.astype(cupy.float32)
    inp.q, inp.tq = inp._make(q32.reshape(c.batch, c.q_heads, c.dim))


def tasks():
    """(label, kind, draws, samples): kind is dense, exact, santa, fm or bern."""
    t = [("flashinfer", "dense", None, None), ("sdpa", "dense", None, None), ("santa exact", "exact", None, None)]
    for S in SAMPLES:
        t += [(f"santa S={S}", "santa", None, S), (f"fm S={S}", "fm", None, S)]
        t += [(f"bern B={B} S={S}", "bern", B, S) for B in DRAWS]
    t += [(f"bern B={B} exact", "bern", B, None) for B in DRAWS]
    return t


def _call(inp, kf, kind, draws, samples, **extra):
    import santa_cupy as sc
    kw = dict(kv_lens=inp.kv_lens, page_table=inp.page_table, validate=False, seed=SEED)
    if kind == "santa":
        return lambda: sc.decode(inp.q, inp.k, inp.v, samples=samples, **kw, **extra)
    if kind == "exact":
        return lambda: sc.decode_exact(inp.q, inp.k, inp.v, **kw)
    kw.update(k_layout="feature_major", key_draws=draws)
    if samples is None:
        return lambda: sc.decode_exact(inp.q, kf, inp.v, **kw)
    return lambda: sc.decode(inp.q, kf, inp.v, samples=samples, **kw, **extra)


def run_config(cfg, timer, env, tail, bar):
    import cupy
    import santa_cupy as sc
    inp = Inputs(cfg, SEED, env["torch"])
    heavy_queries(inp, tail)
    kf = sc.to_feature_major(inp.k)
    item = cupy.dtype(cfg.dtype).itemsize
    tokens = cfg.batch * cfg.n
    k_bytes = tokens * cfg.kv_heads * cfg.dim * item
    qo = report.qo_bytes(cfg.batch, cfg.q_heads, cfg.dim, item)
    scores = tokens * cfg.q_heads
    shape = (cfg.batch, cfg.q_heads, cfg.dim)
    rows, outs = [], {}
    for label, kind, draws, samples in tasks():
        bar.set_postfix_str(f"{cfg.name} {label}")
        row = dict(config=cfg.name, batch=cfg.batch, n=cfg.n, method=label, draws=draws, samples=samples,
                   k_frac=1.0, v_frac=1.0, stash_bytes=0, note=None, error=None, us=None)
        if kind == "dense":
            if label == "flashinfer" and env["flashinfer"]:
                cands = _flashinfer_candidates(inp, env["flashinfer"], env["workspace"])
            elif label == "sdpa" and env["torch"]:
                cands = _sdpa_candidates(inp)
            else:
                cands = _unavailable(f"{label} not importable")
            out = _measure(row, cands, timer, first_success=label == "sdpa")
        else:
            if kind != "exact":         # a score pass first: its stash, read back whole by exact p V
                row["stash_bytes"] = report.stash_bytes(scores, scores)
            try:
                if draws:
                    _, feats, _ = sc.ternary_query(inp.q, draws, "stratified", seed=SEED, kv_heads=cfg.kv_heads)
                    row["k_frac"] = float(feats.mean())
                if samples:
                    _, counts = _call(inp, kf, kind, draws, samples, return_counts=True)()
                    row["v_frac"] = report.unique_v_rows(counts, cfg.kv_heads) / (tokens * cfg.kv_heads)
                    row["stash_bytes"] = report.stash_bytes(scores, report.stash_entries_read(counts, cfg.n))
                    del counts
            except Exception as exc:
                row["note"] = f"counts failed: {_err(exc)}"
            out = _measure(row, [("", lambda: _call(inp, kf, kind, draws, samples))], timer)
        row["bytes"] = row["k_frac"] * k_bytes + row["stash_bytes"] + row["v_frac"] * k_bytes + qo
        row["floor_us"] = row["bytes"] / env["copy_bw"] * 1e6
        if out is not None:
            outs[label] = _as_f32(out, shape)
        rows.append(row)
        bar.update(1)
    best = min((r["us"] for r in rows if r["method"] in ("flashinfer", "sdpa") and r["us"]), default=None)
    alone = {r["samples"]: r["us"] for r in rows if r["method"].startswith("santa S=")}
    for r in rows:
        if r["us"]:
            r["speedup"] = best / r["us"] if best else None
            r["vs_santa"] = alone[r["samples"]] / r["us"] if r["samples"] in alone and alone[r["samples"]] else None
            r["time_over_floor"] = r["us"] / r["floor_us"]
        if r["method"] in outs and "santa exact" in outs:
            r["rel_err"] = _rel_err(outs[r["method"]], outs["santa exact"])
    del inp, kf
    return rows


def markdown(meta, rows):
    lines = [f"# santa_cupy ternary-query decode: {meta['card']}, {meta['date']}", "",
             f"- median of {meta['reps']} launches, L2 flushed ({timing.flush_mode(meta)} of 256 MiB) "
             "before each"
             + (f" and the GPU then held {meta['hold_us']} µs (both untimed)" if meta.get("hold_us") else "")
             + "; copy bandwidth "
             f"{meta['copy_bw'] / 1e12:.3f} TB/s; floor = bytes / copy bandwidth.",
             f"- queries: standard normal × exp({meta['q_tail']} · N(0,1)) per channel, shared by each query "
             "group; K, V standard normal; bfloat16; seed " + str(meta["seed"]) + ".",
             "- K feat: fraction of key features read (mean-group stratified draws); V rows: distinct V "
             "rows read. bytes: K features read + score stash (4 B per score written; read back whole by exact "
             f"p V, in the {report.STASH_READ_RUN}-token runs that receive a draw by sampling) + V rows read.",
             "- × dense: best of FlashInfer and SDPA / this; × santa: SANTA alone at the same S / this; "
             "rel err: ‖o − o_exact‖ / ‖o_exact‖.",
             f"- versions: {', '.join(f'{k} {v}' for k, v in meta['versions'].items())}", ""]
    for name in dict.fromkeys(r["config"] for r in rows):
        lines += [f"## {name}", "", "| method | µs | × dense | × santa | time/floor | K feat | V rows | rel err | note |",
                  "|---|--:|--:|--:|--:|--:|--:|--:|---|"]
        for r in (r for r in rows if r["config"] == name):
            note = "; ".join(x for x in (r["error"] and f"**error**: {r['error']}", r["note"]) if x)
            fmt = report._fmt
            lines.append("| " + " | ".join([
                r["method"], fmt(r["us"], ".1f"), fmt(r.get("speedup"), ".2f"), fmt(r.get("vs_santa"), ".2f"),
                fmt(r.get("time_over_floor"), ".2f"), f"{100 * r['k_frac']:.1f}%", f"{100 * r['v_frac']:.2f}%",
                fmt(r.get("rel_err"), ".2e"), note.replace("|", "/")]) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m bench.bernoulli", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="bench/results")
    p.add_argument("--q-tail", type=float, default=1.0, help="log-normal spread of the query channels")
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--only", nargs="+", metavar="TEXT", help="keep configurations whose name contains any TEXT")
    args = p.parse_args(argv)
    import cupy
    env, versions, notes = _environment(("flashinfer",))
    timing.share_stream()
    env["copy_bw"] = timing.copy_bandwidth()
    flush = timing.L2Flush()
    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    meta = dict(card=name.decode() if isinstance(name, bytes) else str(name), suite="bernoulli",
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
                reps=args.reps, flush=flush.mode, hold_us=timing.HOLD_US, copy_bw=env["copy_bw"],
                q_tail=args.q_tail, seed=SEED,
                versions=versions, import_errors=notes)
    configs = [c for c in CONFIGS if not args.only or any(t in c.name for t in args.only)]
    bar = timing.progress(len(configs) * len(tasks()), desc="bernoulli")
    rows = []
    for cfg in configs:
        rows += run_config(cfg, lambda fn: timing.time_launches(fn, flush, args.reps, 10), env, args.q_tail, bar)
        cupy.get_default_memory_pool().free_all_blocks()
    bar.close()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / report.file_stem(meta)
    stem.with_suffix(".md").write_text(markdown(meta, rows) + "\n")
    stem.with_suffix(".json").write_text(report.to_json(meta, rows) + "\n")
    print(markdown(meta, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
