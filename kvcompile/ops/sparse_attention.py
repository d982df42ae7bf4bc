"""Token-selection decode ops: attention over a chosen subset of cache slots, and the ops that choose them.

Read passes (TidalDecode, TokenSelect) keep the whole cache but let a decode step read only selected slots.
The selection is a tensor `indices` [B, Hkv, K] of cache *slot* numbers per KV head (a whole GQA group of
query heads reads the same slots). Slots hold positions (see `kvcompile.ops.cached_attention`), so a selection
made in one layer means the same tokens in every layer whose cache has the same layout. An entry that selects
nothing points at the scratch slot (the last one), whose position is always -1, so it is never visible.

Three operators, each with a plain PyTorch definition (used on CPU and by the tests), a fake implementation,
and Triton kernels on CUDA (`kvcompile.ops.triton_sparse_decode`, TokenSelect's `kvcompile.ops.triton_tokenselect`):

- `kvcompile::cached_attention_select` — full attention, like `cached_attention`, that also returns the
  `K` visible cached slots with the most attention per KV head (probabilities summed over the group's query
  heads). TidalDecode's token-selection layers.
- `kvcompile::sparse_cached_attention` — attention over the slots in `indices` plus the new token, then the
  new token is stored like `cached_attention` stores it. Every reusing layer of TidalDecode, every layer of
  TokenSelect.
- `kvcompile::tokenselect_indices` — TokenSelect's choice: the first `init_tokens` and the last
  `local_tokens` tokens, plus the `top_k` other tokens with the most per-head soft votes; reuses the previous
  choice while the query stays similar (the selection cache, held in two state buffers it updates).

All three are decode ops: one new token per row (S == 1); queries see the cache through the same visibility
rule as `cached_attention` (positions, sinks and window).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kvcompile.ops import kernel_switch
from kvcompile.ops.cached_attention import attend, visible_keys, write_cache
from kvcompile.ops.triton_topk import topk_slots_triton

NEG_INF = float("-inf")
# TokenSelect reuses a choice while cos(query, last) >= threshold - SIMILARITY_SLACK: the slack keeps float
# rounding (an identical query's similarity comes out 1 +- 1e-7) from deciding, e.g. at threshold 1.0.
SIMILARITY_SLACK = 1e-6


# --- plain helpers (the definition) --------------------------------------------------------------------------
def gather_slots(cache: Tensor, indices: Tensor) -> Tensor:
    """Rows of `cache` [B, Hkv, N, D] at `indices` [B, Hkv, K] -> [B, Hkv, K, D]."""
    return cache.gather(2, indices[..., None].expand(*indices.shape, cache.shape[-1]))


def slot_positions(slot_pos: Tensor, indices: Tensor) -> Tensor:
    """Positions held by the slots in `indices` [B, Hkv, K] (`slot_pos` [B, N]) -> [B, Hkv, K]."""
    return slot_pos[:, None, :].expand(-1, indices.shape[1], -1).gather(2, indices)


_LOW = 2 ** 31 - 1  # index field of a packed key: LOW - index, so equal scores prefer the lower index
_NEG_INF_KEY = -0x7F800001  # the order-preserving bits of -inf


def topk_slots(scores: Tensor, k: int, scratch: int) -> Tensor:
    """The `k` slots with the highest `scores` [..., N] (-inf = not selectable), as int64 [..., k], equal scores
    by the lower slot; in no particular order (attention does not depend on it).

    Slots scoring -inf, and the tail when fewer than `k` slots exist, point at `scratch` (NaN scores are not
    supported). Where `kernel_switch.kernels_for(scores)` allows the kernels, a Triton radix select with each
    row split across programs (`kvcompile.ops.triton_topk`); elsewhere one `torch.topk` over int64 keys that
    order like (score, -slot): the float's bits made order-preserving, then the inverted slot.
    """
    if kernel_switch.kernels_for(scores):
        return topk_slots_triton(scores, k, scratch)
    n = scores.shape[-1]
    take = min(k, n)
    bits = (scores.float() + 0.0).contiguous().view(torch.int32)  # + 0.0: -0.0 becomes 0.0, an equal score
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).long()
    top = ((ordered << 32) | (_LOW - torch.arange(n, device=scores.device))).topk(take, dim=-1).values
    idx = torch.where((top >> 32) > _NEG_INF_KEY, _LOW - (top & 0xFFFFFFFF), scratch)
    if take < k:
        idx = torch.cat([idx, idx.new_full((*idx.shape[:-1], k - take), scratch)], dim=-1)
    return idx


# Attention over per-head key positions [B, Hkv, T] is the op's reference attention.
attend_per_head = attend


def _with_new_tokens(k_cache: Tensor, v_cache: Tensor, slot_pos: Tensor, k: Tensor, v: Tensor,
                     positions: Tensor, indices: Optional[Tensor]):
    """Keys, values and per-head positions of the read set: the selected slots (all if `indices` is None),
    then the new tokens."""
    kv_heads = k_cache.shape[1]
    if indices is None:
        keys, values = k_cache, v_cache
        key_pos = slot_pos[:, None, :].expand(-1, kv_heads, -1)
    else:
        keys, values = gather_slots(k_cache, indices), gather_slots(v_cache, indices)
        key_pos = slot_positions(slot_pos, indices)
    new_pos = positions.to(slot_pos.dtype)[:, None, :].expand(-1, kv_heads, -1)
    return (torch.cat([keys, k.to(k_cache.dtype)], dim=2), torch.cat([values, v.to(v_cache.dtype)], dim=2),
            torch.cat([key_pos, new_pos], dim=2))


def _fast_path(q: Tensor) -> bool:
    """Triton kernels run for decode tensors (one new token) where `kernel_switch.kernels_for` allows them; everything
    else uses the definition."""
    return kernel_switch.kernels_for(q) and q.shape[2] == 1


# --- kvcompile::cached_attention_select ----------------------------------------------------------------------
def select_by_attention(probs: Tensor, visible: Tensor, k: int, scratch: int) -> Tensor:
    """TidalDecode's choice: per KV head, the `k` cached slots with the most attention summed over the group.

    `probs` [B, Hkv, G, S, N] are attention probabilities over the N cached slots; `visible` [B, N] marks the
    slots a query may read. Returns int64 [B, Hkv, k].
    """
    mass = probs.sum(dim=(2, 3)).masked_fill(~visible[:, None, :], NEG_INF)
    return topk_slots(mass, k, scratch)


@torch.library.custom_op("kvcompile::cached_attention_select", mutates_args=("k_cache", "v_cache", "slot_pos"))
def cached_attention_select(q: Tensor, q_sink: Optional[Tensor], k: Tensor, v: Tensor, k_cache: Tensor,
                            v_cache: Tensor, slot_pos: Tensor, positions: Tensor, sink_tokens: int,
                            window_tokens: int, scale: float, num_selected: int) -> tuple[Tensor, Tensor]:
    """Full attention of `q` over the cache plus the new token (then stored), and the `num_selected` visible
    cached slots with the most attention per KV head: `(out [B, Hq, S, D], indices int64 [B, Hkv, K])`."""
    scratch = slot_pos.shape[1] - 1
    if _fast_path(q):
        from kvcompile.ops.triton_sparse_decode import select_decode_step
        return select_decode_step(q, q_sink, k, v, k_cache, v_cache, slot_pos, positions, sink_tokens,
                                  window_tokens, scale, num_selected)
    keys, values, key_pos = _with_new_tokens(k_cache, v_cache, slot_pos, k, v, positions, None)
    out, probs, _ = attend_per_head(q, q_sink, keys, values, key_pos, positions, sink_tokens, window_tokens,
                                    scale, with_probs=True)
    n = slot_pos.shape[1]
    visible = visible_keys(positions[:, -1:], slot_pos, sink_tokens, window_tokens)[:, 0]
    indices = select_by_attention(probs[..., :n], visible, num_selected, scratch)
    write_cache(k_cache, v_cache, slot_pos, k, v, positions, sink_tokens, window_tokens)
    return out, indices


@cached_attention_select.register_fake
def _(q, q_sink, k, v, k_cache, v_cache, slot_pos, positions, sink_tokens, window_tokens, scale, num_selected):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], k_cache.shape[1], num_selected), dtype=torch.long)


# --- kvcompile::sparse_cached_attention ----------------------------------------------------------------------
@torch.library.custom_op("kvcompile::sparse_cached_attention", mutates_args=("k_cache", "v_cache", "slot_pos"))
def sparse_cached_attention(q: Tensor, q_sink: Optional[Tensor], k: Tensor, v: Tensor, k_cache: Tensor,
                            v_cache: Tensor, slot_pos: Tensor, positions: Tensor, indices: Tensor,
                            sink_tokens: int, window_tokens: int, scale: float) -> Tensor:
    """Attend `q` [B, Hq, S, D] over the cache slots `indices` [B, Hkv, K] (per KV head) plus the new `k`, `v`
    [B, Hkv, S, D], then store the new tokens. Selected slots still obey the visibility rule."""
    if _fast_path(q):
        from kvcompile.ops.triton_sparse_decode import sparse_decode_step
        return sparse_decode_step(q, q_sink, k, v, k_cache, v_cache, slot_pos, positions, indices, sink_tokens,
                                  window_tokens, scale)
    keys, values, key_pos = _with_new_tokens(k_cache, v_cache, slot_pos, k, v, positions, indices)
    out = attend_per_head(q, q_sink, keys, values, key_pos, positions, sink_tokens, window_tokens, scale)
    write_cache(k_cache, v_cache, slot_pos, k, v, positions, sink_tokens, window_tokens)
    return out


@sparse_cached_attention.register_fake
def _(q, q_sink, k, v, k_cache, v_cache, slot_pos, positions, indices, sink_tokens, window_tokens, scale):
    return q.new_empty(q.shape)


# --- kvcompile::tokenselect_indices --------------------------------------------------------------------------
def soft_votes(logits: Tensor, candidates: Tensor) -> Tensor:
    """TokenSelect's per-head soft voting: softmax of each head's q·k over the candidate slots, summed over
    all heads. `logits` [B, Hq, N] (unscaled q·k), `candidates` [B, N] -> votes [B, N] (-inf off candidates).
    Always PyTorch; the GPU path's kernels are `kvcompile.ops.triton_tokenselect.soft_votes_triton`."""
    masked = logits.float().masked_fill(~candidates[:, None, :], NEG_INF)
    votes = torch.softmax(masked, dim=-1).nan_to_num(0.0).sum(dim=1)
    return votes.masked_fill(~candidates, NEG_INF)


