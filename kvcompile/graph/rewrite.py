"""Rewriting helpers shared by passes: install the cached-attention op at a site, re-root position subgraphs."""
from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
from torch import fx

from kvcompile.cache import SLOTS, CacheLayout, KVState, StateSpec
from kvcompile.errors import UnsupportedModelError
from kvcompile.graph.sites import AttentionSite, CacheState
import kvcompile.ops.cached_attention  # noqa: F401  (registers torch.ops.kvcompile.cached_attention)

aten = torch.ops.aten
_PROJECTIONS = {aten.linear.default, aten.matmul.default, aten.mm.default, aten.bmm.default, aten.embedding.default}


def _projects_weights(node: fx.Node) -> bool:
    """Whether `node` is a projection or lookup of a model parameter (rotary frequencies are buffers)."""
    if node.target not in _PROJECTIONS:
        return False
    module = node.graph.owning_module
    return any(a.op == "get_attr" and isinstance(operator.attrgetter(a.target)(module), torch.nn.Parameter)
               for a in node.all_input_nodes)


def install_attention(graph: fx.Graph, state: KVState, site: AttentionSite, specs: list[StateSpec], op,
                      args_of: Callable[[dict[str, fx.Node]], tuple], description: str) -> fx.Node:
    """Replace `site`'s attention by a call of the storage op `op` over new cache buffers `specs`.

    The buffers are declared in `state`; `args_of` builds the op's arguments from their `get_attr` nodes, keyed
    by role. The op's output must be the attention output [B, Hq, S, D].
    """
    targets = {spec.role: state.declare(spec) for spec in specs}
    with graph.inserting_before(site.output):
        buffers = {role: graph.get_attr(target) for role, target in targets.items()}
        out = graph.call_function(op, args_of(buffers))
    out.meta["val"] = site.output.meta.get("val")
    site.output.replace_all_uses_with(out)
    site.cache = CacheState(targets, out, description)
    return out


def install_cached_attention(graph: fx.Graph, state: KVState, positions: fx.Node, site: AttentionSite,
                             layout: CacheLayout, q_sink: Optional[fx.Node] = None) -> fx.Node:
    """Replace `site`'s attention by `kvcompile::cached_attention` over new cache buffers of `layout`."""
    dtype = site.key.meta["val"].dtype
    per_slot = (site.num_kv_heads, SLOTS, site.head_dim)
    specs = [StateSpec(f"layer{site.layer}_keys", "keys", layout, per_slot, dtype),
             StateSpec(f"layer{site.layer}_values", "values", layout, per_slot, dtype),
             StateSpec(f"layer{site.layer}_positions", "positions", layout, (SLOTS,), torch.long, fill=-1)]
    return install_attention(graph, state, site, specs, torch.ops.kvcompile.cached_attention.default, lambda b: (
        site.query, q_sink, site.key, site.value, b["keys"], b["values"], b["positions"], positions,
        layout.sink_tokens, layout.window_tokens, site.scale), layout.describe())


def first_compute_node(graph: fx.Graph) -> fx.Node:
    """The first node after the placeholders and attribute reads (where new shared nodes go)."""
    return next(n for n in graph.nodes if n.op not in ("placeholder", "get_attr"))


def reroot(node: fx.Node, old: fx.Node, new: fx.Node, dependent: set[fx.Node], memo: dict[fx.Node, fx.Node],
           before: fx.Node) -> fx.Node:
    """A copy of `node` computed from `new` wherever it was computed from `old`, inserted before `before`.

    Only nodes in `dependent` (those that depend on `old`) are copied; `memo` shares copies across calls, so
    e.g. one rotary cos/sin recomputation serves every layer. Copying a projection of model weights means the
    positions feed the hidden states (absolute position embeddings), which this rewrite does not support.
    """
    if node is old:
        return new
    if node not in dependent:
        return node
    if node not in memo:
        if _projects_weights(node):
            raise UnsupportedModelError(
                f"positions reach the queries through '{node.name}' ({node.target}), not only through rotary "
                "embeddings; re-assigning positions needs a rotary (RoPE) model.")
        args = fx.map_arg(node.args, lambda a: reroot(a, old, new, dependent, memo, before))
        kwargs = fx.map_arg(node.kwargs, lambda a: reroot(a, old, new, dependent, memo, before))
        with node.graph.inserting_before(before):
            copy = node.graph.call_function(node.target, args, kwargs)
        copy.meta = dict(node.meta)
        memo[node] = copy
    return memo[node]


def remove_dead_nodes(graph: fx.Graph) -> None:
    """Drop nodes whose values are unused, including replaced attention.

    FX's default keeps SDPA alive (it is tagged nondeterministic-seeded, hence "impure"); here only the graph's
    inputs, outputs and ops that mutate their arguments (cache writes) count as side effects.
    """
    def has_side_effects(node: fx.Node) -> bool:
        if node.op in ("placeholder", "output"):
            return True
        return isinstance(node.target, torch._ops.OpOverload) and node.target._schema.is_mutable

    graph.eliminate_dead_code(is_impure_node=has_side_effects)
