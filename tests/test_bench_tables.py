"""CPU checks of the benchmark's byte counts, derived columns, table, JSON and CLI (no GPU)."""
import json
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is a folder of scripts next to the package, not installed

from bench import decode as bd  # noqa: E402
from bench import report  # noqa: E402

BW = 3.0e12  # fake copy bandwidth, bytes/s


def _union_by_loops(counts, kv_heads):
    batch, q_heads, cap = counts.shape
    group = q_heads // kv_heads
    return sum(1 for b in range(batch) for h in range(kv_heads) for j in range(cap)
               if any(counts[b, h * group + g, j] > 0 for g in range(group)))


def test_unique_rows_union_over_query_group():
    counts = numpy.zeros((2, 4, 10), dtype=numpy.int32)
    counts[0, 0, 3] = 2
    counts[0, 1, 3] = 1   # same row, same group (kv head 0): counted once
    counts[0, 2, 3] = 5   # same row, other group (kv head 1): counted again
    counts[1, 3, [0, 9]] = 1
    assert report.unique_v_rows(counts, kv_heads=2) == 4
    assert report.unique_v_rows(counts, kv_heads=4) == 5   # MHA: no sharing
    assert report.unique_v_rows(counts, kv_heads=1) == 3   # one group of 4


def test_unique_rows_of_reference_counts():
    sc = pytest.importorskip("santa_cupy")
    rng = numpy.random.default_rng(0)
    q = rng.standard_normal((2, 8, 64)).astype(numpy.float32)
    k, v = (rng.standard_normal((2, 300, 2, 64)).astype(numpy.float32) for _ in range(2))
    lens = numpy.array([300, 200], dtype=numpy.int32)
    _, counts = sc.decode(q, k, v, samples=16, seed=3, kv_lens=lens, return_counts=True)
    rows = report.unique_v_rows(counts, kv_heads=2)
    assert rows == _union_by_loops(counts, 2)
    assert 0 < rows <= 2 * 2 * 4 * 16  # at most group * S rows per (sequence, kv head)


def test_byte_counts():
    # batch 2, 1000 valid tokens in all, 8 q heads / 2 kv heads, dim 64, 2-byte elements
    qo = 2 * 2 * 8 * 64 * 2
    assert report.dense_bytes(2, 1000, 8, 2, 64, 2) == 2 * 1000 * 2 * 64 * 2 + qo
    k = 1000 * 2 * 64 * 2
    stash = 4 * 1000 * 8 + 4 * 300  # fp32 score written per query head and token, 300 read back
    assert report.santa_bytes(2, 1000, 8, 2, 64, 2, v_rows=37, stash_read=300) == k + stash + 37 * 64 * 2 + qo


def _stash_read_by_loops(counts, n):
    batch, heads, cap = counts.shape
    total = 0
    for b in range(batch):
        for h in range(heads):
            for r0 in range(0, cap, report.STASH_READ_RUN):
                if counts[b, h, r0:r0 + report.STASH_READ_RUN].any():
                    total += max(0, min(n, r0 + report.STASH_READ_RUN) - r0)
    return total


def test_stash_read_counts_runs_with_draws():
    run = report.STASH_READ_RUN
    counts = numpy.zeros((2, 3, 3 * run - 5), dtype=numpy.int32)   # capacity off the run size
    counts[0, 0, 0] = 1                  # run 0 of (0, 0): a whole run
    counts[0, 0, run - 1] = 2            # ... the same run again: counted once
    counts[1, 2, 2 * run + 1] = 1        # the last run: 2 * run + 10 valid tokens leave 10 of it
    assert report.stash_entries_read(counts, 2 * run + 10) == run + 10
    counts[1, 1, run:2 * run] = 1        # a run drawn on every row is still one run
    assert report.stash_entries_read(counts, 2 * run + 10) == 2 * run + 10
    rng = numpy.random.default_rng(5)
    counts = (rng.random((2, 4, 700)) < 0.01).astype(numpy.int32)
    assert report.stash_entries_read(counts, 650) == _stash_read_by_loops(counts, 650)


def test_stash_read_of_reference_draws():
    sc = pytest.importorskip("santa_cupy")
    rng = numpy.random.default_rng(2)
    q = rng.standard_normal((1, 4, 64)).astype(numpy.float32)
    k, v = (rng.standard_normal((1, 1024, 1, 64)).astype(numpy.float32) for _ in range(2))
    _, counts = sc.decode(q, k, v, samples=8, seed=3, scheme="systematic", return_counts=True)
    read = report.stash_entries_read(counts, 1024)
    assert read == _stash_read_by_loops(counts, 1024)
    # 8 draws per head land in at most 8 of its 16 runs
    assert 0 < read <= 4 * 8 * report.STASH_READ_RUN


