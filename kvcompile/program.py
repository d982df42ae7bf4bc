"""Build a step program: capture -> analyse -> passes -> a clean graph reading/writing shared cache state."""
from __future__ import annotations

from typing import Optional

import torch
from torch import fx, nn

from kvcompile.cache import KVState
from kvcompile.capture import capture_step
from kvcompile.graph.fuse_linear import fuse_linear_projections
from kvcompile.graph.rewrite import remove_dead_nodes
from kvcompile.graph.sites import find_attention_sites
from kvcompile.passes.base import Pass, StepGraph


def _plain_graph_module(module: fx.GraphModule) -> fx.GraphModule:
    """The exported module as a plain `(input_ids, position_ids) -> logits` GraphModule.

    Drops export's input guards, hooks and metadata assertions (the latter would keep the replaced attention's
    mask computation alive) and its pytree calling convention, which torch.compile cannot trace.
    """
    graph = module.graph
    for node in list(graph.nodes):
        if node.target == torch.ops.aten._assert_tensor_metadata.default or node.target == "_guards_fn":
            graph.erase_node(node)
    output = graph.output_node()
    (logits,) = output.args[0]
    output.args = (logits,)
    graph._codegen = fx.graph.CodeGen()
    return fx.GraphModule(module, graph, class_name="StepGraphModule")


def build_step(model: nn.Module, seq_len: int, passes: list[Pass], state: KVState,
               fused: Optional[dict] = None) -> StepGraph:
    """Capture `model` for steps of `seq_len` tokens and apply `passes` to every attention site; with a `fused`
    dict (shared by a program's steps), also fuse the linear projections of one input with a small member
    (q/k/v; see `kvcompile.graph.fuse_linear`)."""
    module = _plain_graph_module(capture_step(model, seq_len))
    graph = module.graph
    module.add_submodule("kv_state", state)
    positions = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "position_ids")
    step = StepGraph(module, find_attention_sites(graph), state, positions)
    for p in passes:
        p.apply(step)
    unrewritten = [s.output.name for s in step.sites if s.cache is None]
    if unrewritten:
        raise RuntimeError(f"no storage pass rewrote attention at {unrewritten}")
    if fused is not None:
        fuse_linear_projections(module, fused)
    remove_dead_nodes(graph)
    graph.lint()
    module.recompile()
    return step
