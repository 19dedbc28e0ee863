"""GPU kernels against the float64 reference (marker ``gpu``; skipped without a device)."""
import itertools

import numpy
import pytest
from scipy import stats

import santa_cupy as sc
from gpu_helpers import TOL, host, problem, reference_from_counts, rel_err, to_gpu

pytestmark = pytest.mark.gpu
cupy = pytest.importorskip("cupy")

GLOBAL = ("iid", "stratified", "systematic")

CASES = [  # dtype, dim, q_heads, kv_heads, page_size
    *[(dt, d, 8, 2, None) for dt, d in itertools.product(("float32", "float16", "bfloat16"), (64, 128, 256))],
    ("bfloat16", 128, 32, 8, None), ("bfloat16", 128, 8, 8, None), ("float16", 128, 16, 1, None),
    ("bfloat16", 128, 12, 4, 16), ("float16", 64, 6, 2, 1), ("float32", 256, 4, 1, 256),
    ("bfloat16", 128, 10, 5, 7), ("float16", 128, 2, 2, 33), ("float16", 256, 8, 2, 16),
]


def _ids(c):
    return "-".join(str(x) for x in c)


@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_exact_matches_reference(case):
    dt, dim, hq, hk, ps = case
    _check_exact(problem(1, 3, hq, hk, dim, 1000, dt, lens=[1000, 1, 513], page_size=ps), dt)


