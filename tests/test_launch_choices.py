"""Host-side choices that shape the GPU work (no GPU needed)."""
import types

import pytest

pytest.importorskip("cupy")
from santa_cupy import _gpu  # noqa: E402


def _geo(batch, kv_heads, capacity):
    return types.SimpleNamespace(batch=batch, kv_heads=kv_heads, capacity=capacity)


@pytest.mark.parametrize("batch, kv_heads, capacity, samples, parts", [
    (8, 8, 32768, 256, 4),      # one draw per 2 parts, 64 (sequence, KV head) pairs
    (4, 8, 32768, 256, 4),      # 32 pairs
    (1, 8, 32768, 256, 1),      # 8 pairs: pass 2 is latency-bound
    (1, 8, 131072, 256, 4),     # one draw per 8 parts
    (32, 8, 8192, 256, 1),      # two draws per part
    (8, 8, 32768, 1024, 1),
])
def test_parts_per_value_task_follow_the_draw_density(batch, kv_heads, capacity, samples, parts):
    assert _gpu._value_task_parts(_gpu.STAT_PARTS, "systematic", samples, _geo(batch, kv_heads, capacity)) == parts


def test_tile_scheme_and_float32_caches_keep_tile_tasks():
    sparse = _geo(8, 8, 131072)
    assert _gpu._value_task_parts(_gpu.STAT_PARTS, "tile", 256, sparse) == 1
    assert _gpu._value_task_parts(1, "systematic", 256, sparse) == 1
    assert _gpu._value_task_parts(_gpu.STAT_PARTS, "iid", 256, sparse) == _gpu.STAT_PARTS
