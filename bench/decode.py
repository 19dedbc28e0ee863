"""Decode latency sweep: santa_cupy exact and SANTA decode against FlashInfer and PyTorch SDPA.

In one process on one card, for every configuration of a suite, times side by side:

* ``exact``: ``santa_cupy.decode_exact``;
* ``santa``: ``santa_cupy.decode`` for every scheme and sample count S;
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention`` with the flash backend pinned
  (efficient backend if flash refuses the configuration; the note says which ran);
* ``flashinfer``: ``single_decode_with_kv_cache`` (batch 1, contiguous) or
  ``BatchDecodeWithPagedKVCacheWrapper`` (plan untimed, run timed), the faster of
  ``use_tensor_cores`` False/True, when FlashInfer imports.

Results (markdown, JSON, PNG) go to ``--out`` and are rewritten after every configuration, so a
run cut short keeps what it measured. Usage::

    python -m bench.decode --suite smoke --out bench/results
    python -m bench.decode --suite full --out bench/results --only b1- --reps 200
"""
import argparse
import dataclasses
import datetime
import hashlib
import platform
import subprocess
import sys
import warnings
from pathlib import Path

from . import report

SCHEMES = ("systematic", "stratified", "iid", "tile")
SAMPLES = (64, 128, 256, 1024)
METHODS = ("exact", "sdpa", "flashinfer", "santa")
SEED = 20260501
#: FlashInfer page size used to view a contiguous batched cache as pages (batch > 1).
FI_PAGE = 16
FI_WORKSPACE_MIB = 256


