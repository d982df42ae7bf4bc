"""`zipcache`: a quantized KV cache that keeps salient tokens in higher precision (He et al., "ZipCache: Accurate
and Efficient KV Cache Quantization with Salient Token Identification", NeurIPS 2024, arXiv:2405.14256; code
github.com/ThisisBillhe/ZipCache).

Keys and values are quantized token-wise after a channel normalisation (`kvcompile.ops.quantization`). A token's
saliency is the attention it receives, normalized by how many queries could attend it; it is estimated from a
few probe queries (prefill) or from the current query (periodic steps). Per KV head the `saliency_ratio` most
salient tokens get `high_bits`, the rest `low_bits`. Decoded tokens wait in a full-precision buffer, which
is quantized every `streaming_gap` decode steps with saliency from the last of them; that periodic step runs
between steps (`runtime_hook`, `kvcompile.runtime.periodic`), so the decode step itself stays small. Storage is
packed, so `kv_bytes()` is the real footprint. The work is done by `kvcompile.ops.zipcache_attention`.

Read passes compose: `tidaldecode` selects among the quantized tokens (`zipcache_attention_select` /
`zipcache_sparse_attention`). Export is not supported yet: the ops have no functional form or ONNX lowering,
and `kvcompile.export` says so.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from kvcompile.cache import SLOTS, CacheLayout, KVState, StateSpec
from kvcompile.errors import PassError
from kvcompile.graph.rewrite import first_compute_node, install_attention
from kvcompile.ops.zipcache_attention import Policy
from kvcompile.ops.quantization import (HIGH_BITS, LOW_BITS, PACKED_BITS, PROBE_RATIO, SALIENCY_RATIO,
                                        STATE_FIELDS, STREAMING_GAP, UNQUANTIZED, state_layout)
from kvcompile.passes.base import Pass, StepGraph, register
from kvcompile.passes.selection import is_decode_step, register_read_variants
from kvcompile.runtime.periodic import PeriodicQuantization

_ATTENTION = torch.ops.kvcompile.zipcache_attention.default
register_read_variants(_ATTENTION, torch.ops.kvcompile.zipcache_attention_select.default,
                       torch.ops.kvcompile.zipcache_sparse_attention.default)
_WIDTHS = PACKED_BITS + (UNQUANTIZED,)
_SALIENCY = ("normalized", "random")


@register
@dataclass
class ZipCache(Pass):
    """Mixed-precision quantized KV cache. Defaults are the paper's and the official code's: 4 / 2 bits,
    60% salient (`unimportant_ratio` 0.4), probe queries 10% of the prompt, `streaming_gap` 100.

    `high_bits == low_bits` is uniform quantization (saliency then picks nothing); 16 bits keeps values as they
    are, so 16 / 16 is dense attention. `saliency="random"` keeps the same share of high-precision tokens but
    picks them without looking at attention (a fixed hash of position and head): the same bits as ZipCache,
    without its saliency. `seed` draws the random half of the probe queries.
    """

    high_bits: int = HIGH_BITS
    low_bits: int = LOW_BITS
    saliency_ratio: float = SALIENCY_RATIO
    probe_ratio: float = PROBE_RATIO
    streaming_gap: int = STREAMING_GAP
    saliency: str = "normalized"
    seed: int = 0

    name = "zipcache"
    axis = "storage"
    paper = "ZipCache (arXiv:2405.14256)"
    tokens_rewritable = False

    def validate(self) -> None:
        for field in ("high_bits", "low_bits"):
            value = getattr(self, field)
            if isinstance(value, bool) or value not in _WIDTHS:
                raise PassError(f"ZipCache {field} must be one of {_WIDTHS} (packed widths; 16 keeps the cache "
                                f"dtype), got {value!r}.")
        if self.high_bits < self.low_bits:
            raise PassError(f"ZipCache high_bits ({self.high_bits}) is for the salient tokens and must be at least "
                            f"low_bits ({self.low_bits}).")
        if not isinstance(self.saliency_ratio, (int, float)) or not 0 <= self.saliency_ratio <= 1:
            raise PassError(f"ZipCache saliency_ratio is the share of tokens kept at high_bits, in [0, 1]; got "
                            f"{self.saliency_ratio!r}.")
        if not isinstance(self.probe_ratio, (int, float)) or not 0 < self.probe_ratio <= 1:
            raise PassError(f"ZipCache probe_ratio is the share of prompt tokens used as probe queries, in (0, 1]; "
                            f"got {self.probe_ratio!r}.")
        if not isinstance(self.streaming_gap, int) or self.streaming_gap < 1:
            raise PassError(f"ZipCache streaming_gap (decoded tokens buffered in full precision before they are "
                            f"quantized) must be an integer >= 1, got {self.streaming_gap!r}.")
        if self.saliency not in _SALIENCY:
            raise PassError(f"ZipCache saliency must be one of {_SALIENCY}, got {self.saliency!r}.")
        if not isinstance(self.seed, int):
            raise PassError(f"ZipCache seed must be an integer, got {self.seed!r}.")

    def apply(self, step: StepGraph) -> None:
        graph = step.graph
        probes = None
        if not is_decode_step(step):  # one draw of probe queries per prefill step, read by every layer
            with graph.inserting_before(first_compute_node(graph)):
                probes = graph.call_function(torch.ops.kvcompile.zipcache_probes.default,
                                             (step.positions, float(self.probe_ratio), self.seed))
        for site in step.sites:
            try:
                layout = state_layout(site.num_kv_heads, site.head_dim, high_bits=self.high_bits,
                                      low_bits=self.low_bits, saliency_ratio=self.saliency_ratio,
                                      streaming_gap=self.streaming_gap, dtype=site.key.meta["val"].dtype)
            except ValueError as error:
                raise PassError(f"ZipCache cannot store layer {site.layer} (head_dim {site.head_dim}): {error}; "
                                "choose other bit widths.") from None
            dense = CacheLayout()
            specs = [StateSpec(f"layer{site.layer}_zipcache_{name}", name, dense, dims, dtype)
                     for name, dims, dtype in layout]
            # int32 positions: 4 bytes per token and layer instead of 8, part of the >= 4.5x saving.
            specs.append(StateSpec(f"layer{site.layer}_positions", "positions", dense, (SLOTS,), torch.int32, -1))
            specs += [StateSpec(f"layer{site.layer}_zipcache_{role}", role, dense, dims, torch.float32)
                      for role, dims in (("step_query", (site.num_heads, site.head_dim)),
                                         ("step_lse", (site.num_heads,)))]
            install_attention(graph, step.state, site, specs, _ATTENTION, lambda b: (
                site.query, site.key, site.value, [b[name] for name in STATE_FIELDS], b["positions"],
                [b["step_query"], b["step_lse"]], step.positions, probes, site.scale, self.high_bits, self.low_bits,
                float(self.saliency_ratio), self.saliency), self.describe())
            site.notes.append(
                f"zipcache: {self.high_bits}-bit salient / {self.low_bits}-bit regular tokens; "
                + ("prefill chunk quantized at once, ranked by the probe queries "
                   f"'{probes.name}'" if probes is not None else
                   f"decoded tokens buffered, quantized every {self.streaming_gap} decode steps (between steps)"))

    def runtime_hook(self, state: KVState) -> PeriodicQuantization:
        return PeriodicQuantization(state, self.streaming_gap, self.high_bits, self.low_bits,
                                    Policy(float(self.saliency_ratio), self.saliency))

    def describe(self) -> str:
        return (f"zipcache(high_bits={self.high_bits}, low_bits={self.low_bits}, "
                f"saliency_ratio={self.saliency_ratio}, saliency={self.saliency}, probe_ratio={self.probe_ratio}, "
                f"streaming_gap={self.streaming_gap})")

