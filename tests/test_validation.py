"""Every bad input raises ValueError/TypeError naming the argument; garbage that is never read
(rows past kv_lens, unused pages, page-table entries past a sequence's pages) is accepted."""
import math

import numpy
import pytest

import santa_cupy as sc

B, HQ, HKV, D, CAP, PAGE = 2, 4, 2, 8, 20, 4


def base(dtype=numpy.float32):
    r = numpy.random.default_rng(0)
    q = r.standard_normal((B, HQ, D)).astype(dtype)
    k = r.standard_normal((B, CAP, HKV, D)).astype(dtype)
    v = r.standard_normal((B, CAP, HKV, D)).astype(dtype)
    lens = numpy.array([CAP, 7], dtype=numpy.int32)
    return dict(q=q, k=k, v=v, kv_lens=lens)


def paged_base():
    """A paged cache: 5 pages of 4 rows for sequence 0, 2 for sequence 1, in a shuffled order."""
    a = base()
    pages = 8
    r = numpy.random.default_rng(1)
    kp = r.standard_normal((pages, PAGE, HKV, D)).astype(numpy.float32)
    vp = r.standard_normal((pages, PAGE, HKV, D)).astype(numpy.float32)
    table = numpy.array([[3, 0, 6, 1, 7], [5, 2, 4, 4, 4]], dtype=numpy.int32)
    return dict(q=a["q"], k=kp, v=vp, kv_lens=numpy.array([20, 7], dtype=numpy.int32), page_table=table)


def call_both(exc, match, **kw):
    """decode and decode_exact both raise ``exc`` matching ``match``."""
    with pytest.raises(exc, match=match):
        sc.decode(samples=kw.pop("samples", 4), seed=0, **kw)
    with pytest.raises(exc, match=match):
        sc.decode_exact(**kw)


class FakeArray:
    """Looks like an array, is not one."""
    shape = (B, HQ, D)
    ndim = 3
    dtype = numpy.dtype(numpy.float32)


# ---------------------------------------------------------------- shapes

SHAPE_CASES = [
    ("q", lambda a: a["q"][0], ValueError),                              # 2-D
    ("q", lambda a: a["q"][None], ValueError),                           # 4-D
    ("q", lambda a: a["q"][:1], ValueError),                             # batch differs from k
    ("k", lambda a: a["k"][0], ValueError),                              # 3-D k
    ("k", lambda a: a["k"][..., :D - 1], ValueError),                    # head_dim differs
    ("v", lambda a: a["v"][:, :CAP - 1], ValueError),                    # v shape differs from k
    ("v", lambda a: a["v"][..., :D - 1], ValueError),
    ("kv_heads", lambda a: a["q"][:, :3], ValueError),                   # 3 % 2 != 0
    ("empty", lambda a: a["q"][:, :, :0], ValueError),
]


@pytest.mark.parametrize("name,make,exc", SHAPE_CASES)
def test_bad_shapes(name, make, exc):
    a = base()
    target = {"kv_heads": "q", "empty": "q"}.get(name, name)
    a[target] = make(a)
    if name in ("k",):
        a["v"] = a["k"].copy()          # keep v consistent, so the error is about k
    if name == "empty":
        a["k"] = a["k"][..., :0]
        a["v"] = a["v"][..., :0]
    match = {"kv_heads": "kv_heads", "empty": "empty"}.get(name, name)
    call_both(exc, match, **a)


def test_q_heads_not_multiple_of_kv_heads_names_both():
    a = base()
    a["k"] = a["k"][:, :, :1].repeat(3, axis=2)
    a["v"] = a["k"].copy()
    with pytest.raises(ValueError, match=r"q_heads \(4\).*kv_heads \(3\)"):
        sc.decode(**a)


# ---------------------------------------------------------------- dtypes

@pytest.mark.parametrize("name", ["q", "k", "v"])
@pytest.mark.parametrize("dtype", [numpy.int32, numpy.int8, numpy.complex64, numpy.bool_])
def test_non_float_dtype(name, dtype):
    a = base()
    a[name] = a[name].astype(dtype)
    call_both(TypeError, name, **a)


