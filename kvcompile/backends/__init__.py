"""Backends lower a rewritten step graph to something that runs; they add no method logic."""
from __future__ import annotations

from typing import Callable

from torch import fx

from kvcompile.backends.eager import lower as _eager
from kvcompile.backends.inductor import lower as _inductor
from kvcompile.backends import onnxruntime, tensorrt  # noqa: F401  (kvcompile.backends.onnxruntime.load)
from kvcompile.errors import KVCompileError

Lowered = Callable[..., object]
BACKENDS: dict[str, Callable[[fx.GraphModule], Lowered]] = {"eager": _eager, "inductor": _inductor}


def validate(backend: str) -> None:
    """Raise for a backend name that does not exist."""
    if backend not in BACKENDS:
        raise KVCompileError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)} "
                             "(ONNX Runtime and TensorRT are reached through kvcompile.export).")


def lower(module: fx.GraphModule, backend: str) -> Lowered:
    """Lower `module` with the named (validated) backend."""
    return BACKENDS[backend](module)
