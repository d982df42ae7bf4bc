"""ZipCache decode kernel vs. dequantize-then-reference attention, dense and gathered.

Runs on CPU through Triton's interpreter, which must be chosen before triton is imported.
"""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

pytest.importorskip("triton")
import triton.language as tl  # noqa: E402

from kvcompile.ops.decode_reference import decode_attention_reference  # noqa: E402
from kvcompile.ops.quantization import (_salient_slots, dequantize_state, empty_state, free_high_rows,  # noqa: E402
                                        quantize_into, select_salient)
from kvcompile.ops.sparse_attention import attend_per_head, gather_slots, slot_positions  # noqa: E402
from kvcompile.ops import triton_quant_decode  # noqa: E402
from kvcompile.ops.triton_quant_decode import quant_decode_attention_triton  # noqa: E402

from conftest import kernel_device  # noqa: E402

CAPACITY, GAP = 180, 16


def _to_device(state) -> None:
    """Move a state built on the CPU to the kernel's device, in place."""
    dev = kernel_device()
    for planes in (state.keys, state.values):
        for t in (planes.high, planes.low):
            t.data, t.scale, t.zero = t.data.to(dev), t.scale.to(dev), t.zero.to(dev)
        planes.channel = planes.channel.to(dev)
    for name in ("salient_words", "salient_rank", "quantized", "key_buffer", "value_buffer"):
        setattr(state, name, getattr(state, name).to(dev))


def _make_case(bits=(4, 2), G=3, D=64, dtype=torch.float32, seed=0, holes=False):
    """Four rows of a cache, each with its own block history, so their quantized and salient counts differ.
    Row 0: a prefill of 150 and a periodic block (reaching the last salient word), then 10 buffered tokens of
    which its query sees the first 7. Row 1: a prefill of 70 and a periodic block, then 5 buffered. Row 2: a
    prefill of 100 and an empty buffer. Row 3: nothing quantized and 3 buffered. `holes` empties 10 of row 1's
    quantized slots (a gathered read must skip them; a dense read assumes every quantized slot is visible)."""
    gen = torch.Generator().manual_seed(seed)
    B, Hkv = 4, 2
    state = empty_state(B, Hkv, D, CAPACITY, high_bits=bits[0], low_bits=bits[1], streaming_gap=GAP, dtype=dtype)
    for count in (torch.tensor([150, 70, 100, 0]), torch.tensor([GAP, GAP, 0, 0])):
        length = int(count.max())
        # Keys with outlier channels, as the paper shows them.
        k = torch.randn(B, Hkv, length, D, generator=gen) * (1 + 4 * torch.rand(1, 1, 1, D, generator=gen))
        v = torch.randn(B, Hkv, length, D, generator=gen)
        valid = torch.arange(length) < count[:, None]
        salient = select_salient(torch.rand(B, Hkv, length, generator=gen), valid, 0.6, free_high_rows(state))
        quantize_into(state, k.to(dtype), v.to(dtype), salient, count)
    buffered = torch.tensor([10, 5, 0, 3])
    state.key_buffer.copy_(torch.randn(state.key_buffer.shape, generator=gen))
    state.value_buffer.copy_(torch.randn(state.value_buffer.shape, generator=gen))
    slot_pos = torch.full((B, CAPACITY + 1), -1, dtype=torch.long)
    for b in range(B):
        held = int(state.quantized[b] + buffered[b])
        slot_pos[b, :held] = torch.arange(held)
    if holes:
        slot_pos[1, torch.randperm(80, generator=gen)[:10]] = -1
    q_pos = state.quantized + buffered - 1 - torch.tensor([3, 0, 0, 0])
    _to_device(state)
    q = torch.randn(B, Hkv * G, D, generator=gen).to(dtype=dtype, device=kernel_device())
    return q, state, slot_pos.to(kernel_device()), q_pos.to(kernel_device()), 1.0 / math.sqrt(D)


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


