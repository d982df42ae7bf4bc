"""Build a step program: capture -> analyse -> passes -> a clean graph reading/writing shared cache state."""
from __future__ import annotations

import torch
from torch import nn

from kvcompile.cache import KVState
from kvcompile.capture import capture_step
from kvcompile.graph.sites import find_attention_sites
from kvcompile.passes.base import Pass, StepGraph


def build_step(model: nn.Module, seq_len: int, passes: list[Pass], state: KVState) -> StepGraph:
    """Capture `model` for steps of `seq_len` tokens and apply `passes` to every attention site."""
    module = capture_step(model, seq_len)
    graph = module.graph
    for node in list(graph.nodes):
        # Export's metadata assertions would keep the replaced attention's mask computation alive.
        if node.target == torch.ops.aten._assert_tensor_metadata.default:
            graph.erase_node(node)
    module.add_submodule("kv_state", state)
    positions = next(n for n in graph.nodes if n.op == "placeholder" and n.name == "position_ids")
    step = StepGraph(module, find_attention_sites(graph), state, positions)
    for p in passes:
        p.apply(step)
    unrewritten = [s.output.name for s in step.sites if s.cache is None]
    if unrewritten:
        raise RuntimeError(f"no storage pass rewrote attention at {unrewritten}")
    graph.eliminate_dead_code()
    graph.lint()
    module.recompile()
    return step
