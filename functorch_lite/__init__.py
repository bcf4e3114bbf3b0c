"""functorch_lite: pure-function models over pytrees, compiled once or run by run."""

from functorch_lite import (
    checkpoint,
    compile as compile,  # a public namespace, not in __all__
    control,
    interop,
    models,
    nn,
    parallel,
    train,
    transforms,
)
from functorch_lite._checks import TracedValueError
from functorch_lite.compile import (
    CompileStats,
    compile_counter,
    enable_persistent_cache,
    jit,
)
from functorch_lite.control import repeat, while_loop

__version__ = "0.1.0"

__all__ = [
    "CompileStats",
    "TracedValueError",
    "checkpoint",
    "compile_counter",
    "control",
    "enable_persistent_cache",
    "interop",
    "jit",
    "models",
    "nn",
    "parallel",
    "repeat",
    "train",
    "transforms",
    "while_loop",
]
