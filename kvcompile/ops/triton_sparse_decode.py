"""Triton kernel for token-selection decoding: one split-K GQA decode kernel over gathered slots.

`decode_over_slots` is the shared attention kernel. Its grid is (batch, KV head, split); each program loads the
G query heads of one KV head and streams its share of a list of cache slots in blocks with an online softmax,
like `kvcompile.ops.triton_decode`, but the list is either every slot (`indices=None`) or that KV head's own
selected slots, which are gathered inside the kernel (the block of slot numbers is loaded, then their positions,
keys and values; no gathered K/V copy is materialised). The new token, not yet in the cache, is folded into the
first split. A second kernel merges the splits and, on request, writes each query head's log-sum-exp. The same
kernel can also store every raw score (for selection) and skip computing the output (scoring only), and can skip
whole rows by a device-side flag (TokenSelect rows that do not choose afresh), so nothing syncs with the host
and decode steps stay capturable in CUDA graphs.

A selection layer's criterion, each KV head's attention mass per slot, comes from the stored scores and
log-sum-exps in one more kernel (`group_mass`); the top-k after it is `kvcompile.ops.sparse_attention.topk_slots`
(on the GPU a Triton radix select, `kvcompile.ops.triton_topk`). TokenSelect's choice, which scores with this
kernel too, has its own kernels (`kvcompile.ops.triton_tokenselect`).

Everything here also runs on CPU tensors under `TRITON_INTERPRET=1` (that is how the tests run it).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from kvcompile.ops.dependent_launch import dependent_launch
from kvcompile.ops.triton_decode import (_LOG2E, _MAX_SPLITS, _PROGRAMS_PER_SM, _launch_config, _num_sms,
                                         _split_plan, merge_splits)
from kvcompile.ops.triton_support import require_triton, tl, triton

__all__ = ["decode_over_slots", "group_mass", "select_decode_step", "sparse_decode_step"]


if triton is not None:
    from kvcompile.ops.dependent_launch import wait_for_producers
    from kvcompile.ops.triton_decode import _query_group, _softmax_step, _store_partials, _visible

    @triton.jit
    def _slots_split_kernel(
        Q, QS, KN, VN, K, V, POS, QPOS, IDX, SKIP, WS, SC,
        stride_qb, stride_qh, stride_qd,
        stride_sb, stride_sh, stride_sd,
        stride_knb, stride_knh, stride_knd,
        stride_vnb, stride_vnh, stride_vnd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_pb, stride_pn,
        stride_ib, stride_ih, stride_in,
        M, chunk_len, sink_tokens, window_tokens, qk_scale, score_scale,
        G: tl.constexpr, D: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        GATHER: tl.constexpr, HAS_QSINK: tl.constexpr, WINDOWED: tl.constexpr, HAS_SKIP: tl.constexpr,
        STORE_SCORES: tl.constexpr, COMPUTE_OUT: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
    ):
        """Online softmax of the G heads of one KV head over one chunk of its slot list (+ the new token)."""
        wait_for_producers(PDL)
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)
        if HAS_SKIP:
            if tl.load(SKIP + b) != 0:
                return

        q, heads, offs_d, g_mask, d_mask, q_mask = _query_group(Q, b, kvh, stride_qb, stride_qh, stride_qd,
                                                                G, D, BLOCK_G, BLOCK_D)
        if HAS_QSINK:
            qs = tl.load(QS + b * stride_sb + heads[:, None] * stride_sh + offs_d[None, :] * stride_sd,
                         mask=q_mask, other=0.0)
        qp = tl.load(QPOS + b)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        if COMPUTE_OUT:
            if split == 0:  # the new token: position qp, always inside the window, visible unless padding
                kn = tl.load(KN + b * stride_knb + kvh * stride_knh + offs_d * stride_knd, mask=d_mask, other=0.0)
                vn = tl.load(VN + b * stride_vnb + kvh * stride_vnh + offs_d * stride_vnd, mask=d_mask, other=0.0)
                if HAS_QSINK:
                    qn = tl.where(qp < sink_tokens, qs, q)
                else:
                    qn = q
                s_new = tl.sum(qn.to(tl.float32) * kn.to(tl.float32)[None, :], 1) * qk_scale
                seen = qp >= 0
                m_i = tl.where(seen, s_new, m_i)
                l_i = tl.where(seen, 1.0, l_i)
                acc = tl.where(seen, vn.to(tl.float32)[None, :] + acc, acc)

        k_base = K + b * stride_kb + kvh * stride_kh + offs_d[None, :] * stride_kd
        v_base = V + b * stride_vb + kvh * stride_vh + offs_d[None, :] * stride_vd
        start = split * chunk_len
        end = tl.minimum(start + chunk_len, M)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            in_range = offs_n < end
            if GATHER:
                slot = tl.load(IDX + b * stride_ib + kvh * stride_ih + offs_n * stride_in, mask=in_range, other=0)
            else:
                slot = offs_n.to(tl.int64)
            pos = tl.load(POS + b * stride_pb + slot * stride_pn, mask=in_range, other=-1)
            is_sink = pos < sink_tokens
            vis = _visible(pos, qp, sink_tokens, window_tokens, WINDOWED)
            kv_mask = vis[:, None] & d_mask[None, :]
            k = tl.load(k_base + slot[:, None] * stride_kn, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            if HAS_QSINK:
                s_sink = tl.dot(qs, tl.trans(k), input_precision=DOT_PRECISION)
                s = tl.where(is_sink[None, :], s_sink, s)
            if STORE_SCORES:
                rows = (b * tl.num_programs(1) * G + heads) * M
                tl.store(SC + rows[:, None] + offs_n[None, :],
                         tl.where(vis[None, :], s * score_scale, float("-inf")),
                         mask=g_mask[:, None] & in_range[None, :])
            if COMPUTE_OUT:
                m_i, l_i, p, alpha = _softmax_step(tl.where(vis[None, :], s * qk_scale, float("-inf")), m_i, l_i)
                v = tl.load(v_base + slot[:, None] * stride_vn, mask=kv_mask, other=0.0)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)

        if COMPUTE_OUT:
            _store_partials(WS, acc, m_i, l_i, b, heads, split, offs_d, q_mask, g_mask, G, D)

    @triton.jit
    def _group_mass_kernel(SC, LSE, MASS, N, G: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                           PDL: tl.constexpr):
        """For one (row, KV head) and a block of slots: the attention probabilities `exp(score - lse)` of the
        group's G query heads, summed; -inf where no head sees the slot (every score -inf)."""
        wait_for_producers(PDL)
        group = tl.program_id(0).to(tl.int64)  # row * Hkv + KV head; its heads are rows group * G + g
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_g = tl.arange(0, BLOCK_G)
        n_mask = offs_n < N
        heads = group * G + offs_g
        lse = tl.load(LSE + heads, mask=offs_g < G, other=0.0)
        s = tl.load(SC + heads[:, None] * N + offs_n[None, :], mask=(offs_g < G)[:, None] & n_mask[None, :],
                    other=float("-inf"))
        seen = s > float("-inf")
        mass = tl.sum(tl.where(seen, tl.exp(s - lse[:, None]), 0.0), 0)
        tl.store(MASS + group * N + offs_n, tl.where(tl.max(seen.to(tl.int32), 0) > 0, mass, float("-inf")),
                 mask=n_mask)