def _fake_rows():
    geo = dict(config="b1-n4k", group="context", batch=1, n=4096, q_heads=32, kv_heads=8, dim=128,
               dtype="bfloat16", layout="contiguous")
    dense = report.dense_bytes(1, 4096, 32, 8, 128, 2)
    santa = report.santa_bytes(1, 4096, 32, 8, 128, 2, v_rows=1000, stash_read=4096 * 16)
    rows = [report.new_row(**geo, method="exact", us=30.0, bytes=dense, rel_err=0.0),
            report.new_row(**geo, method="sdpa", us=40.0, bytes=dense, rel_err=2e-3, note="FLASH_ATTENTION"),
            report.new_row(**geo, method="flashinfer", us=25.0, bytes=dense, rel_err=1e-3),
            report.new_row(**geo, method="santa", scheme="systematic", samples=256, us=20.0,
                           bytes=santa, rel_err=0.05, v_rows_frac=1000 / (4096 * 8)),
            report.new_row(**geo, method="santa", scheme="iid", samples=256, bytes=santa,
                           error="RuntimeError: boom | x")]
    for r in rows:
        r["dense_floor_us"] = dense / BW * 1e6
    return rows, dense, santa


def test_finish_rows_derived_columns():
    rows, dense, santa = _fake_rows()
    report.finish_rows(rows, BW)
    exact, sdpa, fi, sys_, iid = rows
    assert exact["floor_us"] == pytest.approx(dense / BW * 1e6)
    assert exact["tbps"] == pytest.approx(dense / 30e-6 / 1e12)
    assert exact["time_over_floor"] == pytest.approx(30.0 / exact["floor_us"])
    # speedup is over the faster dense baseline (FlashInfer 25 µs here), not over exact
    assert fi["speedup"] == pytest.approx(1.0)
    assert sdpa["speedup"] == pytest.approx(25 / 40)
    assert sys_["speedup"] == pytest.approx(25 / 20)
    assert sys_["floor_us"] == pytest.approx(santa / BW * 1e6)
    assert santa < dense
    assert iid["us"] is None and iid["speedup"] is None and iid["floor_us"] is not None
    report.finish_rows(rows, BW)  # idempotent: the sweep refreshes after every configuration
    assert sys_["speedup"] == pytest.approx(25 / 20)


def test_markdown_json_and_files(tmp_path):
    rows, _, _ = _fake_rows()
    report.finish_rows(rows, BW)
    meta = {"card": "NVIDIA H100 80GB HBM3", "date": "2026-05-01T12:34+00:00", "suite": "smoke",
            "reps": 100, "warmup": 10, "flush_mib": 256, "copy_mib": 1024, "copy_bw": BW,
            "seed": 1, "versions": {"cupy": "14.2.0"}}
    md = report.markdown(meta, rows)
    assert "NVIDIA H100 80GB HBM3" in md and "3.000 TB/s" in md
    table = [line for line in md.splitlines() if line.startswith("| santa systematic S=256")]
    assert len(table) == 1
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert cells[1] == "20.0" and cells[5] == "1.25" and cells[6] == "5.0e-02" and cells[7] == "3.05%"
    err = next(line for line in md.splitlines() if line.startswith("| santa iid"))
    assert "**error**: RuntimeError: boom / x" in err and err.count("|") == 10
    rows[0]["rel_err"] = float("nan")
    data = json.loads(report.to_json(meta, rows))
    assert data["meta"]["card"] == meta["card"] and data["rows"][0]["rel_err"] is None
    assert set(data["rows"][3]) == set(report.ROW_KEYS)
    paths = report.write(tmp_path, meta, rows)
    assert paths["md"].name == "results_H100-80GB-HBM3_20260501T1234_smoke.md"
    assert json.loads(paths["json"].read_text())["rows"][3]["speedup"] == pytest.approx(1.25)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert paths["png"] is None
    else:
        assert paths["png"].stat().st_size > 0


def test_flush_mode_checked_and_named():
    from bench import timing
    with pytest.raises(ValueError, match="mode"):
        timing.L2Flush(mode="evict")
    rows, _, _ = _fake_rows()
    report.finish_rows(rows, BW)
    meta = {"card": "card", "date": "2026-05-01T12:34+00:00", "suite": "smoke", "reps": 100,
            "warmup": 10, "flush_mib": 256, "copy_mib": 1024, "copy_bw": BW}
    assert "(256 MiB read, untimed)" in report.markdown({**meta, "flush": "read"}, rows)
    assert "(256 MiB write, untimed)" in report.markdown(meta, rows)   # results from before the read flush


