"""Plain-PyTorch reference for single-token decode attention over a positioned KV cache: `cached_attention`'s
definition (`attend`) for one query token per row, in the shapes of the decode kernels.

Every cache slot carries the stream position of the token it holds (-1 = empty), so one routine serves a dense
cache (`window_tokens == 0`) and a StreamingLLM ring cache (`sink_tokens` attention sinks plus a sliding window
of `window_tokens`).
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from kvcompile.ops.cached_attention import attend

__all__ = ["decode_attention_reference"]


def decode_attention_reference(q: Tensor, q_sink: Optional[Tensor], k_cache: Tensor, v_cache: Tensor,
                               slot_pos: Tensor, q_pos: Tensor, sink_tokens: int, window_tokens: int,
                               scale: float) -> Tensor:
    """Attention of one query token per row over the visible cache slots.

    Shapes: `q`/`q_sink` [B, Hq, D]; `k_cache`/`v_cache` [B, Hkv, N, D] with `Hq = G * Hkv` (query head h reads
    KV head h // G); `slot_pos` [B, N]; `q_pos` [B]. Slot n is visible iff `0 <= p <= q_pos` and, when
    `window_tokens > 0`, also `p < sink_tokens` or `p > q_pos - window_tokens` (p = `slot_pos[b, n]`). Sink slots
    (`p < sink_tokens`) are scored with `q_sink` when it is given. Math is float32; the result has q's dtype; rows
    with no visible slot are zeros.
    """
    if q.shape[1] % k_cache.shape[1]:
        raise ValueError(f"query heads ({q.shape[1]}) must be a multiple of kv heads ({k_cache.shape[1]})")
    out = attend(q[:, :, None], None if q_sink is None else q_sink[:, :, None], k_cache, v_cache, slot_pos,
                 q_pos[:, None], sink_tokens, window_tokens, scale)
    return out[:, :, 0]
