"""The selection ops' top-k on the GPU: one Triton program per row finds the k-th largest score by a radix
select over order-preserving integer keys, then writes the chosen slots in slot order.

`sparse_attention.topk_slots` defines the result: the `k` slots with the highest scores, equal scores by the
lower slot, slots scoring -inf (and the tail when a row has fewer than `k` slots) pointing at the scratch slot.
Each score becomes a uint32 key that orders like the float (`-0.0` counted as `0.0`), made again from the score
in every pass rather than stored. The first pass counts the keys' top byte; one pass per remaining byte counts
that byte among the keys that share the bytes chosen so far; each count keeps the byte at which the keys from the
top reach what is still to be taken. The last pass takes every key above the threshold found and, in slot order,
as many keys equal to it as are still needed.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompile.ops.dependent_launch import dependent_launch

try:
    import triton
    import triton.language as tl
except ImportError:  # the module stays importable; calling the kernel raises instead
    triton = None

__all__ = ["topk_slots_triton"]

_BLOCK = 4096  # scores a loop step; the histograms' 256 bins are summed over the steps


if triton is not None:
    from kvcompile.ops.dependent_launch import wait_for_producers

    @triton.jit
    def _keys(SCORES, offs, mask):
        """uint32 keys that order like the float32 scores at `offs` (0 where not `mask`): non-negative floats
        get their sign bit set, negative ones have every bit inverted; -0.0 counts as 0.0."""
        x = tl.load(SCORES + offs, mask=mask, other=0.0)
        x = tl.where(x == 0.0, 0.0, x)
        negative = (x.to(tl.int32, bitcast=True) >> 31).to(tl.uint32, bitcast=True)  # all ones where negative
        return x.to(tl.uint32, bitcast=True) ^ (negative | tl.full(x.shape, 0x80000000, tl.uint32))

    @triton.jit
    def _choose_byte(counts, prefix, remaining):
        """Extend `prefix` (the threshold's bytes so far) by the byte at which the keys counted by byte in
        `counts` reach the `remaining`-th largest, counting from the top; returns the new prefix and the rank
        of the threshold among the keys that share it (after the last byte: how many keys equal to the
        threshold are still to be taken)."""
        digits = tl.arange(0, 256)
        at_or_above = tl.cumsum(counts, 0, reverse=True)
        chosen = tl.max(tl.where(at_or_above >= remaining, digits, -1), 0)
        above = tl.sum(tl.where(digits > chosen, counts, 0), 0)
        return (prefix << 8) | chosen.to(tl.uint32), remaining - above

    @triton.jit
    def _topk_kernel(SCORES, OUT, N, k, scratch, BLOCK: tl.constexpr, PDL: tl.constexpr):
        """Row `program_id(0)` of SCORES [R, N] float32: its `k` output slots in OUT [R, k], of which the first
        min(k, N) are chosen and the rest are `scratch`."""
        wait_for_producers(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs = tl.arange(0, BLOCK)
        scores = SCORES + row * N
        take = tl.minimum(k, N)

        counts = tl.zeros([256], tl.int32)
        for n0 in range(0, N, BLOCK):
            mask = n0 + offs < N
            counts += tl.histogram((_keys(scores, n0 + offs, mask) >> 24).to(tl.int32), 256, mask=mask)
        prefix, remaining = _choose_byte(counts, tl.zeros([], tl.uint32), take)
        for shift in tl.static_range(16, -8, -8):
            counts = tl.zeros([256], tl.int32)
            for n0 in range(0, N, BLOCK):
                mask = n0 + offs < N
                key = _keys(scores, n0 + offs, mask)
                counts += tl.histogram(((key >> shift) & 255).to(tl.int32), 256,
                                       mask=mask & ((key >> (shift + 8)) == prefix))
            prefix, remaining = _choose_byte(counts, prefix, remaining)

        # Every key above the threshold and the first `remaining` equal to it, in slot order.
        taken = tl.zeros([], tl.int32)
        equal_seen = tl.zeros([], tl.int32)
        for n0 in range(0, N, BLOCK):
            mask = n0 + offs < N
            key = _keys(scores, n0 + offs, mask)
            equal = (mask & (key == prefix)).to(tl.int32)
            pick = (mask & ((key > prefix) | ((equal == 1) & (equal_seen + tl.cumsum(equal, 0) <= remaining))))
            pick = pick.to(tl.int32)
            # 0x007FFFFF is the key of -inf; keys at or below it (-inf, negative NaNs) select nothing.
            slot = tl.where(key <= 0x007FFFFF, scratch, n0 + offs).to(tl.int64)
            tl.store(OUT + row * k + taken + tl.cumsum(pick, 0) - 1, slot, mask=pick == 1)
            taken += tl.sum(pick, 0)
            equal_seen += tl.sum(equal, 0)
        for j0 in range(take, k, BLOCK):
            tl.store(OUT + row * k + j0 + offs, tl.full([BLOCK], scratch, tl.int64), mask=j0 + offs < k)


def topk_slots_triton(scores: Tensor, k: int, scratch: int) -> Tensor:
    """`sparse_attention.topk_slots` in one kernel: int64 [..., k] slots of `scores` [..., N] (float32 or a
    dtype that converts to it; no NaN), in slot order (slots scoring -inf read as `scratch`), then the tail."""
    if triton is None:
        raise ImportError("topk_slots_triton needs Triton: pip install triton")
    *lead, n = scores.shape
    out = torch.empty(*lead, k, device=scores.device, dtype=torch.int64)
    if out.numel() == 0:
        return out
    if n == 0:
        return out.fill_(scratch)
    rows = scores.reshape(-1, n).float().contiguous()
    pdl = dependent_launch(scores)
    _topk_kernel[(rows.shape[0],)](rows, out, n, k, scratch, BLOCK=_BLOCK, PDL=pdl, num_warps=8, launch_pdl=pdl)
    return out
