"""ZipCache (arXiv:2405.14256) quantized KV storage: the plain-PyTorch definition.

Quantization (keys and values alike): channel-separable token-wise quantization. Each channel is first divided
by `c = sqrt(max_t |x_t|)` over the tokens of the first quantized block (the prompt); then every *row* is one
asymmetric min/max group of `Hkv * head_dim` values — one token of every KV head, as the official
`true_tokenwise_quantize` groups all heads of a token. With per-head saliency a row holds the r-th salient
(or regular) token of each head; every head of a batch row has the same number of each, so rows stay full.

Storage of one layer (`ZipCacheState`), genuinely packed:

- two row planes per tensor: `high` (salient tokens, `high_bits`) and `low` (the rest, `low_bits`), codes
  packed along the head dim (`pack_bits`), with one float16 scale and zero point per row;
- which slots are salient: one bit per (slot, KV head) in int32 words, plus a running count per word, so the
  plane row of any slot is `rank[word] + popcount(earlier bits of the word)` (high) or `slot - that` (low).
  The decode kernel reads any slot, dense or gathered, in O(1) without a per-slot row table;
- slots `[0, quantized)` are in the planes; the next `streaming_gap` slots sit in a full-precision buffer.

Bytes per token and KV head at the paper's setting (4/2 bits, 60% salient, D=64, Hkv=3), keys + values:
codes 2*64*(0.6*4 + 0.4*2) = 409.6 bits, scales/zeros 2*2*16/Hkv = 21.3, salient bit + rank 2, against
2*64*16 = 2048 for bf16: 4.78x before the 100-token buffer; 4.66x measured at 32k tokens, 4.60x at 16k,
4.47x at 8k (the buffer is a fixed 76.8 KB per layer). Per-head groups of 64 with fp16 scale and zero would
add 0.5 bit per value and cap the ratio at 4.3x, which is why a row spans the heads.

Defaults come from the official code (ThisisBillhe/ZipCache): `zipcache_generation_demo.py` (4/2 bits,
`unimportant_ratio` 0.4, `streaming_gap` 100) and `models/modeling_llama.py` (probe queries: the most recent 5%
of the prompt plus 5% drawn at random from the rest).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields, is_dataclass
from typing import Optional

import torch
from torch import Tensor

from kvcompile.cache import resolve_dims
from kvcompile.ops import kernel_switch
from kvcompile.ops.triton_quantize import quantize_block_triton

HIGH_BITS = 4
LOW_BITS = 2
SALIENCY_RATIO = 0.6
PROBE_RATIO = 0.1
STREAMING_GAP = 100
UNQUANTIZED = 16  # a plane of this width keeps its values in the cache dtype
SCALE_DTYPE = torch.float16
PACKED_BITS = (1, 2, 4, 8)  # code widths that fill whole bytes
_WORD_BITS = 32


# --- bit packing ---------------------------------------------------------------------------------------------
def _check_bits(bits: int, allowed=PACKED_BITS) -> None:
    if bits not in allowed:
        raise ValueError(f"bit width must be one of {allowed}, got {bits}")


def pack_bits(values: Tensor, bits: int) -> Tensor:
    """Codes (uint8 in [0, 2**bits)) packed along the last dim: 8 // bits per byte, the first in the low bits."""
    _check_bits(bits)
    per = 8 // bits
    if values.shape[-1] % per:
        raise ValueError(f"last dim {values.shape[-1]} is not a multiple of {per} ({bits}-bit codes per byte)")
    shifts = torch.arange(per, device=values.device, dtype=torch.int32) * bits
    return (values.to(torch.int32).unflatten(-1, (-1, per)) << shifts).sum(-1).to(torch.uint8)


