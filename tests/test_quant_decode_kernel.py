"""ZipCache decode kernel vs. dequantize-then-reference attention, dense and gathered.

Runs on CPU through Triton's interpreter, which must be chosen before triton is imported.
"""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

from kvcompile.ops.decode_reference import decode_attention_reference  # noqa: E402
from kvcompile.ops.quantization import (dequantize_state, empty_state, free_high_rows, quantize_into,  # noqa: E402
                                        select_salient)
from kvcompile.ops.sparse_attention import attend_per_head, gather_slots, slot_positions  # noqa: E402
from kvcompile.ops.triton_quant_decode import quant_decode_attention_triton  # noqa: E402

CAPACITY, GAP = 180, 16


def _device() -> str:
    """The interpreter runs on CPU tensors; a real launch needs CUDA ones."""
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


def _make_case(bits=(4, 2), G=3, D=64, dtype=torch.float32, seed=0):
    """Three rows of a filled cache: a prefill of ragged length and one periodic block, then part of the
    buffer. Row 0 queries before its last token (causality masks real slots), row 1 has holes, row 2 is
    fresh from prefill."""
    gen = torch.Generator().manual_seed(seed)
    B, Hkv = 3, 2
    state = empty_state(B, Hkv, D, CAPACITY, high_bits=bits[0], low_bits=bits[1], streaming_gap=GAP, dtype=dtype)
    for count in (torch.tensor([120, 70, 100]), torch.tensor([GAP, GAP, 0])):
        length = int(count.max())
        # Keys with outlier channels, as the paper shows them.
        k = torch.randn(B, Hkv, length, D, generator=gen) * (1 + 4 * torch.rand(1, 1, 1, D, generator=gen))
        v = torch.randn(B, Hkv, length, D, generator=gen)
        valid = torch.arange(length) < count[:, None]
        salient = select_salient(torch.rand(B, Hkv, length, generator=gen), valid, 0.6, free_high_rows(state))
        quantize_into(state, k.to(dtype), v.to(dtype), salient, count)
    buffered = torch.tensor([10, 5, 0])
    state.key_buffer.copy_(torch.randn(state.key_buffer.shape, generator=gen))
    state.value_buffer.copy_(torch.randn(state.value_buffer.shape, generator=gen))
    slot_pos = torch.full((B, CAPACITY + 1), -1, dtype=torch.long)
    for b in range(B):
        held = int(state.quantized[b] + buffered[b])
        slot_pos[b, :held] = torch.arange(held)
    slot_pos[1, torch.randperm(80, generator=gen)[:10]] = -1
    q_pos = state.quantized + buffered - 1 - torch.tensor([3, 0, 0])
    dev = _device()
    for planes in (state.keys, state.values):
        for t in (planes.high, planes.low):
            t.data, t.scale, t.zero = t.data.to(dev), t.scale.to(dev), t.zero.to(dev)
        planes.channel = planes.channel.to(dev)
    for name in ("salient_words", "salient_rank", "quantized", "key_buffer", "value_buffer"):
        setattr(state, name, getattr(state, name).to(dev))
    q = torch.randn(B, Hkv * G, D, generator=gen).to(dtype=dtype, device=dev)
    return q, state, slot_pos.to(dev), q_pos.to(dev), 1.0 / math.sqrt(D)


def _dense_reference(q, state, slot_pos, q_pos, scale):
    keys, values = dequantize_state(state, slot_pos.shape[1])
    return decode_attention_reference(q, None, keys, values, slot_pos, q_pos, 0, 0, scale)


def _gathered_reference(q, state, slot_pos, q_pos, scale, indices):
    keys, values = dequantize_state(state, slot_pos.shape[1])
    out = attend_per_head(q[:, :, None], None, gather_slots(keys, indices), gather_slots(values, indices),
                          slot_positions(slot_pos, indices), q_pos[:, None], 0, 0, scale)
    return out[:, :, 0]


def _indices(slot_pos, kv_heads, k, seed):
    """Per KV head, `k` distinct slots: quantized, buffered, empty and scratch ones alike."""
    gen = torch.Generator().manual_seed(seed)
    B, N = slot_pos.shape
    idx = torch.stack([torch.stack([torch.randperm(N, generator=gen)[:k] for _ in range(kv_heads)])
                       for _ in range(B)])
    idx[:, :, 0] = N - 1  # scratch slot
    return idx.to(slot_pos.device)


