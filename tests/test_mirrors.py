"""The launch code's copies of the kernels' compile-time constants (shared-memory sizes and block
shapes are computed from them on the host) agree with the CUDA sources."""
import re

import pytest

from santa_cupy import _gpu, _kernels

DEFINE = re.compile(r"^#define ([A-Z0-9_]+) (\d+)\b", re.M)

SAME_NAME = ("CHUNK_ROWS", "STAT_PARTS", "EXACT_STAGES", "EXACT_STAGE_BYTES", "EXACT_PIPE_RINGS",
             "EXACT_RING_WARPS_256", "EXACT_PIPE_STAGES", "SCORE_STAGES", "SCORE_STAGE_BYTES",
             "SCORE_PIPE_WARPS", "SCORE_PIPE_STAGES", "SCORE_PIPE_CHUNKS", "KEY_STAGES")


def _defines():
    found = {}
    for name, value in DEFINE.findall(_kernels.source()):
        assert found.setdefault(name, int(value)) == int(value), f"{name} defined twice differently"
    return found


@pytest.mark.parametrize("name", SAME_NAME)
def test_host_constant_matches_kernel_define(name):
    assert getattr(_gpu, name) == _defines()[name]


def test_codes_and_block_size_match():
    d = _defines()
    assert _gpu.THREADS == d["SANTA_THREADS"]
    assert _gpu.SCHEME_CODES == {s: d[f"SCHEME_{s.upper()}"] for s in _gpu.SCHEME_CODES}
    assert _gpu.KEY_GROUP_CODES == {g: d[f"KEY_GROUP_{g.upper()}"] for g in _gpu.KEY_GROUP_CODES}


def test_value_warp_bytes_match():
    # pass 2's shared memory per warp, a multiple of the tile in the source
    m = re.search(r"^#define VALUE_WARP_BYTES \((\d+) \* SANTA_TILE\)", _kernels.source(), re.M)
    assert m and _gpu.VALUE_WARP_BYTES == int(m.group(1)) * _defines()["SANTA_TILE"]


def test_a_drifted_constant_is_caught(monkeypatch):
    monkeypatch.setattr(_gpu, "EXACT_PIPE_STAGES", _gpu.EXACT_PIPE_STAGES + 1)
    with pytest.raises(AssertionError):
        test_host_constant_matches_kernel_define("EXACT_PIPE_STAGES")
