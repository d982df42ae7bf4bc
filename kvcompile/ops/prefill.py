"""A fast path of `kvcompile::cached_attention` for chunks of several new tokens (prefill) over a dense cache.

For a dense cache, writing the whole chunk first and then attending over the cache alone is exact: slot = position,
so new tokens land in empty slots, and causality (`slot position <= query position`) hides the chunk's later
tokens from its earlier ones. The attention is FlexAttention with a block mask built on the device from the slot
positions (with plain tensor ops), so blocks of empty or future slots are skipped (a chunk costs what its causal share of the attention
costs) and grouped-query heads read K/V without copies.

A ring cache (streaming) is not exact under write-first (a chunk may overwrite slots its own earlier queries still
see); such calls return None and the caller keeps the reference path.

Not yet called by `cached_attention`: checked on CPU only. On the H100 (torch 2.11), called from inside an
Inductor-compiled step, FlexAttention's block-mask helpers failed under the compiled graph's dispatch wrapper
(`create_block_mask`: vmap over a data-dependent lookup; `BlockMask.from_kv_blocks`: "Cannot access storage of
BatchedTensorImpl" in its q-block transpose, which `compute_q_blocks=False` now skips). Wire it in once a GPU run of
`benchmarks/decode.py --prefill 32768` passes (see docs/benchmarks.md).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
from torch import Tensor

from kvcompile.ops.cached_attention import write_cache

__all__ = ["prefill_step"]


@functools.lru_cache(maxsize=None)
def _flex(compiled: bool):
    """FlexAttention, compiled once per process on CUDA (uncompiled it materialises the full score matrix)."""
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False) if compiled else flex_attention


_BLOCK = 128  # FlexAttention's default tile, in queries and in keys


def _block_mask(visible: Tensor, mask_mod, seq: int, slots: int):
    """A BlockMask from a dense [B, seq, slots] visibility mask, built with plain tensor ops.

    (create_block_mask evaluates the mask through vmap, which fails on data-dependent lookups on torch 2.11.)
    Blocks wholly visible are "full" (no mask evaluated in the kernel); partly visible ones call `mask_mod`.
    """
    batch = visible.shape[0]
    q_blocks, kv_blocks = -(-seq // _BLOCK), -(-slots // _BLOCK)
    padded = torch.nn.functional.pad(visible, (0, kv_blocks * _BLOCK - slots, 0, q_blocks * _BLOCK - seq))
    blocks = padded.view(batch, q_blocks, _BLOCK, kv_blocks, _BLOCK)
    any_visible = blocks.any(dim=4).any(dim=2)
    full = blocks.all(dim=4).all(dim=2)
    partial = any_visible & ~full

    def ordered(dense: Tensor) -> tuple[Tensor, Tensor]:
        dense = dense[:, None].to(torch.int32)  # [B, 1 (heads), q blocks, kv blocks]
        indices = torch.argsort(dense, dim=-1, descending=True, stable=True).to(torch.int32)
        return dense.sum(-1, dtype=torch.int32), indices

    from torch.nn.attention.flex_attention import BlockMask
    # No q-block indices: they serve the backward pass only, and computing them uses vmap.
    return BlockMask.from_kv_blocks(*ordered(partial), *ordered(full), BLOCK_SIZE=_BLOCK, mask_mod=mask_mod,
                                    seq_lengths=(seq, slots), compute_q_blocks=False)


def prefill_step(q: Tensor, q_sink: Optional[Tensor], k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                 slot_pos: Tensor, positions: Tensor, sink_tokens: int, window_tokens: int,
                 scale: float) -> Optional[Tensor]:
    """`cached_attention` for a chunk over a dense cache, or None (nothing done) for layouts it does not serve.

    Returns [B, Hq, S, D] contiguous in q's dtype and updates the cache in place, like the reference.
    """
    if window_tokens or q_sink is not None:
        return None
    batch, q_heads, seq, head_dim = q.shape
    k_cache, v_cache, slot_pos = k_cache[:batch], v_cache[:batch], slot_pos[:batch]
    write_cache(k_cache, v_cache, slot_pos, k, v, positions, sink_tokens, window_tokens)
    slots = k_cache.shape[2]
    query_pos = positions.to(slot_pos.dtype)
    visible = (slot_pos[:, None, :] >= 0) & (slot_pos[:, None, :] <= query_pos[:, :, None])  # [B, S, N]
    key_positions = slot_pos.reshape(-1).contiguous()
    query_positions = query_pos.reshape(-1).contiguous()

    def mask_mod(b, h, q_idx, kv_idx):  # evaluated in the kernel for partly visible blocks only
        key_pos = key_positions[b * slots + kv_idx.clamp(max=slots - 1)]
        query = query_positions[b * seq + q_idx.clamp(max=seq - 1)]
        return (kv_idx < slots) & (key_pos >= 0) & (key_pos <= query)

    block_mask = _block_mask(visible, mask_mod, seq, slots)
    out = _flex(q.is_cuda)(q.to(k_cache.dtype), k_cache, v_cache, block_mask=block_mask, scale=scale,
                           enable_gqa=q_heads != k_cache.shape[1])
    # Queries that see no key at all (padding) come out as zeros, as in the reference.
    return out.to(q.dtype).contiguous()
