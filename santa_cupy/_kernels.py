"""Load the CUDA sources of ``kernels_cu`` and build them with NVRTC, once per device."""
import functools
import importlib.resources
import re

DTYPE_TAGS = {"float32": "float", "bfloat16": "bf16_t", "float16": "f16_t"}
HEAD_DIMS = (64, 128, 256)
KERNELS = ("exact_decode", "stash_decode", "santa_scores", "santa_part_scores", "santa_values", "santa_part_values",
           "key_scores")
SOURCES = ("decode.cu", "bernoulli.cu")
OPTIONS = ("-std=c++17",)
_INCLUDE = re.compile(r'^#include "([^"]+)"$', re.M)


@functools.lru_cache(maxsize=None)
def source():
    """One translation unit of :data:`SOURCES` with local includes inlined, each once (NVRTC then
    needs no include path)."""
    files = importlib.resources.files("kernels_cu")
    seen = set()

    def inline(name):
        seen.add(name)
        return _INCLUDE.sub(lambda m: "" if m.group(1) in seen else inline(m.group(1)),
                            files.joinpath(name).read_text())

    return "\n".join(inline(name) for name in SOURCES)


def name_expressions(dtype_name, dim):
    tag = DTYPE_TAGS[dtype_name]
    return [f"{k}<{tag}, {dim}>" for k in KERNELS]


def instantiations():
    """Every (dtype, head_dim) pair the package compiles."""
    return [(d, h) for d in DTYPE_TAGS for h in HEAD_DIMS]


def _build(dtype_name, dim):
    import cupy
    return cupy.RawModule(code=source(), options=OPTIONS, name_expressions=name_expressions(dtype_name, dim))


_modules = {}
_functions = {}


def kernel(name, dtype_name, dim):
    """The compiled kernel ``name<dtype, dim>`` for the current device."""
    import cupy
    dev = cupy.cuda.runtime.getDevice()
    fn = _functions.get((dev, name, dtype_name, dim))
    if fn is None:
        mod = _modules.get((dev, dtype_name, dim))
        if mod is None:
            mod = _modules[(dev, dtype_name, dim)] = _build(dtype_name, dim)
        fn = _functions[(dev, name, dtype_name, dim)] = mod.get_function(f"{name}<{DTYPE_TAGS[dtype_name]}, {dim}>")
    return fn