@dataclasses.dataclass(frozen=True)
class Config:
    """One decode problem: ``batch`` sequences of ``n`` valid tokens each."""

    batch: int
    n: int
    q_heads: int = 32
    kv_heads: int = 8
    dim: int = 128
    dtype: str = "bfloat16"
    page_size: int = 0  # 0: contiguous cache (batch, n, kv_heads, dim)
    group: str = ""  # "context": the batch-1 context sweep that is plotted

    @property
    def name(self):
        parts = [f"b{self.batch}", f"n{self.n // 1024}k" if self.n % 1024 == 0 else f"n{self.n}"]
        if (self.q_heads, self.kv_heads) != (32, 8):
            parts.append(f"h{self.q_heads}-{self.kv_heads}")
        if self.dim != 128:
            parts.append(f"d{self.dim}")
        if self.dtype != "bfloat16":
            parts.append({"float16": "fp16", "float32": "fp32"}.get(self.dtype, self.dtype))
        if self.page_size:
            parts.append(f"paged{self.page_size}")
        return "-".join(parts)

    @property
    def pages_per_seq(self):
        return -(-self.n // self.page_size)


def _full_suite():
    base = [Config(1, n, group="context") for n in (4096, 16384, 32768, 131072)]
    batched = [Config(8, 8192), Config(8, 32768), Config(16, 32768), Config(32, 8192)]
    mha = [Config(1, 32768, kv_heads=32), Config(8, 32768, kv_heads=32)]
    variants = [Config(1, 32768, dtype="float16"), Config(1, 32768, dim=64),
                Config(1, 32768, dim=256), Config(1, 32768, kv_heads=4),
                Config(8, 32768, page_size=16)]
    return base + batched + mha + variants


#: suite -> (configs, schemes, samples, reps, warm-up)
SUITES = {
    "smoke": ([Config(1, 2048, group="context"), Config(2, 1000, page_size=16)],
              SCHEMES, (64, 256), 20, 3),
    "quick": ([Config(1, 32768, group="context"), Config(8, 32768)], ("systematic",), (256,), 100, 10),
    "full": (_full_suite(), SCHEMES, SAMPLES, 100, 10),
}


# ----------------------------------------------------------------------------------------------
# inputs


class Inputs:
    """One configuration's tensors, each held once in device memory and seen by CuPy and torch.

    ``q`` (batch, q_heads, dim); ``k``, ``v`` contiguous (batch, n, kv_heads, dim) or paged
    (num_pages, page_size, kv_heads, dim) with ``page_table`` (batch, pages_per_seq) int32 (a
    random permutation of the pages) and ``kv_lens`` (batch,) int32. Attributes ``q, k, v`` are
    CuPy arrays (None if CuPy cannot hold the dtype), ``tq, tk, tv`` torch views (None without
    torch).
    """

    def __init__(self, cfg, seed, torch=None, q_scale=1.0):
        import cupy
        import numpy
        self.cfg, self.torch = cfg, torch
        rs = cupy.random.RandomState(seed)
        if cfg.page_size:
            num_pages = cfg.batch * cfg.pages_per_seq
            kv_shape = (num_pages, cfg.page_size, cfg.kv_heads, cfg.dim)
            perm = numpy.random.default_rng(seed).permutation(num_pages).astype(numpy.int32)
            self.page_table = cupy.asarray(perm.reshape(cfg.batch, cfg.pages_per_seq))
            self.kv_lens = cupy.full(cfg.batch, cfg.n, dtype=cupy.int32)
        else:
            kv_shape = (cfg.batch, cfg.n, cfg.kv_heads, cfg.dim)
            self.page_table = self.kv_lens = None
        self.cupy_error = None
        q = rs.standard_normal((cfg.batch, cfg.q_heads, cfg.dim), dtype=cupy.float32)
        self.q, self.tq = self._make(q * q_scale if q_scale != 1 else q)
        self.k, self.tk = self._make(rs.standard_normal(kv_shape, dtype=cupy.float32))
        self.v, self.tv = self._make(rs.standard_normal(kv_shape, dtype=cupy.float32))

    def _make(self, x32):
        """Cast float32 ``x32`` to the dtype once and return (cupy array, torch view) of it."""
        import cupy
        try:
            xc = x32.astype(cupy.dtype(self.cfg.dtype))  # bfloat16 needs CuPy >= 14 + ml_dtypes
        except Exception as exc:
            xc, self.cupy_error = None, f"CuPy cannot make {self.cfg.dtype}: {_err(exc)}"
        if self.torch is None:
            return xc, None
        if xc is not None:
            try:
                return xc, self.torch.from_dlpack(xc)
            except Exception:  # torch cannot view it: give torch its own copy
                pass
        t = self.torch.from_dlpack(x32).to(getattr(self.torch, self.cfg.dtype))
        if xc is None:
            try:
                xc = cupy.from_dlpack(t)
            except Exception:
                pass
        return xc, t

    def santa_args(self):
        if self.q is None:
            raise RuntimeError(self.cupy_error or "no CuPy inputs")
        return (self.q, self.k, self.v), dict(kv_lens=self.kv_lens, page_table=self.page_table)

    def dense_torch(self):
        """torch K, V as (batch, n, kv_heads, dim): views, or gathered copies of a paged cache."""
        if not self.cfg.page_size:
            return self.tk, self.tv
        idx = self.torch.from_dlpack(self.page_table).long()
        c = self.cfg
        return tuple(x[idx].reshape(c.batch, c.pages_per_seq * c.page_size, c.kv_heads, c.dim)[:, :c.n]
                     for x in (self.tk, self.tv))

    def flashinfer_pages(self):
        """FlashInfer's paged view: (k_pages, v_pages, indptr, indices, last_page_len, page_size)."""
        torch, c = self.torch, self.cfg
        dev = self.tk.device
        if c.page_size:
            page, per_seq = c.page_size, c.pages_per_seq
            kp, vp = self.tk, self.tv
            indices = self.torch.from_dlpack(self.page_table).reshape(-1)
        else:  # a contiguous (batch, n, ...) cache is a paged cache with pages in order
            page = next(p for p in (FI_PAGE, 8, 4, 2, 1) if c.n % p == 0)
            per_seq = c.n // page
            kp = self.tk.reshape(-1, page, c.kv_heads, c.dim)
            vp = self.tv.reshape(-1, page, c.kv_heads, c.dim)
            indices = torch.arange(c.batch * per_seq, dtype=torch.int32, device=dev)
        indptr = torch.arange(c.batch + 1, dtype=torch.int32, device=dev) * per_seq
        last = torch.full((c.batch,), c.n - (per_seq - 1) * page, dtype=torch.int32, device=dev)
        return kp, vp, indptr, indices, last, page


# ----------------------------------------------------------------------------------------------
# methods: each returns candidates [(note, build)], build() -> fn, fn() -> output


def _exact_candidates(inp):
    def build():
        import santa_cupy as sc
        args, kw = inp.santa_args()
        return lambda: sc.decode_exact(*args, **kw, validate=False)
    return [("", build)]


def _santa_call(inp, scheme, samples, **extra):
    import santa_cupy as sc
    args, kw = inp.santa_args()
    return lambda: sc.decode(*args, samples=samples, scheme=scheme, seed=SEED, **kw,
                             validate=False, **extra)


def _sdpa_candidates(inp):
    def build(backend_name):
        torch = inp.torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
        backend = getattr(SDPBackend, backend_name)
        q = inp.tq.unsqueeze(2)  # (batch, q_heads, 1, dim)
        k, v = (x.permute(0, 2, 1, 3) for x in inp.dense_torch())  # (batch, kv_heads, n, dim)

        def fn():
            with sdpa_kernel(backend), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)
        return fn
    note = "paged cache gathered to a contiguous copy; " if inp.cfg.page_size else ""
    return [(note + "FLASH_ATTENTION", lambda: build("FLASH_ATTENTION")),
            (note + "EFFICIENT_ATTENTION", lambda: build("EFFICIENT_ATTENTION"))]