@pytest.fixture
def bf16_dots(monkeypatch):
    """The interpreter keeps bfloat16 as its raw bits (uint16) and multiplies those in `tl.dot`: widen bfloat16
    operands to float32 first (exact), as the GPU's bf16 products accumulate in float32."""
    from triton.runtime import interpreter

    dot = interpreter.InterpreterBuilder.create_dot

    def widen(x):
        if x.dtype != tl.bfloat16:
            return x
        return interpreter.TensorHandle((x.data.astype(np.uint32) << 16).view(np.float32), tl.float32)

    monkeypatch.setattr(interpreter.InterpreterBuilder, "create_dot",
                        lambda self, a, b, d, *rest: dot(self, widen(a), widen(b), d, *rest))


def _scores_lse(q, state, slot_pos, q_pos, scale):
    """Natural log-sum-exp of the definition's visible scaled scores [B, Hq]."""
    keys, _ = dequantize_state(state, slot_pos.shape[1])
    B, Hq, D = q.shape
    Hkv = keys.shape[1]
    scores = torch.einsum("bkgd,bknd->bkgn", q.float().view(B, Hkv, -1, D), keys) * scale
    visible = (slot_pos >= 0) & (slot_pos <= q_pos[:, None])
    return scores.masked_fill(~visible[:, None, None], -math.inf).logsumexp(-1).view(B, Hq)


