"""TokenSelect's choice on the GPU (`tokenselect_indices`' fast path) in a fixed sequence of kernels.

1. `_candidates_kernel`, one program per (row, chunk of slots): which slots the query sees, which of those are
   pinned (the first `init_tokens` and the newest `local_tokens - 1` positions); the rest, the candidates, as a
   mask; the chunk's counts of pinned and visible slots.
2. `_flags_kernel`, one program per row: from the counts and the cosine similarity of the query to the last fresh
   choice's, whether the row reads every visible slot (they fit in the budget), reuses its stored choice, or
   chooses afresh (then the query's fingerprint is stored).
3. The criticality scores, q·k of every head over every slot: `decode_over_slots` scoring only, rows that do not
   choose afresh skipped on the device.
4. The per-head soft votes (`soft_votes_triton`: per head and chunk of slots a max and a sum of exponentials,
   then per block of slots every head's probability summed), and their top-k (`kvcompile.ops.triton_topk`).
5. `_assemble_kernel`, the read set of every KV head: one program per (row, chunk) lists the chunk's pinned slots
   (every visible one in a row that reads them all) after those of the chunks before it; one per (row, block)
   places that block of the choice (the stored one or the fresh one) after them, entry j at place j with scratch
   for entries that are no longer visible candidates, and scratch past the end; a fresh choice is stored. Only
   when the whole choice would not fit (more slots pinned than the budget plans for, as when a cached slot
   holds the query's own position) are the valid entries compacted.

The definition (`sparse_attention.tokenselect_choice`) builds the read set from masks with a second top-k; the
kernels give the same slots in another order (attention does not depend on it). Nothing syncs with the host, so
the step stays capturable in CUDA graphs. Everything here also runs on CPU tensors under `TRITON_INTERPRET=1`.
"""
from __future__ import annotations

import torch
from torch import Tensor

from kvcompile.ops.dependent_launch import dependent_launch
from kvcompile.ops.sparse_attention import SIMILARITY_SLACK
from kvcompile.ops.triton_sparse_decode import decode_over_slots
from kvcompile.ops.triton_support import require_triton, tl, triton
from kvcompile.ops.triton_topk import topk_slots_triton

__all__ = ["soft_votes_triton", "tokenselect_step"]

_CHUNK = 2048  # slots per (row, chunk) program
_OUT_BLOCK = 1024  # read-set entries per (row, block) program

