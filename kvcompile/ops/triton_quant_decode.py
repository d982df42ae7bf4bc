"""Split-K GQA decode attention over a ZipCache state (`kvcompile.ops.quantization`), dequantizing in registers.

The structure of `kvcompile.ops.triton_decode`: pass 1 runs a grid of (batch, KV head, split); each program
loads the G query heads of one KV head, streams its share of the keys in tiles with an online softmax and writes
unnormalised partials that `triton_decode`'s merge kernel combines. No dequantized copy of the cache exists
anywhere. Two pass-1 kernels:

- Dense read (`_quant_decode_dense_kernel`): attention does not depend on the order of the keys, and a dense
  decode query sees every quantized token, so the program streams the planes themselves — its share of the high
  rows, then of the low rows, then (last split) the buffer — in contiguous tiles, one plane per loop. Codes enter
  the dots as they are (scale and zero apply per row, the channel scales once per program). For 2- and 4-bit
  planes (`_split_plane_pass`) the tile of packed bytes is not unpacked into head-dim order at all: code j of
  byte i is head dim `PER * i + j` (`PER = 8 // bits`), so q and the accumulator are split by head dim modulo
  PER once per pass and each code position gets its own dot, its codes made elementwise from the loaded bytes
  (on the GPU in PTX, two codes per instruction). Up to head dim 128 each program is one warp, so the softmax
  reductions over a tile's rows stay within it; each tile's scales and zeros are loaded a tile ahead
  (`_row_params`). On an H200 (bf16, batch 8, 8 KV heads, 32 query heads, head 128, 32k slots, 4/2 bits, 221 MB
  of state) one read takes 0.152 ms against 0.228 ms for four-warp programs that loaded the scales in the tile
  (one-off sweep in CUDA graphs, `_dense_launch`); on the H100, 0.151 ms inside the step (profiled), against
  0.231 ms for the four-warp read, 0.273 ms when the bytes were split with joins into head-dim order and 1.55 ms
  for the slot-walking kernel. Reading the state once at the 3 TB/s a device copy reaches there would take
  0.074 ms. Other bit widths (and heads too narrow for a dot per code position) take `_plane_pass`, which splits
  the bytes with joins.
- Gathered read (`_quant_decode_split_kernel`, `indices` given): for each slot the program finds where it
  lives — high plane, low plane (row from the salient bit words and their ranks) or the full-precision buffer —
  loads only those packed bytes and its row's scale and zero, and dequantizes `(code * scale + zero) * channel`.

Visibility is `triton_decode`'s dense case (ZipCache keeps every token, so there are no sinks or window): slot
n is read iff `0 <= slot_pos[n] <= q_pos` and it holds a token (quantized, or within the buffer). The dense
kernel checks this for buffered slots only: it takes every quantized slot to hold a position in [0, q_pos]
(true of a ZipCache decode step, where slot = position and the query is the newest token) unless the query is
padding (q_pos < 0), which sees nothing.

The periodic quantize step (`quantization.quantize_into`, run between steps by `kvcompile.runtime.periodic`) writes
the planes with `kvcompile.ops.triton_quantize` and is replayed from a CUDA graph.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from kvcompile.ops.quantization import MixedPrecisionPlanes, ZipCacheState
from kvcompile.ops.dependent_launch import dependent_launch, nvidia_native
from kvcompile.ops.triton_decode import _LOG2E, _choose_splits, _num_sms, _split_plan, merge_splits
from kvcompile.ops.triton_support import require_triton, tl, triton

__all__ = ["quant_decode_attention_triton"]

# Programs per SM of the dense read (each over >= 2 tiles): several waves hide the last one's tail; with
# one-warp programs, twice as many splits took 0.166 instead of 0.152 ms in the sweep of `_dense_launch`.
_DENSE_PROGRAMS_PER_SM = 16


if triton is not None:
    from kvcompile.ops.dependent_launch import wait_for_producers
    from kvcompile.ops.triton_decode import _query_group, _softmax_step, _store_partials

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
        WORDS, RANK, QUANT, KB, VB, POS, QPOS, IDX, WS, SC,
        stride_qb, stride_qh, stride_qd, stride_pb, stride_pn,
        N, chunk_len, rows_high, rows_low, num_words, buffer_rows, qk_scale,
        G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        HIGH_BITS: tl.constexpr, LOW_BITS: tl.constexpr, DOT_PRECISION: tl.constexpr, STORE_SCORES: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Online softmax of the G heads of one KV head over one chunk of its `indices` (the gathered read);
        with STORE_SCORES also every scaled score (natural log domain, -inf where not visible) to SC
        [B, Hkv, G, N]."""
        wait_for_producers(PDL)
        # int64 offsets: a long cache can pass 2**31 bytes.
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        bh = b * tl.num_programs(1) + kvh

        q, heads, offs_d, g_mask, d_mask, q_mask = _query_group(Q, b, kvh, stride_qb, stride_qh, stride_qd,
                                                                G, D, BLOCK_G, BLOCK_D)
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
            slot = tl.load(IDX + bh * N + offs_n, mask=in_range, other=0).to(tl.int64)
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
            if STORE_SCORES:
                score_rows = b * tl.num_programs(1) * G + heads
                tl.store(SC + score_rows[:, None] * N + offs_n[None, :],
                         s * 0.6931471805599453,  # ln 2: log2 domain to natural
                         mask=g_mask[:, None] & in_range[None, :])

            m_i, l_i, p, alpha = _softmax_step(s, m_i, l_i)

            v = tl.where(is_high[:, None],
                         _plane_rows(VH, VHS, VHZ, bh, b, rows_high, row_high, is_high, offs_d, d_mask,
                                     HIGH_BITS, D),
                         _plane_rows(VL, VLS, VLZ, bh, b, rows_low, row_low, is_low, offs_d, d_mask,
                                     LOW_BITS, D)) * v_channel[None, :]
            v = tl.where(from_buffer[:, None], tl.load(VB + buf_offs, mask=buf_mask, other=0.0).to(tl.float32), v)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)

        _store_partials(WS, acc, m_i, l_i, b, heads, split, offs_d, q_mask, g_mask, G, D)

    @triton.jit
    def _joined_codes(DATA, row, used, q, BITS: tl.constexpr, W: tl.constexpr, OFFSET: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """`OFFSET + code` of a packed plane's rows in head-dim order, for `_plane_operand`: each byte loaded once
        and split with joins."""
        offs = tl.arange(0, BLOCK_D * BITS // 8)
        x = tl.load(DATA + row[:, None] * W + offs[None, :], mask=used[:, None] & (offs < W)[None, :], other=0)
        # Code j of a byte is bits [j * BITS, (j + 1) * BITS). A join appends an axis that becomes the lowest
        # digit of j after the reshape, so codes are joined as (even j, odd j), recursively.
        x = x.to(tl.int32)
        if BITS == 8:
            tile = x
        elif BITS == 4:
            tile = tl.join(x & 15, x >> 4)
        elif BITS == 2:
            tile = tl.join(tl.join(x & 3, (x >> 4) & 3), tl.join((x >> 2) & 3, x >> 6))
        else:
            tile = tl.join(tl.join(tl.join(x & 1, (x >> 4) & 1), tl.join((x >> 2) & 1, (x >> 6) & 1)),
                           tl.join(tl.join((x >> 1) & 1, (x >> 5) & 1), tl.join((x >> 3) & 1, x >> 7)))
        tile = tl.reshape(tile, [BLOCK_N, BLOCK_D])
        if OFFSET == 128:
            tile = (tile | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)  # 0x4300 is 128.0
        elif OFFSET == 1024:
            tile = (tile | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)  # 0x6400 is 1024.0
        else:
            tile = tile.to(tl.float32).to(q.dtype)
        return tile

    @triton.jit
    def _plane_operand(DATA, row, used, q, BITS: tl.constexpr, W: tl.constexpr, OFFSET: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows `row` (int32) of one head's plane (`DATA` at its row 0, `W` elements a row) as a dot operand of
        q's dtype [BLOCK_N, BLOCK_D] in head-dim order: `OFFSET + code`, or the stored values of a 16-bit plane;
        zeros where not `used` and past the head dim. Each packed byte is loaded once (contiguous loads) and
        split with joins; `OFFSET + code` is made by setting exponent bits where `OFFSET` is 128 (bfloat16) or
        1024 (float16), else converted."""
        # if/else, not an early return: Triton compiles the code after a return in a constexpr branch too.
        if BITS == 16:
            offs = tl.arange(0, BLOCK_D)
            tile = tl.load(DATA + row[:, None] * W + offs[None, :], mask=used[:, None] & (offs < W)[None, :],
                           other=0.0)
        else:
            tile = _joined_codes(DATA, row, used, q, BITS, W, OFFSET, BLOCK_N, BLOCK_D)
        return tile

    @triton.jit
    def _row_params(KS, KZ, VS, VZ, row, end):
        """Key and value scales and zeros (float32, zeros past `end`) of plane rows `row`. The plane passes load
        each tile's during the tile before it: Triton's pipeliner stages only loads that feed a dot, so loaded
        in their own tile they would wait out a memory round trip twice a tile."""
        used = row < end
        return (tl.load(KS + row, mask=used, other=0.0).to(tl.float32),
                tl.load(KZ + row, mask=used, other=0.0).to(tl.float32),
                tl.load(VS + row, mask=used, other=0.0).to(tl.float32),
                tl.load(VZ + row, mask=used, other=0.0).to(tl.float32))

    @triton.jit
    def _plane_pass(q, q_sum, m_i, l_i, acc, KD, KS, KZ, VD, VS, VZ, start, end, qk_scale,
                    BITS: tl.constexpr, W: tl.constexpr, OFFSET: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr):
        """Online softmax over rows [start, end) of one head's plane (pointers at its row 0, scales and zeros at
        the batch row's), without the channel scales: `q` carries the key channels and `acc` gets the value
        channels later. Codes enter the dots as `OFFSET + code` (`_plane_operand`); a row's scale and zero apply
        to its score, `q . (code * scale + zero) = scale * (q . (OFFSET + code)) + (zero - OFFSET * scale) *
        sum(q)`, and likewise to its probability weight `w = p * scale` (rounded as the dot sees it)."""
        if BITS != 16:
            k_scale, k_zero, v_scale, v_zero = _row_params(KS, KZ, VS, VZ, start + tl.arange(0, BLOCK_N), end)
        for r0 in range(start, end, BLOCK_N):
            row = r0 + tl.arange(0, BLOCK_N)
            used = row < end
            if BITS != 16:
                next_params = _row_params(KS, KZ, VS, VZ, row + BLOCK_N, end)
            k = _plane_operand(KD, row, used, q, BITS, W, OFFSET, BLOCK_N, BLOCK_D)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            if BITS != 16:
                s = s * k_scale[None, :] + q_sum[:, None] * (k_zero - OFFSET * k_scale)[None, :]
            m_i, l_i, p, alpha = _softmax_step(tl.where(used[None, :], s * qk_scale, float("-inf")), m_i, l_i)
            v = _plane_operand(VD, row, used, q, BITS, W, OFFSET, BLOCK_N, BLOCK_D)
            acc = acc * alpha[:, None]
            if BITS == 16:
                w = p.to(q.dtype)
            else:
                w = (p * v_scale[None, :]).to(q.dtype)
                acc += (tl.sum(p * v_zero[None, :], 1) - OFFSET * tl.sum(w.to(tl.float32), 1))[:, None]
                k_scale, k_zero, v_scale, v_zero = next_params
            acc += tl.dot(w, v, input_precision=DOT_PRECISION)
        return m_i, l_i, acc

    # PTX for `_codes`: a byte permute spreads two bytes of uint8 `x` over the halves of a 32-bit word, and one
    # `lop3` ((w >> shift) & mask | 0x43004300) makes two bfloat16 `128 + code`. Outputs narrower than 32 bits
    # come packed two to a register, the first in the low half; `shift` is a tensor (an asm operand).
    def _code_ptx(mask: str) -> tl.constexpr:
        return tl.constexpr(f"""
            {{
            .reg .b32 a, b, z;
            mov.b32 z, 0;
            prmt.b32 a, $2, z, 0x4140;
            prmt.b32 b, $2, z, 0x4342;
            shr.b32 a, a, $3;
            shr.b32 b, b, $3;
            lop3.b32 $0, a, {mask}, 0x43004300, 0xEA;
            lop3.b32 $1, b, {mask}, 0x43004300, 0xEA;
            }}
            """)

    _NIBBLE_PTX = _code_ptx("0x000F000F")  # 4-bit codes
    _CRUMB_PTX = _code_ptx("0x00030003")  # 2-bit codes

    @triton.jit
    def _code_at(x, shift, ASM: tl.constexpr):
        """128 + the code at bit `shift` of each byte of `x`, as bfloat16, by `_NIBBLE_PTX` or `_CRUMB_PTX`."""
        return tl.inline_asm_elementwise(asm=ASM, constraints="=r,=r,r,r,r,r,r", args=[x, shift],
                                         dtype=tl.bfloat16, is_pure=True, pack=4)

    @triton.jit
    def _codes(raw, SHIFT: tl.constexpr, BITS: tl.constexpr, OFFSET: tl.constexpr, dtype: tl.constexpr,
               PTX: tl.constexpr):
        """`OFFSET + code` of the `BITS`-bit code at bit `SHIFT` of every byte of uint8 `raw`, in `dtype`: with PTX
        (bfloat16 on a GPU) two codes per instruction, else made by setting exponent bits where `OFFSET` is 128
        (bfloat16) or 1024 (float16), or converted."""
        if PTX:
            shift = tl.full(raw.shape, SHIFT, tl.int32)
            if BITS == 4:
                codes = _code_at(raw, shift, _NIBBLE_PTX)
            else:
                codes = _code_at(raw, shift, _CRUMB_PTX)
        else:
            c = (raw.to(tl.int32) >> SHIFT) & ((1 << BITS) - 1)
            if OFFSET == 128:
                codes = (c | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
            elif OFFSET == 1024:
                codes = (c | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
            else:
                codes = c.to(tl.float32).to(dtype)
        return codes

    @triton.jit
    def _unzip(t, PER: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_W: tl.constexpr):
        """Columns j, j + PER, j + 2 PER, ... of `t` [BLOCK_G, PER * BLOCK_W] for j = 0..3 (PER = 2: the last two
        are the first two again)."""
        if PER == 2:
            t0, t1 = tl.split(tl.reshape(t, [BLOCK_G, BLOCK_W, 2]))
            return t0, t1, t0, t1
        else:
            a, b = tl.split(tl.reshape(t, [BLOCK_G, BLOCK_W, 2, 2]))
            t0, t2 = tl.split(a)
            t1, t3 = tl.split(b)
            return t0, t1, t2, t3

    @triton.jit
    def _zip(t0, t1, t2, t3, PER: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
        """The inverse of `_unzip`: column `PER * i + j` of the result is column i of `tj`."""
        if PER == 2:
            return tl.reshape(tl.join(t0, t1), [BLOCK_G, BLOCK_D])
        else:
            return tl.reshape(tl.join(tl.join(t0, t2), tl.join(t1, t3)), [BLOCK_G, BLOCK_D])

    @triton.jit
    def _split_plane_pass(q, q_sum, m_i, l_i, acc, KD, KS, KZ, VD, VS, VZ, start, end, qk_scale,
                          BITS: tl.constexpr, W: tl.constexpr, OFFSET: tl.constexpr, BLOCK_N: tl.constexpr,
                          BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          PTX: tl.constexpr):
        """`_plane_pass` for 2- and 4-bit planes, one dot per code position of a byte (see the module docstring):
        q and acc are split by head dim modulo PER once per pass; no tile is joined or reshaped."""
        PER: tl.constexpr = 8 // BITS
        BLOCK_W: tl.constexpr = BLOCK_D // PER
        q0, q1, q2, q3 = _unzip(q, PER, BLOCK_G, BLOCK_W)
        a0, a1, a2, a3 = _unzip(acc, PER, BLOCK_G, BLOCK_W)
        offs_w = tl.arange(0, BLOCK_W)
        w_mask = offs_w < W
        k_scale, k_zero, v_scale, v_zero = _row_params(KS, KZ, VS, VZ, start + tl.arange(0, BLOCK_N), end)
        for r0 in range(start, end, BLOCK_N):
            row = r0 + tl.arange(0, BLOCK_N)
            used = row < end
            next_params = _row_params(KS, KZ, VS, VZ, row + BLOCK_N, end)
            mask = used[:, None] & w_mask[None, :]
            x = tl.load(KD + row[:, None] * W + offs_w[None, :], mask=mask, other=0)
            s = tl.dot(q0, tl.trans(_codes(x, 0, BITS, OFFSET, q.dtype, PTX)), input_precision=DOT_PRECISION)
            s = tl.dot(q1, tl.trans(_codes(x, BITS, BITS, OFFSET, q.dtype, PTX)), s, input_precision=DOT_PRECISION)
            if PER == 4:
                s = tl.dot(q2, tl.trans(_codes(x, 4, BITS, OFFSET, q.dtype, PTX)), s, input_precision=DOT_PRECISION)
                s = tl.dot(q3, tl.trans(_codes(x, 6, BITS, OFFSET, q.dtype, PTX)), s, input_precision=DOT_PRECISION)
            s = s * k_scale[None, :] + q_sum[:, None] * (k_zero - OFFSET * k_scale)[None, :]
            m_i, l_i, p, alpha = _softmax_step(tl.where(used[None, :], s * qk_scale, float("-inf")), m_i, l_i)
            w = (p * v_scale[None, :]).to(q.dtype)
            shift = (tl.sum(p * v_zero[None, :], 1) - OFFSET * tl.sum(w.to(tl.float32), 1))[:, None]
            k_scale, k_zero, v_scale, v_zero = next_params
            y = tl.load(VD + row[:, None] * W + offs_w[None, :], mask=mask, other=0)
            a0 = tl.dot(w, _codes(y, 0, BITS, OFFSET, q.dtype, PTX), a0 * alpha[:, None] + shift,
                        input_precision=DOT_PRECISION)
            a1 = tl.dot(w, _codes(y, BITS, BITS, OFFSET, q.dtype, PTX), a1 * alpha[:, None] + shift,
                        input_precision=DOT_PRECISION)
            if PER == 4:
                a2 = tl.dot(w, _codes(y, 4, BITS, OFFSET, q.dtype, PTX), a2 * alpha[:, None] + shift,
                            input_precision=DOT_PRECISION)
                a3 = tl.dot(w, _codes(y, 6, BITS, OFFSET, q.dtype, PTX), a3 * alpha[:, None] + shift,
                            input_precision=DOT_PRECISION)
        return m_i, l_i, _zip(a0, a1, a2, a3, PER, BLOCK_G, BLOCK_D)

    @triton.jit
    def _read_plane(q, q_sum, m_i, l_i, acc, KD, KS, KZ, VD, VS, VZ, bh, b, rows, n_rows, split, num_splits,
                    qk_scale, BITS: tl.constexpr, W: tl.constexpr, OFFSET: tl.constexpr, SPLIT: tl.constexpr,
                    PTX: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                    DOT_PRECISION: tl.constexpr):
        """This split's share of one plane's `n_rows` rows — a run of whole tiles; trailing splits may get none —
        through `_split_plane_pass` (SPLIT) or `_plane_pass`. `KD`, `KS`, `KZ` (`VD`, `VS`, `VZ`) are the plane's
        key (value) codes, `rows` rows per (batch row, KV head), and its scales and zeros, `rows` per batch row."""
        share = tl.cdiv(tl.cdiv(n_rows, num_splits), BLOCK_N) * BLOCK_N
        start = split * share
        end = tl.minimum(start + share, n_rows)
        KD = KD + bh * rows * W
        VD = VD + bh * rows * W
        KS = KS + b * rows
        KZ = KZ + b * rows
        VS = VS + b * rows
        VZ = VZ + b * rows
        if SPLIT:
            m_i, l_i, acc = _split_plane_pass(q, q_sum, m_i, l_i, acc, KD, KS, KZ, VD, VS, VZ, start, end, qk_scale,
                                              BITS, W, OFFSET, BLOCK_N, BLOCK_G, BLOCK_D, DOT_PRECISION, PTX)
        else:
            m_i, l_i, acc = _plane_pass(q, q_sum, m_i, l_i, acc, KD, KS, KZ, VD, VS, VZ, start, end, qk_scale,
                                        BITS, W, OFFSET, BLOCK_N, BLOCK_D, DOT_PRECISION)
        return m_i, l_i, acc

    @triton.jit
    def _quant_decode_dense_kernel(
        Q, KH, KHS, KHZ, KL, KLS, KLZ, KC, VH, VHS, VHZ, VL, VLS, VLZ, VC,
        WORDS, RANK, QUANT, KB, VB, POS, QPOS, WS,
        stride_qb, stride_qh, stride_qd, stride_pb, stride_pn,
        N, rows_high, rows_low, num_words, buffer_rows, qk_scale,
        G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        HIGH_BITS: tl.constexpr, LOW_BITS: tl.constexpr, HIGH_W: tl.constexpr, LOW_W: tl.constexpr,
        HIGH_OFFSET: tl.constexpr, LOW_OFFSET: tl.constexpr, HIGH_PTX: tl.constexpr, LOW_PTX: tl.constexpr,
        HIGH_SPLIT: tl.constexpr, LOW_SPLIT: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
    ):
        """Online softmax of the G heads of one KV head over its split's share of the high rows, of the low rows
        and (last split) of the buffer rows, streamed in row order: attention does not depend on the order of
        the keys, and every quantized token is visible to a dense decode query."""
        wait_for_producers(PDL)
        # int64 only for the (batch, head) bases; offsets within one head's plane or buffer are int32 (rows times
        # row width, below 2**31 up to 16M slots at head dim 128).
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        num_splits = tl.num_programs(2)
        bh = b * tl.num_programs(1) + kvh

        q, heads, offs_d, g_mask, d_mask, q_mask = _query_group(Q, b, kvh, stride_qb, stride_qh, stride_qd,
                                                                G, D, BLOCK_G, BLOCK_D)
        qp = tl.load(QPOS + b)
        quantized = tl.load(QUANT + b).to(tl.int32)
        # Salient (high) rows: the last word's rank plus its bits. Its sign bit would be slot 32 * num_words - 1,
        # past the slots or the scratch slot, never quantized. A padded query (q_pos < 0) sees no row.
        last = bh * num_words + num_words - 1
        word = tl.load(WORDS + last).to(tl.int64)
        n_high = tl.load(RANK + last) + _popcount31(word & 0x7FFFFFFF).to(tl.int32)
        n_high = tl.where(qp >= 0, n_high, 0)
        n_low = tl.where(qp >= 0, quantized - n_high, 0)

        # Key channels fold into q once; value channels scale the plane part of acc once, before the buffer.
        k_channel = tl.load(KC + bh * D + offs_d, mask=d_mask, other=0.0)
        v_channel = tl.load(VC + bh * D + offs_d, mask=d_mask, other=0.0)
        q_planes = (q.to(tl.float32) * k_channel[None, :]).to(q.dtype)
        q_sum = tl.sum(q_planes.to(tl.float32), 1)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        m_i, l_i, acc = _read_plane(q_planes, q_sum, m_i, l_i, acc, KH, KHS, KHZ, VH, VHS, VHZ, bh, b, rows_high,
                                    n_high, split, num_splits, qk_scale, HIGH_BITS, HIGH_W, HIGH_OFFSET, HIGH_SPLIT,
                                    HIGH_PTX, BLOCK_N, BLOCK_G, BLOCK_D, DOT_PRECISION)
        m_i, l_i, acc = _read_plane(q_planes, q_sum, m_i, l_i, acc, KL, KLS, KLZ, VL, VLS, VLZ, bh, b, rows_low,
                                    n_low, split, num_splits, qk_scale, LOW_BITS, LOW_W, LOW_OFFSET, LOW_SPLIT,
                                    LOW_PTX, BLOCK_N, BLOCK_G, BLOCK_D, DOT_PRECISION)
        acc = acc * v_channel[None, :]

        # Buffer row i holds slot quantized + i: read where that slot exists and is visible.
        buffer_end = tl.where(split == num_splits - 1, tl.minimum(buffer_rows, N - quantized), 0)
        pos_row0 = POS + b * stride_pb + quantized.to(tl.int64) * stride_pn
        kb = KB + bh * buffer_rows * D
        vb = VB + bh * buffer_rows * D
        for r0 in range(0, buffer_end, BLOCK_N):
            row = r0 + tl.arange(0, BLOCK_N)
            pos = tl.load(pos_row0 + row * stride_pn, mask=row < buffer_end, other=-1)
            vis = (row < buffer_end) & (pos >= 0) & (pos <= qp)
            kv_mask = vis[:, None] & d_mask[None, :]
            k = tl.load(kb + row[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            m_i, l_i, p, alpha = _softmax_step(tl.where(vis[None, :], s * qk_scale, float("-inf")), m_i, l_i)
            v = tl.load(vb + row[:, None] * D + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v, input_precision=DOT_PRECISION)

        _store_partials(WS, acc, m_i, l_i, b, heads, split, offs_d, q_mask, g_mask, G, D)


def _block_slots(block_d: int) -> int:
    """Slots per block. On the H100 (batch 8, 8 KV heads, head 128, 32k slots) 128 slots ran 2.5x faster than
    32 or 64 (1.7 vs 4.3 ms), whatever the split count (4 to 256): the loop is bound by its per-slot
    instructions, not by memory, and larger tiles amortise them."""
    return max(16, min(128, 16384 // block_d))


def _dense_launch(block_d: int) -> tuple[int, int]:
    """(plane rows per tile, warps) of the dense kernel: one warp over 32 rows up to head dim 128, four warps over
    64 rows (fewer for wider heads) beyond, whose accumulator would not fit one warp's registers. In a sweep on an
    H200 (bf16, batch 8, 8 KV heads, 32 query heads, head 128, 32k slots, 4/2 bits; CUDA graphs), one warp over
    32 rows and 2 stages took 0.152 ms against 0.228 ms for four warps over 64 rows: with four warps the softmax
    reductions over a tile's rows cross warps through shared memory and barriers several times a tile. 16 rows
    took 0.165-0.197 ms, 64 rows 0.211 ms, 3 stages 0.172 ms, two warps 0.213 ms; at batch 1, 0.031 against
    0.041 ms."""
    if block_d <= 128:
        return 32, 1
    return max(16, 8192 // block_d), 4


def _code_offset(dtype: torch.dtype, bits: int) -> int:
    """The `OFFSET` of `_plane_operand` for dots in `dtype` on `bits`-bit codes: 128 for bfloat16 (spacing 1 on
    [128, 256), so codes up to 7 bits), 1024 for float16 (spacing 1 on [1024, 2048)); else 0 (convert)."""
    if dtype == torch.bfloat16 and bits < 8:
        return 128
    if dtype == torch.float16 and bits <= 8:
        return 1024
    return 0


def _split_by_code(block_d: int, bits: int) -> bool:
    """Whether the dense read takes a `bits`-bit plane with `_split_plane_pass`: 2 or 4 bits, and each code
    position's dot at least 16 wide (its K, `block_d * bits // 8`)."""
    return bits in (2, 4) and block_d * bits // 8 >= 16


def _ptx_unpack(q: torch.Tensor, bits: int) -> bool:
    """Whether `_split_plane_pass` makes its codes in PTX (`_code_at`): bfloat16 on an NVIDIA GPU
    (not ROCm), not under the Triton interpreter. On the H100 (as in the module docstring) 0.231 instead of
    0.243 ms at 4/2 bits, with outputs equal to the bit."""
    return nvidia_native(q) and q.dtype == torch.bfloat16 and bits in (2, 4)


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


def _results(out: Tensor, lse: Optional[Tensor], scores: Optional[Tensor]):
    """`out`, then the log-sum-exp and the scores where they were asked for."""
    extra = tuple(t for t in (lse, scores) if t is not None)
    return (out, *extra) if extra else out


def quant_decode_attention_triton(q: Tensor, state: ZipCacheState, slot_pos: Tensor, q_pos: Tensor, scale: float,
                                  *, indices: Optional[Tensor] = None, num_splits: Optional[int] = None,
                                  return_lse: bool = False, return_scores: bool = False):
    """Attention of one query token per row `q` [B, Hq, D] over a ZipCache `state`, in place.

    The definition is `decode_attention_reference(q, None, *dequantize_state(state, N), slot_pos, q_pos, 0, 0,
    scale)` with `N = slot_pos.shape[1]`; with `indices` [B, Hkv, K] (slot numbers per KV head; the scratch
    slot reads nothing) only those slots are attended. The dense read (no `indices`) takes every quantized slot
    of a row with `q_pos >= 0` to hold a position in [0, q_pos], as in a ZipCache decode step (see the module
    docstring). With `return_lse` also returns the natural log-sum-exp
    of the scaled scores [B, Hq] float32 (-inf where nothing is visible), from which the periodic step gets the
    probabilities of the buffered tokens without a second pass. With `return_scores` (gathered reads only) also
    returns every scaled score [B, Hkv, G, K] float32 (-inf where not visible), for selection. `num_splits`
    overrides the split count.
    """
    require_triton("quant_decode_attention_triton")
    _check_state(q, state, slot_pos, q_pos, indices)
    q_pos = q_pos.contiguous()  # read at offset b: a column of a [B, S] positions tensor is strided
    B, Hq, D = q.shape
    Hkv = state.keys.channel.shape[1]
    G = Hq // Hkv
    N = slot_pos.shape[1] if indices is None else indices.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if return_scores and indices is None:
        raise ValueError("return_scores needs the gathered read: pass indices (every slot for a full read)")
    scores = torch.empty(B, Hkv, G, N, device=q.device, dtype=torch.float32) if return_scores else None
    if out.numel() == 0:
        lse = q.new_full((B, Hq), -math.inf, dtype=torch.float32) if return_lse else None
        return _results(out, lse, scores)

    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_G = max(16, triton.next_power_of_2(G))  # tl.dot needs M >= 16
    common = dict(G=G, D=D, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, HIGH_BITS=state.keys.high.bits,
                  LOW_BITS=state.keys.low.bits,
                  # fp32 callers get fp32 products, not tf32; other dtypes keep Triton's default.
                  DOT_PRECISION="ieee" if q.dtype == torch.float32 else None)
    rows = (state.keys.high.scale.shape[1], state.keys.low.scale.shape[1], state.salient_words.shape[2],
            state.key_buffer.shape[2])
    pdl = dependent_launch(q)
    if indices is None:
        BLOCK_N, num_warps = _dense_launch(BLOCK_D)
        # Each program finds its share of the rows itself (the counts stay on the device).
        splits = num_splits or _choose_splits(N, B * Hkv, BLOCK_N, _num_sms(q.device), _DENSE_PROGRAMS_PER_SM)
        ws = torch.empty(B * Hq * splits * (D + 2), device=q.device, dtype=torch.float32)
        _quant_decode_dense_kernel[(B, Hkv, splits)](
            q, *_planes_args(state.keys), *_planes_args(state.values),
            state.salient_words, state.salient_rank, state.quantized, state.key_buffer, state.value_buffer,
            slot_pos, q_pos, ws, *q.stride(), *slot_pos.stride(), N, *rows, scale * _LOG2E,
            BLOCK_N=BLOCK_N, HIGH_W=state.keys.high.data.shape[3], LOW_W=state.keys.low.data.shape[3],
            HIGH_OFFSET=_code_offset(q.dtype, state.keys.high.bits),
            LOW_OFFSET=_code_offset(q.dtype, state.keys.low.bits),
            HIGH_PTX=_ptx_unpack(q, state.keys.high.bits), LOW_PTX=_ptx_unpack(q, state.keys.low.bits),
            HIGH_SPLIT=_split_by_code(BLOCK_D, state.keys.high.bits),
            LOW_SPLIT=_split_by_code(BLOCK_D, state.keys.low.bits), PDL=pdl, **common,
            num_warps=num_warps, num_stages=2, launch_pdl=pdl,
        )
    else:
        BLOCK_N = _block_slots(BLOCK_D)
        splits, chunk_len = _split_plan(N, B * Hkv, BLOCK_N, q.device, num_splits)
        ws = torch.empty(B * Hq * splits * (D + 2), device=q.device, dtype=torch.float32)
        _quant_decode_split_kernel[(B, Hkv, splits)](
            q, *_planes_args(state.keys), *_planes_args(state.values),
            state.salient_words, state.salient_rank, state.quantized, state.key_buffer, state.value_buffer,
            slot_pos, q_pos, indices, ws, scores if return_scores else ws, *q.stride(), *slot_pos.stride(), N,
            chunk_len, *rows, scale * _LOG2E, BLOCK_N=BLOCK_N, STORE_SCORES=return_scores, PDL=pdl, **common,
            num_warps=4, num_stages=2, launch_pdl=pdl,
        )
    lse = torch.empty(B, Hq, device=q.device, dtype=torch.float32) if return_lse else None
    merge_splits(ws, out, splits, lse)
    return _results(out, lse, scores)
