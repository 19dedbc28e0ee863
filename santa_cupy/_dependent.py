"""Launch kernels through the driver's ``cuLaunchKernelEx``, optionally as a programmatic
dependent of the previous kernel in their stream.

On sm_90 and later a dependent's blocks may start while the previous kernel still runs (they
wait in ``wait_for_previous_kernel`` for all of its results, or in ``wait_published`` for the part
they need, kernels_cu/common.cuh), which hides the launch gap between the two SANTA passes. CuPy
launches without launch attributes, hence the driver call; it also costs the host less than a
CuPy launch of this many arguments. Where the driver function or the device is missing it is a
plain CuPy launch.
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
            fn.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
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
    """The parameters in 8-byte slots of one buffer, followed by the array of their addresses
    (``void**`` of ``cuLaunchKernelEx``, which copies the values at launch): one ``struct`` call."""
    n = len(args)
    buf = (ctypes.c_char * (16 * n))()
    base = ctypes.addressof(buf)
    struct.pack_into(_format(tuple(map(type, args))) + "Q" * n, buf, 0,
                     *[a.data.ptr if isinstance(a, cupy.ndarray) else a for a in args],
                     *range(base, base + 8 * n, 8))
    return buf, (ctypes.c_void_p * n).from_buffer(buf, 8 * n)


_attribute = _Attribute(id=_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
_configs = {}


def _config(grid, block, shared_mem, stream, dependent):
    """The launch configuration, built once per distinct launch shape (read only by the driver)."""
    key = (grid, block, shared_mem, stream, dependent)
    config = _configs.get(key)
    if config is None:
        if len(_configs) > 4096:
            _configs.clear()
        pad = lambda d: tuple(d) + (1,) * (3 - len(d))
        config = _configs[key] = _Config((ctypes.c_uint * 3)(*pad(grid)), (ctypes.c_uint * 3)(*pad(block)),
                                         shared_mem, stream, ctypes.pointer(_attribute) if dependent else None,
                                         int(dependent))
    return config


def prepare(kernel, grid, block, args, shared_mem=0, dependent=True):
    """A callable that launches ``kernel(grid, block, args, shared_mem=...)``; with ``dependent``,
    as a dependent of the stream's previous kernel. All host work is done here, so that the launch
    follows the previous one closely. ``args``: CuPy arrays and NumPy scalars."""
    fn = _launch_ex() if enabled else None
    if fn is None or not _device_capable():
        return lambda: kernel(grid, block, args, shared_mem=shared_mem)
    buf, pointers = _pack(args)
    config = _config(tuple(grid), tuple(block), shared_mem, cupy.cuda.get_current_stream().ptr, dependent)
    func = kernel.kernel.ptr

    def launch(values=buf):                 # the parameter values live until the launch
        err = fn(config, func, ctypes.addressof(pointers), None)
        if err:
            raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {err}")
    return launch


def launch(kernel, grid, block, args, shared_mem=0, dependent=True):
    """Launch now: see :func:`prepare`."""
    prepare(kernel, grid, block, args, shared_mem, dependent)()
