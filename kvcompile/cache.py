"""Cache state: the statically sized buffers that storage passes add to a graph, shared by its step programs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn


@dataclass(frozen=True)
class CacheLayout:
    """Where a site's tokens live: dense (`window_tokens == 0`) or a ring of sinks + window.

    Every layout ends with one scratch slot (see `kvcompile.ops.cached_attention`).
    """

    sink_tokens: int = 0
    window_tokens: int = 0

    def capacity(self, max_len: int) -> int:
        """Slots needed for sequences of at most `max_len` tokens, scratch slot included."""
        held = max_len if self.window_tokens == 0 else min(max_len, self.sink_tokens + self.window_tokens)
        return held + 1

    def describe(self) -> str:
        """Human-readable layout for `explain()`."""
        if self.window_tokens == 0:
            return "dense (one slot per position)"
        return f"ring of {self.sink_tokens} sink + {self.window_tokens} window slots"


# Roles whose buffers describe one sequence's history and are emptied whenever the cache is (re)allocated.
_RESET_FILL = {"positions": -1, "selection": 0}


@dataclass(frozen=True)
class StateSpec:
    """One buffer of cache state: keys/values [B, Hkv, capacity, D], slot positions [B, capacity], or per-row
    selection state [B, *row_shape] (role "selection": a read pass's memory across decode steps, zeroed for
    every new generate call)."""

    name: str
    role: str            # "keys" | "values" | "positions" | "selection"
    layout: CacheLayout
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    row_shape: Optional[tuple[int, ...]] = None   # role "selection" only: shape per row, independent of length

    def shape(self, batch: int, max_len: int) -> tuple[int, ...]:
        """Buffer shape for `batch` rows of at most `max_len` tokens."""
        if self.row_shape is not None:
            return (batch, *self.row_shape)
        capacity = self.layout.capacity(max_len)
        if self.role == "positions":
            return (batch, capacity)
        return (batch, self.num_kv_heads, capacity, self.head_dim)


class KVState(nn.Module):
    """Holds every cache buffer as a module buffer, so compiled programs see stable addresses.

    Step graphs read buffers through `get_attr` nodes (`kv_state.<name>`); `allocate` sizes them for a
    generate call and reuses them (resetting positions to empty) when the shapes are unchanged.
    """

    def __init__(self):
        super().__init__()
        self.specs: dict[str, StateSpec] = {}

    def declare(self, spec: StateSpec) -> str:
        """Register `spec` (idempotent for identical specs); returns the `get_attr` target."""
        known = self.specs.get(spec.name)
        if known is None:
            self.specs[spec.name] = spec
            self.register_buffer(spec.name, torch.empty(0, dtype=spec.dtype), persistent=False)
        elif known != spec:
            raise RuntimeError(f"cache buffer {spec.name} declared twice with different layouts")
        return f"kv_state.{spec.name}"

    def allocate(self, batch: int, max_len: int, device: torch.device) -> None:
        """Size every buffer for `batch` rows of at most `max_len` tokens, emptied."""
        for name, spec in self.specs.items():
            shape = spec.shape(batch, max_len)
            buffer = getattr(self, name)
            if tuple(buffer.shape) == shape and buffer.device == torch.device(device):
                if spec.role in _RESET_FILL:
                    buffer.fill_(_RESET_FILL[spec.role])
                continue
            fill = _RESET_FILL.get(spec.role, 0)
            self.register_buffer(name, torch.full(shape, fill, dtype=spec.dtype, device=device), persistent=False)

    def kv_bytes(self) -> int:
        """Bytes held by all cache buffers as currently allocated."""
        return sum(buf.numel() * buf.element_size() for buf in self.buffers())
