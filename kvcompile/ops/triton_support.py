"""Triton where it is installed: every kernel module takes it from here. Without it the library still imports
(the ops take their PyTorch paths) and a kernel called directly says what to install."""
from __future__ import annotations

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

__all__ = ["require_triton", "tl", "triton", "triton_available"]


def triton_available() -> bool:
    """True when Triton could be imported."""
    return triton is not None


def require_triton(what: str) -> None:
    """Raise ImportError naming `what` when Triton is missing."""
    if triton is None:
        raise ImportError(f"{what} needs Triton: pip install triton")
