"""Analyse: find each attention layer of a captured graph as an `AttentionSite`.

Two shapes are recognised:
- `aten.scaled_dot_product_attention(q, k, v, mask, ...)`;
- eager attention: `matmul(q, k^T)` [`* scale`] [`+ mask`] -> softmax [-> cast / dropout] -> `matmul(., v)`.
In both, keys/values repeated for grouped-query attention (`unsqueeze -> expand -> reshape`) are traced back to
the [B, Hkv, S, D] tensors. A softmax or attention op that is not part of a recognised site is an error.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import fx

from kvcompile.errors import UnrecognisedAttentionError

aten = torch.ops.aten

_SDPA = {aten.scaled_dot_product_attention.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default, aten._safe_softmax.default}
_MATMUL = {aten.matmul.default, aten.bmm.default}
_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.dropout.default, aten.clone.default,
          aten.contiguous.default, aten.alias.default, aten.type_as.default}
_TRANSPOSES = {aten.transpose.int, aten.permute.default}


@dataclass
class CacheState:
    """The cache buffers a storage pass gave a site, and the op node that reads and writes them."""

    buffers: dict[str, str]
    op_node: fx.Node
    description: str


@dataclass
class AttentionSite:
    """One attention layer of a captured graph, with everything a pass needs to rewrite it."""

    layer: int
    module: str
    kind: str                      # "sdpa" or "eager"
    output: fx.Node                # the node whose value is the attention output [B, Hq, S, D]
    query: fx.Node                 # [B, Hq, S, D], after rotary embedding
    key: fx.Node                   # [B, Hkv, S, D], after rotary embedding, before any GQA repeat
    value: fx.Node                 # [B, Hkv, S, D]
    scale: float
    mask: Optional[fx.Node]
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope_nodes: list[fx.Node] = field(default_factory=list)   # position_ids -> ... -> rotated q / k
    cache: Optional[CacheState] = None
    notes: list[str] = field(default_factory=list)

    @property
    def group_size(self) -> int:
        """Query heads per KV head."""
        return self.num_heads // self.num_kv_heads

    def describe(self) -> str:
        """One paragraph for `explain()`: what was found here and what passes changed."""
        rope = (f"rotary from position_ids through {len(self.rope_nodes)} nodes"
                if self.rope_nodes else "no rotary embedding found")
        lines = [f"layer {self.layer} ({self.module or 'attention'}): {self.kind} at node '{self.output.name}', "
                 f"q={self.query.name} k={self.key.name} v={self.value.name}, {self.num_heads} query heads / "
                 f"{self.num_kv_heads} KV heads (group {self.group_size}), head_dim {self.head_dim}, "
                 f"scale {self.scale:.4g}, mask {'none' if self.mask is None else self.mask.name}, {rope}"]
        if self.cache is not None:
            lines.append(f"  cache: {self.cache.description} via '{self.cache.op_node.name}' "
                         f"(buffers {', '.join(self.cache.buffers.values())})")
        lines += [f"  {note}" for note in self.notes]
        return "\n".join(lines)


def _shape(node: fx.Node) -> tuple[int, ...]:
    val = node.meta.get("val")
    if val is None:
        raise UnrecognisedAttentionError(f"node '{node.name}' carries no shape metadata; capture with torch.export.")
    return tuple(val.shape)


def _strip_gqa_repeat(node: fx.Node) -> fx.Node:
    """The [B, Hkv, S, D] tensor under a grouped-query repeat of K/V, or `node` itself if there is none.

    Recognised repeats: `reshape(expand(unsqueeze(x, 2)))` (transformers' repeat_kv) and
    `repeat_interleave(x, G, dim=1)`; both make query head h read KV head h // G.
    """
    if node.target == aten.repeat_interleave.self_int and tuple(node.args[2:3]) == (1,):
        return node.args[0]
    if node.op != "call_function" or node.target not in (aten.reshape.default, aten.view.default,
                                                         aten._unsafe_view.default):
        return node
    expanded = node.args[0]
    if not (isinstance(expanded, fx.Node) and expanded.target == aten.expand.default):
        return node
    inner = expanded.args[0]
    while (isinstance(inner, fx.Node) and inner.target == aten.slice.Tensor
           and inner.args[2:] in ((0, 9223372036854775807), ())):
        inner = inner.args[0]
    if isinstance(inner, fx.Node) and inner.target == aten.unsqueeze.default and inner.args[1] == 2:
        return inner.args[0]
    return node


def _module_path(node: fx.Node) -> str:
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return path if isinstance(path, str) else ""


def _scalar(value) -> Optional[float]:
    return float(value) if isinstance(value, (int, float)) else None


def _sdpa_site(node: fx.Node) -> AttentionSite:
    q, k, v = node.args[:3]
    mask = node.args[3] if len(node.args) > 3 else node.kwargs.get("attn_mask")
    dropout = node.args[4] if len(node.args) > 4 else node.kwargs.get("dropout_p", 0.0)
    is_causal = node.args[5] if len(node.args) > 5 else node.kwargs.get("is_causal", False)
    scale = node.args[6] if len(node.args) > 6 else node.kwargs.get("scale")
    if dropout:
        raise UnrecognisedAttentionError(
            f"attention '{node.name}' applies dropout {dropout}; call model.eval() before optimize().")
    if mask is None and not is_causal:
        raise UnrecognisedAttentionError(
            f"attention '{node.name}' has neither a mask nor is_causal=True: it is not causal decoder attention.")
    head_dim = _shape(q)[-1]
    return _site("sdpa", node, q, _strip_gqa_repeat(k), _strip_gqa_repeat(v),
                 scale if scale is not None else 1.0 / math.sqrt(head_dim), mask)


def _eager_site(softmax: fx.Node) -> AttentionSite:
    """matmul(q, kT) [* s | / s] [+ mask] -> softmax -> casts -> matmul(., v)."""
    x, mask, scale = softmax.args[0], None, 1.0
    if x.target == aten.add.Tensor:
        a, b = x.args
        a_is_scores = isinstance(a, fx.Node) and a.target in _MATMUL | {aten.mul.Tensor, aten.div.Tensor}
        x, mask = (a, b) if a_is_scores else (b, a)
    if x.target in (aten.mul.Tensor, aten.div.Tensor) and _scalar(x.args[1]) is not None:
        factor = _scalar(x.args[1])
        scale = factor if x.target == aten.mul.Tensor else 1.0 / factor
        x = x.args[0]
    if x.target not in _MATMUL or x.args[1].target not in _TRANSPOSES:
        raise UnrecognisedAttentionError(
            f"softmax '{softmax.name}' looks like attention but its scores '{x.name}' are not matmul(q, k^T); "
            "kvcompile recognises SDPA and matmul -> softmax -> matmul attention.")
    q, key = x.args[0], x.args[1].args[0]
    out = softmax
    while len(out.users) == 1 and next(iter(out.users)).target in _CASTS:
        out = next(iter(out.users))
    consumers = [u for u in out.users if u.target in _MATMUL and u.args[0] is out]
    if len(consumers) != 1 or len(out.users) != 1:
        raise UnrecognisedAttentionError(
            f"softmax '{softmax.name}' looks like attention but its probabilities do not feed one matmul with V.")
    if mask is None:
        raise UnrecognisedAttentionError(
            f"attention at softmax '{softmax.name}' adds no mask: it is not causal decoder attention.")
    output = consumers[0]
    return _site("eager", output, q, _strip_gqa_repeat(key), _strip_gqa_repeat(output.args[1]), scale, mask)


def _site(kind, output, q, k, v, scale, mask) -> AttentionSite:
    q_shape, k_shape, v_shape = _shape(q), _shape(k), _shape(v)
    if len(q_shape) != 4 or len(k_shape) != 4 or k_shape != v_shape or q_shape[1] % k_shape[1]:
        raise UnrecognisedAttentionError(
            f"attention '{output.name}': expected q [B, Hq, S, D] and k, v [B, Hkv, S, D] with Hq a multiple of "
            f"Hkv, got q {q_shape}, k {k_shape}, v {v_shape}.")
    return AttentionSite(layer=-1, module=_module_path(output), kind=kind, output=output, query=q, key=k, value=v,
                         scale=float(scale), mask=mask, num_heads=q_shape[1], num_kv_heads=k_shape[1],
                         head_dim=q_shape[3])


def _position_dependent(graph: fx.Graph, barriers: set[fx.Node]) -> set[fx.Node]:
    """Nodes whose value depends on the `position_ids` placeholder other than through an attention output.

    Attention outputs are barriers: their dependence on positions (the mask) is the attention's own business.
    Shape values (the symbolic batch size read off `position_ids`) carry no position data and do not count.
    """
    source = next((n for n in graph.nodes if n.op == "placeholder" and n.name == "position_ids"), None)
    if source is None:
        return set()
    dependent = {source}
    for node in graph.nodes:
        if (node not in barriers and isinstance(node.meta.get("val"), torch.Tensor)
                and any(a in dependent for a in node.all_input_nodes)):
            dependent.add(node)
    return dependent


def _ancestors(node: fx.Node, within: set[fx.Node]) -> list[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen or n not in within:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return [n for n in node.graph.nodes if n in seen]


def find_attention_sites(graph: fx.Graph) -> list[AttentionSite]:
    """All attention sites of `graph` in execution order; raises if attention is present but unrecognised."""
    sites: list[AttentionSite] = []
    for node in graph.nodes:
        if node.op != "call_function":
            continue
        if node.target in _SDPA:
            sites.append(_sdpa_site(node))
        elif node.target in _SOFTMAX:
            sites.append(_eager_site(node))
        elif "flex_attention" in str(node.target):
            raise UnrecognisedAttentionError(
                f"node '{node.name}' is FlexAttention, which kvcompile does not rewrite; load the model with "
                "attn_implementation='sdpa' or 'eager'.")
    if not sites:
        raise UnrecognisedAttentionError(
            "no attention found in the captured graph: kvcompile looks for scaled_dot_product_attention and "
            "matmul -> softmax -> matmul.")
    dependent = _position_dependent(graph, {site.output for site in sites})
    for layer, site in enumerate(sites):
        site.layer = layer
        rope = _ancestors(site.query, dependent) + _ancestors(site.key, dependent)
        site.rope_nodes = list(dict.fromkeys(rope))
    return sites


