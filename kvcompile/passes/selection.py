"""Rewriting shared by the token-selection read passes (`tidaldecode`, `tokenselect`).

A read pass runs after the storage pass and rewrites the `kvcompile::cached_attention` node that pass installed
at each site (`site.cache.op_node`) into selection ops over the *same* cache buffers. Only the decode step (one
new token per row) is rewritten; longer steps keep dense prefill, as both papers do.
"""
from __future__ import annotations

import operator

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


def is_decode_step(step: StepGraph) -> bool:
    """Whether `step` runs one new token per row (its queries have a static sequence length of 1)."""
    return all(site.query.meta["val"].shape[2] == 1 for site in step.sites)


def cached_attention_node(site: AttentionSite, pass_name: str) -> fx.Node:
    """The `cached_attention` node a storage pass installed at `site`, or a `PassError` saying why not."""
    node = site.cache.op_node if site.cache is not None else None
    if node is None or node.target != _CACHED_ATTENTION:
        found = "no cache" if node is None else f"'{node.name}' ({node.target})"
        raise PassError(f"{pass_name} rewrites the kvcompile::cached_attention op of a storage pass, but layer "
                        f"{site.layer} has {found}; combine {pass_name} with a storage pass that keeps every "
                        "token (dense, streamingllm).")
    return node


def cache_spec(step: StepGraph, site: AttentionSite) -> StateSpec:
    """The state spec of `site`'s slot-position buffer (its cache layout and geometry)."""
    return step.state.specs[site.cache.buffers["positions"].split(".", 1)[1]]


def check_same_slots(step: StepGraph, chooser: AttentionSite, reader: AttentionSite, pass_name: str) -> None:
    """Slot numbers chosen at `chooser` mean the same tokens at `reader` only if both caches share a layout."""
    a, b = cache_spec(step, chooser), cache_spec(step, reader)
    if (a.layout, a.num_kv_heads) != (b.layout, b.num_kv_heads):
        raise PassError(f"{pass_name}: layer {reader.layer} reuses the slots chosen at layer {chooser.layer}, but "
                        f"their caches differ ({a.layout.describe()}, {a.num_kv_heads} KV heads vs "
                        f"{b.layout.describe()}, {b.num_kv_heads} KV heads).")


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
    """Replace `node` by `cached_attention_select`; returns the node of its indices [B, Hkv, num_selected]."""
    with graph.inserting_before(node):
        select = graph.call_function(_SELECT, (*node.args, num_selected))
        out = graph.call_function(operator.getitem, (select, 0))
        indices = graph.call_function(operator.getitem, (select, 1))
    indices.meta["val"] = _fake_indices(site.query, site.num_kv_heads, num_selected)
    _replace(graph, site, node, out, select)
    return indices


def install_sparse(graph: fx.Graph, site: AttentionSite, node: fx.Node, indices: fx.Node) -> fx.Node:
    """Replace `node` by `sparse_cached_attention` over the slots `indices`; returns the new node."""
    q, q_sink, k, v, k_cache, v_cache, slot_pos, positions, sinks, window, scale = node.args
    with graph.inserting_before(node):
        out = graph.call_function(_SPARSE, (q, q_sink, k, v, k_cache, v_cache, slot_pos, positions, indices,
                                            sinks, window, scale))
    _replace(graph, site, node, out, out)
    return out
