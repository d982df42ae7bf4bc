"""Split-K Triton decode kernel vs. the PyTorch reference, and the reference vs. brute force.

Runs on CPU through Triton's interpreter, which must be chosen before triton is imported.
"""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

pytest.importorskip("triton")

from kvcompile.ops.decode_reference import decode_attention_reference  # noqa: E402
from kvcompile.ops.triton_decode import decode_attention_triton  # noqa: E402
from kvcompile.ops.triton_support import triton_available  # noqa: E402

from conftest import kernel_device  # noqa: E402

SINKS, WINDOW = 4, 16


def _dense_positions(gen, B, N):
    """Partially filled dense caches: slot n holds position n up to a random fill, with holes."""
    pos = torch.arange(N).repeat(B, 1)
    fill = torch.randint(N // 3, N + 1, (B,), generator=gen)
    pos[torch.arange(N)[None, :] >= fill[:, None]] = -1
    pos[torch.rand(B, N, generator=gen) < 0.1] = -1
    # Some rows query before their last stored token, so causality masks real slots.
    q_pos = fill - 1 - torch.randint(0, 8, (B,), generator=gen)
    return pos, q_pos


def _ring_positions(gen, B, N):
    """Ring-like caches: sinks, in-window, stale and future positions in shuffled slots."""
    pos = torch.full((B, N), -1, dtype=torch.long)
    q_pos = torch.randint(3 * N // 2, 3 * N, (B,), generator=gen)
    for b in range(B):
        qp = int(q_pos[b])
        recent = torch.arange(qp - WINDOW - 8, qp + 4)  # straddles the window edge and q_pos
        older = torch.randperm(qp - WINDOW - 8 - SINKS, generator=gen)[: N // 2] + SINKS
        held = torch.cat([torch.arange(SINKS), recent, older])[:N]
        slots = torch.randperm(N, generator=gen)[: held.numel()]
        pos[b, slots] = held
    return pos, q_pos


def _make_case(layout, B, Hkv, G, N, D, with_qsink, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    pos, q_pos = (_dense_positions if layout == "dense" else _ring_positions)(gen, B, N)
    Hq = Hkv * G
    dev = kernel_device()

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(dtype=dtype, device=dev)

    return dict(
        q=rand(B, Hq, D),
        q_sink=rand(B, Hq, D) if with_qsink else None,
        k_cache=rand(B, Hkv, N, D),
        v_cache=rand(B, Hkv, N, D),
        slot_pos=pos.to(dev),
        q_pos=q_pos.to(dev),
        sink_tokens=SINKS,
        window_tokens=0 if layout == "dense" else WINDOW,
        scale=1.0 / math.sqrt(D),
    )


def _brute_force(q, q_sink, k_cache, v_cache, slot_pos, q_pos, sink_tokens, window_tokens, scale):
    """One (row, head) at a time, visibility spelled out slot by slot, in float64."""
    B, Hq, D = q.shape
    G = Hq // k_cache.shape[1]
    out = torch.zeros(B, Hq, D, dtype=torch.float64)
    for b in range(B):
        qp = int(q_pos[b])
        for h in range(Hq):
            k, v = k_cache[b, h // G].double().cpu(), v_cache[b, h // G].double().cpu()
            scores, values = [], []
            for n in range(k.shape[0]):
                p = int(slot_pos[b, n])
                if p < 0 or p > qp:
                    continue
                if window_tokens and not (p < sink_tokens or p > qp - window_tokens):
                    continue
                qq = q_sink[b, h] if q_sink is not None and p < sink_tokens else q[b, h]
                scores.append(scale * torch.dot(qq.double().cpu(), k[n]))
                values.append(v[n])
            if scores:
                w = torch.softmax(torch.stack(scores), 0)
                out[b, h] = (w[:, None] * torch.stack(values)).sum(0)
    return out


@pytest.mark.parametrize("layout", ["dense", "ring"])
@pytest.mark.parametrize("with_qsink", [False, True])
def test_reference_matches_brute_force(layout, with_qsink):
    case = _make_case(layout, B=2, Hkv=2, G=3, N=48, D=8, with_qsink=with_qsink, seed=1)
    ref = decode_attention_reference(**case)
    torch.testing.assert_close(ref.double().cpu(), _brute_force(**case), atol=1e-5, rtol=1e-5)


def test_triton_available():
    assert triton_available()


@pytest.mark.parametrize("layout", ["dense", "ring"])
@pytest.mark.parametrize("with_qsink", [False, True])
@pytest.mark.parametrize("G", [1, 3, 4])
@pytest.mark.parametrize("D", [64, 80])
def test_kernel_matches_reference(layout, with_qsink, G, D):
    case = _make_case(layout, B=2, Hkv=2, G=G, N=300, D=D, with_qsink=with_qsink, seed=G * D)
    out = decode_attention_triton(**case)
    assert out.dtype == case["q"].dtype
    torch.testing.assert_close(out, decode_attention_reference(**case), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["dense", "ring"])
@pytest.mark.parametrize("num_splits", [1, 2, 5])
def test_forced_split_counts(layout, num_splits):
    """Splits past a dense cache's fill see no slot and must weigh zero in the merge."""
    case = _make_case(layout, B=2, Hkv=2, G=4, N=300, D=80, with_qsink=True, seed=7)
    out = decode_attention_triton(**case, num_splits=num_splits)
    torch.testing.assert_close(out, decode_attention_reference(**case), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["dense", "ring"])
def test_padded_and_empty_rows_are_zero(layout):
    case = _make_case(layout, B=3, Hkv=2, G=2, N=100, D=64, with_qsink=True, seed=3)
    case["q_pos"][0] = -1  # padded row
    case["slot_pos"][1] = -1  # row whose cache is empty
    out = decode_attention_triton(**case)
    assert torch.isfinite(out).all()
    assert (out[:2] == 0).all()
    torch.testing.assert_close(out, decode_attention_reference(**case), atol=1e-4, rtol=1e-4)


def test_zero_slot_cache():
    case = _make_case("dense", B=2, Hkv=2, G=2, N=0, D=64, with_qsink=False)
    assert (decode_attention_triton(**case) == 0).all()


def test_strided_inputs_and_int32_positions():
    """Views into larger buffers and int32 slot positions need no copies."""
    case = _make_case("ring", B=2, Hkv=2, G=3, N=120, D=64, with_qsink=False, seed=5)
    B, Hq, D = case["q"].shape
    q_buf = torch.zeros(B, D, Hq + 1, device=case["q"].device)
    q_buf[:, :, :Hq] = case["q"].transpose(1, 2)
    k_buf = torch.zeros(B, 2, 130, D, device=case["q"].device)
    k_buf[:, :, :120] = case["k_cache"]
    strided = dict(case, q=q_buf[:, :, :Hq].transpose(1, 2), k_cache=k_buf[:, :, :120],
                   slot_pos=case["slot_pos"].to(torch.int32))
    out = decode_attention_triton(**strided)
    torch.testing.assert_close(out, decode_attention_reference(**case), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("layout", ["dense", "ring"])
def test_fp16(layout):
    """Half-precision operands (bf16 dots are unsupported by the interpreter; GPU-checked)."""
    case = _make_case(layout, B=2, Hkv=2, G=4, N=300, D=128, with_qsink=True,
                      dtype=torch.float16, seed=11)
    out = decode_attention_triton(**case)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, decode_attention_reference(**case), atol=5e-3, rtol=1e-2)
