"""Byte counts, floors, the markdown table, the JSON file and the plot of a decode benchmark.

Pure Python and NumPy (matplotlib optional), so it is checked on machines without a GPU.

A *row* is a dict with the keys of :data:`ROW_KEYS`: one method timed on one configuration.
The sweep fills the geometry, ``method``, ``us`` (median), ``bytes`` and ``rel_err``;
:func:`finish_rows` derives the floor, TB/s, time/floor and the speedup over the best dense
baseline.
"""
import json
import math
import re
from pathlib import Path

import numpy

from . import timing

#: Methods that are dense baselines; the speedup column is over the fastest of them.
DENSE_BASELINES = ("flashinfer", "sdpa")

#: Bytes of score stash per (query head, token) of the SANTA kernel: an fp32 score (or CDF edge)
#: that the score pass writes for every valid token.
STASH_BYTES_PER_SCORE = 4

#: The sampling pass reads a query head's stash back in runs of this many tokens (a statistics
#: part), and only the runs that receive a draw (at least: whole 256-token tiles where it works
#: per tile).
STASH_READ_RUN = 64

ROW_KEYS = ("config", "group", "batch", "n", "q_heads", "kv_heads", "dim", "dtype", "layout",
            "page_size", "method", "scheme", "samples", "us", "us_min", "us_p10", "us_p90",
            "bytes", "stash_bytes", "floor_us", "dense_floor_us", "tbps", "time_over_floor", "speedup",
            "rel_err", "v_rows_frac", "note", "error")


def qo_bytes(batch, q_heads, dim, itemsize):
    """Bytes of the query read and the output written."""
    return 2 * batch * q_heads * dim * itemsize


def dense_bytes(batch, tokens, q_heads, kv_heads, dim, itemsize):
    """Bytes a dense decode must move: all K and V rows of the ``tokens`` valid tokens (summed
    over the batch), plus q and the output."""
    return 2 * tokens * kv_heads * dim * itemsize + qo_bytes(batch, q_heads, dim, itemsize)


def santa_bytes(batch, tokens, q_heads, kv_heads, dim, itemsize, v_rows, stash_read):
    """Bytes a SANTA decode must move: all K rows, the score stash (written for every query head
    and valid token, ``stash_read`` entries of it read back), the ``v_rows`` distinct sampled V
    rows (summed over sequences and KV heads), plus q and the output."""
    return (tokens * kv_heads * dim * itemsize + stash_bytes(tokens * q_heads, stash_read)
            + v_rows * dim * itemsize + qo_bytes(batch, q_heads, dim, itemsize))


def stash_bytes(written, read):
    """Bytes of score stash moved: ``written`` entries stored, ``read`` entries loaded back."""
    return STASH_BYTES_PER_SCORE * (written + read)


