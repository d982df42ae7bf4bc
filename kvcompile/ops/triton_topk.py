"""The selection ops' top-k on the GPU: a radix select over order-preserving integer keys, each row split across
programs, in four counting launches and one writing launch.

`sparse_attention.topk_slots` defines the result: the `k` slots with the highest scores, equal scores by the
lower slot, slots scoring -inf (and the tail when a row has fewer than `k` slots) pointing at the scratch slot.
Each score becomes a uint32 key that orders like the float (`-0.0` counted as `0.0`), made again from the score
in every launch rather than stored. A row is cut into chunks of `_CHUNK` scores, one program each. Counting
launch p adds to the row's totals how often each value of byte p (from the top) occurs among the chunk's keys
that share the bytes chosen before; from the totals every later program chooses, byte by byte, where the keys
from the top reach what is still to be taken, which ends at the threshold key. The last counting launch also
keeps, per chunk, how many keys lie above and equal the threshold for each possible last byte, so that each
program of the writing launch knows where its chunk's keys go: every key above the threshold and, counting from
the lowest slot, as many keys equal to it as are still needed, in slot order.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompile.ops.dependent_launch import dependent_launch
from kvcompile.ops.triton_support import require_triton, tl, triton

__all__ = ["topk_slots_triton"]

_CHUNK = 2048  # scores a program reads in each launch
_NUM_WARPS = 4  # with chunks of 2,048: 66 µs against 92 µs with 8 warps (H100, 64 rows of 32k)


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
    def _threshold(TOTALS, row, rows, take, BYTES: tl.constexpr):
        """The threshold's first `BYTES` bytes from one row's byte counts TOTALS [4, rows, 256], whose `take`
        largest keys are wanted: (prefix, remaining), `remaining` being the threshold's rank among the keys that
        share the prefix (after all four bytes: how many keys equal to the threshold are still to be taken)."""
        digits = tl.arange(0, 256)
        prefix = tl.zeros([], tl.uint32)
        remaining = take
        for byte in tl.static_range(BYTES):
            counts = tl.load(TOTALS + (byte * rows + row.to(tl.int64)) * 256 + digits)
            at_or_above = tl.cumsum(counts, 0, reverse=True)
            chosen = tl.max(tl.where(at_or_above >= remaining, digits, -1), 0)
            remaining -= tl.sum(tl.where(digits > chosen, counts, 0), 0)
            prefix = (prefix << 8) | chosen.to(tl.uint32)
        return prefix, remaining

    @triton.jit
    def _count_kernel(SCORES, TOTALS, ABOVE, EQUAL, N, k, BYTE: tl.constexpr, CHUNK: tl.constexpr,
                      PDL: tl.constexpr):
        """Counting launch BYTE for row `program_id(0)` of SCORES [R, N] float32 and chunk `program_id(1)`: adds
        to TOTALS[BYTE, row] how often each value of byte BYTE occurs among the chunk's keys that share the first
        BYTE bytes of the threshold. The last one also stores, for each possible last byte d, how many of the
        chunk's keys lie above (ABOVE) and equal (EQUAL) the threshold ending in d: [R, chunks, 256] each."""
        wait_for_producers(PDL)
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        rows = tl.num_programs(0)
        offs = chunk * CHUNK + tl.arange(0, CHUNK)
        mask = offs < N
        key = _keys(SCORES + row.to(tl.int64) * N, offs, mask)
        prefix, _ = _threshold(TOTALS, row, rows, tl.minimum(k, N), BYTE)
        shift: tl.constexpr = 24 - 8 * BYTE
        shares = mask
        if BYTE > 0:
            shares = mask & ((key >> (shift + 8)) == prefix)
        counts = tl.histogram(((key >> shift) & 255).to(tl.int32), 256, mask=shares)
        digits = tl.arange(0, 256)
        tl.atomic_add(TOTALS + (BYTE * rows + row.to(tl.int64)) * 256 + digits, counts, sem="relaxed")
        if BYTE == 3:
            above_prefix = tl.sum((mask & ((key >> 8) > prefix)).to(tl.int32), 0)
            summary = (row.to(tl.int64) * tl.num_programs(1) + chunk) * 256 + digits
            tl.store(ABOVE + summary, above_prefix + tl.cumsum(counts, 0, reverse=True) - counts)
            tl.store(EQUAL + summary, counts)

    @triton.jit
    def _write_kernel(SCORES, TOTALS, ABOVE, EQUAL, OUT, N, k, scratch, CHUNK: tl.constexpr,
                      CHUNKS_BLOCK: tl.constexpr, PDL: tl.constexpr):
        """The chosen slots of row `program_id(0)` in chunk `program_id(1)`, written to OUT [R, k] after those of
        the chunks before; the first chunk's program also writes the tail (k above N) as `scratch`."""
        wait_for_producers(PDL)
        row = tl.program_id(0)
        chunk = tl.program_id(1)
        chunks = tl.num_programs(1)
        take = tl.minimum(k, N)
        threshold, remaining = _threshold(TOTALS, row, tl.num_programs(0), take, 4)
        # Per chunk: keys above the threshold, keys equal to it; those are taken from the lowest slot on.
        each = tl.arange(0, CHUNKS_BLOCK)
        summary = (row.to(tl.int64) * chunks + each) * 256 + (threshold & 255).to(tl.int32)
        above = tl.load(ABOVE + summary, mask=each < chunks, other=0)
        equal = tl.load(EQUAL + summary, mask=each < chunks, other=0)
        equal_before = tl.cumsum(equal, 0) - equal
        taken = above + tl.minimum(tl.maximum(remaining - equal_before, 0), equal)
        start = tl.sum(tl.where(each < chunk, taken, 0), 0)
        equal_seen = tl.sum(tl.where(each < chunk, equal, 0), 0)

        offs = chunk * CHUNK + tl.arange(0, CHUNK)
        mask = offs < N
        key = _keys(SCORES + row.to(tl.int64) * N, offs, mask)
        is_equal = (mask & (key == threshold)).to(tl.int32)
        pick = mask & ((key > threshold) | ((is_equal == 1) & (equal_seen + tl.cumsum(is_equal, 0) <= remaining)))
        pick = pick.to(tl.int32)
        # 0x007FFFFF is the key of -inf: taken keys at or below it (-inf, negative NaNs) are written as scratch.
        slot = tl.where(key <= 0x007FFFFF, scratch, offs).to(tl.int64)
        out = OUT + row.to(tl.int64) * k
        tl.store(out + start + tl.cumsum(pick, 0) - 1, slot, mask=pick == 1)
        if chunk == 0:
            for j0 in range(take, k, CHUNK):
                tail = j0 + tl.arange(0, CHUNK)
                tl.store(out + tail, tl.full([CHUNK], scratch, tl.int64), mask=tail < k)