def query_similarity(fingerprint: Tensor, cached: Tensor) -> Tensor:
    """Cosine similarity per row of two [B, F] tensors; 0 against an all-zero (empty) cache."""
    dot = (fingerprint * cached).sum(dim=1)
    norms = fingerprint.norm(dim=1) * cached.norm(dim=1)
    return torch.where(norms > 0, dot / norms.clamp_min(1e-30), torch.zeros_like(dot))


def tokenselect_choice(q: Tensor, q_fingerprint: Tensor, k_cache: Tensor, slot_pos: Tensor, positions: Tensor,
                       fingerprints: Tensor, selected: Tensor, sink_tokens: int, window_tokens: int,
                       init_tokens: int, local_tokens: int, top_k: int, threshold: float) -> Tensor:
    """The definition of `tokenselect_indices` (see there); its kernels are
    `kvcompile.ops.triton_tokenselect.tokenselect_step`."""
    batch, q_heads, _, head_dim = q.shape
    kv_heads, n = k_cache.shape[1], k_cache.shape[2]
    scratch = n - 1
    num_selected = init_tokens + local_tokens - 1 + top_k
    query_pos = positions[:, -1]
    visible = visible_keys(positions[:, -1:], slot_pos, sink_tokens, window_tokens)[:, 0]
    pinned = visible & ((slot_pos < init_tokens) | (slot_pos > query_pos[:, None] - local_tokens))
    middle = visible & ~pinned
    # Below the budget every visible token is read: dense attention, and the selection cache is left alone.
    sparse = visible.sum(dim=1) > num_selected
    fingerprint = q_fingerprint[:, :, -1].float().reshape(batch, -1)
    reuse = sparse & (query_similarity(fingerprint, fingerprints.float()) >= threshold - SIMILARITY_SLACK)
    refresh = sparse & ~reuse

    group = q_heads // kv_heads
    grouped = q[:, :, -1].float().view(batch, kv_heads, group, head_dim)
    logits = torch.einsum("bkgd,bknd->bkgn", grouped, k_cache.float()).reshape(batch, q_heads, n)
    fresh = topk_slots(soft_votes(logits, middle), top_k, scratch)
    chosen = torch.where(reuse[:, None], selected, fresh)
    fingerprints.copy_(torch.where(refresh[:, None], fingerprint.to(fingerprints.dtype), fingerprints))
    selected.copy_(torch.where(refresh[:, None], fresh, selected))

    # Read set: pinned and chosen slots in a sparse row, every visible slot in a dense one.
    rank = torch.full(slot_pos.shape, NEG_INF, device=slot_pos.device).masked_fill(pinned, 1.0)
    rank = rank.scatter(1, chosen, 0.0).masked_fill(~visible, NEG_INF)
    rank = torch.where(sparse[:, None], rank, torch.where(visible, 1.0, NEG_INF))
    indices = topk_slots(rank, num_selected, scratch)
    return indices[:, None, :].expand(batch, kv_heads, num_selected).contiguous()


