"""Fuse linear projections of one input (q/k/v) into one product over concatenated weights.

A decode step multiplies a few rows by every weight matrix: each product is a read of its weights, and small
ones (a GQA model's k and v) run far below the copy bandwidth and add a launch, a split-K reduction and a tail.
In the compiled 8B-shape step on the H100 (batch 8, `benchmarks/profile_step.py --backend inductor`) k and v took
5.8 µs each for 8 MB (48% of the bandwidth) beside q's split-K product and reductions; one product over the
concatenated weights reads the same bytes in one kernel, and slices of its output (views) replace the separate
outputs: streamingllm's step went from 7.60 to 7.16 ms. Large products (gate/up, 112 MiB each) already run at
~92% of the bandwidth, so only groups with a member below `SMALL_PRODUCT_BYTES` are fused.

The concatenated weights are a copy made by `optimize()`, a snapshot of the weights at that time: while the
caller's model is alive its own weights stay too (1.5 GiB for the 8B shape's q/k/v), and changing them in place
later does not reach the program. `optimize(..., fuse_projections=False)` keeps the products apart.
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
    """The plain floating-point parameter a `get_attr` node reads (not a tensor subclass, such as a quantized
    weight, which concatenation would not keep), else None."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return None
    value = operator.attrgetter(node.target)(module)
    plain = isinstance(value, torch.nn.Parameter) and type(value.data) is torch.Tensor
    return value if plain and value.is_floating_point() else None


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
    registered as `fused_projection_<i>_weight` (and `_bias`) buffers; returns the number of groups fused.

    `fused` maps a tuple of parameter ids to their concatenations, so that the steps of one program share them.
    The parameters no node reads any more are dropped from `module` (the caller's model keeps its own).
    """
    graph = module.graph
    groups: dict[fx.Node, list[fx.Node]] = defaultdict(list)
    operands_of: dict[fx.Node, tuple] = {}
    for node in graph.nodes:
        operands = _operands(node)
        if operands is not None:
            operands_of[node] = operands
            groups[node.args[0]].append(node)
    count = 0
    for linears in groups.values():
        operands = [operands_of[n] for n in linears]
        weights = [w for w, _ in operands]
        biases = [b for _, b in operands]
        if len(linears) < 2 or len({(w.dtype, w.device, w.shape[1]) for w in weights}) > 1:
            continue
        if min(w.numel() * w.element_size() for w in weights) >= SMALL_PRODUCT_BYTES:
            continue
        if any(b is None for b in biases) and any(b is not None for b in biases):
            continue
        if biases[0] is not None and len({b.dtype for b in biases}) > 1:
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
            product.meta["val"] = _fake_product(linears[0].args[0], fused_weight)
            start = 0
            for node, weight in zip(linears, weights):
                end = start + weight.shape[0]
                part = graph.call_function(aten.slice.Tensor, (product, -1, start, end))
                if product.meta["val"] is not None:
                    part.meta["val"] = aten.slice.Tensor(product.meta["val"], -1, start, end)
                start = end
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


def _fake_product(x: fx.Node, weight: torch.Tensor):
    """The fused product's metadata value, a fake tensor shaped from the input's (None if it has none). Made with
    `new_empty`, not by running `aten.linear` on fakes: torch 2.11's linear asks a symbolic size for its numel."""
    x_val = x.meta.get("val") if isinstance(x, fx.Node) else None
    mode = getattr(x_val, "fake_mode", None)
    if mode is None:
        return None
    with mode:
        return x_val.new_empty((*x_val.shape[:-1], weight.shape[0]))  # linear keeps its input's dtype


def _drop_unread_parameters(module: fx.GraphModule) -> None:
    """Delete the parameters of `module` that no get_attr node reads (they belong to the caller's model)."""
    read = {n.target for n in module.graph.nodes if n.op == "get_attr"}
    for name, _ in list(module.named_parameters(remove_duplicate=False)):
        if name not in read:
            owner, _, attr = name.rpartition(".")
            delattr(module.get_submodule(owner) if owner else module, attr)
