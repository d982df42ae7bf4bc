"""`dense`: every site reads and writes a full KV cache through the library's own attention op."""
from __future__ import annotations

from dataclasses import dataclass

from kvcompile.cache import CacheLayout
from kvcompile.graph.rewrite import install_cached_attention
from kvcompile.passes.base import Pass, StepGraph, register


@register
@dataclass
class Dense(Pass):
    """Full attention over a dense cache (one slot per position); outputs equal the original model's."""

    name = "dense"
    axis = "storage"

    def apply(self, step: StepGraph) -> None:
        for site in step.sites:
            install_cached_attention(step.graph, step.state, step.positions, site, CacheLayout())
            site.notes.append("dense: full attention over a dense cache")

    def describe(self) -> str:
        return "dense"
