"""ZipCache primitives (`kvcompile.ops.quantization`) and the paper reference (`kvcompile.reference.zipcache`)."""
import math

import pytest
import torch

from conftest import tiny_hf_model
from kvcompile.ops.quantization import (channel_scales, dequantize_rows, dequantize_state, empty_state, fake_quantize,
                                        free_high_rows, kv_bytes, normalized_attention_saliency, pack_bits,
                                        probe_queries, quantize_into, quantize_rows, regular_count,
                                        salient_allowance, select_salient, unpack_bits)
from kvcompile.reference.zipcache import zipcache_logits


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_unpack_round_trip(bits):
    codes = torch.randint(0, 2 ** bits, (3, 5, 64), generator=torch.Generator().manual_seed(bits)).to(torch.uint8)
    packed = pack_bits(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 64 * bits // 8)
    assert torch.equal(unpack_bits(packed, bits), codes)


def test_pack_layout_and_bad_widths():
    """The first code of a byte sits in its lowest bits."""
    assert pack_bits(torch.tensor([1, 2, 3, 0], dtype=torch.uint8), 2).tolist() == [1 + (2 << 2) + (3 << 4)]
    with pytest.raises(ValueError, match="bit width"):
        pack_bits(torch.zeros(8, dtype=torch.uint8), 3)
    with pytest.raises(ValueError, match="multiple of 4"):
        pack_bits(torch.zeros(6, dtype=torch.uint8), 2)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_quantize_rows_error_bound(bits):
    """|x - dequantized| <= scale / 2 for every element of a row, with the row's stored float16 scale: up to
    float32 rounding of the (de)quantization arithmetic, at most 2**-22 of the row's magnitude."""
    gen = torch.Generator().manual_seed(bits)
    B, H, R, D = 2, 3, 40, 16
    rows = torch.randn(B, H, R, D, generator=gen) * torch.rand(B, 1, R, 1, generator=gen) * 10
    rows[:, :, :5] += 300.0  # offsets far above the spread: the float16 zero point must round down
    rows[:, :, 5] = 0.75  # a constant row representable in float16 is stored exactly (scale 0)
    row_valid = torch.arange(R) < torch.tensor([[R], [R - 7]])
    quantized = quantize_rows(rows, row_valid, bits, torch.float32)
    restored = dequantize_rows(quantized)
    scale = quantized.scale.float()[:, None, :, None]
    magnitude = quantized.zero.float().abs()[:, None, :, None] + (2 ** bits - 1) * scale
    error = (restored - rows).abs()
    assert (error <= scale / 2 + 2 ** -22 * magnitude)[row_valid[:, None, :, None].expand_as(error)].all()
    assert (error[:, :, 5] == 0).all()
    assert (quantized.scale[~row_valid] == 0).all()


def test_sixteen_bits_store_exactly():
    """high_bits = low_bits = 16 keeps every value as it was: no quantization at all."""
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(2, 3, 20, 16, generator=gen), torch.randn(2, 3, 20, 16, generator=gen)
    salient = torch.rand(2, 3, 20, generator=gen) < 0.5
    channel = torch.ones(2, 3, 16)
    assert torch.equal(fake_quantize(k.double(), salient[:, :1], channel, 16, 16), k.double())
    for dtype in (torch.float32, torch.bfloat16):
        state = empty_state(2, 3, 16, 30, high_bits=16, low_bits=16, streaming_gap=4, dtype=dtype)
        mask = select_salient(torch.rand(2, 3, 20, generator=gen), torch.ones(2, 20, dtype=torch.bool))
        quantize_into(state, k.to(dtype), v.to(dtype), mask, torch.tensor([20, 20]))
        keys, values = dequantize_state(state, 20)
        assert torch.equal(keys, k.to(dtype).float()) and torch.equal(values, v.to(dtype).float())


@pytest.mark.parametrize("bits", [(4, 2), (8, 1), (16, 2)])
def test_packed_state_reads_back_each_block(bits):
    """Blocks appended with ragged row lengths (a prefill, then a periodic step) read back exactly as
    `fake_quantize` of each block; buffered slots read as stored, the rest as zeros. A row's channel scales
    come from its first non-empty block."""
    gen = torch.Generator().manual_seed(sum(bits))
    B, H, D, gap = 3, 3, 16, 8
    state = empty_state(B, H, D, 120, high_bits=bits[0], low_bits=bits[1], streaming_gap=gap,
                        dtype=torch.float32)
    expected_k, expected_v = torch.zeros(B, H, 121, D), torch.zeros(B, H, 121, D)
    start = torch.zeros(B, dtype=torch.long)
    for length, count in ((50, torch.tensor([50, 33, 0])), (gap, torch.tensor([gap, gap, gap]))):
        k = torch.randn(B, H, length, D, generator=gen) * 3 + torch.randn(B, H, 1, D, generator=gen)
        v = torch.randn(B, H, length, D, generator=gen)
        valid = torch.arange(length) < count[:, None]
        salient = select_salient(torch.rand(B, H, length, generator=gen), valid, 0.6, free_high_rows(state))
        quantize_into(state, k, v, salient, count)
        fake_k = fake_quantize(k, salient, state.keys.channel, *bits, valid)
        fake_v = fake_quantize(v, salient, state.values.channel, *bits, valid)
        for b in range(B):
            n = int(count[b])
            expected_k[b, :, start[b]:start[b] + n] = fake_k[b, :, :n]
            expected_v[b, :, start[b]:start[b] + n] = fake_v[b, :, :n]
        start += count
    torch.testing.assert_close(state.keys.channel[2], channel_scales(k[2:3], valid[2:3], *bits)[0])
    assert state.quantized.tolist() == start.tolist()
    state.key_buffer.normal_(generator=gen)
    for b in range(B):
        expected_k[b, :, start[b]:start[b] + gap] = state.key_buffer[b]
    keys, values = dequantize_state(state, 121)
    assert torch.equal(keys, expected_k)
    assert torch.equal(values[:, :, :int(start.max())], expected_v[:, :, :int(start.max())])


def test_normalized_attention_saliency_hand_example():
    """Accumulated attention favours the first token; dividing by how many queries could attend each token
    ranks the last one above the middle one."""
    probs = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])[None, None]
    positions = torch.arange(3)[None]
    saliency = normalized_attention_saliency(probs, positions, positions)
    torch.testing.assert_close(saliency[0, 0], torch.tensor([1.7 / 3, 0.8 / 2, 0.5 / 1]))
    # Probe queries at positions 2 and 0 only: token 0 is seen by both, tokens 1 and 2 by one.
    probes = torch.tensor([[2, 0]])
    saliency = normalized_attention_saliency(probs[:, :, [2, 0]], probes, positions)
    torch.testing.assert_close(saliency[0, 0], torch.tensor([1.2 / 2, 0.3, 0.5]))