_ONE_WARP_ROW_BYTES = 256  # a bf16 key row at head dim 128, the shape the one-warp launch was swept at


def _slots_launch_config(block_d: int, elem_size: int, gathered: bool, compute_out: bool, programs_per_split: int,
                         sms: int):
    """(BLOCK_N, num_warps, num_stages, programs per SM) of `decode_over_slots`.

    For key rows of at most `_ONE_WARP_ROW_BYTES`, gathered reads run one-warp programs, 8 per SM, over 32 slots
    a block; so do score-only full reads (64 slots a block) where the split cap leaves room for 8 programs per SM.
    Other reads, and wider rows (whose tiles would not fit one warp's registers), take the dense decode's
    four-warp launch. In a sweep on an H200 (8B shape, CUDA graphs), one-warp programs read 2,049 gathered slots
    per KV head in 24.0 against 25.3 µs at batch 8 (7.0 against 7.6 µs at batch 1) and scored 32k slots in 138
    against 161 µs at batch 8; at batch 1 (8 programs a split, at most 64 splits) scoring took 24.4 against
    22.4 µs, and full reads with outputs were no faster (269 µs either way at batch 8).
    """
    narrow = block_d * elem_size <= _ONE_WARP_ROW_BYTES
    if narrow and (gathered or (not compute_out and programs_per_split * _MAX_SPLITS >= 8 * sms)):
        return (32 if gathered else 64), 1, 2, 8
    return (*_launch_config(block_d, elem_size), _PROGRAMS_PER_SM)


