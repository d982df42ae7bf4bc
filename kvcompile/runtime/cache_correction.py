"""Cache correction for sparse decoding (TidalDecode, arXiv:2410.05076, "KV cache correction").

Tokens decoded with sparse attention get keys/values that drift from those full attention would give, and the
drift compounds as they are read by later tokens. Every `interval` decode steps, the tokens decoded since the last
dense pass are run again through the dense prefill step (chunked, like a prompt) after their cache slots are
emptied, which overwrites their keys/values with full-attention ones; the logits of the last of them, the step
being asked for, come from that dense pass.

This needs a prefill step with more than one token (`optimize(..., prefill_chunk > 1)`): the decode step is the
sparse one.
"""
from __future__ import annotations

from typing import Optional

import torch

from kvcompile.errors import PassError
from kvcompile.ops.cached_attention import cache_slots
from kvcompile.runtime.generate import stream_logits


class CacheCorrection:
    """Wraps an `OptimizedModel`'s `reserve` / `run_step` with periodic dense re-computation of decoded tokens."""

    def __init__(self, opt, interval: int):
        self.opt = opt
        self.interval = interval
        self.history: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.corrections = 0
        self._reserve, self._run_step = opt.reserve, opt.run_step

    def reserve(self, batch: int, max_len: int) -> None:
        self.history.clear()
        self._reserve(batch, max_len)

    def run_step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] != 1:  # a dense prefill chunk: nothing decoded sparsely is pending any more
            self.history.clear()
            return self._run_step(input_ids, positions)
        self.history.append((input_ids, positions))
        if len(self.history) < self.interval:
            return self._run_step(input_ids, positions)
        ids = torch.cat([i for i, _ in self.history], dim=1)
        pos = torch.cat([p for _, p in self.history], dim=1)
        self.history.clear()
        self.forget(pos)
        for _, logits in stream_logits(_Dense(self), ids, pos):
            last = logits
        self.corrections += 1
        return last[:, -1:]

    def forget(self, positions: torch.Tensor) -> None:
        """Empty the cache slots holding `positions` [B, n] in every layer, so they can be written again."""
        state = self.opt.state
        for name, spec in state.specs.items():
            if spec.role != "positions":
                continue
            slot_pos = getattr(state, name)
            slots = cache_slots(positions, slot_pos.shape[1], spec.layout.sink_tokens, spec.layout.window_tokens)
            held = slot_pos.gather(1, slots)
            slot_pos.scatter_(1, slots, torch.where(held == positions, -1, held))
            slot_pos[:, -1] = -1


class _Dense:
    """The wrapped model's own steps (prefill chunks), for the correction pass."""

    def __init__(self, correction: CacheCorrection):
        self.prefill_chunk = correction.opt.prefill_chunk
        self.device = correction.opt.device
        self.run_step = correction._run_step


def enable_cache_correction(opt, interval: Optional[int] = None):
    """Make `opt` (an `OptimizedModel`) correct its cache every `interval` decoded tokens; returns `opt`.

    `interval` defaults to the `correction_interval` of the model's `tidaldecode` pass. Applies to every later
    `generate`, `logits_stream` and call of `opt`.
    """
    if interval is None:
        interval = next((getattr(p, "correction_interval", None) for p in opt.passes
                         if getattr(p, "correction_interval", None)), None)
    if not isinstance(interval, int) or interval < 1:
        raise PassError("cache correction needs an interval: pass interval=..., or optimize with "
                        "TidalDecode(correction_interval=...).")
    fixed = [p.name for p in opt.passes if not p.tokens_rewritable]
    if fixed:
        raise PassError(f"cache correction empties decoded tokens and stores them again, which {fixed[0]} storage "
                        "cannot do; use dense or streamingllm storage with cache correction.")
    if opt.prefill_chunk < 2:
        raise PassError("cache correction re-runs decoded tokens through the dense prefill step, but this model "
                        "was optimized with prefill_chunk=1 (every step is a sparse decode step); optimize with "
                        "prefill_chunk > 1.")
    if isinstance(getattr(opt, "cache_correction", None), CacheCorrection):
        opt.cache_correction.interval = interval
        return opt
    correction = CacheCorrection(opt, interval)
    # Instance attributes shadow the methods the generate loop and logits_stream call.
    opt.reserve, opt.run_step = correction.reserve, correction.run_step
    opt.cache_correction = correction
    return opt