def topk_slots_triton(scores: Tensor, k: int, scratch: int) -> Tensor:
    """`sparse_attention.topk_slots` in five launches after zeroing the totals: int64 [..., k] slots of `scores`
    [..., N] (float32 or a dtype that converts to it; no NaN), in slot order (slots scoring -inf read as
    `scratch`), then the tail."""
    require_triton("topk_slots_triton")
    *lead, n = scores.shape
    out = torch.empty(*lead, k, device=scores.device, dtype=torch.int64)
    if out.numel() == 0:
        return out
    if n == 0:
        return out.fill_(scratch)
    rows = scores.reshape(-1, n).float().contiguous()
    grid = (rows.shape[0], triton.cdiv(n, _CHUNK))
    totals = torch.zeros(4, grid[0], 256, device=scores.device, dtype=torch.int32)
    above, equal = (torch.empty(*grid, 256, device=scores.device, dtype=torch.int32) for _ in range(2))
    pdl = dependent_launch(scores)
    launch = dict(CHUNK=_CHUNK, PDL=pdl, num_warps=_NUM_WARPS, launch_pdl=pdl)
    for byte in range(4):
        _count_kernel[grid](rows, totals, above, equal, n, k, BYTE=byte, **launch)
    _write_kernel[grid](rows, totals, above, equal, out, n, k, scratch,
                        CHUNKS_BLOCK=triton.next_power_of_2(grid[1]), **launch)
    return out
