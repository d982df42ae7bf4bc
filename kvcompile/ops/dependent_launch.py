"""Programmatic dependent launch (Hopper and later) for kvcompile's Triton kernels.

A kernel launched with `launch_pdl=True` may start while the kernel before it drains; it must wait on the device
(`wait_for_producers`, PTX `griddepcontrol.wait`) before it touches memory that kernel may use. In the compiled
decode step the kernels around ours are mostly Inductor's, which take part too (`kvcompile.backends.inductor`),
and a launch between two short kernels is then largely hidden. The decode attention kernels never let their
own dependents start early; `kvcompile.ops.skinny_linear` does, once its reads are done. Which of Inductor's
kernels wait, and when they let the next one start, is Inductor's code generation (`triton.enable_pdl`, off by
default in torch); `benchmarks/decode.py` checks every compiled program against the reference in each run.
"""
from __future__ import annotations

import functools
import os

import torch

from kvcompile.ops.triton_support import tl, triton

__all__ = ["dependent_launch", "let_dependents_launch", "nvidia_native", "wait_for_producers"]


def nvidia_native(t: torch.Tensor) -> bool:
    """Whether kernels for `t` are compiled for an NVIDIA GPU (not ROCm, not the Triton interpreter): where
    inline PTX and grid dependency control exist."""
    return t.is_cuda and torch.version.hip is None and os.environ.get("TRITON_INTERPRET", "0") != "1"


def dependent_launch(t: torch.Tensor) -> bool:
    """Whether kernels for `t` launch with programmatic dependent launch (their `PDL=` and `launch_pdl=`):
    NVIDIA Hopper or later."""
    return nvidia_native(t) and _compute_capability(t.device)[0] >= 9


@functools.lru_cache(maxsize=None)
def _compute_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


if triton is not None:

    @triton.jit
    def wait_for_producers(PDL: tl.constexpr):
        """With PDL: wait until the kernels before this one have finished and their writes are visible. The
        first statement of every kernel here that is launched with `launch_pdl`."""
        if PDL:
            tl.extra.cuda.gdc_wait()

    @triton.jit
    def let_dependents_launch(PDL: tl.constexpr):
        """With PDL: let the next kernel launch now (it still waits for this one to finish before reading)."""
        if PDL:
            tl.extra.cuda.gdc_launch_dependents()