def test_probe_queries_are_recent_plus_random():
    probes = probe_queries(200, 0.1, torch.Generator().manual_seed(0))
    assert probes[:10].tolist() == list(range(190, 200))
    assert len(probes) == 20 and (probes[10:] < 190).all()
    assert probe_queries(1).tolist() == [0]


def test_select_salient_counts():
    """Per head all but floor(0.4 n) of the n valid tokens (the official rounding), the most salient first,
    capped by the free high rows; every head of a row gets the same number."""
    gen = torch.Generator().manual_seed(0)
    saliency = torch.rand(3, 4, 50, generator=gen)
    valid = torch.arange(50) < torch.tensor([[50], [23], [0]])
    salient = select_salient(saliency, valid, 0.6)
    counts = salient.sum(-1)
    assert counts.tolist() == [[30] * 4, [23 - regular_count(23, 0.6)] * 4, [0] * 4]
    assert not salient[~valid[:, None].expand_as(salient)].any()
    chosen_min = saliency.masked_fill(~salient, math.inf).amin(-1)[0]
    skipped_max = saliency.masked_fill(salient, -math.inf).amax(-1)[0]
    assert (chosen_min > skipped_max).all()
    capped = select_salient(saliency, valid, 0.6, high_free=torch.tensor([5, 100, 0]))
    assert capped.sum(-1)[:, 0].tolist() == [5, 14, 0]