def decode_over_slots(q: Tensor, q_sink: Optional[Tensor], k_new: Tensor, v_new: Tensor, k_cache: Tensor,
                      v_cache: Tensor, slot_pos: Tensor, q_pos: Tensor, indices: Optional[Tensor],
                      sink_tokens: int, window_tokens: int, scale: float, *, num_splits: Optional[int] = None,
                      with_lse: bool = False, scores: bool = False, score_scale: Optional[float] = None,
                      compute_out: bool = True, skip: Optional[Tensor] = None):
    """One query token per row over a list of cache slots plus the new token; returns `(out, lse, scores)`.

    Shapes: `q`/`q_sink` [B, Hq, D]; `k_new`/`v_new` [B, Hkv, D]; caches [B, Hkv, N, D]; `slot_pos` [B, N];
    `q_pos` [B]; `indices` [B, Hkv, M] int64 slot numbers per KV head, or None for all N slots. Semantics are
    `sparse_cached_attention`'s (visibility by position, sinks scored with `q_sink`). `out` [B, Hq, D] (None
    without `compute_out`); `lse` [B, Hq] natural log-sum-exp of the scaled scores (with `with_lse`); `scores`
    [B, Hkv, G, M] float32 raw q·k times `score_scale` (default `scale`), -inf where not visible (with
    `scores`). Rows with `skip[b] != 0` are not computed (their outputs are undefined).
    """
    require_triton("the sparse decode kernels")
    B, Hq, D = q.shape
    _, Hkv, N, _ = k_cache.shape
    if Hq % Hkv or v_cache.shape != k_cache.shape or tuple(k_new.shape) != (B, Hkv, D):
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k_new {tuple(k_new.shape)}, "
                         f"cache {tuple(k_cache.shape)}")
    G = Hq // Hkv
    M = N if indices is None else indices.shape[2]
    k_new, v_new = k_new.to(k_cache.dtype), v_new.to(v_cache.dtype)
    q, q_sink = q.to(k_cache.dtype), None if q_sink is None else q_sink.to(k_cache.dtype)
    out = torch.empty_like(q, memory_format=torch.contiguous_format) if compute_out else None
    lse = torch.empty(B, Hq, device=q.device, dtype=torch.float32) if with_lse else None
    sc = torch.empty(B, Hkv, G, M, device=q.device, dtype=torch.float32) if scores else None
    if B == 0:
        return out, lse, sc

    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_G = max(16, triton.next_power_of_2(G))
    BLOCK_N, num_warps, num_stages, per_sm = _slots_launch_config(BLOCK_D, k_cache.element_size(),
                                                                  indices is not None, compute_out, B * Hkv,
                                                                  _num_sms(q.device))
    splits, chunk_len = _split_plan(M, B * Hkv, BLOCK_N, q.device, num_splits, per_sm)
    ws = torch.empty(B * Hq * splits * (D + 2) if compute_out else 1, device=q.device, dtype=torch.float32)
    qs = q if q_sink is None else q_sink
    idx = indices if indices is not None else slot_pos  # any tensor; unused when not gathering
    idx_strides = indices.stride() if indices is not None else (0, 0, 0)
    flag = skip if skip is not None else q_pos
    pdl = dependent_launch(q)

    _slots_split_kernel[(B, Hkv, splits)](
        q, qs, k_new, v_new, k_cache, v_cache, slot_pos, q_pos, idx, flag, ws,
        sc if sc is not None else ws,
        *q.stride(), *qs.stride(), *k_new.stride(), *v_new.stride(), *k_cache.stride(), *v_cache.stride(),
        *slot_pos.stride(), *idx_strides,
        M, chunk_len, sink_tokens, window_tokens, scale * _LOG2E, scale if score_scale is None else score_scale,
        G=G, D=D, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
        GATHER=indices is not None, HAS_QSINK=q_sink is not None, WINDOWED=window_tokens > 0,
        HAS_SKIP=skip is not None, STORE_SCORES=scores, COMPUTE_OUT=compute_out,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None, PDL=pdl,
        num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )
    if compute_out:
        merge_splits(ws, out, splits, lse)
    return out, lse, sc


