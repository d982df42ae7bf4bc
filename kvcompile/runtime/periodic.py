"""Work a pass does between steps, outside the step graphs: ZipCache's periodic quantization.

Every prefill chunk quantizes whatever the buffers hold, so after a prefill every row's buffer is empty and,
decode step by decode step, all rows fill their buffers together. Counting decode steps on the host therefore
says when the buffers are full without reading the device: every `streaming_gap` decode steps each layer
quantizes its buffers (`kvcompile.ops.zipcache_attention.quantize_buffers`). Rows that took padding steps (a
left-padded prompt fed token by token) quantize the fewer tokens they hold.

The periodic step is ~125 small kernels per layer (with `kvcompile.ops.triton_quantize`), but its shapes are
static and it never synchronises with the host, so on a GPU it is replayed from a CUDA graph: the first call runs
it (loading its kernels), the second captures and replays it, later ones replay. A graph is kept per set of cache
tensors, the latest (a cache re-allocated by `reserve` gets a new one).
"""
from __future__ import annotations

from typing import Optional

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
        # The tensors the periodic step last ran on, and its graph over them (None until the second call).
        self.graph_key: Optional[tuple] = None
        self.graph: Optional[torch.cuda.CUDAGraph] = None

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
        layers = [self._layer_tensors(layer) for layer in self.layers]
        with torch.no_grad():
            if not self._graphed(layers):
                self._quantize_layers(layers)
                return
            key = tuple((t.data_ptr(), t.shape, t.dtype) for tensors in layers for t in tensors)
            if key != self.graph_key:  # first call on these tensors: run it, which also loads its kernels
                self.graph_key, self.graph = key, None  # a graph of tensors since re-allocated is dropped
                self._quantize_layers(layers)
                return
            if self.graph is None:
                self.graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(self.graph):
                    self._quantize_layers(layers)
            self.graph.replay()

    @staticmethod
    def _graphed(layers: list[list[torch.Tensor]]) -> bool:
        """Whether the step is replayed from a CUDA graph: its tensors are on a GPU."""
        return bool(layers) and layers[0][0].is_cuda

    def _layer_tensors(self, layer: str) -> list[torch.Tensor]:
        """A layer's state tensors (`STATE_FIELDS` order), then its positions, step query and log-sum-exp."""
        names = [f"{layer}_zipcache_{field}" for field in STATE_FIELDS]
        names += [f"{layer}_positions", f"{layer}_zipcache_step_query", f"{layer}_zipcache_step_lse"]
        return [getattr(self.state, name) for name in names]

    def _quantize_layers(self, layers: list[list[torch.Tensor]]) -> None:
        fields = len(STATE_FIELDS)
        for tensors in layers:
            quantize_buffers(state_of(tensors[:fields], *self.bits), *tensors[fields:], self.policy)