def test_salient_allowance_fills_the_planes_exactly():
    """Blocks whose 40% is fractional: the allowance keeps all but floor(0.4 * tokens so far) salient, so the
    planes (sized for the whole cache) end exactly full."""
    gen = torch.Generator().manual_seed(0)
    state = empty_state(1, 2, 16, 49, streaming_gap=4, dtype=torch.float32)
    total = 0
    for n in (7, 3, 11, 1, 5, 9, 13):
        count = torch.tensor([n])
        k = torch.randn(1, 2, n, 16, generator=gen)
        valid = torch.ones(1, n, dtype=torch.bool)
        salient = select_salient(torch.rand(1, 2, n, generator=gen), valid, 0.6, salient_allowance(state, count, 0.6))
        assert abs(int(salient[0, 0].sum()) - (n - regular_count(n, 0.6))) <= 1
        quantize_into(state, k, k, salient, count)
        total += n
        assert int(free_high_rows(state)) == (49 - regular_count(49, 0.6)) - (total - regular_count(total, 0.6))
    assert int(free_high_rows(state)) == 0


def test_bytes_ratio_at_paper_setting():
    """4/2 bits, 60% salient, 100-token buffer: a SmolLM2-shaped layer (3 KV heads, D=64) filled to 32k
    positions (a prefill, then periodic steps) takes >= 4.5x fewer bytes than bf16 (30 identical layers
    scale both sides alike)."""
    capacity, heads, dim = 32768, 3, 64
    state = empty_state(1, heads, dim, capacity, dtype=torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    for length in (32000,) + (100,) * 7:
        k = torch.randn(1, heads, length, dim, generator=gen).bfloat16()
        valid = torch.ones(1, length, dtype=torch.bool)
        salient = select_salient(torch.rand(1, heads, length, generator=gen), valid, 0.6, free_high_rows(state))
        quantize_into(state, k, k, salient, torch.tensor([length]))
    assert int(state.quantized) == 32700 and int(free_high_rows(state)) >= 0
    layers = 30
    dense = layers * 2 * heads * capacity * dim * torch.bfloat16.itemsize
    ratio = dense / (layers * kv_bytes(state))
    assert ratio >= 4.5, ratio


def test_reference_sixteen_bits_is_dense():
    model = tiny_hf_model("llama", "eager")
    ids = torch.randint(1, 96, (1, 30), generator=torch.Generator().manual_seed(0))
    logits = zipcache_logits(model, ids, 12, high_bits=16, low_bits=16, streaming_gap=4)
    torch.testing.assert_close(logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def test_reference_quantizes_only_the_cache():
    """Prefill logits are full precision; decoded ones (with periodic steps every 4 tokens) move away from
    dense, less at 8 bits than at the paper's 4/2."""
    model = tiny_hf_model("llama", "eager")
    ids = torch.randint(1, 96, (1, 30), generator=torch.Generator().manual_seed(0))
    dense = model(ids).logits
    paper = zipcache_logits(model, ids, 12, streaming_gap=4)
    fine = zipcache_logits(model, ids, 12, high_bits=8, low_bits=8, streaming_gap=4)
    torch.testing.assert_close(paper[:, :12], dense[:, :12], atol=1e-5, rtol=1e-5)
    paper_error, fine_error = (paper - dense)[:, 12:].abs().max(), (fine - dense)[:, 12:].abs().max()
    assert 0 < fine_error < paper_error < 0.2 * dense.abs().max()