def _unavailable(message):
    def build():
        raise RuntimeError(message)
    return [("", build)]


def _flashinfer_candidates(inp, fi, workspace):
    c = inp.cfg

    def build(tc):
        if c.batch == 1 and not c.page_size:
            q, k, v = inp.tq[0], inp.tk[0], inp.tv[0]
            return lambda: fi.single_decode_with_kv_cache(q, k, v, kv_layout="NHD", use_tensor_cores=tc)
        kp, vp, indptr, indices, last, page = inp.flashinfer_pages()
        wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", use_tensor_cores=tc)
        dtype = getattr(inp.torch, c.dtype)
        wrapper.plan(indptr, indices, last, c.q_heads, c.kv_heads, c.dim, page,
                     pos_encoding_mode="NONE", q_data_type=dtype, kv_data_type=dtype)
        q = inp.tq
        return lambda: wrapper.run(q, (kp, vp))
    api = "single_decode_with_kv_cache" if c.batch == 1 and not c.page_size else "BatchDecodeWithPagedKVCacheWrapper"
    return [(f"{api}, use_tensor_cores={tc}", lambda tc=tc: build(tc)) for tc in (False, True)]


def _err(exc):
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text if len(text) < 300 else text[:297] + "..."


def _measure(row, candidates, timer, first_success=False):
    """Time every candidate (or up to the first that runs), keep the fastest in ``row``.

    Returns the fastest candidate's output of its first (untimed) call, or None if none ran.
    """
    results, errors = [], []
    for note, build in candidates:
        try:
            fn = build()
            out = fn()  # first call: JIT compilation, and the output checked against the reference
            results.append((timer(fn), note, out))
        except Exception as exc:
            errors.append(f"{note}: {_err(exc)}" if note else _err(exc))
            continue
        if first_success:
            break
    if not results:
        row["error"] = "; ".join(errors)
        return None
    stats, note, out = min(results, key=lambda r: r[0]["median"])
    row.update(us=stats["median"], us_min=stats["min"], us_p10=stats["p10"], us_p90=stats["p90"])
    notes = [note] + [f"{n}: {s['median']:.1f} µs" for s, n, _ in results if n != note]
    notes += [f"failed {e}" for e in errors]
    row["note"] = "; ".join(x for x in notes if x) or None
    return out