def test_measure_keeps_fastest_and_records_errors():
    stats = lambda us: {"median": us, "min": us, "p10": us, "p90": us}  # noqa: E731
    timer = lambda fn: stats(fn())  # noqa: E731 -- the fake "output" doubles as the time

    def broken():
        raise RuntimeError("no kernel")
    row = report.new_row(method="flashinfer")
    out = bd._measure(row, [("tc=False", lambda: lambda: 9.0), ("tc=True", lambda: lambda: 7.0),
                            ("other", broken)], timer)
    assert out == 7.0 and row["us"] == 7.0 and row["error"] is None
    assert row["note"].startswith("tc=True; tc=False: 9.0 µs; failed other: RuntimeError: no kernel")
    row = report.new_row(method="sdpa")
    out = bd._measure(row, [("FLASH", lambda: broken()), ("EFFICIENT", lambda: lambda: 5.0),
                            ("never", lambda: lambda: 1.0)], timer, first_success=True)
    assert out == 5.0 and "EFFICIENT" in row["note"] and "FLASH: RuntimeError" in row["note"]
    row = report.new_row(method="exact")
    assert bd._measure(row, [("", broken)], timer) is None
    assert row["us"] is None and row["error"] == "RuntimeError: no kernel"


def test_suites_and_names():
    names = [c.name for c in bd.SUITES["full"][0]]
    assert len(names) == len(set(names)) == 15
    assert {"b1-n128k", "b16-n32k", "b32-n8k", "b8-n32k-h32-32", "b1-n32k-fp16", "b1-n32k-d256",
            "b1-n32k-h32-4", "b8-n32k-paged16"} <= set(names)
    args = bd.parse_args(["--suite", "quick"])
    configs, tasks, reps, warmup = bd.select(args)
    assert [c.name for c in configs] == ["b1-n32k", "b8-n32k"] and reps >= 100
    assert tasks == [("exact", None, None), ("sdpa", None, None), ("flashinfer", None, None),
                     ("santa", "systematic", 256)]
    args = bd.parse_args(["--suite", "full", "--only", "paged", "--samples", "128", "--schemes", "iid"])
    configs, tasks, _, _ = bd.select(args)
    assert [c.name for c in configs] == ["b8-n32k-paged16"] and tasks[-1] == ("santa", "iid", 128)