@pytest.mark.parametrize("name", ["k", "v"])
def test_dtype_mismatch(name):
    a = base()
    a[name] = a[name].astype(numpy.float16)
    call_both(TypeError, name, **a)


# ---------------------------------------------------------------- kv_lens

@pytest.mark.parametrize("lens,exc", [
    (numpy.array([0, 5], dtype=numpy.int32), ValueError),
    (numpy.array([5, -3], dtype=numpy.int32), ValueError),
    (numpy.array([CAP + 1, 5], dtype=numpy.int32), ValueError),
    (numpy.array([5], dtype=numpy.int32), ValueError),                   # wrong shape
    (numpy.array([[5, 5]], dtype=numpy.int32), ValueError),
    (numpy.array([5.0, 5.0]), TypeError),                                 # float dtype
    (numpy.array([True, True]), TypeError),
    ([5, 5], TypeError),                                                  # not an array
])
def test_bad_kv_lens(lens, exc):
    a = base()
    a["kv_lens"] = lens
    call_both(exc, "kv_lens", **a)


def test_kv_lens_capacity_of_paged_cache():
    a = paged_base()
    a["kv_lens"] = numpy.array([21, 7], dtype=numpy.int32)        # 5 pages of 4 = capacity 20
    call_both(ValueError, "kv_lens", **a)


# ---------------------------------------------------------------- page_table

def test_paged_base_is_valid():
    a = paged_base()
    out = sc.decode_exact(**a)
    assert numpy.isfinite(out).all()


@pytest.mark.parametrize("entry", [8, 100, -1])
def test_page_table_out_of_range(entry):
    a = paged_base()
    a["page_table"] = a["page_table"].copy()
    a["page_table"][1, 1] = entry                        # sequence 1 uses pages 0 and 1 (7 rows)
    call_both(ValueError, "page_table", **a)


def test_page_table_entries_past_length_are_ignored():
    a = paged_base()
    a["page_table"] = a["page_table"].copy()
    a["page_table"][1, 2:] = [-7, 10 ** 6, 8]             # sequence 1 needs only 2 pages
    want = sc.decode_exact(**paged_base())
    numpy.testing.assert_array_equal(sc.decode_exact(**a), want)
    sc.decode(samples=4, seed=0, **a)


@pytest.mark.parametrize("table,exc", [
    (numpy.zeros((B,), dtype=numpy.int32), ValueError),               # 1-D
    (numpy.zeros((B + 1, 5), dtype=numpy.int32), ValueError),         # batch differs
    (numpy.zeros((B, 5, 1), dtype=numpy.int32), ValueError),
    (numpy.zeros((B, 5), dtype=numpy.float32), TypeError),
    ([[0] * 5] * B, TypeError),
])
def test_bad_page_table(table, exc):
    a = paged_base()
    a["page_table"] = table
    call_both(exc, "page_table", **a)


def test_page_table_requires_kv_lens():
    a = paged_base()
    a["kv_lens"] = None
    call_both(ValueError, "kv_lens", **a)


# ---------------------------------------------------------------- NaN / Inf

@pytest.mark.parametrize("bad", [numpy.nan, numpy.inf, -numpy.inf])
@pytest.mark.parametrize("name", ["q", "k", "v"])
def test_non_finite_within_lengths(name, bad):
    a = base()
    a[name] = a[name].copy()
    if name == "q":
        a["q"][1, 2, 3] = bad
    else:
        a[name][1, 6, 1, 0] = bad                        # last valid row of sequence 1
    call_both(ValueError, name, **a)


@pytest.mark.parametrize("dtype", [numpy.float16, numpy.float32])
def test_non_finite_past_lengths_is_accepted(dtype):
    a = base(dtype)
    for name in ("k", "v"):
        a[name] = a[name].copy()
        a[name][1, 7:] = numpy.nan
        a[name][1, 10, 0, 0] = numpy.inf
    out = sc.decode_exact(**a)
    assert numpy.isfinite(out.astype(numpy.float64)).all()
    clean = base(dtype)
    numpy.testing.assert_array_equal(out, sc.decode_exact(**clean))
    for scheme in sc.SCHEMES:
        o = sc.decode(samples=8, scheme=scheme, seed=1, **a)
        numpy.testing.assert_array_equal(o, sc.decode(samples=8, scheme=scheme, seed=1, **clean))


