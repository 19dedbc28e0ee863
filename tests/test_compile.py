"""Every kernel instantiation compiles with NVRTC for sm_80, sm_89 and sm_90 (no GPU needed)."""
import pytest

from santa_cupy import _kernels

nvrtc = pytest.importorskip("cuda.bindings.nvrtc", reason="cuda-bindings (NVRTC) not installed")


def _check(result, prog=None):
    err = result[0] if isinstance(result, tuple) else result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        log = ""
        if prog is not None:
            _, n = nvrtc.nvrtcGetProgramLogSize(prog)
            buf = b" " * n
            nvrtc.nvrtcGetProgramLog(prog, buf)
            log = buf.decode(errors="replace")
        raise AssertionError(f"NVRTC failed: {err}\n{log}")
    return result


@pytest.mark.parametrize("arch", ["sm_80", "sm_89", "sm_90"])
def test_every_instantiation_compiles(arch):
    names = [n for d, h in _kernels.instantiations() for n in _kernels.name_expressions(d, h)]
    _, prog = _check(nvrtc.nvrtcCreateProgram(_kernels.source().encode(), b"decode.cu", 0, [], []))
    for n in names:
        _check(nvrtc.nvrtcAddNameExpression(prog, n.encode()))
    opts = [f"--gpu-architecture={arch}".encode()] + [o.encode() for o in _kernels.OPTIONS]
    _check(nvrtc.nvrtcCompileProgram(prog, len(opts), opts), prog)
    for n in names:
        _, lowered = _check(nvrtc.nvrtcGetLoweredName(prog, n.encode()))
        assert lowered
