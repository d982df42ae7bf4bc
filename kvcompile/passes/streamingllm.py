"""`streamingllm`: attention sinks + a sliding window (Xiao et al., "Efficient Streaming Language Models with
Attention Sinks", ICLR 2024, arXiv:2309.17453).

Every token attends to the first `sink_tokens` tokens of the stream and the most recent `window_tokens` tokens
up to and including itself; the cache is a ring of sinks + window slots. As in the paper, rotary positions are
assigned *within the cache*: a token sees the attended set at positions 0..n by rank. Keys are cached rotated by
their stream position; window keys and the query are then at the same relative distances as their ranks, so only
scores against sink keys need another query: the query rotated to its rank, min(position, sinks + window - 1).
The pass builds that query by re-rooting the graph's own rotary subgraph at the rank positions.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompile.cache import CacheLayout
from kvcompile.errors import PassError
from kvcompile.graph.rewrite import first_compute_node, install_cached_attention, reroot
from kvcompile.passes.base import Pass, StepGraph, register


@register
@dataclass
class StreamingLLM(Pass):
    """Attention sinks + sliding window. Defaults are the paper's (`start_size=4`, `recent_size=2000`).

    `sink_tokens=0` is plain window attention, the baseline the paper shows to collapse.
    """

    sink_tokens: int = 4
    window_tokens: int = 2000

    name = "streamingllm"
    axis = "storage"
    paper = "StreamingLLM (arXiv:2309.17453)"

    def validate(self) -> None:
        if not isinstance(self.sink_tokens, int) or self.sink_tokens < 0:
            raise PassError(f"StreamingLLM sink_tokens must be an integer >= 0, got {self.sink_tokens!r}.")
        if not isinstance(self.window_tokens, int) or self.window_tokens < 1:
            raise PassError(f"StreamingLLM window_tokens must be an integer >= 1 (the current token is always in "
                            f"the window), got {self.window_tokens!r}.")

    def apply(self, step: StepGraph) -> None:
        layout = CacheLayout(self.sink_tokens, self.window_tokens)
        graph = step.graph
        rank_positions, memo = None, {}
        for site in step.sites:
            q_sink = None
            if self.sink_tokens and site.rope_nodes:
                if rank_positions is None:
                    with graph.inserting_before(first_compute_node(graph)):
                        rank_positions = graph.call_function(
                            torch.ops.aten.clamp.default,
                            (step.positions, None, self.sink_tokens + self.window_tokens - 1))
                q_sink = reroot(site.query, step.positions, rank_positions, set(site.rope_nodes), memo, site.output)
            install_cached_attention(graph, step.state, step.positions, site, layout, q_sink)
            site.notes.append(
                f"streamingllm: {self.sink_tokens} sinks + {self.window_tokens} window; "
                + ("sink scores use the query re-rotated to its rank position "
                   f"('{q_sink.name}'; the re-rooted cos/sin nodes are shared by all layers)"
                   if q_sink is not None else "no rotary re-assignment needed"))

    def describe(self) -> str:
        return f"streamingllm(sink_tokens={self.sink_tokens}, window_tokens={self.window_tokens})"