def _as_f32(x, shape):
    import cupy
    if type(x).__module__.split(".")[0] == "torch":
        x = cupy.from_dlpack(x.float().contiguous())
    return cupy.asarray(x, dtype=cupy.float32).reshape(shape)


def _rel_err(out, ref):
    import cupy
    return float(cupy.linalg.norm((out - ref).ravel()) / cupy.linalg.norm(ref.ravel()))


# ----------------------------------------------------------------------------------------------
# sweep


def _tasks(schemes, samples, methods):
    tasks = [(m, None, None) for m in ("exact", "sdpa", "flashinfer") if m in methods]
    if "santa" in methods:
        tasks += [("santa", s, n) for s in schemes for n in samples]
    return tasks


def _geometry(cfg):
    return dict(config=cfg.name, group=cfg.group, batch=cfg.batch, n=cfg.n, q_heads=cfg.q_heads,
                kv_heads=cfg.kv_heads, dim=cfg.dim, dtype=cfg.dtype,
                layout="paged" if cfg.page_size else "contiguous", page_size=cfg.page_size or None)


def run_config(cfg, tasks, timer, env, bar):
    """Time every task on one configuration. Returns its rows (errors recorded, never raised)."""
    import cupy
    geo = _geometry(cfg)
    itemsize = cupy.dtype(cfg.dtype).itemsize
    sizes = (cfg.batch, cfg.batch * cfg.n, cfg.q_heads, cfg.kv_heads, cfg.dim, itemsize)
    dense = report.dense_bytes(*sizes)
    dense_floor = dense / env["copy_bw"] * 1e6
    rows, outs = [], {}
    try:
        inp = Inputs(cfg, SEED, env["torch"], env.get("q_scale", 1.0))
    except Exception as exc:
        bar.update(len(tasks))
        return [report.new_row(**geo, method="inputs", dense_floor_us=dense_floor, error=_err(exc))]
    shape = (cfg.batch, cfg.q_heads, cfg.dim)
    for method, scheme, samples in tasks:
        row = report.new_row(**geo, method=method, scheme=scheme, samples=samples,
                             dense_floor_us=dense_floor, bytes=dense)
        bar.set_postfix_str(f"{cfg.name} {report.label(row)}")
        if method == "exact":
            out = _measure(row, _exact_candidates(inp), timer)
        elif method == "sdpa":
            cands = _sdpa_candidates(inp) if env["torch"] else _unavailable("torch not importable")
            out = _measure(row, cands, timer, first_success=True)
        elif method == "flashinfer":
            cands = (_flashinfer_candidates(inp, env["flashinfer"], env["workspace"]) if env["flashinfer"]
                     else _unavailable("flashinfer not importable"))
            out = _measure(row, cands, timer)
        else:
            row["bytes"] = None
            try:  # untimed: which V rows this seed draws
                _, counts = _santa_call(inp, scheme, samples, return_counts=True)()
                v_rows = report.unique_v_rows(counts, cfg.kv_heads)
                stash_read = report.stash_entries_read(counts, cfg.n)
                del counts
                row["bytes"] = report.santa_bytes(*sizes, v_rows, stash_read)
                row["stash_bytes"] = report.stash_bytes(cfg.batch * cfg.n * cfg.q_heads, stash_read)
                row["v_rows_frac"] = v_rows / (cfg.batch * cfg.n * cfg.kv_heads)
            except Exception as exc:
                row["note"] = f"counts failed: {_err(exc)}"
            count_note = row["note"]
            out = _measure(row, [("", lambda: _santa_call(inp, scheme, samples))], timer)
            row["note"] = "; ".join(x for x in (count_note, row["note"]) if x) or None
        if out is not None:
            try:
                outs[id(row)] = _as_f32(out, shape)
            except Exception as exc:
                row["note"] = "; ".join(x for x in (row["note"], f"output check failed: {_err(exc)}") if x)
        rows.append(row)
        bar.update(1)
    # the reference for rel err: santa_cupy exact, else the first dense baseline that ran
    ref_row = next((r for m in ("exact", "flashinfer", "sdpa") for r in rows
                    if r["method"] == m and id(r) in outs), None)
    for r in rows:
        if ref_row is None or id(r) not in outs:
            continue
        try:
            r["rel_err"] = _rel_err(outs[id(r)], outs[id(ref_row)])
        except Exception as exc:
            r["note"] = "; ".join(x for x in (r["note"], f"rel err failed: {_err(exc)}") if x)
        if ref_row["method"] != "exact":
            r["note"] = "; ".join(x for x in (r["note"], f"rel err vs {ref_row['method']}") if x)
    return rows