def group_mass(scores: Tensor, lse: Tensor) -> Tensor:
    """TidalDecode's selection criterion from a full read's `scores` [B, Hkv, G, N] (natural-log scaled
    scores, -inf where not visible) and each query head's log-sum-exp `lse` [B, Hkv * G]: the attention
    probabilities summed over each KV head's group, float32 [B, Hkv, N], -inf where no head sees the slot.
    One pass over the scores: 18 µs a call in the compiled tidaldecode step on the H100 (batch 8, 32k slots)
    where `torch.exp(scores - lse).sum(2)` and its masking took ~80 µs in ~8 kernels."""
    require_triton("the sparse decode kernels")
    B, Hkv, G, N = scores.shape
    mass = torch.empty(B, Hkv, N, device=scores.device, dtype=torch.float32)
    if mass.numel() == 0:
        return mass
    BLOCK_N = 1024
    pdl = dependent_launch(scores)
    _group_mass_kernel[(B * Hkv, triton.cdiv(N, BLOCK_N))](
        scores.contiguous(), lse.contiguous(), mass, N, G=G, BLOCK_G=triton.next_power_of_2(G), BLOCK_N=BLOCK_N,
        PDL=pdl, num_warps=4, launch_pdl=pdl)
    return mass


# --- the ops' fast paths (decode steps: q [B, Hq, 1, D]) -----------------------------------------------------
def sparse_decode_step(q, q_sink, k, v, k_cache, v_cache, slot_pos, positions, indices, sink_tokens,
                       window_tokens, scale):
    """`sparse_cached_attention` on the kernel: gathered slots + the new token, then the new token is stored."""
    from kvcompile.ops.decode import write_token
    out, _, _ = decode_over_slots(q[:, :, 0], None if q_sink is None else q_sink[:, :, 0], k[:, :, 0], v[:, :, 0],
                                  k_cache, v_cache, slot_pos, positions[:, 0], indices, sink_tokens, window_tokens,
                                  scale)
    write_token(k, v, k_cache, v_cache, slot_pos, positions[:, 0].contiguous(), sink_tokens, window_tokens)
    return out[:, :, None].to(q.dtype)


def select_decode_step(q, q_sink, k, v, k_cache, v_cache, slot_pos, positions, sink_tokens, window_tokens, scale,
                       num_selected):
    """`cached_attention_select` on the kernels: full attention that also keeps every score, the group's
    attention mass per slot from the scores and each head's log-sum-exp (`group_mass`), then `topk_slots`."""
    from kvcompile.ops.decode import write_token
    from kvcompile.ops.sparse_attention import topk_slots
    out, lse, scores = decode_over_slots(
        q[:, :, 0], None if q_sink is None else q_sink[:, :, 0], k[:, :, 0], v[:, :, 0], k_cache, v_cache,
        slot_pos, positions[:, 0], None, sink_tokens, window_tokens, scale, with_lse=True, scores=True)
    # Slots the query cannot see have only -inf scores, so their mass is -inf: never selected.
    indices = topk_slots(group_mass(scores, lse), num_selected, scores.shape[-1] - 1)
    write_token(k, v, k_cache, v_cache, slot_pos, positions[:, 0].contiguous(), sink_tokens, window_tokens)
    return out[:, :, None].to(q.dtype), indices
