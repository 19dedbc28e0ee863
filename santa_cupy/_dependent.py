"""Launch a kernel as a programmatic dependent of the previous kernel in its stream.

On sm_90 and later the dependent's blocks may start while the previous kernel still runs (they
wait in ``wait_for_previous_kernel`` for all of its results, or in ``wait_published`` for the part
they need, kernels_cu/common.cuh), which hides the launch gap between the two SANTA passes. CuPy
launches without launch attributes, so this goes through the driver's ``cuLaunchKernelEx``; where
that or the device is missing it is a plain CuPy launch.
"""
import ctypes
import struct

import cupy
import numpy

_PROGRAMMATIC_STREAM_SERIALIZATION = 6      # CUlaunchAttributeID


class _Attribute(ctypes.Structure):        # CUlaunchAttribute: id, padding, 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int),
                ("rest", ctypes.c_char * 60)]


class _Config(ctypes.Structure):           # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_Attribute)), ("num_attrs", ctypes.c_uint)]


_driver = []
_capable = {}
enabled = True          # False: always a plain launch


def _launch_ex():
    if not _driver:
        try:
            fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
            fn.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
                           ctypes.c_void_p]
            fn.restype = ctypes.c_int
        except (OSError, AttributeError):
            fn = None
        _driver.append(fn)
    return _driver[0]


def _device_capable():
    dev = cupy.cuda.runtime.getDevice()
    if dev not in _capable:
        _capable[dev] = int(cupy.cuda.Device(dev).compute_capability) >= 90
    return _capable[dev]


_STRUCT_CODES = {"i": "i4x", "I": "I4x", "f": "f4x", "q": "q", "Q": "Q", "l": "q", "L": "Q", "d": "d"}
_formats = {}


def _format(types):
    """struct format of parameters of these types: arrays and 8-byte scalars fill an 8-byte slot,
    4-byte scalars its low half."""
    fmt = _formats.get(types)
    if fmt is None:
        codes = []
        for i, t in enumerate(types):
            if issubclass(t, cupy.ndarray):
                codes.append("Q")
            elif issubclass(t, numpy.generic) and numpy.dtype(t).char in _STRUCT_CODES:
                codes.append(_STRUCT_CODES[numpy.dtype(t).char])
            else:
                raise TypeError(f"kernel argument {i} of type {t.__name__}")
        fmt = _formats[types] = "<" + "".join(codes)
    return fmt


def _pack(args):
    """The parameters in 8-byte slots of one buffer, and the array of their addresses
    (``void**`` of ``cuLaunchKernelEx``, which copies the values at launch)."""
    n = len(args)
    buf = (ctypes.c_char * (8 * n))()
    struct.pack_into(_format(tuple(map(type, args))), buf, 0,
                     *[a.data.ptr if isinstance(a, cupy.ndarray) else a.item() for a in args])
    base = ctypes.addressof(buf)
    return buf, (ctypes.c_void_p * n)(*range(base, base + 8 * n, 8))


def prepare(kernel, grid, block, args, shared_mem=0, dependent=True):
    """A callable that launches ``kernel(grid, block, args, shared_mem=...)``; with ``dependent``,
    as a dependent of the stream's previous kernel where the device and driver allow it. All
    host work is done here, so that the launch follows the previous one closely. ``args``: CuPy
    arrays and NumPy scalars."""
    fn = _launch_ex() if enabled and dependent else None
    if fn is None or not _device_capable():
        return lambda: kernel(grid, block, args, shared_mem=shared_mem)
    buf, pointers = _pack(args)
    attr = _Attribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    pad = lambda d: tuple(d) + (1,) * (3 - len(d))
    config = _Config((ctypes.c_uint * 3)(*pad(grid)), (ctypes.c_uint * 3)(*pad(block)), shared_mem,
                     cupy.cuda.get_current_stream().ptr, ctypes.pointer(attr), 1)
    func = kernel.kernel.ptr

    def launch(values=buf):                 # the parameter values live until the launch
        err = fn(ctypes.byref(config), func, pointers, None)
        if err:
            raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {err}")
    return launch


def launch(kernel, grid, block, args, shared_mem=0, dependent=True):
    """Launch now: see :func:`prepare`."""
    prepare(kernel, grid, block, args, shared_mem, dependent)()