def test_non_finite_in_unused_pages_is_accepted():
    a = paged_base()
    for name in ("k", "v"):
        a[name] = a[name].copy()
    # sequence 1 uses pages 5 (rows 0-3) and 2 (rows 4-6, row 3 of page 2 is past its length)
    a["k"][2, 3] = numpy.nan
    a["v"][2, 3] = numpy.inf
    # page 4 is listed for sequence 1 but past its length; nobody uses it
    a["k"][4] = numpy.nan
    a["v"][4] = numpy.nan
    out = sc.decode_exact(**a)
    assert numpy.isfinite(out).all()
    sc.decode(samples=8, seed=0, **a)
    # but NaN in a used row of a page raises, naming the array
    a["k"][2, 2, 1, 0] = numpy.nan
    call_both(ValueError, "k", **a)


# ---------------------------------------------------------------- samples, scheme, keys, scale

@pytest.mark.parametrize("samples,exc", [(0, ValueError), (-4, ValueError), (2.0, TypeError),
                                          ("8", TypeError), (True, TypeError), (None, TypeError)])
def test_bad_samples(samples, exc):
    a = base()
    with pytest.raises(exc, match="samples"):
        sc.decode(samples=samples, **a)
    with pytest.raises(exc, match="samples"):
        sc.sample(numpy.ones(10), samples)


@pytest.mark.parametrize("scheme", ["uniform", "", None, "IID", 3])
def test_unknown_scheme(scheme):
    with pytest.raises(ValueError, match="scheme"):
        sc.decode(samples=4, scheme=scheme, **base())
    with pytest.raises(ValueError, match="scheme"):
        sc.sample(numpy.ones(10), 4, scheme)


@pytest.mark.parametrize("dispatch", ["exact", None, "AUTO"])
def test_unknown_dispatch(dispatch):
    with pytest.raises(ValueError, match="dispatch"):
        sc.decode(samples=4, dispatch=dispatch, **base())


def test_dispatch_auto_samples_on_the_reference():
    """The reference (NumPy) path always samples: the rule is about GPU launch costs."""
    numpy.testing.assert_array_equal(sc.decode(samples=4, seed=1, dispatch="auto", **base()),
                                     sc.decode(samples=4, seed=1, **base()))


@pytest.mark.parametrize("kw,exc,match", [
    (dict(key_draws=4, key_scheme="systematic"), ValueError, "key_scheme"),
    (dict(key_draws=4, key_scheme="tile"), ValueError, "key_scheme"),
    (dict(key_draws=4, key_group="tile"), ValueError, "key_group"),
    (dict(key_draws=4, key_group=None), ValueError, "key_group"),
    (dict(key_draws=0), ValueError, "key_draws"),
    (dict(key_draws=2.5), TypeError, "key_draws"),
    (dict(key_draws=True), TypeError, "key_draws"),
])
def test_bad_key_arguments(kw, exc, match):
    a = base()
    with pytest.raises(exc, match=match):
        sc.decode(samples=4, seed=0, **a, **kw)
    with pytest.raises(exc, match=match):
        sc.decode_exact(seed=0, **a, **kw)


@pytest.mark.parametrize("scale,exc", [(0, ValueError), (0.0, ValueError), (-1.0, ValueError),
                                        (math.nan, ValueError), (math.inf, ValueError),
                                        ("0.5", TypeError), (True, TypeError),
                                        (numpy.array([0.5]), TypeError), (1j, TypeError)])
def test_bad_scale(scale, exc):
    call_both(exc, "scale", scale=scale, **base())
    with pytest.raises(exc, match="scale"):
        sc.bernoulli_scores(base()["q"], base()["k"], 4, seed=0, scale=scale)


