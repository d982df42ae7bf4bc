"""`tidaldecode`: position-persistent sparse attention (Yang et al., "TidalDecode: Fast and Accurate LLM Decoding
with Position Persistent Sparse Attention", ICLR 2025, arXiv:2410.05076; code github.com/DerrickYLJ/TidalDecode).

At every decode step the layers before the first token-selection layer run full attention. A token-selection
layer runs full attention too and picks, per KV head, the `token_budget - 1` cached tokens that received the most
attention (probabilities summed over the group's query heads); every later layer, up to the next selection layer,
attends only to those tokens plus the new one. Tokens selected in one layer keep their positions (cache slots) in
the layers below, so selection is paid in a couple of layers instead of all of them.

Defaults are the official code's: layers 0-1 full, token selection at layer 2 (`sparse_layer_start=2`) and
re-selection at layer 13 of the 32-layer Llama-3-8B (`correction_layer=13`); for another depth L the re-selection
layer keeps that relative place, round(13 * L / 32) (layer 12 of SmolLM2's 30). Prefill stays dense.

Cache correction (the paper's remedy for long generations): the keys/values of sparsely decoded tokens drift from
what full attention would give; every `correction_interval` decoded tokens they are recomputed by a dense chunked
prefill. That re-runs tokens through the prefill step, so it lives in the runtime: see
`kvcompile.runtime.cache_correction.enable_cache_correction`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from kvcompile.errors import PassError
from kvcompile.passes.base import Pass, StepGraph, register
from kvcompile.passes.selection import (check_same_slots, install_select, install_sparse, is_decode_step,
                                        storage_node)

# The official re-selection layer: 13 of Llama-3-8B's 32 layers (0-based), after full layers 0-1 and selection at 2.
_FIRST_SELECTION = 2
_RESELECTION_LAYER, _RESELECTION_DEPTH = 13, 32


def default_selection_layers(num_layers: int) -> tuple[int, ...]:
    """Token-selection layers for a model of `num_layers`: layer 2 and the re-selection layer round(13 L / 32)."""
    first = min(_FIRST_SELECTION, num_layers - 1)
    second = round(num_layers * _RESELECTION_LAYER / _RESELECTION_DEPTH)
    return (first, second) if first < second < num_layers else (first,)


@register
@dataclass
class TidalDecode(Pass):
    """Position-persistent sparse decoding: full attention + top-k in a few layers, reuse in the others.

    `token_budget` counts the tokens a sparse layer reads, the new one included (the official kernels select
    `budget - 1` cached tokens and add the current one; its example scripts default to 128). `selection_layers`
    are 0-based layer indices (default: `default_selection_layers(num_layers)`; in a spec string
    `"tidaldecode:selection_layers=2/12"`); layers before the first run full attention. `correction_interval`
    (default off; the official long-generation runs use 128) is read by
    `kvcompile.runtime.cache_correction.enable_cache_correction`.
    """

    token_budget: int = 128
    selection_layers: Optional[tuple[int, ...]] = None
    correction_interval: Optional[int] = None

    name = "tidaldecode"
    axis = "read"
    paper = "TidalDecode (arXiv:2410.05076)"

    def validate(self) -> None:
        if not isinstance(self.token_budget, int) or self.token_budget < 2:
            raise PassError(f"TidalDecode token_budget must be an integer >= 2 (the new token plus at least one "
                            f"cached token), got {self.token_budget!r}.")
        if self.selection_layers is not None:
            layers = self.selection_layers
            if isinstance(layers, int):
                layers = (layers,)
            elif isinstance(layers, str):  # from a spec string, where commas separate options: "2/12"
                parts = layers.replace(";", "/").replace(" ", "/").split("/")
                layers = tuple(int(p) if p.strip().isdigit() else p for p in parts if p.strip())
            if (not isinstance(layers, (tuple, list)) or not layers
                    or not all(isinstance(x, int) and x >= 0 for x in layers)):
                raise PassError(f"TidalDecode selection_layers must be a non-empty tuple of layer indices >= 0, got "
                                f"{self.selection_layers!r}.")
            self.selection_layers = tuple(sorted(set(layers)))
        if self.correction_interval is not None and (not isinstance(self.correction_interval, int)
                                                     or self.correction_interval < 1):
            raise PassError(f"TidalDecode correction_interval must be a positive integer or None, got "
                            f"{self.correction_interval!r}.")

    def layers_for(self, num_layers: int) -> tuple[int, ...]:
        """The token-selection layers used for a model of `num_layers` attention layers."""
        layers = self.selection_layers or default_selection_layers(num_layers)
        if layers[-1] >= num_layers:
            raise PassError(f"TidalDecode selection_layers {layers} name layer {layers[-1]}, but the model has "
                            f"{num_layers} attention layers (0..{num_layers - 1}).")
        return layers

    def apply(self, step: StepGraph) -> None:
        if not is_decode_step(step):
            return  # prefill chunks stay dense
        layers = self.layers_for(len(step.sites))
        readers: dict[int, list[int]] = {layer: [] for layer in layers}
        chosen: dict[int, str] = {}
        chooser, indices = None, None
        for site in step.sites:
            node = storage_node(site, self.name)
            if site.layer < layers[0]:
                site.notes.append(f"tidaldecode: full attention (layers before {layers[0]} do not select)")
            elif site.layer in readers:
                chooser = site
                indices = install_select(step.graph, site, node, self.token_budget - 1)
                chosen[site.layer] = indices.name
            else:
                check_same_slots(step, chooser, site, self.name)
                install_sparse(step.graph, site, node, indices)
                readers[chooser.layer].append(site.layer)
                site.notes.append(f"tidaldecode: sparse attention over the {self.token_budget - 1} slots per KV head "
                                  f"chosen at layer {chooser.layer} ('{indices.name}') + the new token")
        for site in step.sites:
            if site.layer in readers:
                reused = readers[site.layer]
                span = f"layers {reused[0]}-{reused[-1]}" if reused else "no later layer"
                site.notes.append(
                    f"tidaldecode: token-selection layer: full attention, then the top {self.token_budget - 1} "
                    f"cached slots per KV head by group attention mass -> indices '{chosen[site.layer]}' (of "
                    f"'{site.cache.op_node.name}'), read by {span}")

    def describe(self) -> str:
        layers = self.selection_layers or "default"
        return (f"tidaldecode(token_budget={self.token_budget}, selection_layers={layers}, "
                f"correction_interval={self.correction_interval})")
