"""Rewriting shared by the token-selection read passes (`tidaldecode`, `tokenselect`).

A read pass runs after the storage pass and rewrites the attention op that pass installed at each site
(`site.cache.op_node`) into selection ops over the *same* cache buffers: the op's read variants (see
`register_read_variants`). Only the decode step (one new token per row) is rewritten; longer steps keep dense
prefill, as both papers do.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch
from torch import fx

import kvcompile.ops.sparse_attention  # noqa: F401  (registers the selection ops)
from kvcompile.cache import StateSpec
from kvcompile.errors import PassError
from kvcompile.graph.sites import AttentionSite
from kvcompile.passes.base import StepGraph

_CACHED_ATTENTION = torch.ops.kvcompile.cached_attention.default
_SELECT = torch.ops.kvcompile.cached_attention_select.default
_SPARSE = torch.ops.kvcompile.sparse_cached_attention.default
_INDICES_AT = [a.name for a in _SPARSE._schema.arguments].index("indices")  # where the sparse op takes them


# Storage op -> its read variants: functions of the op's arguments and one more, `num_selected` or `indices`,
# returning the op and arguments of (select) full attention that also returns the top `num_selected` slots
# [B, Hkv, K], and of (sparse) attention over the slots `indices` plus the new token.
_READ_VARIANTS: dict[torch._ops.OpOverload, tuple[Callable, Callable]] = {
    _CACHED_ATTENTION: (lambda args, num_selected: (_SELECT, (*args, num_selected)),
                        lambda args, indices: (_SPARSE, (*args[:_INDICES_AT], indices, *args[_INDICES_AT:]))),
}


def register_read_variants(storage_op, select_op, sparse_op) -> None:
    """Let read passes rewrite the storage op `storage_op`: `select_op` and `sparse_op` take its arguments plus
    `num_selected` and `indices` respectively (see `_READ_VARIANTS`)."""
    _READ_VARIANTS[storage_op] = (lambda args, num_selected: (select_op, (*args, num_selected)),
                                  lambda args, indices: (sparse_op, (*args, indices)))


def is_decode_step(step: StepGraph) -> bool:
    """Whether `step` runs one new token per row (its queries have a static sequence length of 1)."""
    return all(site.query.meta["val"].shape[2] == 1 for site in step.sites)


def cached_attention_node(site: AttentionSite, pass_name: str) -> fx.Node:
    """The `cached_attention` node a storage pass installed at `site`, or a `PassError` saying why not."""
    node = site.cache.op_node if site.cache is not None else None
    if node is None or node.target != _CACHED_ATTENTION:
        found = "no cache" if node is None else f"'{node.name}' ({node.target})"
        raise PassError(f"{pass_name} rewrites the kvcompile::cached_attention op of a storage pass, but layer "
                        f"{site.layer} has {found}; combine {pass_name} with dense or streamingllm storage.")
    return node


def op_arguments(node: fx.Node) -> dict:
    """The arguments of an op node by their names in the op's schema."""
    return dict(zip((a.name for a in node.target._schema.arguments), node.args))


def storage_node(site: AttentionSite, pass_name: str) -> fx.Node:
    """The storage op node at `site` if it has read variants, or a `PassError` saying why not."""
    node = site.cache.op_node if site.cache is not None else None
    if node is None or node.target not in _READ_VARIANTS:
        found = "no cache" if node is None else f"'{node.name}' ({node.target})"
        raise PassError(f"{pass_name} reads a subset of the cache through the storage pass's attention op, but "
                        f"layer {site.layer} has {found}, which offers no selective read; combine {pass_name} "
                        "with dense, streamingllm or zipcache storage.")
    return node


def cache_spec(step: StepGraph, site: AttentionSite) -> StateSpec:
    """The state spec of `site`'s slot-position buffer (its cache layout and geometry)."""
    return step.state.specs[site.cache.buffers["positions"].split(".", 1)[1]]


def check_same_slots(step: StepGraph, chooser: AttentionSite, reader: AttentionSite, pass_name: str) -> None:
    """Slot numbers chosen at `chooser` mean the same tokens at `reader` only if both caches share a layout."""
    a, b = cache_spec(step, chooser).layout, cache_spec(step, reader).layout
    if (a, chooser.num_kv_heads) != (b, reader.num_kv_heads):
        raise PassError(f"{pass_name}: layer {reader.layer} reuses the slots chosen at layer {chooser.layer}, but "
                        f"their caches differ ({a.describe()}, {chooser.num_kv_heads} KV heads vs "
                        f"{b.describe()}, {reader.num_kv_heads} KV heads).")


def _fake_indices(like: fx.Node, kv_heads: int, count: int):
    """Fake value of an int64 [B, Hkv, count] tensor with `like`'s (symbolic) batch size."""
    val = like.meta.get("val")
    mode = getattr(val, "fake_mode", None)
    if mode is None:
        return None
    with mode:
        return val.new_empty((val.shape[0], kv_heads, count), dtype=torch.long)


def _replace(graph: fx.Graph, site: AttentionSite, old: fx.Node, new_out: fx.Node, op_node: fx.Node) -> None:
    new_out.meta["val"] = old.meta.get("val")
    old.replace_all_uses_with(new_out)
    graph.erase_node(old)
    site.cache.op_node = op_node


def install_select(graph: fx.Graph, site: AttentionSite, node: fx.Node, num_selected: int) -> fx.Node:
    """Replace the storage op `node` by its select variant; returns the node of its indices [B, Hkv, K]."""
    op, args = _READ_VARIANTS[node.target][0](node.args, num_selected)
    with graph.inserting_before(node):
        select = graph.call_function(op, args)
        out = graph.call_function(operator.getitem, (select, 0))
        indices = graph.call_function(operator.getitem, (select, 1))
    indices.meta["val"] = _fake_indices(site.query, site.num_kv_heads, num_selected)
    _replace(graph, site, node, out, select)
    return indices


def install_sparse(graph: fx.Graph, site: AttentionSite, node: fx.Node, indices: fx.Node) -> fx.Node:
    """Replace the storage op `node` by its sparse variant over the slots `indices`; returns the new node."""
    op, args = _READ_VARIANTS[node.target][1](node.args, indices)
    with graph.inserting_before(node):
        out = graph.call_function(op, args)
    _replace(graph, site, node, out, out)
    return out