def test_exact_matches_reference_when_pairs_fill_the_multiprocessors():
    # as many (sequence, KV head) pairs as multiprocessors: blocks of 4 rings on a contiguous cache
    sms = cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrMultiProcessorCount,
                                                 cupy.cuda.runtime.getDevice())
    _check_exact(problem(2, -(-sms // 16), 32, 16, 128, 700, "bfloat16"), "bfloat16")


def _check_exact(p, dt):
    g = to_gpu(p)
    out, lse = sc.decode_exact(**g, return_lse=True)
    assert out.dtype == g["q"].dtype and out.shape == g["q"].shape
    # compare with the float64 reference before its final rounding
    from santa_cupy import reference
    K, V, lens = reference.dense_cache(p["k"], p["v"], p["kv_lens"], p.get("page_table"))
    o64, lse64 = reference.decode_exact(p["q"], K, V, lens)
    assert rel_err(host(out), o64) < TOL[dt]
    assert numpy.allclose(host(lse), lse64, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("scheme", ("iid", "stratified", "systematic", "tile"))
@pytest.mark.parametrize("case", CASES[::2] + CASES[9:], ids=_ids)
def test_santa_draws_and_output_match_reference(case, scheme):
    dt, dim, hq, hk, ps = case
    S = 64
    p = problem(2, 3, hq, hk, dim, 1300, dt, lens=[1300, 1, 700], page_size=ps)
    _, ref_counts = sc.decode(**p, samples=S, scheme=scheme, seed=11, return_counts=True)
    g = to_gpu(p)
    out, counts = sc.decode(**g, samples=S, scheme=scheme, seed=11, return_counts=True)
    counts = counts.get()
    same = (counts == ref_counts).all(axis=-1)
    # draws agree except where a position lands within rounding of a CDF boundary
    assert same.mean() >= 0.95, f"{(~same).sum()} of {same.size} heads drew differently"
    moved = numpy.abs(counts - ref_counts).sum() / 2
    assert moved <= max(1, 1e-3 * counts.sum())
    if scheme in GLOBAL:
        assert (counts.sum(-1) == S).all()
    from santa_cupy import reference
    K, V, lens = reference.dense_cache(p["k"], p["v"], p["kv_lens"], p.get("page_table"))
    o64, _, _ = reference.decode(p["q"], K, V, lens, S, scheme, sc.rng.resolve_seed(11, 3))
    err = numpy.linalg.norm((host(out) - o64)[same]) / numpy.linalg.norm(o64[same])
    assert err < TOL[dt]


@pytest.fixture
def part_tasks(monkeypatch):
    """Pass 2 in part tasks wherever the cache has statistics parts (16-bit), whatever the sparsity;
    returns the list of choices made."""
    from santa_cupy import _gpu
    chosen = []

    def choose(stat_parts, scheme, samples, geo):
        chosen.append(1 if scheme == "tile" else stat_parts)
        return chosen[-1]
    monkeypatch.setattr(_gpu, "_value_task_parts", choose)
    return chosen


@pytest.mark.parametrize("samples", [64, 4096])
@pytest.mark.parametrize("scheme", GLOBAL)
@pytest.mark.parametrize("case", [c for c in CASES if c[0] != "float32"][::2], ids=_ids)
def test_part_tasks_match_reference(case, scheme, samples, part_tasks):
    dt, dim, hq, hk, ps = case
    p = problem(5, 3, hq, hk, dim, 5000, dt, lens=[5000, 1, 777], page_size=ps)
    counts = _check_draws_and_output(p, samples, scheme, 13, dt)
    for b, n in enumerate(p["kv_lens"]):
        assert (counts[b, :, n:] == 0).all()
    assert part_tasks[-1] > 1


def _check_draws_and_output(p, samples, scheme, seed, dt):
    """Every head draws `samples` rows, as the reference does but for draws within rounding of a
    CDF boundary, and the output is the reference's for the kernel's own draws; returns the counts."""
    _, ref_counts = sc.decode(**p, samples=samples, scheme=scheme, seed=seed, return_counts=True)
    out, counts = sc.decode(**to_gpu(p), samples=samples, scheme=scheme, seed=seed, return_counts=True)
    counts = counts.get()
    assert (counts.sum(-1) == samples).all()
    assert numpy.abs(counts - ref_counts).sum() / 2 <= max(1, 1e-3 * counts.sum())
    assert rel_err(host(out), reference_from_counts(p, counts, samples)) < TOL[dt]
    return counts


@pytest.mark.parametrize("scheme", GLOBAL)
def test_part_tasks_count_runs_of_draws_across_rounds(scheme, part_tasks):
    """Peaked scores: a row takes the draws of many rounds of 32 in a row (one list entry whose
    count grows round by round); a dropped or misplaced count changes the output."""
    p = problem(17, 2, 8, 2, 128, 3000, "bfloat16", lens=[3000, 2100], peaked=True)
    counts = _check_draws_and_output(p, 4096, scheme, 19, "bfloat16")
    assert counts.max() > 3 * 32
    assert part_tasks[-1] > 1


@pytest.mark.parametrize("samples", [300, 500])
def test_iid_positions_sorted_a_few_heads_at_a_time(samples):
    """The plan sorts iid positions in batches of at most 1024: heads 3 + 1 (S = 300) or 2 + 2
    (S = 500) of a group of 4."""
    p = problem(23, 2, 8, 2, 128, 3000, "bfloat16", lens=[3000, 1900])
    _check_draws_and_output(p, samples, "iid", 29, "bfloat16")


def test_counts_beyond_length_are_zero_and_tile_lengths_ragged():
    p = problem(3, 4, 8, 2, 128, 2000, "bfloat16", lens=[2000, 257, 256, 255], page_size=16)
    g = to_gpu(p)
    for scheme in ("systematic", "tile"):
        _, counts = sc.decode(**g, samples=512, scheme=scheme, seed=5, return_counts=True)
        c = counts.get()
        for b, n in enumerate(p["kv_lens"]):
            assert (c[b, :, n:] == 0).all()
            assert (c[b, :, :n].sum(-1) > 0).all()


@pytest.mark.parametrize("samples", [1, 7, 4096])
def test_sample_counts_extremes(samples):
    p = problem(4, 2, 4, 4, 64, 3000, "float32", lens=[3000, 2])
    g = to_gpu(p)
    for scheme in GLOBAL:
        _, ref_counts = sc.decode(**p, samples=samples, scheme=scheme, seed=3, return_counts=True)
        out, counts = sc.decode(**g, samples=samples, scheme=scheme, seed=3, return_counts=True)
        assert (counts.get().sum(-1) == samples).all()
        moved = numpy.abs(counts.get() - ref_counts).sum() / 2
        assert moved <= max(1, 1e-3 * ref_counts.sum())


def test_long_context_256k():
    n = 262144
    p = problem(5, 1, 4, 1, 128, n, "float16", lens=[n])
    g = to_gpu(p)
    from santa_cupy import reference
    K, V, lens = reference.dense_cache(p["k"], p["v"], p["kv_lens"])
    o64, _ = reference.decode_exact(p["q"], K, V, lens)
    assert rel_err(host(sc.decode_exact(**g)), o64) < TOL["float16"]
    out, counts = sc.decode(**g, samples=256, scheme="systematic", seed=1, return_counts=True)
    assert (counts.get().sum(-1) == 256).all()
    o_k = reference_from_counts(p, counts.get(), 256)
    assert rel_err(host(out), o_k) < TOL["float16"]


def test_bitwise_reproducible_and_fresh_without_seed():
    g = to_gpu(problem(6, 4, 32, 8, 128, 4096, "bfloat16"))
    for scheme in ("iid", "stratified", "systematic", "tile"):
        a = sc.decode(**g, samples=128, scheme=scheme, seed=99)
        b = sc.decode(**g, samples=128, scheme=scheme, seed=99)
        assert (a.view(cupy.uint16) == b.view(cupy.uint16)).all()
    e1, e2 = sc.decode_exact(**g), sc.decode_exact(**g)
    assert (e1.view(cupy.uint16) == e2.view(cupy.uint16)).all()
    x, y = sc.decode(**g, samples=16), sc.decode(**g, samples=16)
    assert not (x == y).all()


def test_dependent_launch_leaves_results_bitwise_unchanged(monkeypatch):
    """Pass 2 (and the exact pass over ternary-query scores) launched as dependents of pass 1, or
    plainly, give the same bits."""
    from santa_cupy import _dependent, layout
    g = to_gpu(problem(8, 3, 8, 2, 128, 5000, "bfloat16", lens=[5000, 300, 2100]))
    kf = layout.to_feature_major(g["k"])

    def run():
        res = []
        for scheme in ("iid", "systematic"):
            out, lse, counts = sc.decode(**g, samples=256, scheme=scheme, seed=5, return_lse=True,
                                         return_counts=True)
            res += [out.view(cupy.uint16), lse.view(cupy.uint32), counts]
        res.append(sc.decode_exact(g["q"], kf, g["v"], kv_lens=g["kv_lens"], key_draws=8, seed=3,
                                   k_layout="feature_major").view(cupy.uint16))
        return [x.get() for x in res]

    base = run()
    monkeypatch.setattr(_dependent, "enabled", False)
    assert all((a == b).all() for a, b in zip(base, run()))


@pytest.mark.parametrize("samples", [8, 256])
@pytest.mark.parametrize("scheme", ("iid", "systematic", "tile"))
@pytest.mark.parametrize("case", [("bfloat16", 128, 8, 2, None), ("float16", 64, 6, 2, 1),
                                  ("bfloat16", 128, 12, 4, 16), ("float16", 256, 8, 2, 16)], ids=_ids)
def test_pass_one_queue_leaves_results_bitwise_unchanged(case, scheme, samples, monkeypatch):
    """Pass 1's splits with their whole share (or one unit) taken from the queue of tail units
    give the bits of fixed splits, call after call (the queue resets itself). Splits as on a GPU
    of 4 multiprocessors, so that they are long."""
    from santa_cupy import _gpu
    monkeypatch.setattr(_gpu, "_sm_count", lambda: 4)
    dt, dim, hq, hk, ps = case
    g = to_gpu(problem(23, 3, hq, hk, dim, 5000, dt, lens=[5000, 300, 2100], page_size=ps))

    def run():
        res = []
        for _ in range(2):
            out, lse, counts = sc.decode(**g, samples=samples, scheme=scheme, seed=5, return_lse=True,
                                         return_counts=True)
            res += [out.view(cupy.uint16).get(), lse.get(), counts.get()]
        return res

    base = run()
    for units in (lambda per, n: per // _gpu.SCORE_PIPE_WARPS, lambda per, n: 1):
        monkeypatch.setattr(_gpu, "_tail_units", units)
        assert all((a == b).all() for a, b in zip(base, run()))


def test_per_sequence_seeds_independent_of_batch_position():
    p = problem(7, 3, 8, 2, 128, 1500, "float16", lens=[1500, 1500, 1500])
    g = to_gpu(p)
    seeds = numpy.array([5, 6, 7], dtype=numpy.uint64)
    full = sc.decode(**g, samples=64, seed=seeds)
    rev = {n: (x[::-1].copy() if n in ("q", "k", "v", "kv_lens") else x) for n, x in g.items()}
    back = sc.decode(**rev, samples=64, seed=cupy.asarray(seeds[::-1].copy()))
    assert (full.get() == back.get()[::-1]).all()
    ref = sc.decode(**p, samples=64, seed=seeds)
    assert rel_err(host(full), ref.astype(numpy.float64)) < 1e-2


@pytest.mark.parametrize("scheme", ("iid", "stratified", "systematic", "tile"))
def test_kernel_output_unbiased(scheme):
    """One-sample t-tests of R kernel outputs against the exact output, Bonferroni over coordinates."""
    p = problem(8, 1, 4, 1, 64, 900, "float32", lens=[900], peaked=True)
    g = to_gpu(p)
    exact = host(sc.decode_exact(**g))[0].ravel()
    R = 400
    outs = numpy.stack([host(sc.decode(**g, samples=16, scheme=scheme, seed=1000 + i))[0].ravel() for i in range(R)])
    t, pval = stats.ttest_1samp(outs, exact, axis=0)
    alpha = 1e-4 / 4
    assert pval.min() > alpha / outs.shape[1]


def test_kernel_detects_bias_negative_control():
    """The same test rejects a deliberately biased estimator (outputs shifted by a fifth of their
    spread)."""
    p = problem(8, 1, 4, 1, 64, 900, "float32", lens=[900], peaked=True)
    g = to_gpu(p)
    exact = host(sc.decode_exact(**g))[0].ravel()
    R = 400
    outs = numpy.stack([host(sc.decode(**g, samples=16, scheme="systematic", seed=1000 + i))[0].ravel() for i in range(R)])
    t, pval = stats.ttest_1samp(outs + 0.2 * outs.std(0), exact, axis=0)
    assert pval.min() < 1e-4 / 4 / outs.shape[1]


def test_stratified_variance_below_iid_on_kernel():
    """Peaked attention, where stratified and systematic draws halve iid's error (0.47 and 0.42 of
    it on the reference, which draws the same rows; iid against iid with other seeds 0.99-1.02):
    a kernel whose strata were lost would fail."""
    p = problem(9, 1, 8, 2, 128, 4000, "float32", lens=[4000], peaked=True)
    g = to_gpu(p)
    exact = host(sc.decode_exact(**g))
    mse = {}
    for scheme in ("iid", "stratified", "systematic"):
        errs = [((host(sc.decode(**g, samples=64, scheme=scheme, seed=i)) - exact) ** 2).sum() for i in range(60)]
        mse[scheme] = numpy.mean(errs)
    assert mse["stratified"] < 0.75 * mse["iid"] and mse["systematic"] < 0.75 * mse["iid"]


def test_out_argument_and_lse():
    p = problem(10, 2, 8, 2, 128, 777, "bfloat16", lens=[777, 5])
    g = to_gpu(p)
    out = cupy.empty_like(g["q"])
    res, lse = sc.decode(**g, samples=32, seed=1, out=out, return_lse=True)
    assert res is out
    _, lse_exact = sc.decode_exact(**g, return_lse=True)
    assert cupy.allclose(lse, lse_exact, rtol=1e-5, atol=1e-5)


def test_cuda_graph_replay_draws_fresh_samples():
    g = to_gpu(problem(11, 2, 8, 2, 128, 3000, "float16", lens=[3000, 2999]))
    out = cupy.empty_like(g["q"])
    sc.decode(**g, samples=32, out=out, validate=False)          # warm-up: compile, workspaces
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        sc.decode(**g, samples=32, out=out, validate=False)
        stream.begin_capture()
        sc.decode(**g, samples=32, out=out, validate=False)
        graph = stream.end_capture()
        graph.launch(stream)
        first = out.copy()
        graph.launch(stream)
        second = out.copy()
    stream.synchronize()
    assert not (first == second).all()
    fixed = cupy.empty_like(out)
    with stream:
        sc.decode(**g, samples=32, seed=4, out=fixed, validate=False)
        stream.begin_capture()
        sc.decode(**g, samples=32, seed=4, out=fixed, validate=False)
        graph = stream.end_capture()
        graph.launch(stream)
    stream.synchronize()
    assert (fixed == sc.decode(**g, samples=32, seed=4)).all()


def test_dlpack_torch_round_trip():
    torch = pytest.importorskip("torch")
    p = problem(12, 2, 8, 2, 128, 600, "float16", lens=[600, 100])
    t = {n: torch.from_dlpack(cupy.asarray(x)) for n, x in p.items()}
    out = sc.decode(**t, samples=64, seed=2)
    assert isinstance(out, torch.Tensor) and out.is_cuda and out.dtype == torch.float16
    same = sc.decode(**to_gpu(p), samples=64, seed=2)
    assert (cupy.from_dlpack(out) == same).all()
    ex = sc.decode_exact(**t)
    assert isinstance(ex, torch.Tensor)


def test_bad_inputs_rejected_before_launch():
    g = to_gpu(problem(13, 2, 8, 2, 128, 300, "float16", lens=[300, 20]))
    with pytest.raises(ValueError, match="samples"):
        sc.decode(**g, samples=5000)
    with pytest.raises(ValueError, match="kv_lens"):
        sc.decode(**{**g, "kv_lens": cupy.asarray([301, 1], dtype=cupy.int32)}, samples=8)
    bad = g["k"].copy()
    bad[1, 3, 0, 0] = numpy.nan
    with pytest.raises(ValueError, match="k"):
        sc.decode(**{**g, "k": bad}, samples=8)
    bad[1, 3, 0, 0] = 0
    bad[1, 200, 0, 0] = numpy.inf      # beyond kv_lens[1]: not an error
    sc.decode(**{**g, "k": bad}, samples=8)
    with pytest.raises(ValueError, match="k must be C-contiguous"):
        sc.decode(**{**g, "k": g["k"][:, ::2], "v": g["v"][:, ::2]}, samples=8, validate=False)
    with pytest.raises(TypeError, match="k is a numpy"):
        sc.decode(**{**g, "k": g["k"].get()}, samples=8)


def test_dispatch_auto_runs_exact_only_on_small_caches():
    p = problem(21, 2, 8, 2, 64, 300, "bfloat16", lens=[300, 41])
    g = to_gpu(p)
    auto = sc.decode(**g, samples=16, seed=2, dispatch="auto")
    assert (auto == sc.decode_exact(**g)).all()
    o, counts = sc.decode(**g, samples=16, seed=2, dispatch="auto", return_counts=True)
    assert (o == sc.decode(**g, samples=16, seed=2)).all() and int(counts.sum()) == 2 * 8 * 16
    n = sc.EXACT_BELOW_BYTES // (2 * 64 * 2)        # one sequence whose keys reach the threshold
    big = to_gpu(problem(22, 1, 8, 2, 64, n, "bfloat16", lens=[n]))
    assert (sc.decode(**big, samples=16, seed=2, dispatch="auto", validate=False)
            == sc.decode(**big, samples=16, seed=2, validate=False)).all()


def test_reference_path_on_cupy_arrays():
    """CuPy inputs the kernels do not take (float64, ternary queries) run the reference on the GPU."""
    p = problem(14, 2, 8, 2, 48, 500, "float32", lens=[500, 77])
    p64 = {n: (x.astype(numpy.float64) if x.dtype.kind == "f" else x) for n, x in p.items()}
    g64 = to_gpu(p64)
    assert numpy.allclose(sc.decode_exact(**g64).get(), sc.decode_exact(**p64))
    assert numpy.allclose(sc.decode(**g64, samples=32, seed=3).get(), sc.decode(**p64, samples=32, seed=3))
    g = to_gpu(p)
    for group in ("mean", "head"):
        a = sc.decode(**g, samples=32, seed=3, key_draws=4, key_group=group)
        b = sc.decode(**p, samples=32, seed=3, key_draws=4, key_group=group)
        assert isinstance(a, cupy.ndarray) and numpy.allclose(a.get(), b, rtol=1e-5, atol=1e-6)


def test_demo_runs_on_the_gpu():
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", "santa_cupy", "--context", "4096", "--seeds", "1"],
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "GPU" in res.stdout
