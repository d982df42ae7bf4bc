"""One decode step of `kvcompile::cached_attention` on the GPU: store the new token, then split-K attention.

With one new token per row, writing it first and then attending over the cache alone is exact for every layout:
a dense cache's slot `p` was empty, and the ring slot that position `p` overwrites held position
`p - window_tokens` (or an older one), which the query at `p` no longer sees. Both steps are Triton kernels
(one launch for the write, two for the attention), with no host synchronisation, so the step can be captured in
a CUDA graph.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor

from kvcompile.ops.dependent_launch import dependent_launch
from kvcompile.ops.triton_decode import decode_attention_triton
from kvcompile.ops.triton_support import require_triton, tl, triton

__all__ = ["decode_step", "write_token"]

if triton is not None:
    from kvcompile.ops.dependent_launch import wait_for_producers

    @triton.jit
    def _write_token_kernel(
        K, V, KC, VC, POS, SLOT_POS, ROW_BASE,
        stride_kb, stride_kh, stride_kd,
        stride_vb, stride_vh, stride_vd,
        stride_cb, stride_ch, stride_cn, stride_cd,
        stride_wb, stride_wh, stride_wn, stride_wd,
        stride_pb, stride_sb, stride_sn,
        scratch, sink_tokens, window_tokens, rows,
        D: tl.constexpr, BLOCK_D: tl.constexpr, WINDOWED: tl.constexpr, HAS_ROW_BASE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Store the new key/value of one (row, kv head) in its slot (or, with HAS_ROW_BASE, in buffer row
        `position - ROW_BASE[b]`, clamped to [0, rows), padding storing none); kv head 0 also stores the
        position."""
        wait_for_producers(PDL)
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        p = tl.load(POS + b * stride_pb).to(tl.int64)
        slot = p
        if WINDOWED:
            ring = sink_tokens + (p - sink_tokens) % window_tokens
            slot = tl.where(p < sink_tokens, p, ring)
        # Padding (p < 0) goes to the scratch slot; so does a position past a dense cache's end, which the
        # reference would reject, rather than a write out of bounds.
        slot = tl.where((p >= 0) & (slot < scratch), slot, scratch)

        offs = tl.arange(0, BLOCK_D)
        mask = offs < D
        if HAS_ROW_BASE:
            row = tl.minimum(tl.maximum(p - tl.load(ROW_BASE + b).to(tl.int64), 0), rows - 1)
            mask = mask & (offs * 0 + p >= 0)  # a block-shaped condition (the interpreter rejects a scalar one)
        else:
            row = slot
        k = tl.load(K + b * stride_kb + h * stride_kh + offs * stride_kd, mask=mask)
        v = tl.load(V + b * stride_vb + h * stride_vh + offs * stride_vd, mask=mask)
        tl.store(KC + b * stride_cb + h * stride_ch + row * stride_cn + offs * stride_cd,
                 k.to(KC.dtype.element_ty), mask=mask)
        tl.store(VC + b * stride_wb + h * stride_wh + row * stride_wn + offs * stride_wd,
                 v.to(VC.dtype.element_ty), mask=mask)
        if h == 0:
            kept = tl.where(slot == scratch, -1, p)
            tl.store(SLOT_POS + b * stride_sb + slot * stride_sn, kept.to(SLOT_POS.dtype.element_ty))
            tl.store(SLOT_POS + b * stride_sb + scratch * stride_sn, tl.full([], -1, SLOT_POS.dtype.element_ty))


def write_token(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, slot_pos: Tensor, positions: Tensor,
                sink_tokens: int, window_tokens: int, row_base: Optional[Tensor] = None) -> None:
    """Store one new token per row (`k`, `v` [B, Hkv, 1, D], `positions` [B]) in place, like
    `cached_attention.write_cache`, in one Triton launch. With `row_base` [B] the caches are buffers (ZipCache's
    full-precision rows, `window_tokens` 0): position p goes to row `p - row_base`, clamped to the buffer, and
    padding rows store no key or value; `slot_pos` is written as for a dense cache."""
    require_triton("write_token")
    batch, kv_heads, _, head_dim = k.shape
    k3, v3 = k[:, :, 0], v[:, :, 0]
    pdl = dependent_launch(k3)
    _write_token_kernel[(batch, kv_heads)](
        k3, v3, k_cache, v_cache, positions, slot_pos, positions if row_base is None else row_base,
        *k3.stride(), *v3.stride(), *k_cache.stride(), *v_cache.stride(),
        positions.stride(0), *slot_pos.stride(),
        slot_pos.shape[1] - 1, sink_tokens, max(window_tokens, 1), k_cache.shape[2],
        D=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), WINDOWED=window_tokens > 0,
        HAS_ROW_BASE=row_base is not None, PDL=pdl, num_warps=1, launch_pdl=pdl,
    )


def decode_step(q: Tensor, q_sink: Optional[Tensor], k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor,
                slot_pos: Tensor, positions: Tensor, sink_tokens: int, window_tokens: int,
                scale: float) -> Tensor:
    """`cached_attention` for one new token per row: the same result and cache update, via Triton kernels.

    `q` [B, Hq, 1, D] over caches of B rows; returns [B, Hq, 1, D], contiguous, in q's dtype. `cached_attention`
    takes it where `kernel_switch.kernels_for(q)` allows the kernels.
    """
    batch, q_heads, seq, head_dim = q.shape
    if seq != 1:
        raise ValueError(f"decode_step takes one new token per row, got {seq}")
    if not k_cache.shape[0] == v_cache.shape[0] == slot_pos.shape[0] == batch:
        raise ValueError(f"decode_step needs caches of the query's {batch} rows, got {k_cache.shape[0]}, "
                         f"{v_cache.shape[0]} and {slot_pos.shape[0]}")
    q_pos = positions.reshape(batch).contiguous()
    write_token(k, v, k_cache, v_cache, slot_pos, q_pos, sink_tokens, window_tokens)

    dtype = k_cache.dtype
    query = q[:, :, 0].to(dtype)
    query_sink = None if q_sink is None else q_sink[:, :, 0].to(dtype)
    out = decode_attention_triton(query, query_sink, k_cache, v_cache, slot_pos, q_pos, sink_tokens, window_tokens,
                                  scale)
    return out.to(q.dtype).view(batch, q_heads, 1, head_dim)