def test_good_scales_accepted():
    a = base()
    for scale in (1, 0.5, numpy.float32(0.5), numpy.float64(2.0)):
        sc.decode_exact(scale=scale, **a)


# ---------------------------------------------------------------- array kinds, out=

@pytest.mark.parametrize("name", ["q", "k", "v", "kv_lens"])
@pytest.mark.parametrize("make", [lambda x: x.tolist(), lambda x: FakeArray(), lambda x: memoryview(x)],
                         ids=["list", "fake", "memoryview"])
def test_non_array_inputs(name, make):
    a = base()
    a[name] = make(a[name])
    call_both(TypeError, name, **a)


class FakeDLPack(FakeArray):
    """A DLPack producer that is not on a CUDA device (like a CPU torch tensor)."""

    def __dlpack__(self, stream=None):
        raise BufferError("no DLPack export from this fake")

    def __dlpack_device__(self):
        return (1, 0)        # kDLCPU


def test_non_cuda_dlpack_input_names_q():
    a = base()
    a["q"] = FakeDLPack()
    with pytest.raises((TypeError, ValueError), match=r"\bq\b"):
        sc.decode(samples=4, seed=0, **a)


def test_non_array_page_table_and_sample_inputs():
    a = paged_base()
    a["page_table"] = FakeArray()
    call_both(TypeError, "page_table", **a)
    with pytest.raises(TypeError, match="p"):
        sc.sample([0.5, 0.5], 2)
    with pytest.raises(TypeError, match="lengths"):
        sc.sample(numpy.ones((2, 5)), 2, lengths=[3, 3])
    with pytest.raises(TypeError, match="q"):
        sc.ternary_query(base()["q"].tolist(), 2)


@pytest.mark.parametrize("out,exc", [
    (numpy.zeros((B, HQ, D + 1), dtype=numpy.float32), ValueError),
    (numpy.zeros((B, HQ), dtype=numpy.float32), ValueError),
    (numpy.zeros((B, HQ, D), dtype=numpy.float64), ValueError),
    (numpy.zeros((B, HQ, D), dtype=numpy.float16), ValueError),
    (numpy.zeros((B, HQ, 2 * D), dtype=numpy.float32)[..., ::2], ValueError),     # not contiguous
    (numpy.zeros((B, HQ, D), dtype=numpy.float32).tolist(), TypeError),
    (FakeArray(), TypeError),
])
def test_bad_out(out, exc):
    call_both(exc, "out", out=out, **base())


# ---------------------------------------------------------------- sample(), ternary_query(), bernoulli_scores()

NO_WEIGHT = [pytest.mark.filterwarnings("ignore::RuntimeWarning")]


@pytest.mark.parametrize("p,kw,exc,match", [
    (numpy.ones((2, 2, 2, 5)), {}, ValueError, "p"),
    (numpy.ones(0), {}, ValueError, "p"),
    (numpy.array([0.5, -0.1, 0.6]), {}, ValueError, "p"),
    (numpy.array([0.5, numpy.nan]), {}, ValueError, "p"),
    (numpy.array([0.5, numpy.inf]), {}, ValueError, "p"),
    pytest.param(numpy.array([[0.5, 0.5], [0.0, 0.0]]), {}, ValueError, "p", marks=NO_WEIGHT),
    pytest.param(numpy.array([0.0, 1.0]), dict(lengths=numpy.array([1])), ValueError, "p",
                 marks=NO_WEIGHT),                                    # nothing valid
    (numpy.array([0.0, numpy.nan]), dict(logits=True), ValueError, "p"),
    (numpy.array([0.0, numpy.inf]), dict(logits=True), ValueError, "p"),
    pytest.param(numpy.full(3, -numpy.inf), dict(logits=True), ValueError, "p", marks=NO_WEIGHT),
    (numpy.ones((2, 5)), dict(lengths=numpy.array([0, 3])), ValueError, "lengths"),
    (numpy.ones((2, 5)), dict(lengths=numpy.array([6, 3])), ValueError, "lengths"),
    (numpy.ones((2, 5)), dict(lengths=numpy.array([3])), ValueError, "lengths"),
])
def test_bad_sample_inputs(p, kw, exc, match):
    with pytest.raises(exc, match=match):
        sc.sample(p, 4, seed=0, **kw)


