"""GQA-aware split-K ("flash-decoding") Triton kernel for single-token decode attention.

Same semantics as :func:`kvcompile.ops.decode_reference.decode_attention_reference`:
cache slots carry token positions (-1 = empty), which serves both a dense cache and a
StreamingLLM ring cache (attention sinks + sliding window).

Pass 1 runs a grid of (batch, kv head, split). Each program loads the G query heads that
share one kv head and streams its chunk of slots in blocks of BLOCK_N with an online
softmax, so K/V are read once per kv head rather than G times. It writes an unnormalised
partial (running max, running sum, accumulator) to a small fp32 workspace. Pass 2 merges
the splits of each (batch, query head) row.
"""

from __future__ import annotations

import functools
import math

import torch

from kvcompile.ops.dependent_launch import dependent_launch
from kvcompile.ops.triton_support import require_triton, tl, triton

__all__ = ["decode_attention_triton"]

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 64  # bounds the workspace and the merge tile of pass 2
_MIN_BLOCKS_PER_SPLIT = 2  # below this the per-program setup and workspace traffic dominate
_PROGRAMS_PER_SM = 2


if triton is not None:
    from kvcompile.ops.dependent_launch import wait_for_producers

    @triton.jit
    def _query_group(Q, b, kvh, stride_qb, stride_qh, stride_qd,
                     G: tl.constexpr, D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr):
        """The G query heads of KV head `kvh` in row `b` as [BLOCK_G, BLOCK_D] (zeros past G and D), with their
        head numbers, the head-dim offsets and the masks: `(q, heads, offs_d, g_mask, d_mask, q_mask)`. The
        prologue of every split-K decode kernel here."""
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        heads = kvh * G + offs_g
        g_mask = offs_g < G
        d_mask = offs_d < D  # BLOCK_D is D rounded up to a power of two
        q_mask = g_mask[:, None] & d_mask[None, :]
        q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=q_mask, other=0.0)
        return q, heads, offs_d, g_mask, d_mask, q_mask

    @triton.jit
    def _softmax_step(s, m_i, l_i):
        """Fold log2 scores `s` [BLOCK_G, BLOCK_N] (-inf where hidden) into the running max and sum: returns
        them, the probabilities and the factor that rescales the accumulator."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # While nothing is visible the max is -inf; shifting by 0 keeps exp2 at 0 instead of NaN.
        m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_shift)
        p = tl.exp2(s - m_shift[:, None])
        return m_new, l_i * alpha + tl.sum(p, 1), p, alpha

    @triton.jit
    def _store_partials(WS, acc, m_i, l_i, b, heads, split, offs_d, q_mask, g_mask, G: tl.constexpr,
                        D: tl.constexpr):
        """A program's partials in the workspace `merge_splits` reads: acc [R, D], then max [R], then sum [R],
        for R = B * Hq * splits rows ordered (b, head, split)."""
        num_splits = tl.num_programs(2)
        n_rows = tl.num_programs(0) * tl.num_programs(1) * G * num_splits
        ws_row = (b * (tl.num_programs(1) * G) + heads) * num_splits + split
        tl.store(WS + ws_row[:, None] * D + offs_d[None, :], acc, mask=q_mask)
        tl.store(WS + n_rows * D + ws_row, m_i, mask=g_mask)
        tl.store(WS + n_rows * (D + 1) + ws_row, l_i, mask=g_mask)

    @triton.jit
    def _visible(pos, qp, sink_tokens, window_tokens, WINDOWED: tl.constexpr):
        """Which slots holding positions `pos` a query at position `qp` sees (`cached_attention`'s rule):
        `0 <= pos <= qp` and, with a window, a sink or inside the window."""
        visible = (pos >= 0) & (pos <= qp)
        if WINDOWED:
            visible = visible & ((pos < sink_tokens) | (pos > qp - window_tokens))
        return visible

    @triton.jit
    def _decode_split_kernel(
        Q, QS, K, V, POS, QPOS, WS,
        stride_qb, stride_qh, stride_qd,
        stride_sb, stride_sh, stride_sd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_pb, stride_pn,
        N, chunk_len, sink_tokens, window_tokens, qk_scale,
        G: tl.constexpr, D: tl.constexpr,
        BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
        HAS_QSINK: tl.constexpr, WINDOWED: tl.constexpr, DOT_PRECISION: tl.constexpr, PDL: tl.constexpr,
    ):
        """Online softmax of the G heads of one kv head over one chunk of slots."""
        wait_for_producers(PDL)
        # int64 base offsets: a large cache can pass 2**31 elements.
        b = tl.program_id(0).to(tl.int64)
        kvh = tl.program_id(1).to(tl.int64)
        split = tl.program_id(2)

        q, heads, offs_d, g_mask, d_mask, q_mask = _query_group(Q, b, kvh, stride_qb, stride_qh, stride_qd,
                                                                G, D, BLOCK_G, BLOCK_D)
        if HAS_QSINK:
            qs = tl.load(
                QS + b * stride_sb + heads[:, None] * stride_sh + offs_d[None, :] * stride_sd,
                mask=q_mask, other=0.0)
        qp = tl.load(QPOS + b)

        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)

        k_base = K + b * stride_kb + kvh * stride_kh + offs_d[None, :] * stride_kd
        v_base = V + b * stride_vb + kvh * stride_vh + offs_d[None, :] * stride_vd
        start = split * chunk_len
        end = tl.minimum(start + chunk_len, N)
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            pos = tl.load(POS + b * stride_pb + offs_n * stride_pn, mask=offs_n < end, other=-1)
            is_sink = pos < sink_tokens
            vis = _visible(pos, qp, sink_tokens, window_tokens, WINDOWED)
            # Loads masked by visibility: empty or out-of-window slots cost no bandwidth.
            kv_mask = vis[:, None] & d_mask[None, :]
            k = tl.load(k_base + offs_n[:, None] * stride_kn, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            if HAS_QSINK:
                s_sink = tl.dot(qs, tl.trans(k), input_precision=DOT_PRECISION)
                s = tl.where(is_sink[None, :], s_sink, s)
            m_i, l_i, p, alpha = _softmax_step(tl.where(vis[None, :], s * qk_scale, float("-inf")), m_i, l_i)
            v = tl.load(v_base + offs_n[:, None] * stride_vn, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)

        _store_partials(WS, acc, m_i, l_i, b, heads, split, offs_d, q_mask, g_mask, G, D)

    @triton.jit
    def _decode_merge_kernel(
        WS, OUT, LSE, num_splits,
        D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr, STORE_LSE: tl.constexpr,
        PDL: tl.constexpr,
    ):
        """Merge the split partials of one (batch, query head) row into the output; with STORE_LSE also store
        the row's natural log-sum-exp of the scaled scores (-inf when nothing was visible)."""
        wait_for_producers(PDL)
        row = tl.program_id(0)
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_mask = offs_s < num_splits
        n_rows = tl.num_programs(0) * num_splits
        ws_row = row * num_splits + offs_s
        d_mask = offs_d < D

        acc = tl.load(WS + ws_row[:, None] * D + offs_d[None, :],
                      mask=s_mask[:, None] & d_mask[None, :], other=0.0)
        m = tl.load(WS + n_rows * D + ws_row, mask=s_mask, other=float("-inf"))
        l = tl.load(WS + n_rows * (D + 1) + ws_row, mask=s_mask, other=0.0)

        m_max = tl.max(m, 0)
        m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.exp2(m - m_ref)  # empty splits weigh 0
        l_tot = tl.sum(w * l, 0)
        out = tl.sum(w[:, None] * acc, 0)
        # No visible slot at all leaves acc == 0, so dividing by 1 gives the required zeros.
        out = out / tl.where(l_tot > 0.0, l_tot, 1.0)
        tl.store(OUT + row * D + offs_d, out.to(OUT.dtype.element_ty), mask=d_mask)
        if STORE_LSE:
            lse = tl.where(l_tot > 0.0, (m_ref + tl.log2(l_tot)) / 1.4426950408889634, float("-inf"))
            tl.store(LSE + row, lse)


def merge_splits(ws: torch.Tensor, out: torch.Tensor, splits: int, lse: torch.Tensor | None = None) -> None:
    """Pass 2 of every split-K decode kernel here: combine the partials in `ws` (acc [R, D], then max [R], then
    sum [R], rows ordered (b, head, split)) into `out` [B, Hq, D], and the log-sum-exp into `lse` [B, Hq] if
    given."""
    rows, head_dim = out.shape[0] * out.shape[1], out.shape[2]
    pdl = dependent_launch(out)
    _decode_merge_kernel[(rows,)](
        ws, out, lse if lse is not None else ws, splits,
        D=head_dim, BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=triton.next_power_of_2(head_dim),
        STORE_LSE=lse is not None, PDL=pdl, num_warps=4, launch_pdl=pdl,
    )


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    """Multiprocessor count of a CUDA device; an H100's 132 elsewhere (interpreter)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 132


def _launch_config(block_d: int, elem_size: int) -> tuple[int, int, int]:
    """(BLOCK_N, num_warps, num_stages) for a padded head dim and K/V element size.

    Tuned on an H100 (bf16, D=128): 128 slots a block, 2 stages, 4 warps, i.e. 64 KB of K+V
    per stage. Wider heads or fp32 take fewer slots a block to stay within shared memory.
    """
    block_n = max(16, min(128, (32 * 1024) // (block_d * elem_size)))
    return block_n, 4, 2


def _choose_splits(n_slots: int, programs_per_split: int, block_n: int, sms: int,
                   programs_per_sm: int = _PROGRAMS_PER_SM) -> int:
    """Splits so that pass 1 runs at most ~`programs_per_sm` programs per SM, each over >= 2 blocks of slots.

    On an H100, where the 128 KB of pipelined K/V tiles let one four-warp program reside per SM, 2 beat both
    fewer splits (idle SMs) and more (a ragged last wave, more workspace traffic).
    """
    wanted = (programs_per_sm * sms) // max(programs_per_split, 1)
    most = math.ceil(n_slots / (_MIN_BLOCKS_PER_SPLIT * block_n))
    return max(1, min(wanted, most, _MAX_SPLITS))


def _split_plan(n_slots: int, programs_per_split: int, block_n: int, device, num_splits=None,
                programs_per_sm: int = _PROGRAMS_PER_SM) -> tuple[int, int]:
    """(splits, chunk_len) for `n_slots` slots: `num_splits` (default `_choose_splits`), each chunk whole blocks so
    only the last has a ragged tail; rounding up may leave fewer non-empty chunks than asked for, and empty
    programs are not launched."""
    n = max(n_slots, 1)
    splits = num_splits or _choose_splits(n, programs_per_split, block_n, _num_sms(device), programs_per_sm)
    chunk_len = block_n * max(1, triton.cdiv(triton.cdiv(n, splits), block_n))
    return max(1, triton.cdiv(n, chunk_len)), chunk_len


def decode_attention_triton(
    q: torch.Tensor,
    q_sink: torch.Tensor | None,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_pos: torch.Tensor,
    q_pos: torch.Tensor,
    sink_tokens: int,
    window_tokens: int,
    scale: float,
    *,
    num_splits: int | None = None,
) -> torch.Tensor:
    """Triton decode attention; see ``decode_attention_reference`` for the semantics.

    ``num_splits`` overrides the automatic split count of the slot axis (tests use it to
    exercise the merge). Inputs may be strided; no tensor is copied or repeated.
    """
    require_triton("decode_attention_triton")
    B, Hq, D = q.shape
    Bk, Hkv, N, Dk = k_cache.shape
    if Hq % Hkv or Bk != B or Dk != D or v_cache.shape != k_cache.shape:
        raise ValueError(f"incompatible shapes q {tuple(q.shape)}, k {tuple(k_cache.shape)}, "
                         f"v {tuple(v_cache.shape)}")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError("q, k_cache and v_cache must share one dtype")
    if q_sink is not None and q_sink.shape != q.shape:
        raise ValueError("q_sink must have q's shape")
    if tuple(slot_pos.shape) != (B, N) or tuple(q_pos.shape) != (B,):
        raise ValueError("slot_pos must be [B, N] and q_pos [B]")

    G = Hq // Hkv
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out

    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_G = max(16, triton.next_power_of_2(G))  # tl.dot needs M >= 16
    BLOCK_N, num_warps, num_stages = _launch_config(BLOCK_D, k_cache.element_size())
    splits, chunk_len = _split_plan(N, B * Hkv, BLOCK_N, q.device, num_splits)

    # One allocation for all partials keeps the host-side cost of a call low.
    ws = torch.empty(B * Hq * splits * (D + 2), device=q.device, dtype=torch.float32)
    qs = q if q_sink is None else q_sink
    windowed = window_tokens > 0
    pdl = dependent_launch(q)

    _decode_split_kernel[(B, Hkv, splits)](
        q, qs, k_cache, v_cache, slot_pos, q_pos, ws,
        *q.stride(), *qs.stride(), *k_cache.stride(), *v_cache.stride(), *slot_pos.stride(),
        N, chunk_len, sink_tokens, window_tokens, scale * _LOG2E,
        G=G, D=D, BLOCK_G=BLOCK_G, BLOCK_D=BLOCK_D, BLOCK_N=BLOCK_N,
        HAS_QSINK=q_sink is not None, WINDOWED=windowed,
        # fp32 callers get fp32 products, not tf32; other dtypes keep Triton's default.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else None, PDL=pdl,
        num_warps=num_warps, num_stages=num_stages, launch_pdl=pdl,
    )
    merge_splits(ws, out, splits)
    return out
