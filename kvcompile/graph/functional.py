"""Functionalise a step graph: cache state read and written in place becomes explicit inputs and outputs.

A step graph reads its cache through `get_attr kv_state.<name>` nodes and updates it inside mutating custom
ops. Formats without mutable state (ONNX) need `(input_ids, position_ids, *state) -> (logits, *new_state)`
instead: each mutating op is swapped for a functional form that returns the updated buffers, and the graph
returns them in `state_names` order.
"""
from __future__ import annotations

import operator

import torch
from torch import fx

from kvcompile.errors import KVCompileError
from kvcompile.graph.rewrite import remove_dead_nodes

STATE_PREFIX = "kv_state."


def mutated_args(target: torch._ops.OpOverload) -> list[int]:
    """Indices of the arguments `target` writes in place, from its schema."""
    return [i for i, arg in enumerate(target._schema.arguments) if arg.alias_info is not None
            and arg.alias_info.is_write]


def functionalise(module: fx.GraphModule, state_names: list[str],
                  functional_forms: dict[torch._ops.OpOverload, torch._ops.OpOverload]) -> fx.GraphModule:
    """A copy of `module` taking the cache buffers `state_names` as inputs after its own, returning them updated.

    `functional_forms` maps each in-place op to a form returning `(out, *mutated args in schema order)`. Each
    buffer must be read only by such ops, and written at most once per step; anything else is an error that
    names the node.
    """
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    current: dict[str, fx.Node] = {}
    written: set[str] = set()
    placeholders = [n for n in module.graph.nodes if n.op == "placeholder"]
    for node in placeholders:
        env[node] = graph.node_copy(node, env.__getitem__)
    for name in state_names:
        current[name] = graph.placeholder(f"past_{name}")

    for node in module.graph.nodes:
        if node.op == "placeholder":
            continue
        if node.op == "get_attr" and node.target.startswith(STATE_PREFIX):
            name = node.target[len(STATE_PREFIX):]
            _check_state_users(node, functional_forms)
            env[node] = current[name]
        elif node.op == "call_function" and node.target in functional_forms:
            env[node] = _call_functional(graph, node, functional_forms[node.target], env, current, written)
        elif node.op == "output":
            (logits,) = node.args[0] if isinstance(node.args[0], (tuple, list)) else (node.args[0],)
            graph.output((env[logits], *(current[name] for name in state_names)))
        else:
            _check_pure(node)
            env[node] = graph.node_copy(node, env.__getitem__)

    result = fx.GraphModule(module, graph, class_name="FunctionalStep")
    remove_dead_nodes(result.graph)
    result.graph.lint()
    result.recompile()
    return result


def _check_state_users(node: fx.Node, functional_forms) -> None:
    for user in node.users:
        if user.op != "call_function" or user.target not in functional_forms:
            raise KVCompileError(
                f"cache buffer '{node.target}' is used by node '{user.name}' ({user.target}), which export cannot "
                "turn into explicit state; only ops with a functional form can read cache state "
                f"({', '.join(str(t) for t in functional_forms)}). Add one for this op.")


def _check_pure(node: fx.Node) -> None:
    if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload) and mutated_args(node.target):
        raise KVCompileError(f"node '{node.name}' ({node.target}) writes a tensor in place and has no functional "
                             "form for export; add one next to the op.")


def _call_functional(graph: fx.Graph, node: fx.Node, functional: torch._ops.OpOverload, env, current,
                     written: set[str]) -> fx.Node:
    """Emit `functional` for the in-place `node`; its updated buffers become the current state."""
    call = graph.call_function(functional, fx.map_arg(node.args, env.__getitem__),
                               fx.map_arg(node.kwargs, env.__getitem__))
    for out_index, arg_index in enumerate(mutated_args(node.target), start=1):
        buffer = node.args[arg_index]
        if not (isinstance(buffer, fx.Node) and buffer.op == "get_attr" and buffer.target.startswith(STATE_PREFIX)):
            raise KVCompileError(f"node '{node.name}' ({node.target}) writes '{buffer}', which is not cache state; "
                                 "export can only make kv_state buffers explicit.")
        name = buffer.target[len(STATE_PREFIX):]
        if name in written:
            raise KVCompileError(f"cache buffer '{name}' is written twice in one step (again by '{node.name}'); "
                                 "export supports one writer per buffer and step.")
        written.add(name)
        current[name] = graph.call_function(operator.getitem, (call, out_index))
    return graph.call_function(operator.getitem, (call, 0))
