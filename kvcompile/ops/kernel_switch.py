"""The switch between kvcompile's fast paths (Triton kernels, and the fused prefill) and every op's plain PyTorch
reference path, which `reference_paths()` selects for checking one against the other."""
from __future__ import annotations

import contextlib
from typing import Iterator

from torch import Tensor

from kvcompile.ops.triton_support import triton_available

__all__ = ["kernels_enabled", "kernels_for", "reference_paths"]

_KERNELS = True


def kernels_enabled() -> bool:
    """Whether the ops take their fast paths (everywhere outside `reference_paths`)."""
    return _KERNELS


def kernels_for(t: Tensor) -> bool:
    """Whether the ops take their Triton kernels for tensors like `t`: on CUDA, with Triton installed, outside
    `reference_paths`."""
    return t.is_cuda and triton_available() and _KERNELS


@contextlib.contextmanager
def reference_paths() -> Iterator[None]:
    """Within this block every op takes its plain PyTorch reference path: attention (decode and prefill), the
    skinny products, ZipCache's quantization and reads, the selection ops.

    For checking fast programs against the reference; replayed CUDA graphs are unaffected.
    """
    global _KERNELS
    previous, _KERNELS = _KERNELS, False
    try:
        yield
    finally:
        _KERNELS = previous
