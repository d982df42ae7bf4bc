"""Prefill paths of `kvcompile::cached_attention` (several new tokens per row).

- The usual prefill — every row's chunk holds positions p0..p0+S-1 (the same p0 in every row; trailing padding
  and padding-only rows allowed) over a dense cache whose slots 0..p0-1 hold positions 0..p0-1 — is causal
  attention over slots 0..p0+S-1 once the chunk is written (slot = position). `causal_prefill` runs it as
  `scaled_dot_product_attention` with the lower-right causal mask and native GQA: on CUDA in bf16/fp16 the flash
  kernel, with no repeated K/V and no mask tensor (other dtypes and devices may take SDPA's math path, which
  materialises the scores). `prefix_start` decides whether a call qualifies; it reads two scalars on the host,
  which a prefill step can afford (decode steps never come here).
- Anything else (left-padded rows, rows at different positions, ring caches, sink queries) takes the reference
  attention in blocks of queries (`attend_in_blocks`), so each block's score matrix stays within
  `SCORE_ELEMENTS` (its probabilities and masks take a few times that).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.nn.attention.bias import causal_lower_right

from kvcompile.ops.cached_attention import attend, write_cache

__all__ = ["prefix_start", "causal_prefill", "attend_in_blocks", "SCORE_ELEMENTS"]

SCORE_ELEMENTS = 1 << 28  # float32 scores per block of queries (1 GiB)


def prefix_start(slot_pos: Tensor, positions: Tensor) -> Optional[int]:
    """p0 when `causal_prefill` is exact for this chunk, else None: every row is padding (-1) only, or positions
    p0, p0+1, ... from its first column followed by padding only, and such a row's dense cache holds exactly
    0..p0-1 in slots 0..p0-1 with slots p0..p0+S-1 empty (S = chunk length, p0 + S short of the scratch slot)."""
    seq = positions.shape[1]
    start = int(positions[:, 0].max())
    if start < 0 or start + seq >= slot_pos.shape[1]:  # nothing to attend, or no room before the scratch slot
        return None
    steps = torch.arange(start + seq, device=positions.device)
    real = positions >= 0
    rows = real[:, :1]  # rows with tokens start with one
    ok = (positions == torch.where(real, steps[start:], -1)).all() & (real[:, 1:] <= real[:, :-1]).all()
    ok &= ((slot_pos[:, start:start + seq] < 0) | ~rows).all()
    if start:
        ok &= ((slot_pos[:, :start] == steps[:start]) | ~rows).all()
    return start if bool(ok) else None


def causal_prefill(q: Tensor, k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_pos: Tensor,
                   positions: Tensor, start: int, scale: float) -> Tensor:
    """Write the chunk, then causal attention of `q` [B, Hq, S, D] over cache slots 0..start+S-1 (padding
    queries get zeros)."""
    write_cache(k_cache, v_cache, slot_pos, k, v, positions, 0, 0)
    seq, end = q.shape[2], start + q.shape[2]
    keys, values = k_cache[:, :, :end].to(q.dtype), v_cache[:, :, :end].to(q.dtype)
    mask = causal_lower_right(seq, end) if start else None
    out = torch.nn.functional.scaled_dot_product_attention(q, keys, values, attn_mask=mask, is_causal=not start,
                                                           scale=scale, enable_gqa=q.shape[1] != k.shape[1])
    return torch.where((positions >= 0)[:, None, :, None], out, 0.0).contiguous()


def attend_in_blocks(q: Tensor, q_sink: Optional[Tensor], keys: Tensor, values: Tensor, key_pos: Tensor,
                     positions: Tensor, sink_tokens: int, window_tokens: int, scale: float) -> Tensor:
    """`attend` over blocks of queries, each with at most `SCORE_ELEMENTS` scores."""
    batch, q_heads, seq, _ = q.shape
    block = max(1, SCORE_ELEMENTS // (batch * q_heads * keys.shape[2]))
    if block >= seq:
        return attend(q, q_sink, keys, values, key_pos, positions, sink_tokens, window_tokens, scale)
    return torch.cat([
        attend(q[:, :, s:s + block], None if q_sink is None else q_sink[:, :, s:s + block], keys, values, key_pos,
               positions[:, s:s + block], sink_tokens, window_tokens, scale)
        for s in range(0, seq, block)], dim=2)
