"""The GPU fast paths of `kvcompile::cached_attention` against its reference path, on CPU.

`decode_step` (Triton write + split-K attention) runs through Triton's interpreter, which must be chosen before
triton is imported; the prefill paths (causal SDPA, blocked reference) run as they would on CUDA. Both are compared
with the op's reference path (`kernel_switch.reference_paths`) on outputs and on the cache state they leave behind.
"""
import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

import kvcompile.ops.cached_attention  # noqa: E402,F401  (registers the op)
from kvcompile.ops import decode, kernel_switch  # noqa: E402
from kvcompile.ops import prefill  # noqa: E402

B, HKV, G, D = 2, 2, 3, 32
SINKS, WINDOW = 2, 6


def reference(*args):
    """The op's plain PyTorch reference path."""
    with kernel_switch.reference_paths():
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


def test_caches_of_another_row_count_are_rejected_before_any_write():
    cache = empty_cache(B + 1, 10)
    before = clone_all(cache)
    q, _, k, v = token(torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=f"caches of the query's {B} rows"):
        decode.decode_step(q, None, k, v, *cache, torch.zeros(B, 1, dtype=torch.long), 0, 0, 0.2)
    assert all(torch.equal(t, b) for t, b in zip(cache, before))


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
    assert kernel_switch.kernels_enabled()
    with kernel_switch.reference_paths():
        assert not kernel_switch.kernels_enabled()
    assert kernel_switch.kernels_enabled()


def test_causal_prefill_matches_reference():
    """Chunks of contiguous positions through a dense cache: the first (is_causal) and later ones (lower-right
    causal over the cached prefix) take the SDPA path and match the reference, cache state included."""
    chunk, chunks = 8, 3
    ref_cache = empty_cache(B, chunk * chunks + 4)
    fast_cache = clone_all(ref_cache)
    gen = torch.Generator().manual_seed(3)
    for c in range(chunks):
        q, _, k, v = token(gen, seq=chunk)
        positions = torch.arange(c * chunk, (c + 1) * chunk).repeat(B, 1)
        assert prefill.prefix_start(fast_cache[2], positions) == c * chunk
        expected = reference(q, None, k, v, *ref_cache, positions, 0, 0, 0.25)
        out = torch.ops.kvcompile.cached_attention(q, None, k, v, *fast_cache, positions, 0, 0, 0.25)
        assert out.shape == q.shape and out.is_contiguous()
        torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5, msg=f"chunk {c}")
        for fast, ref in zip(fast_cache, ref_cache):
            torch.testing.assert_close(fast, ref, atol=0, rtol=0)


def test_causal_prefill_with_trailing_padding_and_padding_rows():
    """The last chunk of a prompt (right-padded) and a padding-only row (a batch padded to a pinned size) still
    take the SDPA path; padding queries get zeros, as in the reference."""
    ref_cache = empty_cache(3, 40)
    ref_cache[2][:2, :8] = torch.arange(8)  # rows 0 and 1 hold a prefix; row 2 (padding only) holds nothing
    fast_cache = clone_all(ref_cache)
    q, _, k, v = token(torch.Generator().manual_seed(6), batch=3, seq=8)
    positions = torch.arange(8, 16).repeat(3, 1)
    positions[0, 5:] = -1
    positions[2] = -1
    assert prefill.prefix_start(fast_cache[2], positions) == 8
    expected = reference(q, None, k, v, *ref_cache, positions, 0, 0, 0.25)
    out = torch.ops.kvcompile.cached_attention(q, None, k, v, *fast_cache, positions, 0, 0, 0.25)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for fast, ref in zip(fast_cache, ref_cache):
        torch.testing.assert_close(fast, ref, atol=0, rtol=0)


def test_prefix_start_refuses_what_causal_prefill_cannot_do():
    cache = empty_cache(B, 40)[2]
    cache[:, :8] = torch.arange(8)
    contiguous = torch.arange(8, 16).repeat(B, 1)
    assert prefill.prefix_start(cache, contiguous) == 8
    padded = contiguous.clone()
    padded[1, :3] = -1
    staggered = contiguous - torch.tensor([[0], [1]])
    holes = cache.clone()
    holes[1, 4] = -1
    stale = cache.clone()
    stale[0, 12] = 3  # a stale entry in a slot the chunk is about to fill
    gap = contiguous.clone()
    gap[0, 2] = -1  # padding between real tokens
    assert prefill.prefix_start(cache, padded) is None
    assert prefill.prefix_start(cache, staggered) is None
    assert prefill.prefix_start(holes, contiguous) is None
    assert prefill.prefix_start(stale, contiguous) is None
    assert prefill.prefix_start(cache, gap) is None
    assert prefill.prefix_start(cache[:, :16], contiguous) is None  # the chunk would reach the scratch slot


@pytest.mark.parametrize("layout", ["dense", "ring"])
def test_blocked_prefill_matches_reference(layout, monkeypatch):
    """A left-padded chunk (dense) and a chunk with sink queries (ring) take the blocked reference: split into
    blocks of a few queries it equals the unsplit reference."""
    sinks, window = (0, 0) if layout == "dense" else (SINKS, WINDOW)
    gen = torch.Generator().manual_seed(4)
    seq = 12
    ref_cache = empty_cache(B, 40 if layout == "dense" else SINKS + WINDOW + 1)
    q, q_sink, k, v = token(gen, seq=seq)
    q_sink = q_sink if layout == "ring" else None
    positions = torch.arange(seq).repeat(B, 1) - torch.tensor([[0], [5]])
    positions = positions.clamp(min=-1)
    expected = reference(q, q_sink, k, v, *clone_all(ref_cache), positions, sinks, window, 0.2)
    monkeypatch.setattr(prefill, "SCORE_ELEMENTS", B * HKV * G * 3 * (ref_cache[0].shape[2] + seq))
    out = torch.ops.kvcompile.cached_attention(q, q_sink, k, v, *ref_cache, positions, sinks, window, 0.2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=1e-6)