@pytest.mark.parametrize("bits", [(4, 2), (8, 1), (2, 16), (16, 2)])
@pytest.mark.parametrize("G", [1, 4])
def test_dense_matches_dequantized_reference(bits, G):
    case = _make_case(bits, G=G, seed=G + bits[0])
    out = quant_decode_attention_triton(*case)
    assert out.dtype == case[0].dtype
    torch.testing.assert_close(out, _dense_reference(*case), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("bits", [(4, 2), (2, 1)])
def test_gathered_matches_dequantized_reference(bits):
    q, state, slot_pos, q_pos, scale = _make_case(bits, G=3, D=32, seed=5, holes=True)
    indices = _indices(slot_pos, 2, 70, seed=1)
    out = quant_decode_attention_triton(q, state, slot_pos, q_pos, scale, indices=indices)
    torch.testing.assert_close(out, _gathered_reference(q, state, slot_pos, q_pos, scale, indices),
                               atol=1e-4, rtol=1e-4)


def test_gathered_scores_for_selection():
    """`return_scores` over every slot (a selection layer's full read): the visible slots' scaled scores of each
    query head, -inf elsewhere; the output and log-sum-exp are the dense read's."""
    q, state, slot_pos, q_pos, scale = _make_case(seed=3)
    B, N = slot_pos.shape
    every = torch.arange(N, device=slot_pos.device).expand(B, 2, N).contiguous()
    out, lse, scores = quant_decode_attention_triton(q, state, slot_pos, q_pos, scale, indices=every,
                                                     return_lse=True, return_scores=True)
    keys, _ = dequantize_state(state, N)
    expected = torch.einsum("bkgd,bknd->bkgn", q.float().view(B, 2, -1, q.shape[2]), keys) * scale
    visible = ((slot_pos >= 0) & (slot_pos <= q_pos[:, None]))[:, None, None].expand_as(expected)
    assert torch.equal(torch.isinf(scores), ~visible)
    torch.testing.assert_close(scores[visible], expected[visible], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out, _dense_reference(q, state, slot_pos, q_pos, scale), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, _scores_lse(q, state, slot_pos, q_pos, scale), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="indices"):
        quant_decode_attention_triton(q, state, slot_pos, q_pos, scale, return_scores=True)


@pytest.mark.parametrize("block_rows", [16, None])
@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_splits_and_log_sum_exp(monkeypatch, block_rows, num_splits):
    """Dense read split over rows: with 16-row tiles the salient rows (100, 52, 60, 0) and the others (66, 34,
    40, 0) span several tiles and splits, and 7 splits leave some programs no plane rows; the default 32-row
    tiles hold a plane in a few, so most splits take a whole plane or none. The log-sum-exp merges them."""
    if block_rows:
        monkeypatch.setattr(triton_quant_decode, "_dense_launch", lambda block_d: (block_rows, 1))
    q, state, slot_pos, q_pos, scale = _make_case(seed=9)
    assert _salient_slots(state).tolist() == [100, 52, 60, 0]
    out, lse = quant_decode_attention_triton(q, state, slot_pos, q_pos, scale, num_splits=num_splits,
                                             return_lse=True)
    torch.testing.assert_close(out, _dense_reference(q, state, slot_pos, q_pos, scale), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, _scores_lse(q, state, slot_pos, q_pos, scale), atol=1e-4, rtol=1e-4)


def test_buffer_past_the_last_slot():
    """Buffer rows whose slot is past `slot_pos`'s last column are not read (row 0's last 6 of 10)."""
    q, state, slot_pos, q_pos, scale = _make_case(G=2, D=32, seed=6)
    slot_pos = slot_pos[:, :170]
    out, lse = quant_decode_attention_triton(q, state, slot_pos, q_pos, scale, num_splits=2, return_lse=True)
    torch.testing.assert_close(out, _dense_reference(q, state, slot_pos, q_pos, scale), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(lse, _scores_lse(q, state, slot_pos, q_pos, scale), atol=1e-4, rtol=1e-4)


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
    expected = decode_attention_reference(q, None, torch.cat([k, k[:, :, :1]], 2), torch.cat([v, v[:, :, :1]], 2),
                                          slot_pos, q_pos, 0, 0, 0.125)
    _to_device(state)
    dev = kernel_device()
    out = quant_decode_attention_triton(q.to(dev), state, slot_pos.to(dev), q_pos.to(dev), 0.125)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("gathered", [False, True])
def test_padded_and_empty_rows_are_zero(gathered):
    """A padding query (q_pos -1, as a left-padded row's padding steps) sees none of its row's tokens, and a
    row with nothing stored sees nothing."""
    q, state, slot_pos, q_pos, scale = _make_case(bits=(4, 2), G=2, D=32, seed=4)
    q_pos[0] = -1
    slot_pos[3] = -1  # row 3's buffered tokens gone: nothing stored
    indices = _indices(slot_pos, 2, 120, seed=3) if gathered else None
    out, lse = quant_decode_attention_triton(q, state, slot_pos, q_pos, scale, indices=indices, return_lse=True)
    assert torch.isfinite(out).all() and (out[[0, 3]] == 0).all() and (lse[[0, 3]] == -math.inf).all()
    expected = (_gathered_reference(q, state, slot_pos, q_pos, scale, indices) if gathered
                else _dense_reference(q, state, slot_pos, q_pos, scale))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert torch.isfinite(lse[[1, 2]]).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("gathered", [False, True])
def test_half_precision(bf16_dots, dtype, gathered):
    """Half-precision queries, buffers and 16-bit planes: dots on half operands, accumulated in float32."""
    bits = (16, 2) if gathered else (4, 16)
    q, state, slot_pos, q_pos, scale = _make_case(bits, dtype=dtype, G=4, D=64, seed=11)
    indices = _indices(slot_pos, 2, 90, seed=2) if gathered else None
    out, lse = quant_decode_attention_triton(q, state, slot_pos, q_pos, scale, indices=indices, return_lse=True)
    assert out.dtype == dtype
    expected = (_gathered_reference(q, state, slot_pos, q_pos, scale, indices) if gathered
                else _dense_reference(q, state, slot_pos, q_pos, scale))
    tol = 5e-3 if dtype == torch.float16 else 3e-2
    torch.testing.assert_close(out, expected, atol=tol, rtol=tol)
    if not gathered:
        torch.testing.assert_close(lse, _scores_lse(q, state, slot_pos, q_pos, scale), atol=tol, rtol=tol)


def test_rejects_non_contiguous_state():
    q, state, slot_pos, q_pos, scale = _make_case(D=32, seed=1)
    state.key_buffer = state.key_buffer.transpose(2, 3).contiguous().transpose(2, 3)
    with pytest.raises(ValueError, match="contiguous"):
        quant_decode_attention_triton(q, state, slot_pos, q_pos, scale)