def test_sample_accepts_minus_inf_logits():
    idx, _ = sc.sample(numpy.array([-numpy.inf, 0.0, -numpy.inf]), 5, "iid", seed=0, logits=True)
    assert (idx == 1).all()


@pytest.mark.parametrize("kw,exc,match", [
    (dict(draws=0), ValueError, "draws"),
    (dict(draws=1.5), TypeError, "draws"),
    (dict(draws=2, scheme="systematic"), ValueError, "scheme"),
    (dict(draws=2, kv_heads=3), ValueError, "kv_heads"),
    (dict(draws=2, kv_heads=0), ValueError, "kv_heads"),
    (dict(draws=2, kv_heads=2.0), TypeError, "kv_heads"),
])
def test_bad_ternary_query_arguments(kw, exc, match):
    with pytest.raises(exc, match=match):
        sc.ternary_query(base()["q"], seed=0, **kw)


@pytest.mark.parametrize("make,exc,match", [
    (lambda q: q.astype(numpy.int32), TypeError, "q"),
    (lambda q: q[0], ValueError, "q"),
    (lambda q: numpy.where(numpy.arange(D) == 2, numpy.nan, q).astype(numpy.float32), ValueError, "q"),
])
def test_bad_ternary_query_input(make, exc, match):
    with pytest.raises(exc, match=match):
        sc.ternary_query(make(base()["q"]), 2, seed=0)


@pytest.mark.parametrize("kw,exc,match", [
    (dict(draws=0), ValueError, "draws"),
    (dict(draws=2, scheme="iid-ish"), ValueError, "scheme"),
    (dict(draws=2, key_group="all"), ValueError, "key_group"),
    (dict(draws=2, kv_lens=numpy.array([0, 3], dtype=numpy.int32)), ValueError, "kv_lens"),
])
def test_bad_bernoulli_scores_arguments(kw, exc, match):
    a = base()
    with pytest.raises(exc, match=match):
        sc.bernoulli_scores(a["q"], a["k"], seed=0, **kw)


def test_bernoulli_scores_non_finite_key():
    a = base()
    k = a["k"].copy()
    k[0, 3, 1, 2] = numpy.nan
    with pytest.raises(ValueError, match="k"):
        sc.bernoulli_scores(a["q"], k, 2, seed=0)


# ---------------------------------------------------------------- flags, seeds, read-only outputs

@pytest.mark.parametrize("name", ["return_lse", "validate"])
@pytest.mark.parametrize("value", ["no", 1, None])
def test_flags_must_be_bool(name, value):
    call_both(TypeError, name, **{name: value}, **base())


@pytest.mark.parametrize("value", ["no", 0])
def test_return_counts_must_be_bool(value):
    with pytest.raises(TypeError, match="return_counts"):
        sc.decode(samples=4, seed=0, return_counts=value, **base())


@pytest.mark.parametrize("seed,exc", [(-1, ValueError), (2 ** 64, ValueError), (1.5, TypeError),
                                      (True, TypeError), ("7", TypeError),
                                      (numpy.array([1, -2]), ValueError), (numpy.array([1]), ValueError),
                                      (numpy.array([1.0, 2.0]), TypeError)])
def test_bad_seed_raises_before_the_values_are_read(seed, exc):
    a = base()
    a["k"][0, 0, 0, 0] = numpy.nan         # a bad seed is reported first
    with pytest.raises(exc, match="seed"):
        sc.decode(samples=4, seed=seed, **a)
    with pytest.raises(exc, match="seed"):
        sc.decode_exact(seed=seed, **a)


def test_bad_seed_in_the_other_entry_points():
    a = base()
    with pytest.raises(ValueError, match="seed"):
        sc.sample(numpy.ones((2, 5)), 4, seed=-1)
    with pytest.raises(ValueError, match="seed"):
        sc.ternary_query(a["q"], 2, seed=numpy.array([1, 2, 3]))
    with pytest.raises(ValueError, match="seed"):
        sc.bernoulli_scores(a["q"], a["k"], 2, seed=-3)