@pytest.mark.parametrize("bits", [(4, 2), (8, 1), (16, 2)])
@pytest.mark.parametrize("G", [1, 4])
def test_dense_matches_dequantized_reference(bits, G):
    case = _make_case(bits, G=G, seed=G + bits[0])
    out = quant_decode_attention_triton(*case)
    assert out.dtype == case[0].dtype
    torch.testing.assert_close(out, _dense_reference(*case), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [(4, 2), (2, 1)])
def test_gathered_matches_dequantized_reference(bits):
    q, state, slot_pos, q_pos, scale = _make_case(bits, G=3, D=32, seed=5)
    indices = _indices(slot_pos, 2, 70, seed=1)
    out = quant_decode_attention_triton(q, state, slot_pos, q_pos, scale, indices=indices)
    torch.testing.assert_close(out, _gathered_reference(q, state, slot_pos, q_pos, scale, indices),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("num_splits", [1, 3])
def test_splits_and_log_sum_exp(num_splits):
    q, state, slot_pos, q_pos, scale = _make_case(seed=9)
    out, lse = quant_decode_attention_triton(q, state, slot_pos, q_pos, scale, num_splits=num_splits,
                                             return_lse=True)
    torch.testing.assert_close(out, _dense_reference(q, state, slot_pos, q_pos, scale), atol=1e-4, rtol=1e-4)
    keys, _ = dequantize_state(state, slot_pos.shape[1])
    B, Hq, D = q.shape
    scores = torch.einsum("bkgd,bknd->bkgn", q.view(B, 2, -1, D), keys) * scale
    visible = (slot_pos >= 0) & (slot_pos <= q_pos[:, None])
    expected = scores.masked_fill(~visible[:, None, None], -math.inf).logsumexp(-1).view(B, Hq)
    torch.testing.assert_close(lse, expected, atol=1e-4, rtol=1e-4)


def test_sixteen_bits_is_dense_attention():
    """With 16/16 bits the kernel is plain decode attention over the raw keys and values."""
    gen = torch.Generator().manual_seed(3)
    B, Hkv, G, D, N = 2, 2, 2, 32, 60
    k, v = torch.randn(B, Hkv, N, D, generator=gen), torch.randn(B, Hkv, N, D, generator=gen)
    state = empty_state(B, Hkv, D, N, high_bits=16, low_bits=16, streaming_gap=GAP, dtype=torch.float32)
    count = torch.tensor([N, 40])
    salient = select_salient(torch.rand(B, Hkv, N, generator=gen), torch.arange(N) < count[:, None])
    quantize_into(state, k, v, salient, count)
    slot_pos = torch.arange(N + 1).repeat(B, 1)
    slot_pos[:, N] = -1
    slot_pos[1, 40:] = -1
    q, q_pos = torch.randn(B, Hkv * G, D, generator=gen), torch.tensor([N - 1, 39])
    out = quant_decode_attention_triton(q, state, slot_pos, q_pos, 0.125)
    expected = decode_attention_reference(q, None, torch.cat([k, k[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2),
                                          slot_pos, q_pos, 0, 0, 0.125)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_padded_and_empty_rows_are_zero():
    q, state, slot_pos, q_pos, scale = _make_case(bits=(4, 2), G=2, D=32, seed=4)
    q_pos[0] = -1  # padded row
    slot_pos[1] = -1  # row that sees nothing
    out, lse = quant_decode_attention_triton(q, state, slot_pos, q_pos, scale, return_lse=True)
    assert torch.isfinite(out).all() and (out[:2] == 0).all() and (lse[:2] == -math.inf).all()
    torch.testing.assert_close(out, _dense_reference(q, state, slot_pos, q_pos, scale), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("gathered", [False, True])
def test_fp16(gathered):
    """Half-precision queries and buffers (bf16 dots are unsupported by the interpreter)."""
    q, state, slot_pos, q_pos, scale = _make_case(dtype=torch.float16, G=4, D=64, seed=11)
    indices = _indices(slot_pos, 2, 90, seed=2) if gathered else None
    out = quant_decode_attention_triton(q, state, slot_pos, q_pos, scale, indices=indices)
    assert out.dtype == torch.float16
    expected = (_gathered_reference(q, state, slot_pos, q_pos, scale, indices) if gathered
                else _dense_reference(q, state, slot_pos, q_pos, scale))
    torch.testing.assert_close(out, expected, atol=5e-3, rtol=1e-2)


def test_rejects_non_contiguous_state():
    q, state, slot_pos, q_pos, scale = _make_case(D=32, seed=1)
    state.key_buffer = state.key_buffer.transpose(2, 3).contiguous().transpose(2, 3)
    with pytest.raises(ValueError, match="contiguous"):
        quant_decode_attention_triton(q, state, slot_pos, q_pos, scale)
