"""Split-K GQA decode attention over a ZipCache state (`kvcompile.ops.quantization`), dequantizing in registers.

The structure of `kvcompile.ops.triton_decode`: pass 1 runs a grid of (batch, KV head, split); each program
loads the G query heads of one KV head and streams its share of the slots (every slot, or that head's own
`indices` for a gathered top-k read) in blocks with an online softmax, writing unnormalised partials that
`triton_decode`'s merge kernel combines. For each slot the program finds where it lives — high plane, low plane
(row from the salient bit words and their ranks) or the full-precision buffer — loads only those packed bytes
and its row's scale and zero, and dequantizes `(code * scale + zero) * channel` in registers: no dequantized
copy of the cache exists anywhere.

Visibility is `triton_decode`'s dense case (ZipCache keeps every token, so there are no sinks or window): slot
n is read iff `0 <= slot_pos[n] <= q_pos` and it holds a token (quantized, or within the buffer).

The periodic quantize step stays in PyTorch (`quantization.quantize_into`): it runs once every
`streaming_gap` (100) steps on that many tokens, a few fused elementwise and sort ops, so a kernel would save
microseconds per hundred steps.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from kvcompile.ops.quantization import MixedPrecisionPlanes, ZipCacheState
from kvcompile.ops.triton_decode import _LOG2E, _choose_splits, _num_sms, triton_available

try:
    import triton
    import triton.language as tl
except ImportError:  # the module stays importable; calling the kernel raises instead
    triton = None

__all__ = ["quant_decode_attention_triton", "triton_available"]


if triton is not None:
    from kvcompile.ops.triton_decode import _decode_merge_kernel

    @triton.jit
    def _popcount31(x):
        """Set bits of non-negative int64 values below 2**31 (SWAR: pairs, nibbles, bytes, then a byte sum)."""
        x = x - ((x >> 1) & 0x55555555)
        x = (x & 0x33333333) + ((x >> 2) & 0x33333333)
        x = (x + (x >> 4)) & 0x0F0F0F0F
        return ((x * 0x01010101) >> 24) & 0xFF

    @triton.jit
    def _plane_rows(DATA, SCALE, ZERO, bh, b, rows, row, used, offs_d, d_mask,
                    BITS: tl.constexpr, D: tl.constexpr):
        """Rows `row` of one plane as float32 [BLOCK_N, BLOCK_D] (zeros where not `used`), before the channel
        scale: `code * scale + zero`, or the stored value for a 16-bit plane."""
        mask = used[:, None] & d_mask[None, :]
        if BITS == 16:
            val = tl.load(DATA + (bh * rows + row)[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
            val = val.to(tl.float32)
        else:
            per_byte: tl.constexpr = 8 // BITS
            byte = tl.load(DATA + (bh * rows + row)[:, None] * (D // per_byte) + (offs_d // per_byte)[None, :],
                           mask=mask, other=0)
            code = (byte.to(tl.int32) >> ((offs_d % per_byte) * BITS)[None, :]) & ((1 << BITS) - 1)
            scale = tl.load(SCALE + b * rows + row, mask=used, other=0.0).to(tl.float32)
            zero = tl.load(ZERO + b * rows + row, mask=used, other=0.0).to(tl.float32)
            val = code.to(tl.float32) * scale[:, None] + zero[:, None]
        return val

    @triton.jit
    def _quant_decode_split_kernel(
        Q, KH, KHS, KHZ, KL, KLS, KLZ, KC, VH, VHS, VHZ, VL, VLS, VLZ, VC,
        WORDS, RANK, QUANT, KB, VB, POS, QPOS, IDX, WS,
        stride_qb, stride_qh, stride_qd, stride_pb, stride_pn,
        N, chunk_len, rows_high, rows_low, num_words, buffer_rows, qk_scale,
        G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        HIGH_BITS: tl.constexpr, LOW_BITS: tl.constexpr, GATHER: tl.constexpr, DOT_PRECISION: tl.constexpr,
    ):
        """Online softmax of the G heads of one KV head over one chunk of slots (or of its indices)."""
        # int64 offsets: a long cache can pass 2**31 bytes.
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        bh = b * tl.num_programs(1) + kvh

        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        heads = kvh * G + offs_g
        g_mask = offs_g < G
        d_mask = offs_d < D
        q_mask = g_mask[:, None] & d_mask[None, :]
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=q_mask, other=0.0)
        qp = tl.load(QPOS + b)
        quantized = tl.load(QUANT + b)
        k_channel = tl.load(KC + bh * D + offs_d, mask=d_mask, other=0.0)
        v_channel = tl.load(VC + bh * D + offs_d, mask=d_mask, other=0.0)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)

        start = split * chunk_len
        end = tl.minimum(start + chunk_len, N)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            in_range = offs_n < end
            if GATHER:
                slot = tl.load(IDX + bh * N + offs_n, mask=in_range, other=0).to(tl.int64)
            else:
                slot = offs_n.to(tl.int64)
            pos = tl.load(POS + b * stride_pb + slot * stride_pn, mask=in_range, other=-1)
            is_quantized = slot < quantized
            buffer_row = slot - quantized
            in_buffer = (buffer_row >= 0) & (buffer_row < buffer_rows)
            vis = in_range & (pos >= 0) & (pos <= qp) & (is_quantized | in_buffer)

            # Where a quantized slot lives: its bit, and the salient slots before it.
            read_bits = vis & is_quantized
            word_index = slot // 32
            word = tl.load(WORDS + bh * num_words + word_index, mask=read_bits, other=0).to(tl.int64)
            rank = tl.load(RANK + bh * num_words + word_index, mask=read_bits, other=0).to(tl.int64)
            bit = slot % 32
            salient = ((word >> bit) & 1) == 1
            is_high = read_bits & salient
            is_low = read_bits & (~salient)
            # Bits below `bit` (at most 31 of them), so the sign bit of the word never counts.
            row_high = rank + _popcount31(word & ((tl.full([BLOCK_N], 1, tl.int64) << bit) - 1))
            row_low = slot - row_high
            from_buffer = vis & in_buffer
            buf_mask = from_buffer[:, None] & d_mask[None, :]
            buf_offs = (bh * buffer_rows + buffer_row)[:, None] * D + offs_d[None, :]

            k = tl.where(is_high[:, None],
                         _plane_rows(KH, KHS, KHZ, bh, b, rows_high, row_high, is_high, offs_d, d_mask,
                                     HIGH_BITS, D),
                         _plane_rows(KL, KLS, KLZ, bh, b, rows_low, row_low, is_low, offs_d, d_mask,
                                     LOW_BITS, D)) * k_channel[None, :]
            k = tl.where(from_buffer[:, None], tl.load(KB + buf_offs, mask=buf_mask, other=0.0).to(tl.float32), k)
            s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION)
            s = tl.where(vis[None, :], s * qk_scale, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            # While nothing is visible the max is -inf; shifting by 0 keeps exp2 at 0 instead of NaN.
            m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_shift)
            p = tl.exp2(s - m_shift[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)

            v = tl.where(is_high[:, None],
                         _plane_rows(VH, VHS, VHZ, bh, b, rows_high, row_high, is_high, offs_d, d_mask,
                                     HIGH_BITS, D),
                         _plane_rows(VL, VLS, VLZ, bh, b, rows_low, row_low, is_low, offs_d, d_mask,
                                     LOW_BITS, D)) * v_channel[None, :]
            v = tl.where(from_buffer[:, None], tl.load(VB + buf_offs, mask=buf_mask, other=0.0).to(tl.float32), v)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
            m_i = m_new

        # Workspace as `triton_decode`: acc [R, D], then max [R], then sum [R], rows ordered (b, head, split).
        num_splits = tl.num_programs(2)
        n_rows = tl.num_programs(0) * tl.num_programs(1) * G * num_splits
        ws_row = (b * (tl.num_programs(1) * G) + heads) * num_splits + split
        tl.store(WS + ws_row[:, None] * D + offs_d[None, :], acc, mask=q_mask)
        tl.store(WS + n_rows * D + ws_row, m_i, mask=g_mask)
        tl.store(WS + n_rows * (D + 1) + ws_row, l_i, mask=g_mask)


def _block_slots(block_d: int) -> int:
    """Slots per block: the dequantized K and V tiles live in registers, so about 4K values each.
    Not tuned on a GPU yet."""
    return max(16, min(64, 4096 // block_d))


def _planes_args(planes: MixedPrecisionPlanes) -> tuple:
    return (planes.high.data, planes.high.scale, planes.high.zero, planes.low.data, planes.low.scale,
            planes.low.zero, planes.channel)


def _check_state(q: Tensor, state: ZipCacheState, slot_pos: Tensor, q_pos: Tensor,
                 indices: Optional[Tensor]) -> None:
    B, Hq, D = q.shape
    Bk, Hkv, Dk = state.keys.channel.shape
    if Bk != B or Dk != D or Hq % Hkv:
        raise ValueError(f"q {tuple(q.shape)} does not fit a state of {Bk} rows, {Hkv} KV heads, head dim {Dk}")
    if (state.keys.high.bits, state.keys.low.bits) != (state.values.high.bits, state.values.low.bits):
        raise ValueError("keys and values must share their bit widths")
    if state.key_buffer.dtype != q.dtype or state.value_buffer.dtype != q.dtype:
        raise TypeError("the full-precision buffers must have q's dtype")
    if slot_pos.dim() != 2 or slot_pos.shape[0] != B or tuple(q_pos.shape) != (B,):
        raise ValueError("slot_pos must be [B, N] and q_pos [B]")
    if indices is not None and (indices.shape[:2] != (B, Hkv) or not indices.is_contiguous()):
        raise ValueError("indices must be a contiguous [B, Hkv, K] tensor")
    state_tensors = [*_planes_args(state.keys), *_planes_args(state.values), state.salient_words,
                     state.salient_rank, state.key_buffer, state.value_buffer]
    if not all(t.is_contiguous() for t in state_tensors):
        raise ValueError("ZipCache state tensors must be contiguous (the kernel reads them in place)")


def _log_sum_exp(ws: Tensor, B: int, Hq: int, D: int, splits: int) -> Tensor:
    """Natural log-sum-exp of the scaled scores of each (row, query head) from the split partials [B, Hq]."""
    rows = B * Hq * splits
    m = ws[rows * D: rows * (D + 1)].view(B, Hq, splits)
    l = ws[rows * (D + 1):].view(B, Hq, splits)
    m_max = m.amax(-1, keepdim=True)
    shift = torch.where(m_max == -math.inf, 0.0, m_max)
    return (shift[..., 0] + torch.log2((l * torch.exp2(m - shift)).sum(-1))) * math.log(2.0)


def quant_decode_attention_triton(q: Tensor, state: ZipCacheState, slot_pos: Tensor, q_pos: Tensor, scale: float,
                                  *, indices: Optional[Tensor] = None, num_splits: Optional[int] = None,
                                  return_lse: bool = False):
    """Attention of one query token per row `q` [B, Hq, D] over a ZipCache `state`, in place.

    The definition is `decode_attention_reference(q, None, *dequantize_state(state, N), slot_pos, q_pos, 0, 0,
    scale)` with `N = slot_pos.shape[1]`; with `indices` [B, Hkv, K] (slot numbers per KV head; the scratch
    slot reads nothing) only those slots are attended. With `return_lse` also returns the natural log-sum-exp
    of the scaled scores [B, Hq] float32 (-inf where nothing is visible), from which the periodic step gets the
    probabilities of the buffered tokens without a second pass. `num_splits` overrides the split count.
    """
    if triton is None:
        raise ImportError("quant_decode_attention_triton needs Triton: pip install triton")
    _check_state(q, state, slot_pos, q_pos, indices)
    B, Hq, D = q.shape
    Hkv = state.keys.channel.shape[1]
    G = Hq // Hkv
    N = slot_pos.shape[1] if indices is None else indices.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return (out, q.new_full((B, Hq), -math.inf, dtype=torch.float32)) if return_lse else out

    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_G = max(16, triton.next_power_of_2(G))  # tl.dot needs M >= 16
    BLOCK_N = _block_slots(BLOCK_D)
    splits = num_splits or _choose_splits(N, B * Hkv, BLOCK_N, _num_sms(q.device))
    chunk_len = BLOCK_N * max(1, triton.cdiv(triton.cdiv(N, splits), BLOCK_N))
    splits = max(1, triton.cdiv(N, chunk_len))
    ws = torch.empty(B * Hq * splits * (D + 2), device=q.device, dtype=torch.float32)

    _quant_decode_split_kernel[(B, Hkv, splits)](
        q, *_planes_args(state.keys), *_planes_args(state.values),
        state.salient_words, state.salient_rank, state.quantized, state.key_buffer, state.value_buffer,
        slot_pos, q_pos, indices if indices is not None else slot_pos, ws,
        *q.stride(), *slot_pos.stride(),
        N, chunk_len, state.keys.high.scale.shape[1], state.keys.low.scale.shape[1],
        state.salient_words.shape[2], state.key_buffer.shape[2], scale * _LOG2E,
        G=G, D=D, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
        HIGH_BITS=state.keys.high.bits, LOW_BITS=state.keys.low.bits, GATHER=indices is not None,
        # fp32 callers get fp32 products, not tf32; other dtypes keep Triton's default.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None,
        num_warps=4, num_stages=2,
    )
    _decode_merge_kernel[(B * Hq,)](
        ws, out, splits, D=D, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=BLOCK_D, num_warps=4,
    )
    return (out, _log_sum_exp(ws, B, Hq, D, splits)) if return_lse else out
