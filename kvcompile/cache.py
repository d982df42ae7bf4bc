"""Cache state: the statically sized buffers that storage passes add to a graph, shared by its step programs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Union

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


@dataclass(frozen=True)
class Slots:
    """The `StateSpec` dimension that is the cache's slot count (scratch slot included)."""

    def __call__(self, slots: int) -> int:
        return slots


SLOTS = Slots()

# A dimension of a state buffer after the batch: a fixed size, or a rule that sizes it for the cache's slot
# count. Rules are compared by value (specs are declared once per captured step), so make them frozen
# dataclasses like `Slots`.
Dim = Union[int, Callable[[int], int]]


def resolve_dims(dims: tuple[Dim, ...], slots: int) -> tuple[int, ...]:
    """`dims` with every rule replaced by its size for a cache of `slots` slots."""
    return tuple(d if isinstance(d, int) else d(slots) for d in dims)


@dataclass(frozen=True)
class StateSpec:
    """One buffer of cache state: [B, *dims] of `dtype`, holding `fill` everywhere at the start of each generate
    call. Rule dims follow `layout.capacity(max_len)`: keys [Hkv, SLOTS, D], slot positions [SLOTS] filled with
    -1, a read pass's memory per row [F], quantized planes sized by their own rules. `role` says what the buffer
    holds ("keys", "values", "positions", ...), for tools that treat some buffers specially."""

    name: str
    role: str
    layout: CacheLayout
    dims: tuple[Dim, ...]
    dtype: torch.dtype
    fill: Union[int, float] = 0

    def shape(self, batch: int, max_len: int) -> tuple[int, ...]:
        """Buffer shape for `batch` rows of at most `max_len` tokens."""
        return (batch, *resolve_dims(self.dims, self.layout.capacity(max_len)))


class KVState(nn.Module):
    """Holds every cache buffer as a module buffer, so compiled programs see stable addresses.

    Step graphs read buffers through `get_attr` nodes (`kv_state.<name>`); `allocate` sizes them for a
    generate call and reuses them (reset to their fill values) when the shapes are unchanged.
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
        """Size every buffer for `batch` rows of at most `max_len` tokens, each holding its spec's fill value."""
        for name, spec in self.specs.items():
            shape = spec.shape(batch, max_len)
            buffer = getattr(self, name)
            if tuple(buffer.shape) == shape and buffer.device == torch.device(device):
                buffer.fill_(spec.fill)
            else:
                self.register_buffer(name, torch.full(shape, spec.fill, dtype=spec.dtype, device=device),
                                     persistent=False)

    def kv_bytes(self) -> int:
        """Bytes held by all cache buffers as currently allocated."""
        return sum(buf.numel() * buf.element_size() for buf in self.buffers())