def test_sources_digest_names_the_code(tmp_path, monkeypatch):
    digest = bd.sources_digest()
    assert len(digest) == 12 and int(digest, 16) >= 0 and digest == bd.sources_digest()
    # a copy of the tree with one kernel byte changed gets another digest
    for sub in ("bench", "santa_cupy", "kernels_cu"):
        dst = tmp_path / sub
        dst.mkdir()
        for f in (ROOT / sub).iterdir():
            if f.is_file():
                (dst / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(bd, "__file__", str(tmp_path / "bench" / "decode.py"))
    assert bd.sources_digest() == digest
    cu = tmp_path / "kernels_cu" / "decode.cu"
    cu.write_bytes(cu.read_bytes() + b" ")
    assert bd.sources_digest() != digest


def test_cli_help_and_list_without_gpu():
    for argv in (["--help"], ["--list", "--suite", "smoke"]):
        res = subprocess.run([sys.executable, "-m", "bench.decode", *argv], cwd=ROOT,
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
    assert "b2-n1000-paged16" in res.stdout


class _FakeBar:
    def __init__(self):
        self.n = 0

    def set_postfix_str(self, text):
        pass

    def update(self, n=1):
        self.n += n


def _numpy_as_cupy():
    """A stand-in ``cupy`` module backed by NumPy: santa_cupy then runs its CPU reference."""
    import types

    class RandomState(numpy.random.RandomState):
        def standard_normal(self, size=None, dtype=numpy.float64):
            return super().standard_normal(size).astype(dtype)

    fake = types.ModuleType("cupy")
    for name in ("asarray", "full", "dtype", "int32", "float32", "linalg"):
        setattr(fake, name, getattr(numpy, name))
    fake.random = types.SimpleNamespace(RandomState=RandomState)
    return fake


@pytest.mark.parametrize("cfg", [bd.Config(1, 300, q_heads=4, kv_heads=2, dim=64, dtype="float32"),
                                 bd.Config(2, 100, q_heads=4, kv_heads=1, dim=64, dtype="float16",
                                           page_size=16)], ids=lambda c: c.name)
def test_run_config_on_the_cpu_reference(monkeypatch, cfg):
    sc = pytest.importorskip("santa_cupy")
    monkeypatch.setitem(sys.modules, "cupy", _numpy_as_cupy())
    tasks = bd._tasks(("systematic", "tile"), (8, 64), bd.METHODS)
    timer = lambda fn: (fn(), {"median": 10.0, "min": 9.0, "p10": 9.5, "p90": 11.0})[1]  # noqa: E731
    env = {"torch": None, "flashinfer": None, "workspace": None, "copy_bw": BW, "q_scale": 4.0}
    bar = _FakeBar()
    rows = bd.run_config(cfg, tasks, timer, env, bar)
    assert bar.n == len(tasks) == len(rows) == 7
    by = {report.label(r): r for r in rows}
    assert by["santa exact"]["error"] is None and by["santa exact"]["rel_err"] == 0.0
    assert by["sdpa"]["error"].endswith("torch not importable") and by["sdpa"]["us"] is None
    assert by["flashinfer"]["error"].endswith("flashinfer not importable")
    itemsize = numpy.dtype(cfg.dtype).itemsize
    dense = report.dense_bytes(cfg.batch, cfg.batch * cfg.n, cfg.q_heads, cfg.kv_heads, cfg.dim, itemsize)
    for name in ("santa systematic S=8", "santa systematic S=64", "santa tile S=64"):
        r = by[name]
        assert r["error"] is None and r["us"] == 10.0, r
        assert 0 < r["rel_err"] < 2
        group = cfg.q_heads // cfg.kv_heads
        v_rows = r["v_rows_frac"] * cfg.batch * cfg.n * cfg.kv_heads
        assert v_rows == pytest.approx(round(v_rows))
        assert 0 < v_rows <= cfg.batch * cfg.kv_heads * min(cfg.n, group * max(r["samples"], 2))
        scores = cfg.batch * cfg.n * cfg.q_heads
        stash_read = r["stash_bytes"] // report.STASH_BYTES_PER_SCORE - scores
        assert 0 < stash_read <= scores
        assert r["bytes"] == report.santa_bytes(cfg.batch, cfg.batch * cfg.n, cfg.q_heads,
                                                cfg.kv_heads, cfg.dim, itemsize, round(v_rows), stash_read)
    # each row's error is that of its own call against exact on the same inputs
    inp = bd.Inputs(cfg, bd.SEED, q_scale=4.0)
    (q, k, v), kw = inp.santa_args()
    exact = sc.decode_exact(q, k, v, **kw).astype(numpy.float32)
    for scheme, samples in (("systematic", 8), ("systematic", 64), ("tile", 64)):
        got = sc.decode(q, k, v, samples=samples, scheme=scheme, seed=bd.SEED, **kw).astype(numpy.float32)
        want = numpy.linalg.norm((got - exact).ravel()) / numpy.linalg.norm(exact.ravel())
        assert by[f"santa {scheme} S={samples}"]["rel_err"] == pytest.approx(want, rel=1e-6)
    assert by["santa systematic S=64"]["rel_err"] < by["santa systematic S=8"]["rel_err"]
    report.finish_rows(rows, BW)
    assert by["santa exact"]["floor_us"] == pytest.approx(dense / BW * 1e6)
    assert by["santa exact"]["speedup"] is None  # no dense baseline ran


def test_bernoulli_table_renders_rows_and_gaps():
    from bench import bernoulli as bb
    meta = dict(card="GPU", date="2026-01-01", reps=3, copy_bw=BW, q_tail=1.0, seed=1, versions={"cupy": "x"})
    rows = [dict(config="b8-n32k", method="santa S=256", us=250.0, speedup=1.0, vs_santa=1.0,
                 time_over_floor=1.7, k_frac=1.0, v_frac=0.025, rel_err=0.3, note=None, error=None),
            dict(config="b8-n32k", method="flashinfer", us=None, k_frac=1.0, v_frac=1.0, note=None,
                 error="flashinfer not importable")]
    md = bb.markdown(meta, rows)
    assert "| santa S=256 | 250.0 | 1.00 | 1.00 | 1.70 | 100.0% | 2.50% | 3.00e-01 |  |" in md
    assert "| flashinfer | – | – | – | – | 100.0% | 100.00% | – | **error**: flashinfer not importable |" in md
    assert len(bb.tasks()) == 3 + 2 * (2 + len(bb.DRAWS)) + len(bb.DRAWS)
