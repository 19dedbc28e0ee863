"""Philox4x32-10 and the documented stream layout of :mod:`santa_cupy.rng`; seed resolution.

Statistical assertions here (one KS test, six stream-correlation tests, distinct doubles) take
their share of the suite-wide false-failure budget documented in ``test_statistics.py``
(``stat_budget.ALPHA`` each). Every draw uses a fixed seed, so the outcome is deterministic;
ALPHA bounds how often a correct RNG would fail for a random choice of those seeds.
"""
import numpy
import pytest
from scipy import stats

import santa_cupy as sc
from santa_cupy import rng
from stat_budget import ALPHA


# ---------------------------------------------------------------- Philox known answers

# Random123 kat_vectors, philox4x32 with 10 rounds: counter, key, expected output.
KAT = [
    ((0x00000000, 0x00000000, 0x00000000, 0x00000000), (0x00000000, 0x00000000),
     (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF),
     (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]


@pytest.mark.parametrize("counter,key,expected", KAT)
def test_philox_known_answer(counter, key, expected):
    out = rng.philox4x32(numpy.array(counter, dtype=numpy.uint32), numpy.array(key, dtype=numpy.uint32))
    assert out.dtype == numpy.uint32
    assert out.shape == (4,)
    assert [int(x) for x in out] == list(expected)


def test_philox_vectorised_matches_scalar_and_broadcasts_key():
    counters = numpy.array([c for c, _, _ in KAT], dtype=numpy.uint32)
    keys = numpy.array([k for _, k, _ in KAT], dtype=numpy.uint32)
    out = rng.philox4x32(counters, keys)
    assert out.tolist() == [list(e) for _, _, e in KAT]
    # one key broadcast against a batch of counters equals row-by-row evaluation
    ctr = numpy.random.default_rng(1).integers(0, 2 ** 32, size=(5, 3, 4), dtype=numpy.uint64).astype(numpy.uint32)
    key = numpy.array([0xA4093822, 0x299F31D0], dtype=numpy.uint32)
    batch = rng.philox4x32(ctr, key)
    assert batch.shape == (5, 3, 4)
    for i in range(5):
        for j in range(3):
            numpy.testing.assert_array_equal(batch[i, j], rng.philox4x32(ctr[i, j], key))


def test_philox_rounds_matter():
    c, k, e = KAT[2]
    assert [int(x) for x in rng.philox4x32(c, k, rounds=7)] != list(e)


# ---------------------------------------------------------------- uniforms: documented layout

def _manual_double(key, head, seq, purpose, offset, index):
    """The documented stream, assembled by hand from philox4x32 words."""
    counter = [index // 2, head, (seq & 0xFFFFFF) | (purpose << 24), offset & 0xFFFFFFFF]
    words = [int(w) for w in rng.philox4x32(counter, [key & 0xFFFFFFFF, key >> 32])]
    wa, wb = (words[2], words[3]) if index % 2 else (words[0], words[1])
    return ((wa >> 5) * 2 ** 26 + (wb >> 6)) / 2.0 ** 53


@pytest.mark.parametrize("key,head,seq,purpose,offset,index", [
    (0, 0, 0, rng.VALUES, 0, 0),
    (0, 0, 0, rng.VALUES, 0, 1),
    (2 ** 64 - 1, 7, 3, rng.KEYS, 5, 12),
    (0x0123456789ABCDEF, 31, 1000, rng.GROUP_KEYS, 2 ** 32 - 1, 4095),
    (12345, 2, 0, rng.VALUES, 77, 1001),
])
def test_uniforms_follow_documented_layout(key, head, seq, purpose, offset, index):
    got = rng.uniforms(numpy.uint64(key), head, seq, purpose, offset, index)
    assert float(got) == _manual_double(key, head, seq, purpose, offset, index)


def test_uniforms_range_dtype_resolution_and_determinism():
    idx = numpy.arange(200_000)
    u = rng.uniforms(numpy.uint64(20240601), 3, 1, rng.VALUES, 0, idx)
    assert u.dtype == numpy.float64 and u.shape == idx.shape
    assert u.min() >= 0.0 and u.max() < 1.0
    # 53-bit doubles: u * 2**53 is an integer
    numpy.testing.assert_array_equal(u * 2.0 ** 53, numpy.floor(u * 2.0 ** 53))
    assert len(numpy.unique(u)) == len(u)      # a repeat among 2e5 of 2^53 values: p about 2e-6
    numpy.testing.assert_array_equal(u, rng.uniforms(numpy.uint64(20240601), 3, 1, rng.VALUES, 0, idx))


def test_uniforms_broadcast_shape():
    u = rng.uniforms(numpy.full((2, 1, 1), 9, dtype=numpy.uint64), numpy.arange(3)[None, :, None],
                     numpy.zeros((2, 1, 1), dtype=numpy.int64), rng.VALUES, 0, numpy.arange(5)[None, None, :])
    assert u.shape == (2, 3, 5)
    assert float(u[1, 2, 4]) == _manual_double(9, 2, 0, rng.VALUES, 0, 4)


def test_uniforms_ks_uniform():
    u = rng.uniforms(numpy.uint64(987654321), 0, 0, rng.VALUES, 0, numpy.arange(100_000))
    assert stats.kstest(u, "uniform").pvalue > ALPHA


_BASE = dict(keys=numpy.uint64(42), heads=1, sequences=2, purpose=rng.VALUES, offset=3)
_WORD_CHANGES = {
    "key": dict(keys=numpy.uint64(42 + 2 ** 32)),      # high word of the key only
    "head": dict(heads=2),
    "sequence": dict(sequences=3),
    "purpose": dict(purpose=rng.KEYS),
    "offset": dict(offset=4),
}


@pytest.mark.parametrize("word", sorted(_WORD_CHANGES) + ["index"])
def test_stream_words_give_independent_streams(word):
    n = 20_000
    idx = numpy.arange(n)
    a = rng.uniforms(index=idx, **_BASE)
    if word == "index":
        b = rng.uniforms(index=idx + n, **_BASE)      # the next n doubles of the same stream
    else:
        b = rng.uniforms(index=idx, **{**_BASE, **_WORD_CHANGES[word]})
    assert not numpy.array_equal(a, b)
    assert numpy.mean(a == b) < 1e-3
    # Pearson correlation of two independent uniform streams: r * sqrt(n) ~ N(0, 1)
    r = numpy.corrcoef(a, b)[0, 1]
    p = 2 * stats.norm.sf(abs(r) * numpy.sqrt(n))
    assert p > ALPHA, (word, r)


def test_two_doubles_of_one_block_differ_in_words():
    # doubles 2i and 2i+1 come from the same Philox block, different words
    u = rng.uniforms(numpy.uint64(5), 0, 0, rng.VALUES, 0, numpy.arange(8))
    assert len(set(u.tolist())) == 8


# ---------------------------------------------------------------- resolve_seed

def test_resolve_seed_int():
    plan = rng.resolve_seed(2 ** 40 + 7, 3)
    assert plan.keys.dtype == numpy.uint64
    numpy.testing.assert_array_equal(plan.keys, numpy.full(3, 2 ** 40 + 7, dtype=numpy.uint64))
    numpy.testing.assert_array_equal(plan.sequences, numpy.arange(3))
    assert plan.offset == 0 and not plan.fresh
    top = rng.resolve_seed(2 ** 64 - 1, 1)
    assert int(top.keys[0]) == 2 ** 64 - 1
    assert int(rng.resolve_seed(numpy.uint64(2 ** 64 - 1), 1).keys[0]) == 2 ** 64 - 1
    assert int(rng.resolve_seed(numpy.int32(5), 1).keys[0]) == 5


def test_resolve_seed_per_sequence_array():
    seeds = numpy.array([11, 2 ** 63 + 5, 0], dtype=numpy.uint64)
    plan = rng.resolve_seed(seeds, 3)
    numpy.testing.assert_array_equal(plan.keys, seeds)
    numpy.testing.assert_array_equal(plan.sequences, numpy.zeros(3))
    assert plan.offset == 0 and not plan.fresh
    plan = rng.resolve_seed([4, 5], 2)
    numpy.testing.assert_array_equal(plan.keys, numpy.array([4, 5], dtype=numpy.uint64))


def test_resolve_seed_list_with_large_values():
    plan = rng.resolve_seed([2 ** 63, 1], 2)
    assert int(plan.keys[0]) == 2 ** 63


def test_resolve_seed_none_is_fresh_each_call():
    a = rng.resolve_seed(None, 2)
    b = rng.resolve_seed(None, 2)
    assert a.fresh and b.fresh
    assert a.offset != b.offset
    assert a.offset != 0 and b.offset != 0          # never the offset of an explicit seed
    numpy.testing.assert_array_equal(a.keys, numpy.full(2, rng.fresh_key(), dtype=numpy.uint64))
    numpy.testing.assert_array_equal(a.sequences, numpy.arange(2))


BAD_SEEDS = [
    (-1, ValueError),
    (2 ** 64, ValueError),
    (-(2 ** 70), ValueError),
    (1.0, TypeError),
    (0.5, TypeError),
    (True, TypeError),
    (numpy.bool_(False), TypeError),
    ("7", TypeError),
    (numpy.array([1.0, 2.0]), TypeError),
    (numpy.array([1, -2]), ValueError),
    (numpy.array([1, 2, 3]), ValueError),          # wrong length
    (numpy.array([[1, 2]]), ValueError),           # wrong shape
    (numpy.array(3), ValueError),                  # 0-d array is not (batch,)
]


@pytest.mark.parametrize("seed,exc", BAD_SEEDS, ids=[repr(s)[:30] for s, _ in BAD_SEEDS])
def test_resolve_seed_rejects_bad_seeds(seed, exc):
    with pytest.raises(exc, match="seed"):
        rng.resolve_seed(seed, 2)


@pytest.mark.parametrize("seed,exc", BAD_SEEDS[:6] + BAD_SEEDS[8:11],
                         ids=[repr(s)[:30] for s, _ in BAD_SEEDS[:6] + BAD_SEEDS[8:11]])
def test_public_api_rejects_bad_seeds(seed, exc, small_problem):
    q, k, v = small_problem
    with pytest.raises(exc, match="seed"):
        sc.decode(q, k, v, samples=4, seed=seed)
    with pytest.raises(exc, match="seed"):
        sc.sample(numpy.ones((2, 5)), 4, seed=seed)
    with pytest.raises(exc, match="seed"):
        sc.ternary_query(q, 4, seed=seed)


# ---------------------------------------------------------------- seeds through the public API

@pytest.fixture
def small_problem():
    r = numpy.random.default_rng(3)
    q = r.standard_normal((2, 4, 8))
    k = r.standard_normal((2, 40, 2, 8))
    v = r.standard_normal((2, 40, 2, 8))
    return q, k, v


@pytest.mark.parametrize("scheme", sc.SCHEMES)
def test_per_sequence_seed_is_independent_of_batch_position(scheme):
    r = numpy.random.default_rng(4)
    q = r.standard_normal((3, 4, 8))
    k = r.standard_normal((3, 300, 2, 8))
    v = r.standard_normal((3, 300, 2, 8))
    lens = numpy.array([300, 17, 260], dtype=numpy.int32)
    seeds = numpy.array([101, 202, 303], dtype=numpy.uint64)
    perm = numpy.array([2, 0, 1])
    a = sc.decode(q, k, v, samples=16, scheme=scheme, seed=seeds, kv_lens=lens)
    b = sc.decode(q[perm], k[perm], v[perm], samples=16, scheme=scheme, seed=seeds[perm], kv_lens=lens[perm])
    numpy.testing.assert_array_equal(a[perm], b)
    # a sequence alone in its batch draws the same as in the batch
    c = sc.decode(q[1:2], k[1:2], v[1:2], samples=16, scheme=scheme, seed=seeds[1:2], kv_lens=lens[1:2])
    numpy.testing.assert_array_equal(a[1:2], c)
    # whereas one int seed makes the draws depend on the batch index (sequence word)
    d = sc.decode(q, k, v, samples=16, scheme=scheme, seed=7, kv_lens=lens)
    e = sc.decode(q[perm], k[perm], v[perm], samples=16, scheme=scheme, seed=7, kv_lens=lens[perm])
    assert not numpy.array_equal(d[perm], e)


@pytest.mark.parametrize("scheme", sc.SCHEMES)
def test_per_sequence_seed_sample(scheme):
    p = numpy.random.default_rng(5).random((3, 2, 600))
    seeds = numpy.array([9, 8, 7])
    idx, w = sc.sample(p, 32, scheme, seed=seeds)
    idx2, w2 = sc.sample(p[::-1], 32, scheme, seed=seeds[::-1])
    numpy.testing.assert_array_equal(idx, idx2[::-1])
    numpy.testing.assert_array_equal(w, w2[::-1])


def test_seed_none_draws_fresh_randomness(small_problem):
    q, k, v = small_problem
    a = sc.decode(q, k, v, samples=8, scheme="iid", seed=None)
    b = sc.decode(q, k, v, samples=8, scheme="iid", seed=None)
    assert not numpy.array_equal(a, b)
    i1, _ = sc.sample(numpy.ones(1000), 16, "iid", seed=None)
    i2, _ = sc.sample(numpy.ones(1000), 16, "iid", seed=None)
    assert not numpy.array_equal(i1, i2)
    # ternary queries too: fresh key draws, so fresh scores
    e1 = sc.decode_exact(q, k, v, key_draws=2, seed=None)
    assert not numpy.array_equal(e1, sc.decode_exact(q, k, v, key_draws=2, seed=None))


def test_explicit_seed_is_reproducible_and_seed_sensitive(small_problem):
    q, k, v = small_problem
    for scheme in sc.SCHEMES:
        a = sc.decode(q, k, v, samples=8, scheme=scheme, seed=123)
        numpy.testing.assert_array_equal(a, sc.decode(q, k, v, samples=8, scheme=scheme, seed=123))
        assert not numpy.array_equal(a, sc.decode(q, k, v, samples=8, scheme=scheme, seed=124))
        # seeds that differ only in the high 32 bits of the key
        assert not numpy.array_equal(a, sc.decode(q, k, v, samples=8, scheme=scheme, seed=123 + 2 ** 32))
