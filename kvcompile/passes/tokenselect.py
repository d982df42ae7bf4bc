"""`tokenselect`: dynamic token-level KV selection (Wu et al., "TokenSelect: Efficient Long-Context Inference and
Length Extrapolation for LLMs via Dynamic Token-Level KV Cache Selection", arXiv:2411.02886; code
github.com/pzs19/TokenSelect).

At every decode step and in every layer, each query head scores every cached token by q·k (its per-head
criticality); the scores are normalised per head by a softmax and summed over heads (per-head soft voting), and
the `top_k` tokens with the most votes are read, together with the first `init_tokens` and the last
`local_tokens` tokens (the new one included). Selection cache: while the query stays similar to the one that made
the last fresh selection (cosine similarity >= `similarity_threshold`), that selection is reused.

Defaults follow the paper/official configs: n_init = 128, n_local = 512, top-k = 2048 (a 2688-token budget);
another `token_budget` keeps those shares (128:512 of 2688 for init:local); similarity threshold 0.9.
Scores use the unscaled q·k, as the official code does. Deviations, both outside the evaluated regime: the
official implementation also selects during chunked prefill and re-assigns rotary positions within the selected
set for length extrapolation; here prefill is dense and tokens keep the model's own positions (exact within the
trained context).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

import kvcompile.ops.sparse_attention  # noqa: F401  (registers the selection ops)
from kvcompile.cache import StateSpec
from kvcompile.errors import PassError
from kvcompile.graph.rewrite import first_compute_node, reroot
from kvcompile.passes.base import Pass, StepGraph, register
from kvcompile.passes.selection import (cache_spec, cached_attention_node, install_sparse, is_decode_step,
                                        op_arguments)

# The official configuration (config/*-token-retrieval.yaml): n_init 128, n_local 512, top_k 2048.
_INIT, _LOCAL, _TOP_K = 128, 512, 2048
_BUDGET = _INIT + _LOCAL + _TOP_K
_NEVER_REUSE = 2.0  # a threshold above every cosine similarity: the op's selection cache is then off


@register
@dataclass
class TokenSelect(Pass):
    """Per-head soft-voted token selection in every layer, with the selection cache.

    `token_budget` counts every token a query reads (init + top-k + local, the new token included).
    `init_tokens` / `local_tokens` default to the paper's shares of the budget. `similarity_threshold=None`
    turns the selection cache off.
    """

    token_budget: int = _BUDGET
    init_tokens: Optional[int] = None
    local_tokens: Optional[int] = None
    similarity_threshold: Optional[float] = 0.9

    name = "tokenselect"
    axis = "read"
    paper = "TokenSelect (arXiv:2411.02886)"

    def split(self) -> tuple[int, int, int]:
        """(init_tokens, local_tokens, top_k) for this budget."""
        init = self.init_tokens if self.init_tokens is not None else max(1, round(self.token_budget * _INIT / _BUDGET))
        local = (self.local_tokens if self.local_tokens is not None
                 else max(1, round(self.token_budget * _LOCAL / _BUDGET)))
        return init, local, self.token_budget - init - local

    def validate(self) -> None:
        if not isinstance(self.token_budget, int) or self.token_budget < 3:
            raise PassError(f"TokenSelect token_budget must be an integer >= 3 (init, local and top-k tokens), got "
                            f"{self.token_budget!r}.")
        for label, value, least in (("init_tokens", self.init_tokens, 0), ("local_tokens", self.local_tokens, 1)):
            if value is not None and (not isinstance(value, int) or value < least):
                raise PassError(f"TokenSelect {label} must be an integer >= {least}, got {value!r}.")
        init, local, top_k = self.split()
        if top_k < 1:
            raise PassError(f"TokenSelect token_budget={self.token_budget} leaves no top-k tokens after "
                            f"{init} init + {local} local tokens; raise the budget or lower init/local_tokens.")
        threshold = self.similarity_threshold
        if threshold is not None and (not isinstance(threshold, (int, float)) or not 0 < threshold <= 1):
            raise PassError(f"TokenSelect similarity_threshold must be in (0, 1] or None (no selection cache), got "
                            f"{threshold!r}.")

    def apply(self, step: StepGraph) -> None:
        if not is_decode_step(step):
            return  # prefill chunks stay dense
        init, local, top_k = self.split()
        threshold = _NEVER_REUSE if self.similarity_threshold is None else float(self.similarity_threshold)
        graph = step.graph
        zeros, memo = None, {}
        for site in step.sites:
            node = cached_attention_node(site, self.name)
            args = op_arguments(node)
            q, k_cache, slot_pos, positions = args["q"], args["k_cache"], args["slot_pos"], args["positions"]
            fingerprint = q
            if site.rope_nodes:  # the query before rotary: similar queries stay similar as positions advance
                if zeros is None:
                    with graph.inserting_before(first_compute_node(graph)):
                        zeros = graph.call_function(torch.ops.aten.zeros_like.default, (step.positions,))
                    zeros.meta = dict(step.positions.meta)
                fingerprint = reroot(q, step.positions, zeros, set(site.rope_nodes), memo, node)
            layout = cache_spec(step, site).layout
            query_state = step.state.declare(StateSpec(
                f"layer{site.layer}_tokenselect_query", "selection", layout, (site.num_heads * site.head_dim,),
                torch.float32))
            slots_state = step.state.declare(StateSpec(
                f"layer{site.layer}_tokenselect_slots", "selection", layout, (top_k,), torch.long))
            with graph.inserting_before(node):
                buffers = graph.get_attr(query_state), graph.get_attr(slots_state)
                indices = graph.call_function(torch.ops.kvcompile.tokenselect_indices.default, (
                    q, fingerprint, k_cache, slot_pos, positions, *buffers, args["sink_tokens"],
                    args["window_tokens"], init, local, top_k, threshold))
            sparse = install_sparse(graph, site, node, indices)
            cache = ("off" if self.similarity_threshold is None
                     else f"reused while cos(query, last) >= {self.similarity_threshold}")
            site.notes.append(
                f"tokenselect: {init} init + {local} local (new token included) + top {top_k} slots by per-head "
                f"soft voting -> '{indices.name}' (selection cache {cache}; state {query_state}, {slots_state}), "
                f"read by '{sparse.name}' in this layer")

    def describe(self) -> str:
        init, local, top_k = self.split()
        return (f"tokenselect(token_budget={self.token_budget}: {init} init + {top_k} top-k + {local} local, "
                f"similarity_threshold={self.similarity_threshold})")