def test_read_only_out_raises_before_the_computation():
    out = numpy.zeros((B, HQ, D), dtype=numpy.float32)
    out.setflags(write=False)
    call_both(ValueError, "out", out=out, **base())


@pytest.mark.parametrize("lens", [numpy.array([2 ** 64 - 1, 5], dtype=numpy.uint64),
                                  numpy.array([2 ** 63, 5], dtype=numpy.uint64)])
def test_huge_unsigned_kv_lens_are_reported_as_given(lens):
    a = base()
    a["kv_lens"] = lens
    call_both(ValueError, str(int(lens[0])), **a)


def test_huge_unsigned_page_entry_is_reported_as_given():
    a = paged_base()
    a["page_table"] = a["page_table"].astype(numpy.uint64)
    a["page_table"][0, 1] = 2 ** 64 - 1
    call_both(ValueError, r"page_table\[0, 1\] = 18446744073709551615", **a)


def test_page_table_without_columns_names_it():
    a = paged_base()
    a["page_table"] = a["page_table"][:, :0]
    call_both(ValueError, "page_table", **a)


def test_scheme_must_be_a_string():
    with pytest.raises(ValueError, match="scheme"):
        sc.decode(samples=4, seed=0, scheme=numpy.array(["iid", "tile"]), **base())
    with pytest.raises(ValueError, match="k_layout"):
        sc.decode_exact(k_layout=numpy.array("standard"), **base())


@pytest.mark.parametrize("p,kw,exc,match", [
    (numpy.array([0.5 + 1j, 0.5]), {}, TypeError, "p"),
    (numpy.array(["a", "b"]), {}, TypeError, "p"),
    (numpy.array([0.5, None]), {}, TypeError, "p"),
    (numpy.ones((0, 5)), {}, ValueError, "p"),
    (numpy.ones((2, 5)), dict(lengths=numpy.array([2.7, 3.2])), TypeError, "lengths"),
    (numpy.ones((2, 5)), dict(lengths=numpy.array([True, True])), TypeError, "lengths"),
    (numpy.ones((2, 5)), dict(logits="yes"), TypeError, "logits"),
    (numpy.ones((2, 5)), dict(counts=1), TypeError, "counts"),
])
def test_more_bad_sample_inputs(p, kw, exc, match):
    with pytest.raises(exc, match=match):
        sc.sample(p, 4, seed=0, **kw)


@pytest.mark.parametrize("make", [lambda q: q[..., :0], lambda q: q[:, :0]])
def test_empty_ternary_query_input(make):
    with pytest.raises(ValueError, match="q"):
        sc.ternary_query(make(base()["q"]), 2, seed=0)


def test_bernoulli_scores_needs_draws_and_takes_validate():
    a = base()
    with pytest.raises(TypeError, match="draws"):
        sc.bernoulli_scores(a["q"], a["k"], None, seed=0)
    with pytest.raises(TypeError, match="validate"):
        sc.bernoulli_scores(a["q"], a["k"], 2, seed=0, validate="no")
    # NumPy inputs are always checked, validate or not
    k = a["k"].copy()
    k[0, 3, 1, 2] = numpy.nan
    with pytest.raises(ValueError, match="k"):
        sc.bernoulli_scores(a["q"], k, 2, seed=0, validate=False)


def test_append_into_read_only_cache_raises():
    k_fm = sc.to_feature_major(base()["k"])
    k_fm.setflags(write=False)
    with pytest.raises(ValueError, match="k_fm"):
        sc.append_feature_major(k_fm, base()["k"][:, 0], numpy.array([3, 4]))


def test_bernoulli_scores_dtype_mismatch_names_q_and_k_only():
    a = base()
    with pytest.raises(TypeError, match="q and k must share one dtype, got float32, float16$"):
        sc.bernoulli_scores(a["q"], a["k"].astype(numpy.float16), 2, seed=0)