def unpack_bits(packed: Tensor, bits: int) -> Tensor:
    """Inverse of `pack_bits`: uint8 codes, `8 // bits` times as many along the last dim."""
    _check_bits(bits)
    shifts = torch.arange(8 // bits, device=packed.device, dtype=torch.int32) * bits
    return ((packed.to(torch.int32)[..., None] >> shifts) & (2 ** bits - 1)).flatten(-2).to(torch.uint8)


# --- token-wise quantization of rows -------------------------------------------------------------------------
@dataclass
class QuantizedRows:
    """Rows of one precision. `data` [B, Hkv, R, D * bits // 8] uint8 codes (at 16 bits: [B, Hkv, R, D] values
    in the cache dtype); `scale`, `zero` [B, R] float16, one per row for all heads (unused at 16 bits)."""

    data: Tensor
    scale: Tensor
    zero: Tensor
    bits: int


def _fp16_toward(x: Tensor, direction: float) -> Tensor:
    """The float16 nearest to float64 `x` on one side: <= x for direction -inf, >= x for +inf."""
    h = x.to(SCALE_DTYPE)
    wrong = h.double() > x if direction < 0 else h.double() < x
    return torch.where(wrong, torch.nextafter(h, torch.full_like(h, direction)), h)


def quantize_rows(rows: Tensor, row_valid: Tensor, bits: int, dtype: torch.dtype) -> QuantizedRows:
    """Asymmetric min/max quantization of `rows` [B, Hkv, R, D], one group per row across all heads.

    `row_valid` [B, R] marks real rows (others are ignored and get zero scale). The zero point is the row
    minimum rounded down to float16 and the scale `(max - zero) / (2**bits - 1)` rounded up, so every value
    lies in the representable range and `|x - (code * scale + zero)| <= scale / 2` holds with the stored
    float16 parameters. At 16 bits the rows are kept as they are, in `dtype`.
    """
    batch, heads, count, _ = rows.shape
    if bits == UNQUANTIZED:
        unused = torch.zeros(batch, count, dtype=SCALE_DTYPE, device=rows.device)
        return QuantizedRows(rows.to(dtype), unused, unused.clone(), bits)
    _check_bits(bits)
    x = rows.float()
    valid = row_valid[:, None, :, None]
    low = torch.where(valid, x, math.inf).amin(dim=(1, 3)).masked_fill(~row_valid, 0.0)
    high = torch.where(valid, x, -math.inf).amax(dim=(1, 3)).masked_fill(~row_valid, 0.0)
    levels = 2 ** bits - 1
    zero = _fp16_toward(low.double(), -math.inf)
    scale = _fp16_toward((high.double() - zero.double()) / levels, math.inf)
    step = scale.float()[:, None, :, None]
    codes = torch.where(step > 0, (x - zero.float()[:, None, :, None]) / step, 0.0)
    codes = codes.round().clamp(0, levels).to(torch.uint8)
    return QuantizedRows(pack_bits(codes, bits), scale, zero, bits)


def dequantize_rows(rows: QuantizedRows, dtype: torch.dtype = torch.float32) -> Tensor:
    """`code * scale + zero` (computed in float32) as [B, Hkv, R, D] in `dtype`; 16-bit rows as stored."""
    if rows.bits == UNQUANTIZED:
        return rows.data.to(dtype)
    codes = unpack_bits(rows.data, rows.bits).float()
    return (codes * rows.scale.float()[:, None, :, None] + rows.zero.float()[:, None, :, None]).to(dtype)


def channel_scales(x: Tensor, valid: Tensor, high_bits: int, low_bits: int) -> Tensor:
    """ZipCache's channel normalisation of `x` [B, Hkv, T, D]: `sqrt(max |x|)` over the `valid` [B, T] tokens,
    float32 [B, Hkv, D]. 1 for an all-zero channel, and everywhere when nothing is quantized (16/16 bits), so
    that storage is then exact."""
    if min(high_bits, low_bits) == UNQUANTIZED:
        return torch.ones(x.shape[0], x.shape[1], x.shape[3], device=x.device)
    magnitude = torch.where(valid[:, None, :, None], x.float().abs(), 0.0).amax(dim=2).sqrt()
    return torch.where(magnitude > 0, magnitude, 1.0)


def _take_rows(x: Tensor, take: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The tokens of `x` [B, H, T, D] marked in `take` [B, H, T], in slot order, as rows padded to T:
    (rows [B, H, T, D], order [B, H, T] (token of each row), count [B] (real rows, from head 0))."""
    order = torch.argsort((~take).to(torch.int8), dim=-1, stable=True)
    rows = x.gather(2, order[..., None].expand(-1, -1, -1, x.shape[-1]))
    return rows, order, take[:, 0].sum(-1)


def _row_mask(count: Tensor, rows: int) -> Tensor:
    return torch.arange(rows, device=count.device) < count[:, None]


def fake_quantize(x: Tensor, salient: Tensor, channel: Tensor, high_bits: int, low_bits: int,
                  valid: Optional[Tensor] = None) -> Tensor:
    """What one block of tokens reads back after mixed-precision quantization: `x` [B, Hkv, T, D], `salient`
    [B, Hkv or 1, T] (the same count in every head), `channel` [B, Hkv, D]; tokens outside `valid` [B, T]
    come back as zeros. Same rows and groups as `quantize_into` stores."""
    batch, heads, seq, dim = x.shape
    valid = torch.ones(batch, seq, dtype=torch.bool, device=x.device) if valid is None else valid
    salient = salient.expand(batch, heads, seq) & valid[:, None]
    c = channel[:, :, None, :]
    out = torch.zeros_like(x)
    for take, bits in ((salient, high_bits), (~salient & valid[:, None], low_bits)):
        # float32 like `quantize_into`; unquantized rows keep x's dtype so that 16/16 bits are exact.
        normalized = x / c.to(x.dtype) if bits == UNQUANTIZED else x.float() / c
        rows, order, count = _take_rows(normalized, take)
        row_valid = _row_mask(count, seq)
        restored = dequantize_rows(quantize_rows(rows, row_valid, bits, x.dtype), x.dtype)
        index = order[..., None].expand(-1, -1, -1, dim)
        out.scatter_(2, index, torch.where(row_valid[:, None, :, None], restored, out.gather(2, index)))
    return out * c.to(x.dtype)


# --- the per-layer state -------------------------------------------------------------------------------------
@dataclass
class MixedPrecisionPlanes:
    """Keys or values of one layer: salient rows at high precision, the rest at low, and the channel scales
    [B, Hkv, D] float32 (0 until the first quantized block sets them). Each plane has one spare last row that
    absorbs the padding rows of a block."""

    high: QuantizedRows
    low: QuantizedRows
    channel: Tensor


@dataclass
class ZipCacheState:
    """One layer's ZipCache. `salient_words`, `salient_rank` [B, Hkv, W] int32: bit `n % 32` of word `n // 32`
    marks slot n salient, and the rank counts salient slots before the word. `quantized` [B] int64: slots
    [0, quantized) are in the planes. `key_buffer`, `value_buffer` [B, Hkv, streaming_gap, D] (cache dtype)
    hold slot `quantized + i` in row i. All zeros is the empty cache."""

    keys: MixedPrecisionPlanes
    values: MixedPrecisionPlanes
    salient_words: Tensor
    salient_rank: Tensor
    quantized: Tensor
    key_buffer: Tensor
    value_buffer: Tensor


def regular_count(tokens, saliency_ratio: float):
    """Tokens of a block of `tokens` kept at low precision: floor((1 - ratio) * tokens), as the official
    `int(unimportant_ratio * n)`. Works on ints and integer tensors."""
    if isinstance(tokens, Tensor):
        return torch.floor((1 - saliency_ratio) * tokens.double() + 1e-9).to(tokens.dtype)
    return math.floor((1 - saliency_ratio) * tokens + 1e-9)


@dataclass(frozen=True)
class PlaneRows:
    """Rows of one plane in a cache of `slots` slots (the last one scratch): `floor((1 - ratio) * tokens)` in
    the low plane and the other tokens in the high plane, plus the spare row each. Blocks chosen by
    `select_salient` with `salient_allowance` or `free_high_rows` never overflow either."""

    high: bool
    saliency_ratio: float

    def __call__(self, slots: int) -> int:
        tokens = slots - 1
        low = regular_count(tokens, self.saliency_ratio)
        return (tokens - low if self.high else low) + 1


@dataclass(frozen=True)
class WordCount:
    """32-bit words holding one bit per slot of a cache of `slots` slots."""

    def __call__(self, slots: int) -> int:
        return -(-slots // _WORD_BITS)


_PLANE_PARTS = ("high", "high_scale", "high_zero", "low", "low_scale", "low_zero", "channel")
# Names of the tensors of a `ZipCacheState`, in the order of `state_layout` and `state_of`.
STATE_FIELDS = (tuple(f"{kv}_{part}" for kv in ("k", "v") for part in _PLANE_PARTS)
                + ("salient_words", "salient_rank", "quantized", "key_buffer", "value_buffer"))


def state_layout(kv_heads: int, head_dim: int, *, high_bits: int = HIGH_BITS, low_bits: int = LOW_BITS,
                 saliency_ratio: float = SALIENCY_RATIO, streaming_gap: int = STREAMING_GAP,
                 dtype: torch.dtype = torch.bfloat16) -> list[tuple[str, tuple, torch.dtype]]:
    """`(name, dims, dtype)` of each tensor of one layer's state, in `STATE_FIELDS` order. `dims` is the shape
    after the batch dim; an entry is an int or a rule (`PlaneRows`, `WordCount`) that sizes it for a cache of
    n slots. Raises `ValueError` for bit widths that cannot be stored."""
    def plane(name: str, bits: int, high: bool) -> list:
        _check_bits(bits, PACKED_BITS + (UNQUANTIZED,))
        if bits != UNQUANTIZED and head_dim % (8 // bits):
            raise ValueError(f"head_dim {head_dim} cannot be packed at {bits} bits")
        width, stored = (head_dim, dtype) if bits == UNQUANTIZED else (head_dim * bits // 8, torch.uint8)
        rows = PlaneRows(high, saliency_ratio)
        return [(name, (kv_heads, rows, width), stored), (f"{name}_scale", (rows,), SCALE_DTYPE),
                (f"{name}_zero", (rows,), SCALE_DTYPE)]

    layout = []
    for kv in ("k", "v"):
        layout += (plane(f"{kv}_high", high_bits, True) + plane(f"{kv}_low", low_bits, False)
                   + [(f"{kv}_channel", (kv_heads, head_dim), torch.float32)])
    words, buffer = (kv_heads, WordCount()), (kv_heads, streaming_gap, head_dim)
    return layout + [("salient_words", words, torch.int32), ("salient_rank", words, torch.int32),
                     ("quantized", (), torch.int64), ("key_buffer", buffer, dtype), ("value_buffer", buffer, dtype)]


def state_of(tensors, high_bits: int, low_bits: int) -> ZipCacheState:
    """The state made of `tensors` (in `STATE_FIELDS` order; shared, not copied)."""
    def planes(t) -> MixedPrecisionPlanes:
        return MixedPrecisionPlanes(QuantizedRows(t[0], t[1], t[2], high_bits),
                                    QuantizedRows(t[3], t[4], t[5], low_bits), t[6])

    return ZipCacheState(planes(tensors[0:7]), planes(tensors[7:14]), *tensors[14:])


def empty_state(batch: int, kv_heads: int, head_dim: int, capacity: int, *, high_bits: int = HIGH_BITS,
                low_bits: int = LOW_BITS, saliency_ratio: float = SALIENCY_RATIO,
                streaming_gap: int = STREAMING_GAP, dtype: torch.dtype = torch.bfloat16,
                device=None) -> ZipCacheState:
    """An empty state for `capacity` positions (slots `[0, capacity]`, the last one scratch)."""
    layout = state_layout(kv_heads, head_dim, high_bits=high_bits, low_bits=low_bits,
                          saliency_ratio=saliency_ratio, streaming_gap=streaming_gap, dtype=dtype)
    tensors = [torch.zeros(batch, *resolve_dims(dims, capacity + 1), dtype=stored, device=device)
               for _, dims, stored in layout]
    return state_of(tensors, high_bits, low_bits)


def _unpack_words(words: Tensor) -> Tensor:
    shifts = torch.arange(_WORD_BITS, device=words.device, dtype=torch.int64)
    return ((words.to(torch.int64)[..., None] >> shifts) & 1).bool().flatten(-2)


def _salient_slots(state: ZipCacheState) -> Tensor:
    """Salient slots per batch row [B] (the same in every head): the last word's rank plus its bits."""
    return state.salient_rank[:, 0, -1].long() + _unpack_words(state.salient_words[:, 0, -1:]).sum(-1)


def free_high_rows(state: ZipCacheState) -> Tensor:
    """High-precision rows still free per batch row [B] (the `high_free` of `select_salient`)."""
    return state.keys.high.scale.shape[1] - 1 - _salient_slots(state)


def salient_allowance(state: ZipCacheState, count: Tensor, saliency_ratio: float) -> Tensor:
    """High-precision rows [B] a block of `count` [B] tokens may take (the `high_free` of `select_salient`):
    what keeps all but `regular_count` of *every token so far* salient. Within one token of the block's own
    `count - regular_count(count)` (equal when `(1 - ratio) * count` is whole, as for blocks of 100 at 60%), and
    never more than the planes (`PlaneRows`) hold, however the tokens arrive in blocks."""
    total = state.quantized + count
    return total - regular_count(total, saliency_ratio) - _salient_slots(state)


def _fused_quantize(keys: Tensor, state: ZipCacheState) -> bool:
    """Whether `quantize_into` stores the planes with the Triton kernels of `triton_quantize`: for CUDA tensors
    with packed planes (16-bit planes stay here), unless `kernel_switch.reference_paths()` is active."""
    return kernel_switch.kernels_for(keys) and UNQUANTIZED not in (state.keys.high.bits, state.keys.low.bits)


def quantize_into(state: ZipCacheState, keys: Tensor, values: Tensor, salient: Tensor, count: Tensor) -> None:
    """Append one block to the planes, in place (ZipCache's prefill and periodic step).

    Tokens t < count[b] of `keys`/`values` [B, Hkv, T, D] take slots `quantized[b] + t`; `salient`
    [B, Hkv or 1, T] picks their precision and must give every head of a row the same number of salient tokens
    within `free_high_rows` (as `select_salient` does). Channel scales are set by a row's first non-empty block.
    Shapes stay static, nothing syncs with the host, and the work is O(T + slots / 32): a block of zero tokens
    is a cheap no-op. On CUDA the planes are written by `triton_quantize`'s kernels (same bits, fewer launches).
    """
    batch, heads, seq, _ = keys.shape
    valid = _row_mask(count, seq)
    salient = salient.expand(batch, heads, seq) & valid[:, None]
    high_used = _salient_slots(state)
    for planes, x in ((state.keys, keys), (state.values, values)):
        unset = (planes.channel == 0).all(-1, keepdim=True) & (count > 0)[:, None, None]
        fresh = channel_scales(x, valid, planes.high.bits, planes.low.bits)
        planes.channel.copy_(torch.where(unset, fresh, planes.channel))
    if _fused_quantize(keys, state):
        quantize_block_triton(state, keys, values, salient, count, high_used)
    else:
        regular = ~salient & valid[:, None]
        for planes, x in ((state.keys, keys), (state.values, values)):
            normalized = x.float() / planes.channel[:, :, None, :]
            for take, plane, used in ((salient, planes.high, high_used),
                                      (regular, planes.low, state.quantized - high_used)):
                rows, _, n = _take_rows(normalized, take)
                row_valid = _row_mask(n, seq)
                block = quantize_rows(rows, row_valid, plane.bits, plane.data.dtype)
                spare = plane.scale.shape[1] - 1
                target = torch.where(row_valid, used[:, None] + torch.arange(seq, device=keys.device), spare)
                plane.data.scatter_(2, target[:, None, :, None].expand_as(block.data), block.data)
                plane.scale.scatter_(1, target, block.scale)
                plane.zero.scatter_(1, target, block.zero)
    # The new slots' bits are clear, so adding each salient bit's value sets it (distinct bits never carry);
    # ranks grow by the new salient slots of the earlier words.
    words = state.salient_words.shape[-1]
    slot = state.quantized[:, None] + torch.arange(seq, device=keys.device)
    word = (slot // _WORD_BITS).clamp(max=words - 1)[:, None].expand(batch, heads, seq)
    bit = torch.where(salient, torch.ones_like(word) << (slot % _WORD_BITS)[:, None], 0)
    state.salient_words.scatter_add_(2, word, torch.where(bit >= 2 ** 31, bit - 2 ** 32, bit).to(torch.int32))
    added = torch.zeros_like(state.salient_rank).scatter_add_(2, word, salient.to(torch.int32))
    state.salient_rank.add_((added.cumsum(-1) - added).to(torch.int32))
    state.quantized.add_(count)


def dequantize_state(state: ZipCacheState, slots: int) -> tuple[Tensor, Tensor]:
    """Keys and values of the first `slots` slots as float32 [B, Hkv, slots, D]: quantized slots dequantized
    (`(code * scale + zero) * channel`), buffered slots as stored, the rest zeros. The decode kernel's
    definition."""
    batch, heads, gap, dim = state.key_buffer.shape
    high_rows, low_rows = state.keys.high.scale.shape[1], state.keys.low.scale.shape[1]
    slot = torch.arange(slots, device=state.quantized.device)
    is_salient = _unpack_words(state.salient_words)[..., :slots]
    high_row = is_salient.cumsum(-1) - is_salient.long()
    buffer_row = (slot - state.quantized[:, None])[:, None]
    # Each slot's row in [high plane | low plane | buffer | a zero row], read with one index_select.
    plane_row = torch.where(is_salient, high_row, high_rows + slot - high_row)
    other_row = high_rows + low_rows + torch.where(buffer_row < gap, buffer_row, gap)
    row = torch.where(buffer_row < 0, plane_row, other_row)
    total = high_rows + low_rows + gap + 1
    flat = (torch.arange(batch * heads, device=slot.device).view(batch, heads, 1) * total + row).flatten()

    def read(planes: MixedPrecisionPlanes, buffer: Tensor) -> Tensor:
        channel = planes.channel[:, :, None, :]
        source = torch.cat([dequantize_rows(planes.high) * channel, dequantize_rows(planes.low) * channel,
                            buffer.float(), buffer.new_zeros(batch, heads, 1, dim, dtype=torch.float32)], dim=2)
        return source.flatten(0, 2).index_select(0, flat).view(batch, heads, slots, dim)

    return read(state.keys, state.key_buffer), read(state.values, state.value_buffer)


def kv_bytes(state) -> int:
    """Bytes of every tensor in a (nested) state dataclass: packed codes, scales, zeros, channel scales,
    salient bits and ranks, counters and the full-precision buffer."""
    total = 0
    for f in fields(state):
        value = getattr(state, f.name)
        if isinstance(value, Tensor):
            total += value.numel() * value.element_size()
        elif is_dataclass(value):
            total += kv_bytes(value)
    return total


# --- saliency ------------------------------------------------------------------------------------------------
def normalized_attention_saliency(probs: Tensor, query_positions: Tensor, key_positions: Tensor) -> Tensor:
    """ZipCache's normalized attention score: attention each key received, summed over the queries, divided by
    how many of those queries could attend it (`query position >= key position >= 0`), which removes the causal
    bias toward early tokens. `probs` [B, H, Q, T], positions [B, Q] and [B, T] -> [B, H, T] (0 for keys no
    query could attend)."""
    qp, kp = query_positions[:, :, None], key_positions[:, None, :]
    count = ((qp >= kp) & (kp >= 0) & (qp >= 0)).sum(1)
    return probs.sum(-2) / count.clamp(min=1)[:, None, :].to(probs.dtype)


def _probe_split(length: int, probe_ratio: float) -> tuple[int, int]:
    """Where the recent probes of a `length`-token prompt start, and how many earlier ones are drawn."""
    share = probe_ratio / 2
    recent_start = int(length - share * length)
    return recent_start, int(share * length) if recent_start > 0 else 0


def probe_count(length: int, probe_ratio: float = PROBE_RATIO) -> int:
    """How many probe queries `probe_queries` gives a `length`-token prompt (never fewer for a longer one)."""
    recent_start, drawn = _probe_split(length, probe_ratio)
    return length - recent_start + drawn


def probe_queries(length: int, probe_ratio: float = PROBE_RATIO,
                  generator: Optional[torch.Generator] = None) -> Tensor:
    """Positions of the probe queries of a `length`-token prompt: the most recent `probe_ratio / 2` of it and as
    many drawn uniformly (with replacement, as the official code) from the earlier tokens. The last token is
    always a probe, so every key has a query that attends it."""
    recent_start, drawn = _probe_split(length, probe_ratio)
    earlier = torch.randint(0, max(recent_start, 1), (drawn,), generator=generator)
    return torch.cat([torch.arange(recent_start, length), earlier])


def select_salient(saliency: Tensor, valid: Tensor, saliency_ratio: float = SALIENCY_RATIO,
                   high_free: Optional[Tensor] = None) -> Tensor:
    """Boolean [B, H, T]: per (row, head) the most salient of the `valid` [B, T] tokens — all but the
    `regular_count` least salient, capped at `high_free` [B] — so every head of a row gets the same number.
    Ties go to the earlier token."""
    n = valid.sum(-1)
    high = n - regular_count(n, saliency_ratio)
    if high_free is not None:
        high = torch.minimum(high, high_free)
    order = saliency.masked_fill(~valid[:, None], -math.inf).argsort(dim=-1, descending=True, stable=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(order.shape[-1], device=order.device)
                                            .expand_as(order))
    return rank < high[:, None, None]