def _free(torch):
    import cupy
    cupy.get_default_memory_pool().free_all_blocks()
    if torch is not None:
        torch.cuda.empty_cache()


def _environment(methods):
    """Import torch and FlashInfer if present. Returns (env, versions, notes)."""
    import cupy
    import santa_cupy
    env = {"torch": None, "flashinfer": None, "workspace": None}
    versions = {"python": platform.python_version(), "cupy": cupy.__version__,
                "santa_cupy": santa_cupy.__version__,
                "cuda runtime": cupy.cuda.runtime.runtimeGetVersion(),
                "cuda driver": cupy.cuda.runtime.driverGetVersion()}
    notes = {}
    try:
        import torch
        env["torch"] = torch
        versions["torch"] = torch.__version__
        torch.cuda.set_device(cupy.cuda.Device().id)
    except Exception as exc:
        notes["torch"] = _err(exc)
    if env["torch"] is not None and "flashinfer" in methods:
        try:
            import flashinfer
            env["flashinfer"] = flashinfer
            versions["flashinfer"] = getattr(flashinfer, "__version__", "?")
            env["workspace"] = env["torch"].empty(FI_WORKSPACE_MIB << 20, dtype=env["torch"].uint8,
                                                  device="cuda")
        except Exception as exc:
            notes["flashinfer"] = _err(exc)
    try:
        # "-dirty": the tree that ran is not the commit named
        versions["git"] = subprocess.run(["git", "describe", "--always", "--dirty"], capture_output=True,
                                         text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip() or "none"
    except Exception:
        pass
    versions["sources"] = sources_digest()
    return env, versions, notes


def sources_digest():
    """The first 12 hex digits of a SHA-256 over the package's and the kernels' source files: names
    the code that ran where a copy of the tree carries no (or a stale) git history."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for f in sorted([*root.glob("santa_cupy/*.py"), *root.glob("kernels_cu/*")]):
        if f.is_file():
            h.update(f.relative_to(root).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:12]


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="python -m bench.decode",
        description="Time santa_cupy exact and SANTA decode side by side with FlashInfer and "
                    "PyTorch SDPA (flash) on one GPU; write markdown, JSON and a PNG plot.")
    p.add_argument("--suite", choices=tuple(SUITES), default="quick",
                   help="smoke: two tiny configs (checks the script); quick: batch 1 and 8 at 32k, "
                        "systematic S=256; full: every configuration of the issue (default: quick)")
    p.add_argument("--out", default="bench/results", help="output folder (default: bench/results)")
    p.add_argument("--reps", type=int,
                   help="timed launches per method, median reported (default: 100; smoke 20)")
    p.add_argument("--warmup", type=int, help="untimed launches first (default: 10; smoke 3)")
    p.add_argument("--schemes", nargs="+", choices=SCHEMES, help="SANTA schemes (default: the suite's)")
    p.add_argument("--samples", nargs="+", type=int, help="SANTA sample counts S (default: the suite's)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS),
                   help="methods to time (default: all)")
    p.add_argument("--only", nargs="+", metavar="TEXT",
                   help="keep configurations whose name contains any TEXT (e.g. b1-n32k paged)")
    p.add_argument("--q-scale", type=float, default=1.0,
                   help="multiply the standard normal q by this: the scores q.k/sqrt(dim) then have "
                        "standard deviation q-scale; larger is peakier attention, fewer distinct V "
                        "rows and a smaller SANTA error (default: 1)")
    p.add_argument("--flush-mib", type=int, default=256, help="L2 flush buffer, MiB (>= 256)")
    p.add_argument("--flush", choices=("read", "write"), default="read",
                   help="how the L2 is flushed before each launch: read the buffer (the L2 is left clean) "
                        "or write it (left dirty: each launch also writes the flush's lines back; "
                        "bench/NOTES.md, version 76). Default: read")
    p.add_argument("--copy-mib", type=int, default=1024, help="copy bandwidth buffer, MiB")
    p.add_argument("--device", type=int, default=0, help="CUDA device id")
    p.add_argument("--list", action="store_true", help="print the configurations and methods; no GPU")
    return p.parse_args(argv)


def select(args):
    """The configurations, tasks, reps and warm-up the arguments select."""
    configs, schemes, samples, reps, warmup = SUITES[args.suite]
    if args.only:
        configs = [c for c in configs if any(t in c.name for t in args.only)]
    tasks = _tasks(args.schemes or schemes, args.samples or samples, args.methods)
    return configs, tasks, args.reps or reps, args.warmup if args.warmup is not None else warmup


def main(argv=None):
    args = parse_args(argv)
    configs, tasks, reps, warmup = select(args)
    if args.list:
        for c in configs:
            print(c.name)
        print(f"{len(configs)} configurations x {len(tasks)} methods: "
              + ", ".join(report.label(report.new_row(method=m, scheme=s, samples=n)) for m, s, n in tasks))
        return 0
    import cupy

    from . import timing
    cupy.cuda.Device(args.device).use()
    env, versions, notes = _environment(args.methods)
    timing.share_stream()
    props = cupy.cuda.runtime.getDeviceProperties(args.device)
    name = props["name"]
    env["copy_bw"] = timing.copy_bandwidth(args.copy_mib)
    env["q_scale"] = args.q_scale
    flush = timing.L2Flush(args.flush_mib, args.flush)
    meta = {"card": name.decode() if isinstance(name, bytes) else str(name),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"),
            "suite": args.suite, "reps": reps, "warmup": warmup, "flush_mib": max(256, args.flush_mib),
            "flush": args.flush,
            "hold_us": timing.HOLD_US,
            "copy_mib": args.copy_mib, "copy_bw": env["copy_bw"], "seed": SEED,
            "q_scale": args.q_scale,
            "reference": "santa_cupy exact decode", "versions": versions, "import_errors": notes,
            "command": " ".join([Path(sys.executable).name, "-m", "bench.decode"] + sys.argv[1:])}
    for lib, msg in notes.items():
        print(f"{lib} unavailable: {msg}", file=sys.stderr)

    def timer(fn):
        return timing.time_launches(fn, flush, reps, warmup)
    bar = timing.progress(len(configs) * len(tasks), desc=args.suite)
    rows, paths = [], {}
    for cfg in configs:
        try:
            rows += run_config(cfg, tasks, timer, env, bar)
        except Exception as exc:  # keep going: the other configurations still get measured
            rows.append(report.new_row(**_geometry(cfg), method="config", error=_err(exc)))
        finally:
            _free(env["torch"])
        report.finish_rows(rows, env["copy_bw"])
        paths = report.write(args.out, meta, rows)  # after every config: a cut-short run keeps its rows
    bar.close()
    print(report.markdown(meta, rows))
    print("\n".join(f"wrote {p}" for p in paths.values() if p), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
