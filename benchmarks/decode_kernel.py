"""Check and time the split-K Triton decode kernel on a CUDA GPU.

Usage (from a checkout, on a GPU machine): ``python benchmarks/decode_kernel.py``.

For each shape it checks the kernel against the PyTorch reference in bf16 (dense cache, and a
shuffled ring cache with q_sink), then times with ``triton.testing.do_bench`` (median; it
flushes L2 before every call, so a small cache is not served from L2):
- the kernel on a full dense cache and on a ring cache (sinks + window over all N slots),
- ``scaled_dot_product_attention(enable_gqa=True)`` without a mask, the speed-of-light baseline.
Each is timed as an eager call and as the replay of a CUDA graph of that call: the eager time
includes host launch overhead wherever the GPU work is shorter than it, the graph time is the
GPU's. The floor is the K+V bytes over the device-to-device copy bandwidth measured here;
"x/floor" columns give floor / graph time, the fraction of that bandwidth reached.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
import triton.testing

# Runs from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kvcompile.ops.decode_reference import decode_attention_reference  # noqa: E402
from kvcompile.ops.triton_decode import decode_attention_triton  # noqa: E402

HQ, HKV, D = 32, 8, 128
SINKS = 4
DTYPE = torch.bfloat16


def copy_bandwidth() -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src), return_mode="median")
    return 2 * src.numel() / (ms * 1e-3)


def make_inputs(B: int, N: int, ring: bool, gen: torch.Generator):
    """Random bf16 inputs; a ring cache holds the sinks and the latest N - SINKS positions,
    in shuffled slots, with the window covering exactly those."""
    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=DTYPE)

    q_pos = torch.full((B,), N - 1, dtype=torch.long, device="cuda")
    pos = torch.arange(N, device="cuda").repeat(B, 1)
    if ring:
        q_pos += 5 * N  # the stream has run far past the cache's capacity
        pos[:, SINKS:] += q_pos[:, None] - (N - 1)
        pos = pos[:, torch.randperm(N, generator=gen, device="cuda")]
    return dict(
        q=randn(B, HQ, D),
        q_sink=randn(B, HQ, D) if ring else None,
        k_cache=randn(B, HKV, N, D),
        v_cache=randn(B, HKV, N, D),
        slot_pos=pos,
        q_pos=q_pos,
        sink_tokens=SINKS,
        window_tokens=N - SINKS if ring else 0,
        scale=1.0 / math.sqrt(D),
    )


def bench(fn) -> tuple[float, float]:
    """Median ms of ``fn`` called eagerly and replayed from a CUDA graph."""
    eager = triton.testing.do_bench(fn, return_mode="median")  # also warms up / compiles
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return eager, triton.testing.do_bench(graph.replay, return_mode="median")


def check(args) -> float:
    """Relative L2 error of the kernel against the fp32 reference; raises past bf16 noise."""
    out = decode_attention_triton(**args).float()
    ref = decode_attention_reference(**args).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    if not math.isfinite(rel) or rel > 1e-2:
        raise AssertionError(f"kernel differs from reference: relative error {rel:.2e}")
    return rel


def main() -> None:
    if not torch.cuda.is_available():
        sys.exit("needs a CUDA GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write)")

    rows = []
    for B in (1, 8):
        for N in (4096, 32768):
            dense, ring = make_inputs(B, N, False, gen), make_inputs(B, N, True, gen)
            errs = (check(dense), check(ring))
            q4 = dense["q"][:, :, None]  # SDPA wants [B, H, L=1, D]
            k, v = dense["k_cache"], dense["v_cache"]
            times = [bench(lambda: decode_attention_triton(**dense)),
                     bench(lambda: decode_attention_triton(**ring)),
                     bench(lambda: F.scaled_dot_product_attention(q4, k, v, enable_gqa=True))]
            floor = 2 * k.numel() * k.element_size() / bw * 1e3  # ms
            rows.append((B, N, floor, times, max(errs)))

    print("\nms as eager/graph; x/floor = floor / graph time")
    print(f"{'B':>2} {'N':>6} {'floor':>7} {'dense':>15} {'ring':>15} {'sdpa':>15} "
          f"{'dense/floor':>11} {'ring/floor':>10} {'sdpa/floor':>10} {'rel err':>8}")
    for B, N, floor, times, err in rows:
        cells = " ".join(f"{e:7.4f}/{g:<7.4f}" for e, g in times)
        fracs = " ".join(f"{floor / g:>{w}.2f}" for (_, g), w in zip(times, (11, 10, 10)))
        print(f"{B:>2} {N:>6} {floor:7.4f} {cells} {fracs} {err:8.1e}")


if __name__ == "__main__":
    main()