if triton is not None:
    from kvcompile.ops.dependent_launch import wait_for_producers
    from kvcompile.ops.triton_decode import _visible

    @triton.jit
    def _chunk_slots(POS, QPOS, b, chunk, stride_pb, stride_pn, N, sink_tokens, window_tokens, init_tokens,
                     local_tokens, CHUNK: tl.constexpr, WINDOWED: tl.constexpr):
        """The slots of one chunk of row `b`, and which of them the query sees and which of those are pinned."""
        offs = chunk * CHUNK + tl.arange(0, CHUNK)
        pos = tl.load(POS + b * stride_pb + offs * stride_pn, mask=offs < N, other=-1)
        visible, pinned = _visibility(pos, tl.load(QPOS + b), sink_tokens, window_tokens, init_tokens,
                                      local_tokens, WINDOWED)
        return offs, visible, pinned

    @triton.jit
    def _visibility(pos, qp, sink_tokens, window_tokens, init_tokens, local_tokens, WINDOWED: tl.constexpr):
        """(visible, pinned) for slots holding positions `pos`, seen from query position `qp`."""
        visible = _visible(pos, qp, sink_tokens, window_tokens, WINDOWED)
        return visible, visible & ((pos < init_tokens) | (pos > qp - local_tokens))

    @triton.jit
    def _candidates_kernel(POS, QPOS, MIDDLE, COUNTS, stride_pb, stride_pn, N, sink_tokens, window_tokens,
                           init_tokens, local_tokens, CHUNK: tl.constexpr, WINDOWED: tl.constexpr,
                           PDL: tl.constexpr):
        """One chunk of one row: the candidate mask MIDDLE [B, N] (int8), and COUNTS [B, chunks, 2] = the
        chunk's pinned and visible slots."""
        wait_for_producers(PDL)
        b = tl.program_id(0).to(tl.int64)
        chunk = tl.program_id(1)
        offs, visible, pinned = _chunk_slots(POS, QPOS, b, chunk, stride_pb, stride_pn, N, sink_tokens,
                                             window_tokens, init_tokens, local_tokens, CHUNK, WINDOWED)
        tl.store(MIDDLE + b * N + offs, (visible & ~pinned).to(tl.int8), mask=offs < N)
        count = COUNTS + (b * tl.num_programs(1) + chunk) * 2
        tl.store(count, tl.sum(pinned.to(tl.int32), 0))
        tl.store(count + 1, tl.sum(visible.to(tl.int32), 0))

    @triton.jit
    def _flags_kernel(COUNTS, FP, CACHED_FP, FLAGS, SKIP, stride_fb, stride_fh, stride_fd, chunks, num_selected,
                      threshold, F: tl.constexpr, D: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_C: tl.constexpr,
                      PDL: tl.constexpr):
        """One row: FLAGS [B, 2] = (reuse, refresh), SKIP [B] = 1 unless the row chooses afresh; a fresh choice's
        query fingerprint FP goes to CACHED_FP [B, F]."""
        wait_for_producers(PDL)
        b = tl.program_id(0).to(tl.int64)
        c = tl.arange(0, BLOCK_C)
        n_visible = tl.sum(tl.load(COUNTS + (b * chunks + c) * 2 + 1, mask=c < chunks, other=0), 0)
        offs_f = tl.arange(0, BLOCK_F)
        f_mask = offs_f < F
        fingerprint = tl.load(FP + b * stride_fb + (offs_f // D) * stride_fh + (offs_f % D) * stride_fd,
                              mask=f_mask, other=0.0).to(tl.float32)
        cached = tl.load(CACHED_FP + b * F + offs_f, mask=f_mask, other=0.0)
        norms = tl.sqrt(tl.sum(fingerprint * fingerprint, 0)) * tl.sqrt(tl.sum(cached * cached, 0))
        similarity = tl.where(norms > 0, tl.sum(fingerprint * cached, 0) / tl.maximum(norms, 1e-30), 0.0)
        sparse = (n_visible > num_selected).to(tl.int32)
        reuse = sparse * (similarity >= threshold).to(tl.int32)
        refresh = sparse - reuse
        tl.store(FLAGS + b * 2, reuse)
        tl.store(FLAGS + b * 2 + 1, refresh)
        tl.store(SKIP + b, 1 - refresh)
        if refresh != 0:
            tl.store(CACHED_FP + b * F + offs_f, fingerprint, mask=f_mask)

    @triton.jit
    def _assemble_kernel(POS, QPOS, COUNTS, FLAGS, FRESH, SELECTED, INDICES, stride_pb, stride_pn, N, chunks,
                         num_selected, top_k, scratch, sink_tokens, window_tokens, init_tokens, local_tokens,
                         KV_HEADS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, BLOCK_C: tl.constexpr,
                         WINDOWED: tl.constexpr, PDL: tl.constexpr):
        """Row b's read set INDICES [B, KV_HEADS, num_selected]: programs (b, chunk < chunks) list the chunk's
        pinned slots (a sparse row) or visible ones (a dense row); programs (b, chunks + i) place block i of the
        choice (FRESH [B, top_k] or the stored SELECTED [B, top_k]) after them, fill block i of the set's tail
        with scratch, and store a fresh choice."""
        wait_for_producers(PDL)
        b = tl.program_id(0).to(tl.int64)
        program = tl.program_id(1)
        c = tl.arange(0, BLOCK_C)
        pinned_counts = tl.load(COUNTS + (b * chunks + c) * 2, mask=c < chunks, other=0)
        visible_counts = tl.load(COUNTS + (b * chunks + c) * 2 + 1, mask=c < chunks, other=0)
        sparse = tl.sum(visible_counts, 0) > num_selected
        listed_counts = tl.where(sparse, pinned_counts, visible_counts)
        out = INDICES + b * KV_HEADS * num_selected
        if program < chunks:
            # (Names differ from the other branch's: compiled Triton types a name alike in both branches.)
            slots, slot_visible, slot_pinned = _chunk_slots(POS, QPOS, b, program, stride_pb, stride_pn, N,
                                                            sink_tokens, window_tokens, init_tokens, local_tokens,
                                                            CHUNK, WINDOWED)
            listed = tl.where(sparse, slot_pinned, slot_visible)
            if tl.sum(listed.to(tl.int32), 0) > 0:
                before = tl.sum(tl.where(c < program, listed_counts, 0), 0)
                rank = before + tl.cumsum(listed.to(tl.int32), 0) - 1
                for h in range(KV_HEADS):
                    tl.store(out + h * num_selected + rank, slots.to(tl.int64), mask=listed & (rank < num_selected))
        else:
            block = program - chunks
            lanes = tl.arange(0, BLOCK)
            offs = block * BLOCK + lanes
            reuse = tl.load(FLAGS + b * 2 + lanes * 0) != 0  # the row's flags, in every lane
            refresh = tl.load(FLAGS + b * 2 + 1 + lanes * 0) != 0
            qp = tl.load(QPOS + b)
            chosen, valid = _choice(POS, FRESH, SELECTED, b, offs, reuse, refresh, qp, stride_pb, stride_pn, top_k,
                                    scratch, sink_tokens, window_tokens, init_tokens, local_tokens, WINDOWED)
            n_listed = tl.sum(listed_counts, 0)
            if n_listed + top_k <= num_selected:
                # The whole choice fits (every step but a rare one): entry j goes to n_listed + j, scratch where it
                # is not a valid choice; the same slots as compacting them, without counting earlier blocks.
                rank = n_listed + offs
                entry = tl.where(valid, chosen, scratch)
                placed = offs < top_k
                tail = (offs >= n_listed + top_k) & (offs < num_selected)
            else:
                # Block i goes after the listed slots and the valid choices of the blocks before it (an entry that
                # is no longer a visible candidate is dropped, as the definition drops it); scratch past them all.
                before = 0
                total = 0
                for first in range(0, top_k, BLOCK):
                    _, counted = _choice(POS, FRESH, SELECTED, b, first + lanes, reuse, refresh, qp, stride_pb,
                                         stride_pn, top_k, scratch, sink_tokens, window_tokens, init_tokens,
                                         local_tokens, WINDOWED)
                    count = tl.sum(counted.to(tl.int32), 0)
                    before += tl.where(first < block * BLOCK, count, 0)
                    total += count
                rank = n_listed + before + tl.cumsum(valid.to(tl.int32), 0) - 1
                entry = chosen
                placed = valid & (rank < num_selected)
                tail = (offs >= n_listed + total) & (offs < num_selected)
            for h in range(KV_HEADS):
                tl.store(out + h * num_selected + rank, entry, mask=placed)
                tl.store(out + h * num_selected + offs, tl.full([BLOCK], scratch, tl.int64), mask=tail)
            if tl.load(FLAGS + b * 2 + 1) != 0:  # a fresh choice: store it
                keep = offs < top_k
                tl.store(SELECTED + b * top_k + offs, tl.load(FRESH + b * top_k + offs, mask=keep), mask=keep)

    @triton.jit
    def _choice(POS, FRESH, SELECTED, b, j, reuse, refresh, qp, stride_pb, stride_pn, top_k, scratch, sink_tokens,
                window_tokens, init_tokens, local_tokens, WINDOWED: tl.constexpr):
        """Entries `j` of row b's choice (the stored one where `reuse`, the fresh one where `refresh`): their
        slots, and which are still visible candidates (visible, not pinned)."""
        in_choice = (j < top_k) & (reuse | refresh)
        chosen = tl.where(reuse, tl.load(SELECTED + b * top_k + j, mask=in_choice & reuse, other=scratch),
                          tl.load(FRESH + b * top_k + j, mask=in_choice & refresh, other=scratch))
        pos = tl.load(POS + b * stride_pb + chosen * stride_pn, mask=in_choice, other=-1)
        visible, pinned = _visibility(pos, qp, sink_tokens, window_tokens, init_tokens, local_tokens, WINDOWED)
        return chosen, in_choice & visible & ~pinned

    @triton.jit
    def _vote_partials_kernel(LOGITS, CANDIDATES, MAX, SUM, N, HQ, CHUNK: tl.constexpr, PDL: tl.constexpr):
        """For one (row, query head) and a chunk of slots: the largest logit among the candidate slots and the
        sum of exp(logit - it) over them (-inf and 0 without candidates; -inf and NaN when every candidate's logit
        is -inf, which `_votes_kernel` leaves out like the former)."""
        wait_for_producers(PDL)
        head = tl.program_id(0).to(tl.int64)  # row * HQ + query head
        chunk = tl.program_id(1)
        offs = chunk * CHUNK + tl.arange(0, CHUNK)
        n_mask = offs < N
        candidate = tl.load(CANDIDATES + (head // HQ) * N + offs, mask=n_mask, other=0) != 0
        x = tl.load(LOGITS + head * N + offs, mask=candidate, other=float("-inf"))
        largest = tl.max(x, 0)
        total = tl.sum(tl.where(candidate, tl.exp(x - largest), 0.0), 0)
        tl.store(MAX + head * tl.num_programs(1) + chunk, largest)
        tl.store(SUM + head * tl.num_programs(1) + chunk, total)

    @triton.jit
    def _votes_kernel(LOGITS, CANDIDATES, MAX, SUM, VOTES, N, HQ, CHUNKS, BLOCK_H: tl.constexpr,
                      BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
        """For one row and a block of slots: each query head's softmax over the row's candidate slots (its
        log-sum-exp from the chunks' partials), summed over the heads; -inf off the candidates."""
        wait_for_producers(PDL)
        row = tl.program_id(0).to(tl.int64)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        heads = tl.arange(0, BLOCK_H)
        chunks = tl.arange(0, BLOCK_C)
        partial = (row * HQ + heads[:, None]) * CHUNKS + chunks[None, :]
        partial_mask = (heads < HQ)[:, None] & (chunks < CHUNKS)[None, :]
        largest = tl.load(MAX + partial, mask=partial_mask, other=float("-inf"))
        head_max = tl.max(largest, 1)
        seen = largest > float("-inf")
        total = tl.sum(tl.where(seen, tl.load(SUM + partial, mask=partial_mask, other=0.0)
                                * tl.exp(largest - head_max[:, None]), 0.0), 1)
        lse = head_max + tl.log(total)  # -inf for a head without candidates (it votes nothing)
        n_mask = offs_n < N
        candidate = tl.load(CANDIDATES + row * N + offs_n, mask=n_mask, other=0) != 0
        x = tl.load(LOGITS + (row * HQ + heads[:, None]) * N + offs_n[None, :],
                    mask=(heads < HQ)[:, None] & candidate[None, :], other=float("-inf"))
        counted = (x > float("-inf")) & (lse > float("-inf"))[:, None]
        votes = tl.sum(tl.where(counted, tl.exp(x - lse[:, None]), 0.0), 0)
        tl.store(VOTES + row * N + offs_n, tl.where(candidate, votes, float("-inf")), mask=n_mask)


def soft_votes_triton(logits: Tensor, candidates: Tensor) -> Tensor:
    """`sparse_attention.soft_votes` (TokenSelect's criterion) in two kernels: each (row, query head, chunk of
    slots) reduces its candidates' logits to a max and a sum of exponentials, then each (row, block of slots)
    sums every head's probability. `logits` [B, Hq, N] float32, `candidates` [B, N] bool (or int8 0/1) -> votes
    [B, N]."""
    require_triton("the TokenSelect kernels")
    B, Hq, N = logits.shape
    votes = torch.empty(B, N, device=logits.device, dtype=torch.float32)
    if votes.numel() == 0:
        return votes
    CHUNK, BLOCK_N = 4096, 256
    chunks = triton.cdiv(N, CHUNK)
    largest, total = (torch.empty(B * Hq, chunks, device=logits.device, dtype=torch.float32) for _ in range(2))
    logits, flags = logits.float().contiguous(), candidates.to(torch.int8).contiguous()
    pdl = dependent_launch(logits)
    _vote_partials_kernel[(B * Hq, chunks)](logits, flags, largest, total, N, Hq, CHUNK=CHUNK, PDL=pdl,
                                            num_warps=4, launch_pdl=pdl)
    _votes_kernel[(B, triton.cdiv(N, BLOCK_N))](
        logits, flags, largest, total, votes, N, Hq, chunks, BLOCK_H=triton.next_power_of_2(Hq),
        BLOCK_C=triton.next_power_of_2(chunks), BLOCK_N=BLOCK_N, PDL=pdl, num_warps=4, launch_pdl=pdl)
    return votes


def tokenselect_step(q: Tensor, q_fingerprint: Tensor, k_cache: Tensor, slot_pos: Tensor, positions: Tensor,
                     fingerprints: Tensor, selected: Tensor, sink_tokens: int, window_tokens: int, init_tokens: int,
                     local_tokens: int, top_k: int, threshold: float) -> Tensor:
    """`sparse_attention.tokenselect_indices` for a decode query `q` [B, Hq, 1, D] on the kernels: int64
    [B, Hkv, init_tokens + local_tokens - 1 + top_k] slots; updates the selection cache (`fingerprints` [B, Hq * D]
    float32, `selected` [B, top_k] int64) in place."""
    require_triton("the TokenSelect kernels")
    B, Hq, _, D = q.shape
    Hkv, N = k_cache.shape[1], k_cache.shape[2]
    num_selected = init_tokens + local_tokens - 1 + top_k
    if (fingerprints.shape != (B, Hq * D) or fingerprints.dtype != torch.float32 or not fingerprints.is_contiguous()
            or selected.shape != (B, top_k) or selected.dtype != torch.long or not selected.is_contiguous()):
        raise ValueError(f"tokenselect_step needs contiguous selection-cache buffers: fingerprints float32 "
                         f"{(B, Hq * D)} and selected int64 {(B, top_k)}, got {fingerprints.dtype} "
                         f"{tuple(fingerprints.shape)} and {selected.dtype} {tuple(selected.shape)}")
    device = q.device
    indices = torch.empty(B, Hkv, num_selected, device=device, dtype=torch.long)
    if B == 0:
        return indices
    q_pos = positions[:, -1].contiguous()
    fingerprint = q_fingerprint[:, :, -1]
    chunks = triton.cdiv(N, _CHUNK)
    middle = torch.empty(B, N, device=device, dtype=torch.int8)
    counts = torch.empty(B, chunks, 2, device=device, dtype=torch.int32)
    flags = torch.empty(B, 2, device=device, dtype=torch.int32)
    skip = torch.empty(B, device=device, dtype=torch.int32)
    pdl = dependent_launch(q)
    visibility = dict(sink_tokens=sink_tokens, window_tokens=window_tokens, init_tokens=init_tokens,
                      local_tokens=local_tokens, WINDOWED=window_tokens > 0, PDL=pdl, launch_pdl=pdl)
    _candidates_kernel[(B, chunks)](slot_pos, q_pos, middle, counts, *slot_pos.stride(), N, CHUNK=_CHUNK,
                                    num_warps=4, **visibility)
    _flags_kernel[(B,)](counts, fingerprint, fingerprints, flags, skip, *fingerprint.stride(), chunks, num_selected,
                        float(threshold) - SIMILARITY_SLACK, F=Hq * D, D=D, BLOCK_F=triton.next_power_of_2(Hq * D),
                        BLOCK_C=triton.next_power_of_2(chunks), PDL=pdl, num_warps=8, launch_pdl=pdl)
    # Scoring only, at scale 1 (the criticality is the unscaled q·k); the new-token arguments are not read.
    _, _, scores = decode_over_slots(q[:, :, 0], None, k_cache[:, :, 0], k_cache[:, :, 0], k_cache, k_cache, slot_pos,
                                     q_pos, None, sink_tokens, window_tokens, 1.0, scores=True, compute_out=False,
                                     skip=skip)
    fresh = topk_slots_triton(soft_votes_triton(scores.view(B, Hq, N), middle), top_k, N - 1)
    _assemble_kernel[(B, chunks + triton.cdiv(num_selected, _OUT_BLOCK))](
        slot_pos, q_pos, counts, flags, fresh, selected, indices, *slot_pos.stride(), N, chunks, num_selected, top_k,
        N - 1, KV_HEADS=Hkv, CHUNK=_CHUNK, BLOCK=_OUT_BLOCK, BLOCK_C=triton.next_power_of_2(chunks), num_warps=4,
        **visibility)
    return indices