def stash_entries_read(counts, n):
    """Stash entries the sampling pass reads back, at least: the valid tokens of every
    :data:`STASH_READ_RUN`-token run of a query head that receives a draw.

    Parameters
    ----------
    counts : int array (batch, q_heads, capacity), NumPy or CuPy
        Draws per cache row, as returned by ``santa_cupy.decode(..., return_counts=True)``.
    n : int
        Valid tokens of every sequence.
    """
    drawn = numpy.asarray(counts.get() if hasattr(counts, "get") else counts) > 0
    batch, q_heads, cap = drawn.shape
    runs = -(-cap // STASH_READ_RUN)
    drawn = numpy.pad(drawn, ((0, 0), (0, 0), (0, runs * STASH_READ_RUN - cap)))
    hit = drawn.reshape(batch, q_heads, runs, STASH_READ_RUN).any(axis=3).sum(axis=(0, 1))
    valid = numpy.clip(n - STASH_READ_RUN * numpy.arange(runs), 0, STASH_READ_RUN)
    return int(hit @ valid)


def unique_v_rows(counts, kv_heads):
    """Distinct V rows a SANTA decode reads.

    Parameters
    ----------
    counts : int array (batch, q_heads, capacity), NumPy or CuPy
        Draws per cache row, as returned by ``santa_cupy.decode(..., return_counts=True)``.
    kv_heads : int
        Query heads ``h`` use KV head ``h // (q_heads // kv_heads)``; a row drawn by several
        heads of one group is read once.

    Returns
    -------
    int
        Number of (sequence, KV head, row) triples drawn at least once.
    """
    batch, q_heads, cap = counts.shape
    hit = (counts.reshape(batch, kv_heads, q_heads // kv_heads, cap) > 0).any(axis=2)
    return int(hit.sum())


def new_row(**fields):
    """A row with every key of :data:`ROW_KEYS`, unset ones ``None``."""
    row = dict.fromkeys(ROW_KEYS)
    row.update(fields)
    return row


def finish_rows(rows, copy_bw):
    """Fill the derived columns of every row in place.

    Parameters
    ----------
    rows : list of dict
        Rows with ``us`` (median µs, or None on error) and ``bytes`` (or None).
    copy_bw : float
        Measured device-to-device copy bandwidth, bytes/s (read + written).
    """
    best = {}
    for r in rows:
        if r["method"] in DENSE_BASELINES and r["us"] is not None and r["error"] is None:
            best[r["config"]] = min(best.get(r["config"], math.inf), r["us"])
    for r in rows:
        if r["bytes"] is not None:
            r["floor_us"] = r["bytes"] / copy_bw * 1e6
        if r["us"] is None:
            continue
        if r["bytes"] is not None:
            r["tbps"] = r["bytes"] / (r["us"] * 1e-6) / 1e12
            r["time_over_floor"] = r["us"] / r["floor_us"]
        if r["config"] in best:
            r["speedup"] = best[r["config"]] / r["us"]
    return rows


def label(row):
    """Short method name of a row for tables and legends."""
    if row["method"] == "santa":
        return f"santa {row['scheme']} S={row['samples']}"
    if row["method"] == "exact":
        return "santa exact"
    return row["method"]


def _fmt(x, spec, missing="–"):
    return missing if x is None else format(x, spec)


def _configs(rows):
    order = {}
    for r in rows:
        order.setdefault(r["config"], r)
    return order


def config_title(r):
    """One line describing a configuration row."""
    heads = f"{r['q_heads']}q/{r['kv_heads']}kv"
    layout = f"paged (page {r['page_size']})" if r["layout"] == "paged" else "contiguous"
    return f"batch {r['batch']}, n = {r['n']}, {heads}, d = {r['dim']}, {r['dtype']}, {layout}"


def markdown(meta, rows):
    """The results as markdown: a header with the card, method and bandwidth, then one table per
    configuration."""
    lines = [f"# santa_cupy decode benchmark: {meta.get('card', '?')}, {meta.get('date', '?')}", ""]
    bw = meta.get("copy_bw")
    lines += [
        f"- suite `{meta.get('suite')}`; median of {meta.get('reps')} timed launches after "
        f"{meta.get('warmup')} warm-up launches, CUDA events, L2 flushed before each launch "
        f"({meta.get('flush_mib')} MiB {timing.flush_mode(meta)}, untimed)"
        + (f", then the GPU held {meta['hold_us']} µs (untimed) so that no host-side launch cost is timed"
           if meta.get("hold_us") else "") + "; one process, one card.",
        f"- copy bandwidth {_fmt(bw and bw / 1e12, '.3f')} TB/s (device-to-device copy of "
        f"{meta.get('copy_mib')} MiB, bytes read + written / time); floor = bytes / copy bandwidth.",
        "- dense bytes: K and V of every valid token (+ q, output). SANTA bytes: K + "
        f"{STASH_BYTES_PER_SCORE} B score stash written per query head and token, and read back for the "
        f"{STASH_READ_RUN}-token runs of a query head that receive a draw + distinct sampled V rows "
        "(union over each query group) (+ q, output).",
        "- × best dense: time of the faster of FlashInfer and SDPA / this time. rel err: "
        f"‖o − o_ref‖ / ‖o_ref‖ in float32, o_ref = {meta.get('reference', 'santa_cupy exact decode')}.",
        f"- inputs: standard normal K, V and q × {meta.get('q_scale', 1)} (scores with standard "
        f"deviation {meta.get('q_scale', 1)}), cast to the dtype; seed {meta.get('seed')}. Nearly flat "
        "attention over n tokens makes the exact output small (norm ~ sqrt(dim / n_eff)) and the SANTA "
        "rel err ~ sqrt(n_eff / S): a check that the kernel estimates the right thing, not an accuracy "
        "figure.",
        f"- versions: {', '.join(f'{k} {v}' for k, v in meta.get('versions', {}).items())}"]
    lines += [f"- unavailable: {lib} ({msg})" for lib, msg in meta.get("import_errors", {}).items()]
    lines.append("")
    header = ("| method | µs | TB/s | floor µs | time/floor | × best dense | rel err | V rows | note |\n"
              "|---|--:|--:|--:|--:|--:|--:|--:|---|")
    for name, first in _configs(rows).items():
        lines += [f"## {name}: {config_title(first)}", "",
                  f"dense floor {_fmt(first['dense_floor_us'], '.1f')} µs", "", header]
        for r in (r for r in rows if r["config"] == name):
            note = r["note"] or ""
            if r["error"]:
                note = f"**error**: {r['error']}" + (f"; {note}" if note else "")
            frac = None if r["v_rows_frac"] is None else 100 * r["v_rows_frac"]
            lines.append("| " + " | ".join([
                label(r), _fmt(r["us"], ".1f"), _fmt(r["tbps"], ".2f"), _fmt(r["floor_us"], ".1f"),
                _fmt(r["time_over_floor"], ".2f"), _fmt(r["speedup"], ".2f"),
                _fmt(r["rel_err"], ".1e"), "" if frac is None else f"{frac:.2f}%",
                note.replace("|", "/").replace("\n", " ")]) + " |")
        lines.append("")
    return "\n".join(lines)


def _clean(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    return x


def to_json(meta, rows):
    """``{"meta": ..., "rows": [...]}`` as a JSON string (non-finite numbers become null)."""
    return json.dumps(_clean({"meta": meta, "rows": rows}), indent=1, default=str)


def file_stem(meta):
    """``results_<card>_<date>_<suite>``, safe as a file name."""
    card = re.sub(r"[^A-Za-z0-9.]+", "-", str(meta.get("card", "gpu"))).strip("-")
    card = card.removeprefix("NVIDIA-")
    date = re.sub(r"[^0-9T]", "", str(meta.get("date", "")))[:13]
    return f"results_{card}_{date}_{meta.get('suite', 'run')}"


def plot(path, meta, rows, group="context"):
    """Latency against context length at batch 1 (rows of ``group``), one line per method, with
    the dense floor and the SANTA floor of each S dashed. Returns the path, or None when
    matplotlib is missing or there is nothing to plot."""
    rows = [r for r in rows if r["group"] == group]
    if not any(r["us"] is not None for r in rows):
        return None
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(11, 6))
    samples = sorted({r["samples"] for r in rows if r["method"] == "santa"})
    cmap = plt.get_cmap("viridis")
    color = {s: cmap(i / max(1, len(samples) - 1) * 0.85) for i, s in enumerate(samples)}
    styles = {"systematic": "-", "stratified": "--", "iid": ":", "tile": "-."}
    fixed = {"flashinfer": ("tab:red", "o"), "sdpa": ("tab:orange", "s"), "exact": ("black", "D")}
    for name in dict.fromkeys(label(r) for r in rows):
        pts = sorted((r["n"], r["us"]) for r in rows if label(r) == name and r["us"] is not None)
        if not pts:
            continue
        r0 = next(r for r in rows if label(r) == name)
        if r0["method"] == "santa":
            kw = dict(color=color[r0["samples"]], ls=styles.get(r0["scheme"], "-"), marker=".", lw=1.2)
        else:
            c, m = fixed.get(r0["method"], ("gray", "x"))
            kw = dict(color=c, marker=m, lw=2)
        ax.plot(*zip(*pts), label=name, **kw)
    dense = sorted({(r["n"], r["dense_floor_us"]) for r in rows if r["dense_floor_us"] is not None})
    if dense:
        ax.plot(*zip(*dense), color="gray", ls="--", lw=2.5, alpha=0.6, label="dense floor")
    for s in samples:
        floor = {}
        for r in rows:
            if r["method"] == "santa" and r["samples"] == s and r["floor_us"] is not None:
                # one floor per S: the systematic one when present (schemes differ little)
                if r["scheme"] == "systematic" or r["n"] not in floor:
                    floor[r["n"]] = r["floor_us"]
        if floor:
            ax.plot(*zip(*sorted(floor.items())), color=color[s], ls=(0, (1, 1.5)), lw=3.5,
                    alpha=0.5, label=f"SANTA floor S={s}")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ns = sorted({r["n"] for r in rows})
    ax.set_xticks(ns, [f"{n // 1024}k" if n % 1024 == 0 else str(n) for n in ns])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("context length n (tokens)")
    ax.set_ylabel("latency (µs, median)")
    first = rows[0]
    ax.set_title(f"decode, batch 1, {first['q_heads']}q/{first['kv_heads']}kv, d={first['dim']}, "
                 f"{first['dtype']}: {meta.get('card', '')}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return path


def write(out_dir, meta, rows):
    """Write ``<stem>.md``, ``<stem>.json`` and ``<stem>.png`` into ``out_dir``.

    Returns
    -------
    dict
        ``{"md": path, "json": path, "png": path or None}``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / file_stem(meta)
    paths = {"md": stem.with_suffix(".md"), "json": stem.with_suffix(".json")}
    paths["md"].write_text(markdown(meta, rows) + "\n")
    paths["json"].write_text(to_json(meta, rows) + "\n")
    try:
        paths["png"] = plot(stem.with_suffix(".png"), meta, rows)
    except Exception as exc:  # a broken plot must not lose the numbers
        print(f"plot skipped: {type(exc).__name__}: {exc}")
        paths["png"] = None
    return paths
