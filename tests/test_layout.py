"""Feature-major key caches: conversion both ways and appends, contiguous and paged."""
import numpy
import pytest

import santa_cupy as sc


def _cache(shape, seed=0):
    return numpy.random.default_rng(seed).standard_normal(shape).astype(numpy.float32)


@pytest.mark.parametrize("shape", [(2, 37, 4, 64), (5, 16, 2, 128)])     # contiguous, paged
def test_round_trip_and_feature_rows_contiguous(shape):
    k = _cache(shape)
    kf = sc.to_feature_major(k)
    assert kf.shape == (shape[0], shape[2], shape[3], shape[1]) and kf.flags.c_contiguous
    assert kf.strides[-1] == k.itemsize                     # one feature of many tokens: one run
    numpy.testing.assert_array_equal(kf[1, 1, 3], k[1, :, 1, 3])
    numpy.testing.assert_array_equal(sc.from_feature_major(kf), k)


def test_append_contiguous_matches_standard_layout():
    k = _cache((3, 10, 2, 64))
    new = _cache((3, 2, 64), seed=1)
    pos = numpy.array([0, 9, 4])
    kf = sc.to_feature_major(k)
    assert sc.append_feature_major(kf, new, pos) is kf
    k[numpy.arange(3), pos] = new
    numpy.testing.assert_array_equal(kf, sc.to_feature_major(k))


def test_append_paged_matches_standard_layout():
    pages = _cache((7, 4, 2, 64))
    table = numpy.array([[6, 2, 0], [1, 5, 3]], dtype=numpy.int32)
    new = _cache((2, 2, 64), seed=2)
    pos = numpy.array([9, 3])                                # pages table[0, 2] and table[1, 0]
    kf = sc.to_feature_major(pages)
    sc.append_feature_major(kf, new, pos, page_table=table)
    pages[table[[0, 1], pos // 4], pos % 4] = new
    numpy.testing.assert_array_equal(kf, sc.to_feature_major(pages))


def test_append_bad_input_names_argument():
    kf = sc.to_feature_major(_cache((2, 8, 2, 64)))
    new = _cache((2, 2, 64))
    with pytest.raises(ValueError, match="positions must be in \\[0, 8\\), got 8 for sequence 1"):
        sc.append_feature_major(kf, new, numpy.array([0, 8]))
    with pytest.raises(TypeError, match="positions"):
        sc.append_feature_major(kf, new, numpy.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="k_new"):
        sc.append_feature_major(kf, new[:, :1], numpy.array([0, 1]))
    with pytest.raises(TypeError, match="k_new"):
        sc.append_feature_major(kf, new.astype(numpy.float16), numpy.array([0, 1]))
    with pytest.raises(ValueError, match="page_table"):
        sc.append_feature_major(kf, new, numpy.array([0, 1]), page_table=numpy.array([[0], [9]]))
    with pytest.raises(ValueError, match="k must be a 4-D"):
        sc.to_feature_major(new)
    with pytest.raises(TypeError, match="positions must be a numpy or cupy array"):
        sc.append_feature_major(kf, new, [0, 1])


def _problem(paged, dtype=numpy.float32, kv_heads=2, dim=64):
    r = numpy.random.default_rng(3)
    q = r.standard_normal((2, 8, dim)).astype(dtype)
    if paged:
        k, v = (_cache((5, 16, kv_heads, dim), s).astype(dtype) for s in (4, 5))
        return dict(q=q, k=k, v=v, kv_lens=numpy.array([30, 9]), page_table=numpy.array([[4, 0], [2, 1]]))
    k, v = (_cache((2, 30, kv_heads, dim), s).astype(dtype) for s in (4, 5))
    return dict(q=q, k=k, v=v, kv_lens=numpy.array([30, 9]))


@pytest.mark.parametrize("dtype,kv_heads,dim", [(numpy.float32, 2, 64), (numpy.float16, 1, 128),
                                                (numpy.float64, 8, 16)])
@pytest.mark.parametrize("paged", [False, True])
def test_decode_reads_feature_major_caches(paged, dtype, kv_heads, dim):
    p = _problem(paged, dtype, kv_heads, dim)
    f = {**p, "k": sc.to_feature_major(p["k"])}
    kw = dict(key_draws=4, seed=3)
    # (float64 inputs are read in place, so the strided view may be summed in another order)
    numpy.testing.assert_allclose(sc.decode_exact(**f, k_layout="feature_major"), sc.decode_exact(**p),
                                  rtol=1e-13, atol=1e-15)
    numpy.testing.assert_array_equal(sc.decode(**f, samples=16, k_layout="feature_major", **kw),
                                     sc.decode(**p, samples=16, **kw))
    # the einsum may sum in another order over a strided view: rounding relative to the terms,
    # not to a score that cancels to near zero
    want = sc.bernoulli_scores(p["q"], p["k"], 4, seed=3, kv_lens=p["kv_lens"], page_table=p.get("page_table"))
    numpy.testing.assert_allclose(
        sc.bernoulli_scores(f["q"], f["k"], 4, seed=3, kv_lens=f["kv_lens"], page_table=f.get("page_table"),
                            k_layout="feature_major"),
        want, rtol=1e-12, atol=1e-12 * numpy.abs(want[numpy.isfinite(want)]).max())


def test_bad_k_layout_names_argument():
    p = _problem(False)
    with pytest.raises(ValueError, match="k_layout"):
        sc.decode(**p, k_layout="tokens")
    with pytest.raises(ValueError, match=r"k \(feature_major\)"):
        sc.decode_exact(**{**p, "k": p["k"][0]}, k_layout="feature_major")
    with pytest.raises(ValueError, match="v must have the shape"):   # k not actually feature-major
        sc.decode_exact(**p, k_layout="feature_major")
