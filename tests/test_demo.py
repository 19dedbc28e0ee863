"""The demo (``python -m santa_cupy``) runs on the CPU reference."""
import subprocess
import sys


def test_demo_runs_on_the_cpu():
    res = subprocess.run([sys.executable, "-m", "santa_cupy", "--cpu", "--context", "4096", "--seeds", "1"],
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "demo on CPU" in res.stdout
    rows = [line.split() for line in res.stdout.splitlines() if line.startswith("systematic ")]
    errors = [float(r[2]) for r in rows]                       # S = 16, 64, 256, 1024
    assert len(errors) == 4 and errors == sorted(errors, reverse=True)
