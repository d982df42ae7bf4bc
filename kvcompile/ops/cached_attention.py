"""`kvcompile::cached_attention`: attention of new tokens over a KV cache whose slots carry positions.

One operator serves every cache *storage* the library has so far:

- dense: slot = position, capacity = longest sequence + 1;
- ring (StreamingLLM): the first `sink_tokens` positions keep their slots, later ones cycle through
  `window_tokens` slots, capacity = sinks + window + 1.

The last slot of every cache is a scratch slot: padded tokens, and tokens of a chunk that the ring could not
keep, are written there and never read (its position stays -1).

Visibility of a cached or new key at position `p` to a query at position `qp`:
`0 <= p <= qp` and, with a window, `p < sink_tokens or p > qp - window_tokens`.
Scores against sink keys use `q_sink` (the query rotated to its rank in the attended set) when given.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kvcompile.ops import kernel_switch


def cache_slots(positions: Tensor, capacity: int, sink_tokens: int, window_tokens: int) -> Tensor:
    """Slot of each new token in a cache of `capacity` slots (the last one is the scratch slot)."""
    scratch = capacity - 1
    if window_tokens == 0:
        slots = positions
    else:
        ring = sink_tokens + (positions - sink_tokens).remainder(window_tokens)
        slots = torch.where(positions < sink_tokens, positions, ring)
        # Within one chunk only the newest `window_tokens` tokens survive in the ring.
        newest = positions.amax(dim=1, keepdim=True)
        kept = (positions < sink_tokens) | (positions > newest - window_tokens)
        slots = torch.where(kept, slots, scratch)
    return torch.where(positions >= 0, slots, scratch)


def visible_keys(query_pos: Tensor, key_pos: Tensor, sink_tokens: int, window_tokens: int) -> Tensor:
    """Which keys each query reads: [B, S, T] for key positions [B, T], [B, Hkv, S, T] for per-head [B, Hkv, T].

    `query_pos` is [B, S]."""
    qp = query_pos[:, :, None] if key_pos.dim() == 2 else query_pos[:, None, :, None]
    kp = key_pos[..., None, :]
    visible = (kp >= 0) & (kp <= qp)
    if window_tokens:
        visible &= (kp < sink_tokens) | (kp > qp - window_tokens)
    return visible


def write_cache(k_cache: Tensor, v_cache: Tensor, slot_pos: Tensor, k: Tensor, v: Tensor, positions: Tensor,
                sink_tokens: int, window_tokens: int) -> None:
    """Store new keys/values (and their positions) in their slots, in place."""
    batch, kv_heads, seq, head_dim = k.shape
    slots = cache_slots(positions, slot_pos.shape[1], sink_tokens, window_tokens)
    index = slots[:, None, :, None].expand(batch, kv_heads, seq, head_dim)
    k_cache.scatter_(2, index, k.to(k_cache.dtype))
    v_cache.scatter_(2, index, v.to(v_cache.dtype))
    slot_pos.scatter_(1, slots, positions.to(slot_pos.dtype))
    slot_pos[:, -1] = -1


def attend(q: Tensor, q_sink: Optional[Tensor], keys: Tensor, values: Tensor, key_pos: Tensor,
           positions: Tensor, sink_tokens: int, window_tokens: int, scale: float, with_probs: bool = False):
    """Masked GQA attention in float32 over explicit keys; queries that see nothing get zeros.

    `q` [B, Hq, S, D]; `keys`/`values` [B, Hkv, T, D]; `key_pos` [B, T], or [B, Hkv, T] when each KV head holds
    different tokens. With `with_probs`, also returns the probabilities [B, Hkv, G, S, T] and the natural
    log-sum-exp of the visible scaled scores [B, Hq, S] (-inf where nothing is visible).
    """
    batch, q_heads, seq, head_dim = q.shape
    kv_heads = keys.shape[1]
    group = q_heads // kv_heads
    per_head_pos = key_pos if key_pos.dim() == 3 else key_pos[:, None, :]

    def scores_of(query: Tensor) -> Tensor:
        grouped = query.float().reshape(batch, kv_heads, group * seq, head_dim)
        return (grouped @ keys.float().transpose(-1, -2)).view(batch, kv_heads, group, seq, -1) * scale

    scores = scores_of(q)
    if q_sink is not None:
        is_sink = (per_head_pos < sink_tokens)[:, :, None, None, :]
        scores = torch.where(is_sink, scores_of(q_sink), scores)
    visible = visible_keys(positions, per_head_pos, sink_tokens, window_tokens)[:, :, None]
    masked = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(masked, dim=-1).nan_to_num(0.0)
    out = probs.view(batch, kv_heads, group * seq, -1) @ values.float()
    out = out.view(batch, q_heads, seq, head_dim).to(q.dtype)
    if not with_probs:
        return out
    return out, probs, torch.logsumexp(masked, dim=-1).view(batch, q_heads, seq)


@torch.library.custom_op("kvcompile::cached_attention", mutates_args=("k_cache", "v_cache", "slot_pos"))
def cached_attention(q: Tensor, q_sink: Optional[Tensor], k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                     slot_pos: Tensor, positions: Tensor, sink_tokens: int, window_tokens: int,
                     scale: float) -> Tensor:
    """Attend `q` [B, Hq, S, D] over the cache plus the new `k`, `v` [B, Hkv, S, D], then store them.

    `positions` [B, S] are the new tokens' stream positions (-1 for padding). `window_tokens=0` is a dense
    cache. The cache tensors are updated in place.
    """
    from kvcompile.ops import decode, prefill
    if kernel_switch.kernels_enabled():
        if q.shape[2] == 1 and kernel_switch.kernels_for(q):
            return decode.decode_step(q, q_sink, k, v, k_cache, v_cache, slot_pos, positions, sink_tokens,
                                      window_tokens, scale)
        if q.shape[2] > 1 and window_tokens == 0:
            start = prefill.prefix_start(slot_pos, positions)
            if start is not None:
                return prefill.causal_prefill(q, k, v, k_cache, v_cache, slot_pos, positions, start, scale)
    keys = torch.cat([k_cache, k.to(k_cache.dtype)], dim=2)
    values = torch.cat([v_cache, v.to(v_cache.dtype)], dim=2)
    key_pos = torch.cat([slot_pos, positions.to(slot_pos.dtype)], dim=1)
    out = prefill.attend_in_blocks(q, q_sink, keys, values, key_pos, positions, sink_tokens, window_tokens, scale)
    write_cache(k_cache, v_cache, slot_pos, k, v, positions, sink_tokens, window_tokens)
    return out


@cached_attention.register_fake
def _(q, q_sink, k, v, k_cache, v_cache, slot_pos, positions, sink_tokens, window_tokens, scale):
    return q.new_empty(q.shape)  # contiguous, like every implementation
