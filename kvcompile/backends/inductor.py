"""`inductor`: torch.compile of the rewritten graph, whole graph, static shapes; CUDA graphs on GPU."""
import torch
from torch import fx


def lower(module: fx.GraphModule):
    """Compile lazily (on first call) with Inductor; on CUDA, replay decode steps as CUDA graphs."""
    on_cuda = any(p.is_cuda for p in module.parameters())
    # Compile the bound forward: GraphModule.__call__ wraps errors in a way Dynamo cannot trace.
    return torch.compile(module.forward, backend="inductor", fullgraph=True, dynamic=False,
                         mode="reduce-overhead" if on_cuda else None)
