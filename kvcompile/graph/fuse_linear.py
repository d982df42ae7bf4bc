"""Fuse linear projections of one input (q/k/v) into one product over concatenated weights.

A decode step multiplies a few rows by every weight matrix: each product is a read of its weights, and small
ones (a GQA model's k and v) run far below the copy bandwidth and add a launch, a split-K reduction and a tail.
One product over the concatenated weights reads the same bytes in one kernel; slices of its output (views) replace
the separate outputs. On the H100 (Llama-3.1-8B shape, batch 8; `benchmarks/profile_step.py --gemv`) one layer's
q/k/v products took 0.088 ms apart and 0.043 ms fused; gate/up 0.102 and 0.099 ms: products of large weights
already run near the bandwidth, so only groups with a small member (< `SMALL_PRODUCT_BYTES`) are fused.

The concatenated weights are a copy: while the caller's model is alive its own weights stay too (1.5 GB for the
8B shape's q/k/v). `optimize(..., fuse_projections=False)` keeps the products apart.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from typing import Optional

import torch
from torch import fx

aten = torch.ops.aten
SMALL_PRODUCT_BYTES = 16 << 20  # a weight below this runs far below the copy bandwidth on its own


def _parameter(module: fx.GraphModule, node) -> Optional[torch.nn.Parameter]:
    """The parameter a `get_attr` node reads, else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = operator.attrgetter(node.target)(module)
    return value if isinstance(value, torch.nn.Parameter) else None


def _operands(node: fx.Node) -> Optional[tuple[torch.nn.Parameter, Optional[torch.nn.Parameter]]]:
    """(weight, bias or None) of an `aten.linear` node over parameters, else None."""
    if node.op != "call_function" or node.target != aten.linear.default or node.kwargs:
        return None
    module = node.graph.owning_module
    weight = _parameter(module, node.args[1])
    bias_node = node.args[2] if len(node.args) > 2 else None
    bias = _parameter(module, bias_node)
    if weight is None or weight.dim() != 2 or (bias_node is not None and bias is None):
        return None
    return weight, bias


def fuse_linear_projections(module: fx.GraphModule, fused: dict[tuple, tuple]) -> int:
    """Replace each group of >= 2 linears reading the same input node, one of them smaller than
    `SMALL_PRODUCT_BYTES`, by one linear over the concatenated weights (and biases, where all have one),
    registered as `fused_projection_<i>` buffers; returns the number of groups fused.

    `fused` maps a tuple of parameter ids to their concatenations, so that the steps of one program share them.
    The parameters no node reads any more are dropped from `module` (the caller's model keeps its own).
    """
    graph = module.graph
    groups: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    for node in graph.nodes:
        if _operands(node) is not None:
            groups[node.args[0]].append(node)
    count = 0
    for linears in groups.values():
        operands = [_operands(n) for n in linears]
        weights = [w for w, _ in operands]
        biases = [b for _, b in operands]
        if len(linears) < 2 or len({(w.dtype, w.device, w.shape[1]) for w in weights}) > 1:
            continue
        if min(w.numel() * w.element_size() for w in weights) >= SMALL_PRODUCT_BYTES:
            continue
        if any(b is None for b in biases) and any(b is not None for b in biases):
            continue
        key = tuple(id(p) for p in weights + biases)
        if key not in fused:
            with torch.no_grad():
                fused[key] = (torch.cat(weights), None if biases[0] is None else torch.cat(biases))
        name = f"fused_projection_{count}"
        count += 1
        fused_weight, fused_bias = fused[key]
        module.register_buffer(f"{name}_weight", fused_weight, persistent=False)
        if fused_bias is not None:
            module.register_buffer(f"{name}_bias", fused_bias, persistent=False)
        with graph.inserting_before(linears[0]):  # grouped in graph order: the first product of the input
            args = (linears[0].args[0], graph.get_attr(f"{name}_weight"))
            if fused_bias is not None:
                args += (graph.get_attr(f"{name}_bias"),)
            product = graph.call_function(aten.linear.default, args)
            start = 0
            for node, weight in zip(linears, weights):
                part = graph.call_function(aten.slice.Tensor, (product, -1, start, start + weight.shape[0]))
                start += weight.shape[0]
                part.meta["val"] = node.meta.get("val")
                node.replace_all_uses_with(part)
        for node in linears:
            reads = node.args[1:]
            graph.erase_node(node)
            for read in reads:
                if isinstance(read, fx.Node) and not read.users:
                    graph.erase_node(read)
    if count:
        _drop_unread_parameters(module)
    return count


def _drop_unread_parameters(module: fx.GraphModule) -> None:
    """Delete the parameters of `module` that no get_attr node reads (they belong to the caller's model)."""
    read = {n.target for n in module.graph.nodes if n.op == "get_attr"}
    for name, _ in list(module.named_parameters(remove_duplicate=False)):
        if name not in read:
            owner, _, attr = name.rpartition(".")
            delattr(module.get_submodule(owner) if owner else module, attr)
