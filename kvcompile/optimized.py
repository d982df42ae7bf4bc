"""`optimize()` and the program it returns: rewritten prefill/decode steps over shared cache state."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from kvcompile import backends
from kvcompile.cache import KVState
from kvcompile.capture import check_capturable, model_device_dtype
from kvcompile.errors import InputError, KVCompileError
from kvcompile.passes.base import Pass, StepGraph, resolve
from kvcompile.program import build_step
from kvcompile.runtime import generate as runtime


class OptimizedModel(runtime.Runner):
    """A decoder whose attention was rewritten by passes; generates and scores through its own KV cache."""

    def __init__(self, model: nn.Module, passes: list[Pass], backend: str, prefill_chunk: int,
                 max_cache_len: Optional[int], max_batch_size: Optional[int], fuse_projections: bool):
        self.passes = passes
        self.backend = backend
        self.prefill_chunk = prefill_chunk
        self.max_cache_len = max_cache_len
        self.max_batch_size = max_batch_size
        self.device, self.dtype = model_device_dtype(model)
        self.generation_config = getattr(model, "generation_config", None)
        self.generation_defaults = runtime.generation_defaults(self.generation_config)
        self.model_name = type(model).__name__
        self.state = KVState()
        fused = {} if fuse_projections else None  # one concatenation of each weight group for all steps
        self.steps: dict[int, StepGraph] = {n: build_step(model, n, passes, self.state, fused)
                                            for n in sorted({1, prefill_chunk})}
        self._lowered = {n: backends.lower(step.module, backend) for n, step in self.steps.items()}
        self.hooks = [hook for hook in (p.runtime_hook(self.state) for p in passes) if hook is not None]
        if max_cache_len is not None:
            self.reserve(max_batch_size or 1, max_cache_len)

    # --- the StepRunner protocol used by the generate loop -------------------------------------------------
    def reserve(self, batch: int, max_len: int) -> None:
        """Size the cache for `batch` rows of at most `max_len` tokens (reusing buffers when pinned)."""
        if self.max_batch_size is not None and batch > self.max_batch_size:
            raise InputError(f"batch of {batch} rows exceeds max_batch_size={self.max_batch_size}; split the "
                             "batch or optimize() with a larger max_batch_size.")
        if self.max_cache_len is not None:
            if max_len > self.max_cache_len:
                raise InputError(
                    f"prompt plus new tokens need {max_len} cache positions but max_cache_len="
                    f"{self.max_cache_len}; shorten the prompt or max_new_tokens, or optimize() with a larger "
                    "max_cache_len (or a streaming pass, whose cache does not grow).")
            max_len = self.max_cache_len
        # A pinned batch size pins the cache's rows too: run_step pads smaller batches to it.
        self.state.allocate(self.max_batch_size or batch, max_len, self.device)
        for hook in self.hooks:
            hook.reset()

    def run_step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits for one step of new tokens (the prefill chunk or one token per row), then the passes' work
        between steps. A batch smaller than a pinned `max_batch_size` is padded with padding rows (position -1,
        never stored) to the pinned shape."""
        rows = input_ids.shape[0]
        if self.max_batch_size is not None and rows < self.max_batch_size:
            pad = self.max_batch_size - rows
            input_ids = torch.cat([input_ids, input_ids.new_zeros(pad, input_ids.shape[1])])
            positions = torch.cat([positions, positions.new_full((pad, positions.shape[1]), -1)])
        with torch.no_grad():
            logits = self._lowered[input_ids.shape[1]](input_ids, positions)[:rows]
        for hook in self.hooks:
            hook.after_step(input_ids.shape[1])
        return logits

    # --- user API (logits_stream, __call__, generate come from runtime.Runner) -------------------------------
    def kv_bytes(self) -> int:
        """Bytes of KV-cache state currently allocated."""
        return self.state.kv_bytes()

    def explain(self) -> str:
        """Each attention site found in the decode graph, and what each pass changed there."""
        step = self.steps[1]
        lines = [f"kvcompile: {self.model_name}, {len(step.sites)} attention sites, backend {self.backend}, "
                 f"passes: {', '.join(p.describe() for p in self.passes)}"]
        lines += [site.describe() for site in step.sites]
        return "\n".join(lines)


def optimize(model: nn.Module, passes: Union[list, str, Pass] = ("dense",), backend: str = "eager", *,
             prefill_chunk: int = 128, max_cache_len: Optional[int] = None,
             max_batch_size: Optional[int] = None, fuse_projections: bool = True) -> OptimizedModel:
    """Rewrite `model`'s attention with `passes` and lower it with `backend` ("eager" or "inductor").

    Cache sizes are chosen per generate call; `max_cache_len` / `max_batch_size` pin them (for deployment,
    CUDA graphs and export). `fuse_projections` computes projections of one input with a small member (q/k/v) as one
    product over their concatenated weights: faster decode, for a copy of those weights taken now (later in-place
    changes to `model`'s q/k/v weights do not reach the program; optimize again). The model itself
    is never modified: on any error nothing has changed.
    """
    resolved = resolve(passes)
    backends.validate(backend)
    check_capturable(model)
    if not isinstance(prefill_chunk, int) or prefill_chunk < 1:
        raise KVCompileError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}.")
    for name, value in (("max_cache_len", max_cache_len), ("max_batch_size", max_batch_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise KVCompileError(f"{name} must be a positive integer or None, got {value!r}.")
    if model.training:
        raise KVCompileError("the model is in training mode; call model.eval() before optimize().")
    return OptimizedModel(model, resolved, backend, prefill_chunk, max_cache_len, max_batch_size,
                          bool(fuse_projections))