@torch.library.custom_op("kvcompile::tokenselect_indices", mutates_args=("fingerprints", "selected"))
def tokenselect_indices(q: Tensor, q_fingerprint: Tensor, k_cache: Tensor, slot_pos: Tensor, positions: Tensor,
                        fingerprints: Tensor, selected: Tensor, sink_tokens: int, window_tokens: int,
                        init_tokens: int, local_tokens: int, top_k: int, threshold: float) -> Tensor:
    """TokenSelect's slots for a decode query `q` [B, Hq, 1, D], before the new token is stored.

    Pinned: visible tokens at positions < `init_tokens` and the `local_tokens - 1` newest cached ones (the new
    token makes `local_tokens`). Among the rest, each query head votes with softmax(q·k) (unscaled, as the
    paper's criticality) and the `top_k` slots with the most votes are chosen, one set shared by all heads.
    Selection cache: `fingerprints` [B, Hq*D] holds the query (without rotary) of the last fresh choice and
    `selected` [B, top_k] its slots; while cos(query, fingerprint) >= `threshold` (less `SIMILARITY_SLACK`) the
    stored slots are reused. When every visible token fits in the budget all are read (dense) and the cache is
    left alone.
    Returns int64 [B, Hkv, init_tokens + local_tokens - 1 + top_k].
    """
    if _fast_path(q):
        from kvcompile.ops.triton_tokenselect import tokenselect_step
        return tokenselect_step(q, q_fingerprint, k_cache, slot_pos, positions, fingerprints, selected,
                                sink_tokens, window_tokens, init_tokens, local_tokens, top_k, threshold)
    return tokenselect_choice(q, q_fingerprint, k_cache, slot_pos, positions, fingerprints, selected, sink_tokens,
                              window_tokens, init_tokens, local_tokens, top_k, threshold)


@tokenselect_indices.register_fake
def _(q, q_fingerprint, k_cache, slot_pos, positions, fingerprints, selected, sink_tokens, window_tokens,
      init_tokens, local_tokens, top_k, threshold):
    return q.new_empty((q.shape[0], k_cache.shape[1], init_tokens + local_tokens - 1 + top_k), dtype=torch.long)


__all__ = ["attend_per_head", "cached_attention_select", "gather_slots", "query_similarity",
           "select_by_attention", "slot_positions", "soft_votes", "sparse_cached_attention", "tokenselect_choice",
           "tokenselect_indices", "topk_slots"]
