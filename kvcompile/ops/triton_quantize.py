"""ZipCache's block quantization (the planes part of `quantization.quantize_into`) in three Triton launches.

The PyTorch definition takes hundreds of small kernels per layer (an argsort per plane, the min/max, rounding,
packing, scatters), which made the periodic step of an 8B-shaped model launch-bound. Here, after the channel
scales are set (in PyTorch):

- `_rank_tokens_kernel`, grid (B, Hkv): ranks the block's tokens with a running count instead of a sort. The
  r-th salient (regular) token of a head, in slot order, goes to `source[b, h, 0, r]` (`source[b, h, 1, r]`),
  [B, Hkv, 2, T] int32; head 0 also writes the block's rows per plane (`block_rows` [2, B], counted on head 0
  as `quantization._take_rows` does).
- `_store_rows_kernel`, grid (T, B), once per plane: program (r, b) gathers block row r (the r-th taken token of
  every KV head, divided by the channel scales), takes its min/max, rounds the float16 zero point down and the
  scale up, rounds the codes half to even, packs `8 // bits` codes a byte (the first in the low bits) and stores
  keys and values at plane row `used[b] + r`.

Codes, scales and zeros equal the PyTorch path's bit for bit: the divisions round to nearest and the scale's
quotient is taken in float64, as there. Block rows past a row's count are not written; the PyTorch path writes
them, as zeros, to the spare last row, which holds zeros from the start and which no reader reads. Nothing syncs
with the host and the shapes are static, so the step can be captured in a CUDA graph. 16-bit planes are not
handled here (`quantize_into` keeps its PyTorch path for them).
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompile.ops.triton_support import require_triton, tl, triton

__all__ = ["quantize_block_triton"]

_RANK_TOKENS = 128  # tokens per tile of `_rank_tokens_kernel`


if triton is not None:

    @triton.jit
    def _rank_tokens_kernel(SALIENT, COUNT, SOURCE, BLOCK_ROWS, stride_sb, stride_sh, stride_st, T,
                            BLOCK_T: tl.constexpr):
        """The token of every block row of one (row, KV head), and the block's rows; see the module docstring."""
        b = tl.program_id(0).to(tl.int64)
        h = tl.program_id(1).to(tl.int64)
        bh = b * tl.num_programs(1) + h
        count = tl.minimum(tl.load(COUNT + b), T).to(tl.int32)
        salient_before = tl.zeros([], tl.int32)  # salient tokens in earlier tiles
        for t0 in range(0, count, BLOCK_T):
            t = t0 + tl.arange(0, BLOCK_T)
            valid = t < count
            salient = tl.load(SALIENT + b * stride_sb + h * stride_sh + t * stride_st, mask=valid,
                              other=0).to(tl.int32)
            high_row = salient_before + tl.cumsum(salient, 0) - salient
            # A regular token's row counts the regular tokens before it: t minus the salient ones.
            entry = tl.where(salient == 1, high_row, T + t - high_row)
            tl.store(SOURCE + bh * 2 * T + entry, t, mask=valid)
            salient_before += tl.sum(salient, 0)
        first_head = h == 0  # the rows of a block are counted on head 0, as in `quantization._take_rows`
        tl.store(BLOCK_ROWS + b, salient_before, mask=first_head)
        tl.store(BLOCK_ROWS + tl.num_programs(0) + b, count - salient_before, mask=first_head)

    @triton.jit
    def _fp16_toward(x, DOWN: tl.constexpr):
        """The float16 nearest to float32 or float64 `x` on one side: <= x if DOWN, else >= x. A conversion
        rounded to nearest (also through float32) lands on one of the two float16 neighbours of `x` and keeps
        its sign, so a wrong side is one step off: one code up in magnitude when going down from a negative
        value (-0 included) or up from a positive one, one code down otherwise."""
        h = x.to(tl.float32).to(tl.float16)
        bits = h.to(tl.int16, bitcast=True)
        if DOWN:
            wrong = h.to(x.dtype) > x
            away_from_zero = bits < 0
        else:
            wrong = h.to(x.dtype) < x
            away_from_zero = bits >= 0
        moved = (bits + tl.where(away_from_zero, 1, -1)).to(tl.int16).to(tl.float16, bitcast=True)
        return tl.where(wrong, moved, h)

    @triton.jit
    def _round_half_even(v):
        """`torch.round` of non-negative float32 `v`: `v - floor(v)` is exact, so the ties are seen exactly."""
        whole = tl.floor(v)
        fraction = v - whole
        up = (fraction > 0.5) | ((fraction == 0.5) & ((whole.to(tl.int32) & 1) == 1))
        return whole + up.to(tl.float32)

    @triton.jit
    def _quantize_row(X, CHANNEL, DATA, SCALE, ZERO, x_offs, channel_offs, mask, data_offs, data_mask, param_offs,
                      BITS: tl.constexpr):
        """Quantize one row as `quantization.quantize_rows` and store it: its values at `x_offs` (channel scales
        at `channel_offs`) [BLOCK_H, BLOCK_D // per, per], value d of a head at [head, d // per, d % per] for
        `per = 8 // BITS`; its packed bytes go to `data_offs` [BLOCK_H, BLOCK_D // per], its float16 scale and
        zero point to `param_offs`."""
        x = tl.load(X + x_offs, mask=mask, other=0.0).to(tl.float32)
        x = tl.math.div_rn(x, tl.load(CHANNEL + channel_offs, mask=mask, other=1.0))
        zero = _fp16_toward(tl.min(tl.where(mask, x, float("inf"))), True)
        high = tl.max(tl.where(mask, x, float("-inf")))
        levels: tl.constexpr = (1 << BITS) - 1
        scale = _fp16_toward((high.to(tl.float64) - zero.to(tl.float64)) / levels, False)
        step = scale.to(tl.float32)
        codes = tl.math.div_rn(x - zero.to(tl.float32), tl.where(step > 0, step, 1.0))
        codes = _round_half_even(tl.where(step > 0, codes, 0.0))
        codes = tl.minimum(tl.maximum(codes, 0.0), levels).to(tl.int32)
        shifts = tl.arange(0, 8 // BITS) * BITS
        tl.store(DATA + data_offs, tl.sum(codes << shifts[None, None, :], 2).to(tl.uint8), mask=data_mask)
        tl.store(SCALE + param_offs, scale)
        tl.store(ZERO + param_offs, zero)

    @triton.jit
    def _store_rows_kernel(KEYS, VALUES, KEY_CHANNEL, VALUE_CHANNEL, KEY_DATA, KEY_SCALE, KEY_ZERO,
                           VALUE_DATA, VALUE_SCALE, VALUE_ZERO, SOURCE, BLOCK_ROWS, QUANTIZED, HIGH_USED,
                           T, plane_rows,
                           H: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, HIGH: tl.constexpr,
                           BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr):
        """Block row r of batch row b (program (r, b)) of one plane, keys and values, at plane row `used + r`
        (`used`: the plane's rows already taken). `SOURCE` and `BLOCK_ROWS` point at the plane's part."""
        r = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)
        used = tl.load(HIGH_USED + b)
        if not HIGH:
            used = tl.load(QUANTIZED + b) - used
        row = used + r
        # Rows past the plane (more tokens than `select_salient` allows) are dropped rather than written astray.
        if (r < tl.load(BLOCK_ROWS + b)) & (row < plane_rows):
            heads = tl.arange(0, BLOCK_H)
            bh = b * H + heads
            head_mask = heads < H
            token = tl.load(SOURCE + bh * 2 * T + r, mask=head_mask, other=0)
            # In bounds even if the heads' counts differed (a broken `select_salient` contract): `SOURCE` is
            # uninitialised past each head's count.
            token = tl.minimum(tl.maximum(token, 0), T - 1)
            PER: tl.constexpr = 8 // BITS
            W: tl.constexpr = D // PER
            offs_w = tl.arange(0, BLOCK_D // PER)
            d = offs_w[:, None] * PER + tl.arange(0, PER)[None, :]
            mask = head_mask[:, None, None] & (d < D)[None, :, :]
            x_offs = ((bh * T + token) * D)[:, None, None] + d[None, :, :]
            channel_offs = (bh * D)[:, None, None] + d[None, :, :]
            data_offs = ((bh * plane_rows + row) * W)[:, None] + offs_w[None, :]
            data_mask = head_mask[:, None] & (offs_w < W)[None, :]
            param_offs = b * plane_rows + row
            _quantize_row(KEYS, KEY_CHANNEL, KEY_DATA, KEY_SCALE, KEY_ZERO, x_offs, channel_offs, mask,
                          data_offs, data_mask, param_offs, BITS)
            _quantize_row(VALUES, VALUE_CHANNEL, VALUE_DATA, VALUE_SCALE, VALUE_ZERO, x_offs, channel_offs, mask,
                          data_offs, data_mask, param_offs, BITS)


def quantize_block_triton(state, keys: Tensor, values: Tensor, salient: Tensor, count: Tensor,
                          high_used: Tensor) -> None:
    """The planes part of `quantization.quantize_into` for a `ZipCacheState` with packed (1 to 8-bit) planes and
    its channel scales set: the block's salient tokens go to the high planes from row `high_used` [B] on, the
    regular ones to the low planes from row `quantized - high_used` on. `keys`, `values` [B, Hkv, T, D];
    `salient` [B, Hkv or 1, T] bool, the same count in every head; tokens past `count` [B] are not part of the
    block. The salient bits and `quantized` are left to the caller."""
    from kvcompile.ops.quantization import PACKED_BITS  # (that module imports this one)
    require_triton("quantize_block_triton")
    planes = [(state.keys.high, state.values.high), (state.keys.low, state.values.low)]
    for key_rows, value_rows in planes:
        if key_rows.bits != value_rows.bits or key_rows.bits not in PACKED_BITS:
            raise ValueError(f"the fused kernel stores packed planes with the same widths for keys and values, "
                             f"got {key_rows.bits} and {value_rows.bits} bits")
    state_tensors = [t for pair in planes for rows in pair for t in (rows.data, rows.scale, rows.zero)]
    if not all(t.is_contiguous() for t in state_tensors + [state.keys.channel, state.values.channel]):
        raise ValueError("ZipCache state tensors must be contiguous (the kernel writes them in place)")
    batch, heads, seq, dim = keys.shape
    keys, values = keys.contiguous(), values.contiguous()
    salient = salient.expand(batch, heads, seq)
    source = torch.empty(batch, heads, 2, seq, dtype=torch.int32, device=keys.device)
    block_rows = torch.empty(2, batch, dtype=torch.int32, device=keys.device)
    _rank_tokens_kernel[(batch, heads)](salient, count, source, block_rows, *salient.stride(), seq,
                                        BLOCK_T=_RANK_TOKENS)
    for plane, (key_rows, value_rows) in enumerate(planes):
        _store_rows_kernel[(seq, batch)](
            keys, values, state.keys.channel, state.values.channel, key_rows.data, key_rows.scale, key_rows.zero,
            value_rows.data, value_rows.scale, value_rows.zero, source[:, :, plane], block_rows[plane],
            state.quantized, high_used, seq, key_rows.scale.shape[1], H=heads, D=dim, BITS=key_rows.bits,
            HIGH=plane == 0, BLOCK_H=triton.next_power_of_2(heads), BLOCK_D=triton.next_power_of_2(dim))
