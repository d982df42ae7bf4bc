"""Plain-PyTorch reference for single-token decode attention over a positioned KV cache.

Every cache slot carries the stream position of the token it holds (-1 = empty), so one
routine serves a dense cache (``window_tokens == 0``) and a StreamingLLM ring cache
(``sink_tokens`` attention sinks plus a sliding window of ``window_tokens``).
"""

from __future__ import annotations

import torch

__all__ = ["decode_attention_reference"]


def decode_attention_reference(
    q: torch.Tensor,
    q_sink: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    q_pos: torch.Tensor,
    sink_tokens: int,
    window_tokens: int,
    scale: float,
) -> torch.Tensor:
    """Attention of one query token per row over the visible cache slots.

    Shapes: ``q``/``q_sink`` [B, Hq, D]; ``k_cache``/``v_cache`` [B, Hkv, N, D] with
    ``Hq = G * Hkv`` (query head h reads kv head h // G); ``slot_pos`` [B, N]; ``q_pos`` [B].
    Slot n is visible iff ``0 <= p <= q_pos`` and, when ``window_tokens > 0``, also
    ``p < sink_tokens`` or ``p > q_pos - window_tokens`` (p = ``slot_pos[b, n]``).
    Sink slots (``p < sink_tokens``) are scored with ``q_sink`` when it is given.
    Math is fp32; the result has q's dtype; rows with no visible slot are zeros.
    """
    B, Hq, D = q.shape
    Hkv = k_cache.shape[1]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of kv heads ({Hkv})")
    G = Hq // Hkv

    # Group query heads by the kv head they read: [B, Hkv, G, D] against [B, Hkv, N, D].
    k = k_cache.float()
    scores = torch.einsum("bkgd,bknd->bkgn", q.float().view(B, Hkv, G, D), k) * scale

    pos = slot_pos.long()[:, None, None, :]  # [B, 1, 1, N], broadcast over heads
    qp = q_pos.long()[:, None, None, None]
    is_sink = pos < sink_tokens
    if q_sink is not None:
        sink_scores = torch.einsum("bkgd,bknd->bkgn", q_sink.float().view(B, Hkv, G, D), k) * scale
        scores = torch.where(is_sink, sink_scores, scores)

    visible = (pos >= 0) & (pos <= qp)
    if window_tokens > 0:
        visible = visible & (is_sink | (pos > qp - window_tokens))

    probs = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1)
    # A row with nothing visible softmaxes to NaN everywhere; all its slots are masked, so
    # zeroing masked probabilities turns it into an all-zero output.
    probs = probs.masked_fill(~visible, 0.0)
    out = torch.einsum("bkgn,bknd->bkgd", probs, v_cache.float())
    return out.reshape(B, Hq, D).to(q.dtype)
