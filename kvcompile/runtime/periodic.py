"""Work a pass does between steps, outside the step graphs: ZipCache's periodic quantization.

Every prefill chunk quantizes whatever the buffers hold, so after a prefill every row's buffer is empty and,
decode step by decode step, all rows fill their buffers together. Counting decode steps on the host therefore
says when the buffers are full without reading the device: every `streaming_gap` decode steps each layer
quantizes its buffers (`kvcompile.ops.zipcache_attention.quantize_buffers`). Rows that took padding steps (a
left-padded prompt fed token by token) quantize the fewer tokens they hold.
"""
from __future__ import annotations

import torch

from kvcompile.cache import KVState
from kvcompile.ops.quantization import STATE_FIELDS, state_of
from kvcompile.ops.zipcache_attention import Policy, quantize_buffers


class PeriodicQuantization:
    """Counts decode steps since the last prefill chunk and quantizes every layer's buffers every `gap`."""

    def __init__(self, state: KVState, gap: int, high_bits: int, low_bits: int, policy: Policy):
        self.state, self.gap, self.bits, self.policy = state, gap, (high_bits, low_bits), policy
        self.layers = sorted({name.split("_")[0] for name, spec in state.specs.items() if spec.role == "step_lse"},
                             key=lambda layer: int(layer[len("layer"):]))
        self.decoded = 0

    def reset(self) -> None:
        """A new sequence: the cache was just emptied."""
        self.decoded = 0

    def after_step(self, new_tokens: int) -> None:
        if new_tokens > 1:
            self.decoded = 0
            return
        self.decoded += 1
        if self.decoded == self.gap:
            self.quantize()

    def quantize(self) -> None:
        """The periodic step, now: every layer's buffered tokens go into its planes."""
        self.decoded = 0
        with torch.no_grad():
            for layer in self.layers:
                tensors = [getattr(self.state, f"{layer}_zipcache_{field}") for field in STATE_FIELDS]
                quantize_buffers(state_of(tensors, *self.bits), getattr(self.state, f"{layer}_positions"),
                                 getattr(self.state, f"{layer}_zipcache_step_query"),
                                 getattr(self.state, f"{layer}_zipcache_step_lse"), self.policy)
