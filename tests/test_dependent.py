"""The driver structures and parameter packing behind the dependent launch of pass 2 (no GPU
needed)."""
import ctypes

import numpy
import pytest

pytest.importorskip("cupy")
from santa_cupy import _dependent  # noqa: E402


def test_launch_structures_match_the_driver_layout():
    # CUlaunchAttribute: 4-byte id, padding, 64-byte value union at offset 8
    assert ctypes.sizeof(_dependent._Attribute) == 72 and _dependent._Attribute.value.offset == 8
    # CUlaunchConfig: six dims, shared bytes, stream at 32, attrs at 40, count at 48
    c = _dependent._Config
    assert (c.shared.offset, c.stream.offset, c.attrs.offset, c.num_attrs.offset) == (24, 32, 40, 48)
    assert ctypes.sizeof(c) == 56


def test_parameters_packed_in_their_type_and_width():
    args = (numpy.int32(-3), numpy.uint64(2 ** 63 + 5), numpy.float32(0.5), numpy.uint32(7), numpy.int32(9))
    _, p = _dependent._pack(args)
    read = (ctypes.c_int32, ctypes.c_uint64, ctypes.c_float, ctypes.c_uint32, ctypes.c_int32)
    assert [t.from_address(p[i]).value for i, t in enumerate(read)] == [-3, 2 ** 63 + 5, 0.5, 7, 9]
    assert all(p[i + 1] - p[i] == 8 for i in range(len(args) - 1))   # every slot 8-byte aligned


@pytest.mark.parametrize("bad", [1.5, numpy.float16(1.0), "x"])
def test_unsupported_parameter_rejected(bad):
    with pytest.raises(TypeError, match="kernel argument 1"):
        _dependent._pack((numpy.int32(1), bad))
