"""`inductor`: torch.compile of the rewritten graph, whole graph, static shapes; CUDA graphs for decode on GPU."""
from __future__ import annotations

import copy
import operator
from typing import Optional

import torch
from torch import fx

from kvcompile.ops import skinny_linear  # noqa: F401  (registers its two ops)

aten = torch.ops.aten


def new_tokens_per_row(module: fx.GraphModule) -> Optional[int]:
    """Static sequence length of the step's `input_ids` placeholder (1 for a decode step), if recorded."""
    for node in module.graph.nodes:
        if node.op == "placeholder" and node.name == "input_ids":
            value = node.meta.get("val")
            if value is not None and value.dim() == 2 and isinstance(value.shape[1], int):
                return value.shape[1]
    return None


class CUDAGraphStep:
    """A compiled decode step replayed from CUDA graphs: one graph per input shape and set of cache buffers.

    The graph is keyed on the addresses and shapes of the module's buffers, so a cache re-allocated by
    `reserve` gets a new graph rather than a stale one. Capturing proves the step free of host
    synchronisation (a synchronising call fails during capture). Logits are copied out of the graph's memory,
    so a result stays valid after the next step.
    """

    WARMUP_RUNS = 2  # Triton/Inductor compile and the cuBLAS workspace set-up happen outside the capture

    def __init__(self, module: fx.GraphModule, compiled):
        self.module = module
        self.compiled = compiled
        self.graphs: dict[tuple, tuple] = {}

    def _key(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple:
        buffers = tuple((b.data_ptr(), tuple(b.shape)) for b in self.module.buffers())
        return tuple(input_ids.shape), input_ids.dtype, positions.dtype, input_ids.device, buffers

    def _capture(self, input_ids: torch.Tensor, positions: torch.Tensor) -> tuple:
        # Warm-up and capture run the real step on the real inputs: writing the same token at the same position
        # again is idempotent, so the replay that follows leaves the cache as one step would.
        ids, pos = input_ids.clone(), positions.clone()
        side = torch.cuda.Stream(device=ids.device)
        side.wait_stream(torch.cuda.current_stream(ids.device))
        with torch.cuda.stream(side):
            for _ in range(self.WARMUP_RUNS):
                self.compiled(ids, pos)
        torch.cuda.current_stream(ids.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.compiled(ids, pos)
        return graph, ids, pos, out

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if torch.cuda.is_current_stream_capturing():  # inside a caller's own graph capture
            return self.compiled(input_ids, positions)
        key = self._key(input_ids, positions)
        entry = self.graphs.get(key)
        if entry is None:
            entry = self.graphs[key] = self._capture(input_ids, positions)
        graph, ids, pos, out = entry
        ids.copy_(input_ids)
        pos.copy_(positions)
        graph.replay()
        return out.clone()


def _tensor_subclass(module: fx.GraphModule, node) -> bool:
    """Whether `node` reads an attribute of `module` that holds a tensor subclass (a parameter's data too)."""
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        return False
    value = operator.attrgetter(node.target)(module)
    data = value.data if isinstance(value, torch.nn.Parameter) else value
    return isinstance(data, torch.Tensor) and type(data) is not torch.Tensor


def _linear_bias(node: fx.Node):
    """The bias argument of an `aten.linear` node, given by position or keyword (None if absent)."""
    return node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")


def _plain_product(module: fx.GraphModule, node, x) -> bool:
    """Whether `node` is an `aten.linear` of `x` without bias over a plain tensor, used by one node only."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target == aten.linear.default
            and len(node.args) >= 2):
        return False
    no_bias = _linear_bias(node) is None and set(node.kwargs) <= {"bias"}
    return node.args[0] is x and no_bias and len(node.users) == 1 and not _tensor_subclass(module, node.args[1])


def _shape(module: fx.GraphModule, node) -> Optional[tuple]:
    """The shape of the tensor `node` stands for: a module attribute's, else its recorded value's (None if
    unknown)."""
    if not isinstance(node, fx.Node):
        return None
    value = operator.attrgetter(node.target)(module) if node.op == "get_attr" else node.meta.get("val")
    return tuple(value.shape) if isinstance(value, torch.Tensor) else None


def _gated_products(module: fx.GraphModule, graph: fx.Graph) -> None:
    """Replace each `silu(linear(x, gate)) * linear(x, up)` (a gated MLP's input side; weights of one shape)
    in `graph` by one `kvcompile::skinny_gated_linear` call: both products in one kernel, the activation and
    the product in its epilogue."""
    for mul in list(graph.nodes):
        if mul.op != "call_function" or mul.target != aten.mul.Tensor or len(mul.args) != 2 or mul.kwargs:
            continue
        for silu, up in (mul.args, mul.args[::-1]):
            if not (isinstance(silu, fx.Node) and silu.target == aten.silu.default and len(silu.users) == 1
                    and isinstance(up, fx.Node) and up.op == "call_function" and up.args):
                continue
            gate, x = silu.args[0], up.args[0]
            if not (_plain_product(module, gate, x) and _plain_product(module, up, x)):
                continue
            shape = _shape(module, gate.args[1])
            if shape is None or shape != _shape(module, up.args[1]):
                continue
            with graph.inserting_before(mul):
                fused = graph.call_function(torch.ops.kvcompile.skinny_gated_linear.default,
                                            (x, gate.args[1], up.args[1]))
            mul.replace_all_uses_with(fused)
            for node in (mul, silu, gate, up):
                graph.erase_node(node)
            break


def with_skinny_products(module: fx.GraphModule) -> fx.GraphModule:
    """A copy of the step whose products run as the decode step's few rows want (see
    `kvcompile.ops.skinny_linear`: Triton kernels that take part in dependent launch): each gated MLP's
    `silu(linear(x, gate)) * linear(x, up)` calls `kvcompile::skinny_gated_linear`, and the other `aten.linear`
    products call `kvcompile::skinny_linear`, except products over a tensor subclass (such as a quantized
    weight), which keep their own linear. The copy's submodules are `module`'s own, so the cache state
    (`kv_state`), which `reserve` re-allocates, is shared; tensors held directly by `module` (the fused
    projections' weights, set once when the program is built) are shared as they are now. `module` itself,
    which the exporters read, is left as it is."""
    graph = copy.deepcopy(module.graph)
    _gated_products(module, graph)
    for node in graph.nodes:
        if node.op == "call_function" and node.target == aten.linear.default:
            x, weight = node.args[:2]
            bias = _linear_bias(node)
            if _tensor_subclass(module, weight) or _tensor_subclass(module, bias):
                continue  # a quantized weight, say: its own linear, not the plain kernel
            node.target = torch.ops.kvcompile.skinny_linear.default
            node.args, node.kwargs = (x, weight, bias), {}
    routed = fx.GraphModule(module, graph, class_name=type(module).__name__)
    for name, child in module.named_children():
        setattr(routed, name, child)
    return routed


def lower(module: fx.GraphModule):
    """Compile lazily (on first call) with Inductor; on CUDA, replay decode steps as CUDA graphs, with their
    products through `with_skinny_products`.

    Only the one-token step is graph-captured: its work per call is small and launch-bound. Prefill chunks run
    compiled without graphs (their kernels are long, and a graph would pin the chunk's activations in memory).
    """
    on_cuda = any(p.is_cuda for p in module.parameters())
    decode = on_cuda and new_tokens_per_row(module) == 1
    if decode:
        module = with_skinny_products(module)
    # Programmatic dependent launch (Hopper+; Inductor ignores it elsewhere): each kernel is launched while the
    # one before drains and waits on the device for its inputs, as kvcompile's decode kernels do
    # (`kvcompile.ops.dependent_launch`). On the H100 it took streamingllm's step from 7.23 to 7.00 ms (8B
    # shape, batch 8, `benchmarks/decode.py` with TORCHINDUCTOR_ENABLE_PDL=1).
    # Compile the bound forward: GraphModule.__call__ wraps errors in a way Dynamo cannot trace.
    compiled = torch.compile(module.forward, backend="inductor", fullgraph=True, dynamic=False,
                             options={"triton.enable_pdl": True})
    return CUDAGraphStep(module, compiled) if decode else compiled
