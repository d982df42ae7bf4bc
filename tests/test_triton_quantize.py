"""The fused quantize kernels (`triton_quantize`) against `quantize_into`'s PyTorch path, bit for bit.

Runs on CPU through Triton's interpreter, which must be chosen before triton is imported.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

pytest.importorskip("triton")

from kvcompile.ops import kernel_switch, quantization, triton_quantize  # noqa: E402
from kvcompile.ops.quantization import empty_state, free_high_rows, quantize_into, select_salient  # noqa: E402

from conftest import kernel_device  # noqa: E402

B, HKV, T, D = 3, 2, 24, 16


def _blocks(dtype, seed, integers=False, seq=T):
    """Two blocks of `seq` random keys and values with per-token magnitudes from 1e-3 to 1e3 and outlier channels
    (or small integers, whose codes hit exact ties), padded rows and per-head or shared saliency scores."""
    gen = torch.Generator().manual_seed(seed)
    blocks = []
    T = seq
    for count, score_heads in ((torch.tensor([T, 13, 0]), HKV), (torch.tensor([5, T, 9]), 1)):
        if integers:
            k, v = (torch.randint(-6, 7, (B, HKV, T, D), generator=gen).float() for _ in range(2))
        else:
            magnitude = 10.0 ** (6 * torch.rand(B, 1, T, 1, generator=gen) - 3)
            k = torch.randn(B, HKV, T, D, generator=gen) * magnitude * (1 + 4 * torch.rand(D, generator=gen))
            v = torch.randn(B, HKV, T, D, generator=gen) * magnitude + torch.randn(B, 1, T, 1, generator=gen)
        scores = torch.rand(B, score_heads, T, generator=gen)
        blocks.append((k.to(dtype), v.to(dtype), scores, count))
    return blocks


def _quantized_state(blocks, bits, dtype, channel=None):
    """The state after appending `blocks` with `quantize_into`, on the kernel's device."""
    T = blocks[0][0].shape[2]
    state = empty_state(B, HKV, D, 2 * T, high_bits=bits[0], low_bits=bits[1], dtype=dtype, device=kernel_device())
    if channel is not None:
        state.keys.channel.fill_(channel)
        state.values.channel.fill_(channel)
    for k, v, scores, count in blocks:
        valid = torch.arange(T) < count[:, None]
        salient = select_salient(scores, valid, 0.6, free_high_rows(state).cpu())
        dev = kernel_device()
        quantize_into(state, k.to(dev), v.to(dev), salient.to(dev), count.to(dev))
    return state


def _tensors(state):
    """(name, tensor) of everything `quantize_into` writes."""
    for kv, planes in (("keys", state.keys), ("values", state.values)):
        for precision in ("high", "low"):
            rows = getattr(planes, precision)
            yield from ((f"{kv}.{precision}.{part}", getattr(rows, part)) for part in ("data", "scale", "zero"))
        yield f"{kv}.channel", planes.channel
    yield from ((name, getattr(state, name)) for name in ("salient_words", "salient_rank", "quantized"))


def _assert_same_state(monkeypatch, blocks, bits, dtype, channel=None):
    with kernel_switch.reference_paths():
        expected = _quantized_state(blocks, bits, dtype, channel)
    monkeypatch.setattr(quantization, "_fused_quantize", lambda keys, state: True)
    fused = _quantized_state(blocks, bits, dtype, channel)
    for (name, got), (_, want) in zip(_tensors(fused), _tensors(expected)):
        assert torch.equal(got, want), name


@pytest.mark.parametrize("bits, dtype", [((4, 2), torch.float32), ((8, 4), torch.float32),
                                         ((2, 1), torch.float32), ((4, 4), torch.float32),
                                         ((4, 2), torch.float16), ((2, 1), torch.bfloat16)])
def test_kernel_planes_equal_pytorch(monkeypatch, bits, dtype):
    """Two blocks (the second appended after the first, setting row 2's channel scales): channel scales,
    packed codes, float16 scales and zero points all equal the PyTorch path's."""
    _assert_same_state(monkeypatch, _blocks(dtype, seed=bits[0] + bits[1]), bits, dtype)


def test_blocks_longer_than_a_ranking_tile(monkeypatch):
    """Blocks of 300 tokens (a prefill chunk): `_rank_tokens_kernel` ranks in tiles of 128, carrying the salient
    count from tile to tile."""
    assert 300 > 2 * triton_quantize._RANK_TOKENS
    _assert_same_state(monkeypatch, _blocks(torch.float32, seed=3, seq=300), (4, 2), torch.float32)


def test_ties_round_half_to_even(monkeypatch):
    """Integers with unit channel scales: at 2 bits a row spanning [-6, 6] has scale 4 and codes (x + 6) / 4 on
    exact halves, which must round to even as `torch.round` does."""
    _assert_same_state(monkeypatch, _blocks(torch.float32, seed=7, integers=True), (2, 2), torch.float32,
                       channel=1.0)
