"""CPU checks of the bounds computation behind the performance targets (no GPU)."""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # bench/ is a folder of scripts next to the package, not installed

from bench import bounds, report  # noqa: E402


def _rows(config, dense_us, santa_us, santa_bytes, batch=8, n=32768):
    geo = dict(config=config, batch=batch, n=n, q_heads=32, kv_heads=8, dim=128, dtype="bfloat16", error=None)
    dense = report.dense_bytes(batch, batch * n, 32, 8, 128, 2)
    return [report.new_row(**geo, method="flashinfer", us=dense_us, bytes=dense),
            report.new_row(**geo, method="sdpa", us=dense_us * 1.1, bytes=dense),
            report.new_row(**geo, method="santa", scheme="systematic", samples=256, us=santa_us, bytes=santa_bytes),
            report.new_row(**geo, method="santa", scheme="iid", samples=256, us=1.0, bytes=1)]


def test_target_and_rates_from_the_best_dense_row():
    rows = _rows("c", 200.0, 150.0, 600e6)
    (b,) = bounds.bounds(rows, {"c": 50.0}, targets=(("c", 2.0),))
    assert b["dense"] == "flashinfer" and b["target_us"] == pytest.approx(100.0)
    rate = rows[0]["bytes"] / 200.0
    assert b["with_stash_us"] == pytest.approx(600e6 / rate)
    stash = 2 * report.STASH_BYTES_PER_SCORE * 8 * 32768 * 32   # a file without the stash read: all of it
    assert b["no_stash_us"] == pytest.approx((600e6 - stash) / rate)
    assert b["with_stash_pct"] == pytest.approx(100 * b["with_stash_us"] / 100.0)
    assert bounds.key_bytes(rows[0]) == 8 * 32768 * 8 * 128 * 2
    rows[2]["stash_bytes"] = 40e6                                # the stash bytes the row counted
    (b,) = bounds.bounds(rows, {"c": 50.0}, targets=(("c", 2.0),))
    assert b["no_stash_us"] == pytest.approx((600e6 - 40e6) / rate)


@pytest.mark.parametrize("key_read, santa_bytes, verdict", [
    (120.0, 500e6, "out of reach: reading the keys"),      # the keys alone take longer than the target
    (101.0, 500e6, "at the limit"),                          # ... or as long, within the noise
    (50.0, 1.2e9, "out of reach with the score stash"),    # the stash tips it over
    (50.0, 400e6, "needs"),                                  # within reach on paper
])
def test_verdicts(key_read, santa_bytes, verdict):
    (b,) = bounds.bounds(_rows("c", 200.0, 150.0, santa_bytes), {"c": key_read}, targets=(("c", 2.0),))
    assert b["verdict"].startswith(verdict)
    text = bounds.markdown("card", "date", 4.0, "results.json", [b])
    assert "| c | 2.0× |" in text and b["verdict"] in text
