"""The GPU fast paths of `kvcompile::cached_attention` against its reference path, on CPU.

`decode_step` (Triton write + split-K attention) runs through Triton's interpreter, which must be chosen before
triton is imported; `prefill_step` (FlexAttention) runs uncompiled. Both are compared with the op's reference
path (taken on CPU tensors) on outputs and on the cache state they leave behind.
"""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

import kvcompile.ops.cached_attention  # noqa: E402,F401  (registers the op)
from kvcompile.ops import decode  # noqa: E402
from kvcompile.ops.prefill import prefill_step  # noqa: E402

B, HKV, G, D = 2, 2, 3, 32
SINKS, WINDOW = 2, 6


def reference(*args):
    """The op on CPU tensors: its plain PyTorch reference path."""
    return torch.ops.kvcompile.cached_attention(*args)


def empty_cache(batch, capacity, dtype=torch.float32):
    k = torch.randn(batch, HKV, capacity, D).to(dtype)  # stale data that must stay invisible
    return k, torch.randn_like(k), torch.full((batch, capacity), -1, dtype=torch.long)


def clone_all(tensors):
    return [t.clone() for t in tensors]


def token(gen, batch=B, seq=1, dtype=torch.float32):
    def rand(heads):
        return torch.randn(batch, heads, seq, D, generator=gen).to(dtype)
    return rand(HKV * G), rand(HKV * G), rand(HKV), rand(HKV)


@pytest.mark.parametrize("layout", ["dense", "ring"])
@pytest.mark.parametrize("with_qsink", [False, True])
def test_decode_stream_matches_reference(layout, with_qsink):
    """Token by token through a dense cache and through a ring that wraps many times, with padded rows."""
    sinks, window = (0, 0) if layout == "dense" else (SINKS, WINDOW)
    steps = 30
    capacity = steps + 1 if layout == "dense" else sinks + window + 1
    ref_cache = empty_cache(B, capacity)
    fast_cache = clone_all(ref_cache)
    gen = torch.Generator().manual_seed(0)
    scale = 1 / math.sqrt(D)
    start = torch.tensor([0, -3])  # row 1 starts with three padded steps
    for step in range(steps):
        q, q_sink, k, v = token(gen)
        q_sink = q_sink if with_qsink else None
        positions = (start + step).clamp(min=-1)[:, None]
        expected = reference(q, q_sink, k, v, *ref_cache, positions, sinks, window, scale)
        out = decode.decode_step(q, q_sink, k, v, *fast_cache, positions, sinks, window, scale)
        assert out.shape == q.shape and out.is_contiguous()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=f"step {step}")
        for fast, ref in zip(fast_cache, ref_cache):
            torch.testing.assert_close(fast, ref, atol=0, rtol=0, msg=f"cache after step {step}")


def test_pinned_cache_with_more_rows():
    """A cache pinned to more rows than the batch is used through its first rows; the others stay untouched."""
    cache = empty_cache(3, 10)
    before = clone_all(cache)
    ref_cache = [t[:B].clone() for t in cache]
    gen = torch.Generator().manual_seed(1)
    q, _, k, v = token(gen)
    positions = torch.tensor([[0], [0]])
    expected = reference(q, None, k, v, *ref_cache, positions, 0, 0, 0.2)
    out = decode.decode_step(q, None, k, v, *cache, positions, 0, 0, 0.2)
    torch.testing.assert_close(out, expected)
    for t, r, b in zip(cache, ref_cache, before):
        torch.testing.assert_close(t[:B], r)
        assert torch.equal(t[B:], b[B:])


def test_half_precision_cache_with_float_query():
    """Queries in another dtype than the cache are cast for the kernel; the result has the query's dtype."""
    gen = torch.Generator().manual_seed(2)
    cache = empty_cache(B, 12, torch.float16)
    ref_cache = clone_all(cache)
    for step in range(5):
        q, q_sink, k, v = token(gen)
        positions = torch.full((B, 1), step)
        expected = reference(q, q_sink, k, v, *ref_cache, positions, SINKS, 4, 0.2)
        out = decode.decode_step(q, q_sink, k, v, *cache, positions, SINKS, 4, 0.2)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, expected, atol=3e-3, rtol=1e-2)


def test_reference_switch():
    assert decode.kernels_enabled()
    with decode.reference_attention():
        assert not decode.kernels_enabled()
    assert decode.kernels_enabled()


def test_prefill_dense_chunks_match_reference():
    """Chunks of a left-padded batch through a dense cache, FlexAttention against the reference."""
    chunk, chunks = 8, 3
    capacity = chunk * chunks + 1
    ref_cache = empty_cache(B, capacity)
    fast_cache = clone_all(ref_cache)
    gen = torch.Generator().manual_seed(3)
    stream = torch.arange(chunk * chunks)[None].repeat(B, 1) - torch.tensor([[0], [5]])
    stream = stream.clamp(min=-1)
    for c in range(chunks):
        q, _, k, v = token(gen, seq=chunk)
        positions = stream[:, c * chunk:(c + 1) * chunk]
        expected = reference(q, None, k, v, *ref_cache, positions, 0, 0, 0.25)
        out = prefill_step(q, None, k, v, *fast_cache, positions, 0, 0, 0.25)
        assert out.shape == q.shape and out.is_contiguous()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=f"chunk {c}")
        for fast, ref in zip(fast_cache, ref_cache):
            torch.testing.assert_close(fast, ref, atol=0, rtol=0)


def test_prefill_leaves_ring_to_the_reference():
    cache = empty_cache(B, SINKS + WINDOW + 1)
    before = clone_all(cache)
    q, q_sink, k, v = token(torch.Generator().manual_seed(4), seq=4)
    positions = torch.arange(4)[None].repeat(B, 1)
    assert prefill_step(q, q_sink, k, v, *cache, positions, SINKS, WINDOW, 0.2) is None
    assert all(torch.equal(a, b) for a, b in zip(cache, before))


def test_prefill_block_mask_over_many_blocks():
    """Chunks and caches spanning several 128-wide blocks: empty, partly and wholly visible ones, with holes."""
    gen = torch.Generator().manual_seed(5)
    seq, cached = 256, 300
    capacity = cached + seq + 150
    ref_cache = empty_cache(B, capacity)
    ref_cache[2][:, :cached] = torch.arange(cached)
    ref_cache[2][1, 50:60] = -1  # holes in one row
    fast_cache = clone_all(ref_cache)
    q, _, k, v = token(gen, seq=seq)
    positions = torch.arange(cached, cached + seq).repeat(B, 1)
    positions[1, :5] = -1
    expected = reference(q, None, k, v, *ref_cache, positions, 0, 0, 0.2)
    out = prefill_step(q, None, k, v, *fast_cache, positions, 0, 0, 0.2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for fast, ref in zip(fast_cache, ref_cache):
        torch.testing.assert_close(fast, ref, atol=0, rtol=0)
