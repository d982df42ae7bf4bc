"""Capture: `torch.export` a decoder's cache-free forward into an FX graph, one per step length.

The model is captured *without* its own KV cache: `(input_ids, position_ids) -> logits`, batch dynamic, sequence
length static. Cache state is added by the storage passes as explicit, statically sized buffers at each attention
site. This keeps one capture path for Hugging Face models and plain modules alike (a plain module has no cache of
its own to find), and leaves positions as the one explicit input every pass can reason about.
"""
from __future__ import annotations

import inspect

import torch
from torch import nn

from kvcompile.errors import UnsupportedModelError


class _LogitsStep(nn.Module):
    """`(input_ids, position_ids) -> logits` around a Hugging Face or plain decoder."""

    def __init__(self, model: nn.Module, hugging_face: bool):
        super().__init__()
        self.model = model
        self.hugging_face = hugging_face

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        if self.hugging_face:
            return self.model(input_ids=input_ids, position_ids=position_ids, use_cache=False).logits
        out = self.model(input_ids, position_ids=position_ids)
        return out if isinstance(out, torch.Tensor) else out.logits


def is_hugging_face(model: nn.Module) -> bool:
    """Whether `model` is a transformers model (it then gets `use_cache=False` and keyword inputs)."""
    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return False
    return isinstance(model, PreTrainedModel)


def check_capturable(model: nn.Module) -> None:
    """Raise `UnsupportedModelError` for models this capture cannot handle, before any work is done."""
    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(f"optimize() takes a torch.nn.Module, got {type(model).__name__}.")
    if is_hugging_face(model):
        config = model.config
        if getattr(config, "is_encoder_decoder", False):
            raise UnsupportedModelError(
                f"{type(model).__name__} is an encoder-decoder model; kvcompile supports decoder-only causal "
                "language models (e.g. LlamaForCausalLM, GPTNeoXForCausalLM).")
        if not hasattr(model, "lm_head") and not type(model).__name__.endswith("ForCausalLM"):
            raise UnsupportedModelError(
                f"{type(model).__name__} is not a causal language model; pass the *ForCausalLM class "
                "(it must return logits).")
        rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
        if isinstance(rope, dict) and rope.get("rope_type") == "dynamic":
            raise UnsupportedModelError(
                "dynamic NTK RoPE recomputes frequencies from the sequence length at run time, which a static "
                "cache cannot follow; use a model with a fixed rope_type.")
        return
    params = inspect.signature(model.forward).parameters
    if "position_ids" not in params:
        raise UnsupportedModelError(
            f"{type(model).__name__}.forward must accept `position_ids` (called as model(input_ids, "
            "position_ids=...)) so that the cache can give each token its position.")


def model_device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and floating dtype of the model's first floating parameter."""
    for p in model.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    raise UnsupportedModelError(f"{type(model).__name__} has no floating-point parameters.")


def capture_step(model: nn.Module, seq_len: int) -> torch.fx.GraphModule:
    """Export one step of `seq_len` new tokens per row as an FX graph with placeholders input_ids, position_ids."""
    device, _ = model_device_dtype(model)
    step = _LogitsStep(model, is_hugging_face(model))
    input_ids = torch.zeros(2, seq_len, dtype=torch.long, device=device)
    position_ids = torch.arange(seq_len, device=device).expand(2, seq_len).contiguous()
    batch = torch.export.Dim("batch", min=1, max=4096)
    with torch.no_grad():
        exported = torch.export.export(step, (input_ids, position_ids),
                                       dynamic_shapes=({0: batch}, {0: batch}), strict=False)
    return exported.module()
