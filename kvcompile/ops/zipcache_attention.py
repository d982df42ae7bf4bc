"""ZipCache attention (arXiv:2405.14256) over the packed per-layer state of `kvcompile.ops.quantization`.

A layer's cache is its `ZipCacheState` tensors (`STATE_FIELDS`, passed as one list `state` and updated in place)
and `slot_pos` [B, N]: the position each slot holds, -1 if empty. ZipCache keeps every token, so slot = position;
the last slot is the scratch slot of `kvcompile.ops.cached_attention`.

- Prefill (several new tokens per row): the new tokens attend in full precision over the (dequantized) cache and
  themselves. The block of buffered + new tokens is then ranked by the normalized attention of the step's probe
  queries (`zipcache_probes`) and quantized: per KV head the `saliency_ratio` most salient at `high_bits`.
- Decode (one new token): the token goes into the full-precision buffer, then attends over the quantized tokens
  and the buffer. The step's scaled query and the log-sum-exp of its scores are kept (`step_query`,
  `step_lse`) for the periodic step.
- The periodic step (`quantize_buffers`), run between steps by `kvcompile.runtime.periodic.PeriodicQuantization`
  every `streaming_gap` decode steps: each row quantizes what its buffer holds as one block, ranked by the
  attention the last step's query gave the buffered tokens, `exp(q.k - lse)`. Keeping it out of the decode op
  keeps the decode step small (a CUDA graph replays it every step; the periodic step has its own graph).

Read variants for read passes (TidalDecode), decode only: `zipcache_attention_select` (full attention that also
returns the top slots: on CUDA the Triton kernel's gathered read over every slot, which writes the scores too) and
`zipcache_sparse_attention` (attention over given slots: the gathered read on CUDA). Elsewhere both gather from
the dequantized cache. After a sparse read
the periodic step ranks every buffered token by `exp(q.k - lse)` with the log-sum-exp over the tokens read.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from kvcompile.ops import kernel_switch
from kvcompile.ops.cached_attention import cache_slots
from kvcompile.ops.decode import write_token
from kvcompile.ops.quantization import (ZipCacheState, dequantize_state, normalized_attention_saliency, probe_count,
                                        probe_queries, quantize_into, salient_allowance, select_salient, state_of)
from kvcompile.ops.sparse_attention import (attend_per_head, gather_slots, select_by_attention, slot_positions,
                                            topk_slots)
from kvcompile.ops.triton_quant_decode import quant_decode_attention_triton
from kvcompile.ops.triton_sparse_decode import group_mass


# --- probe queries -------------------------------------------------------------------------------------------
@torch.library.custom_op("kvcompile::zipcache_probes", mutates_args=())
def zipcache_probes(positions: Tensor, probe_ratio: float, seed: int) -> Tensor:
    """Probe queries of a prefill step: per row, `probe_queries` of its real (position >= 0) tokens, drawn with
    `seed`, as columns of the step [B, probe_count(S)] int64, -1 where a row has fewer. One draw per step, shared
    by every layer, as the reference draws one per prompt (it reads the positions on the host)."""
    batch, seq = positions.shape
    out = torch.full((batch, probe_count(seq, probe_ratio)), -1, dtype=torch.long)
    for row, row_positions in enumerate(positions.cpu()):
        columns = (row_positions >= 0).nonzero()[:, 0]
        if len(columns):
            picks = columns[probe_queries(len(columns), probe_ratio, torch.Generator().manual_seed(seed))]
            out[row, :len(picks)] = picks
    return out.to(positions.device)


@zipcache_probes.register_fake
def _(positions, probe_ratio, seed):
    return positions.new_empty((positions.shape[0], probe_count(positions.shape[1], probe_ratio)))


# --- shared steps --------------------------------------------------------------------------------------------
def _store_positions(slot_pos: Tensor, positions: Tensor) -> None:
    slot_pos.scatter_(1, cache_slots(positions, slot_pos.shape[1], 0, 0), positions.to(slot_pos.dtype))
    slot_pos[:, -1] = -1


def _store_token(state: ZipCacheState, slot_pos: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> None:
    """Put the decode token k, v [B, Hkv, 1, D] in buffer row `position - quantized` (padding rows store none):
    one Triton launch (`decode.write_token`) where `_use_kernel` allows it, else PyTorch gathers and scatters."""
    pos = positions[:, 0]
    if _use_kernel(k):
        write_token(k, v, state.key_buffer, state.value_buffer, slot_pos, pos.contiguous(), 0, 0,
                    row_base=state.quantized)
    else:
        row = (pos - state.quantized).clamp(0, state.key_buffer.shape[2] - 1)
        index = row[:, None, None, None].expand(k.shape)
        padding = (pos < 0)[:, None, None, None]
        for buffer, x in ((state.key_buffer, k), (state.value_buffer, v)):
            buffer.scatter_(2, index, torch.where(padding, buffer.gather(2, index), x.to(buffer.dtype)))
        _store_positions(slot_pos, positions)


@dataclass(frozen=True)
class Policy:
    """Which tokens of a block get the high precision: the `ratio` most salient by `saliency`, "normalized"
    (the paper's normalized attention) or "random" (a fixed hash of slot and head: the same bits per block
    without saliency, the baseline the paper's metric has to beat)."""

    ratio: float
    saliency: str


def _quantize_block(state: ZipCacheState, keys: Tensor, values: Tensor, scores: Tensor, count: Tensor,
                    policy: Policy) -> None:
    """Quantize the first `count` [B] tokens of a block [B, Hkv, T, D], the highest `scores` [B, Hkv, T] at the
    high precision."""
    batch, heads, seq, _ = keys.shape
    if policy.saliency == "random":
        slot = state.quantized[:, None, None] + torch.arange(seq, device=keys.device)
        head = torch.arange(heads, device=keys.device)[:, None]
        scores = ((slot * 2654435761 + head * 40503) % 2 ** 32).double()  # Knuth's multiplicative hash
    valid = torch.arange(seq, device=keys.device) < count[:, None]
    salient = select_salient(scores, valid, policy.ratio, salient_allowance(state, count, policy.ratio))
    quantize_into(state, keys, values, salient, count)


def quantize_buffers(state: ZipCacheState, slot_pos: Tensor, step_query: Tensor, step_lse: Tensor,
                     policy: Policy) -> None:
    """The periodic step: every row quantizes the tokens its buffer holds as one block, the most salient by the
    attention of the last decode step's scaled query `step_query` [B, Hq, D] (`exp(q.k - step_lse)`, summed over
    the query group; one query, so the normalized attention is the attention itself)."""
    batch, kv_heads, gap, head_dim = state.key_buffer.shape
    slots = state.quantized[:, None] + torch.arange(gap, device=slot_pos.device)
    held = slot_pos.gather(1, slots.clamp(max=slot_pos.shape[1] - 1)).long()
    filled = (held >= 0) & (slots < slot_pos.shape[1] - 1)  # buffers fill from row 0 up
    grouped = step_query.view(batch, kv_heads, -1, head_dim)
    scores = torch.einsum("bkgd,bknd->bkgn", grouped, state.key_buffer.float())
    mass = torch.exp(scores - step_lse.view(batch, kv_heads, -1, 1)).sum(2).masked_fill(~filled[:, None], 0.0)
    _quantize_block(state, state.key_buffer, state.value_buffer, mass, filled.sum(1), policy)


def _keep_step(step_query: Tensor, step_lse: Tensor, q: Tensor, lse: Tensor, scale: float) -> None:
    """Keep the decode query (scaled) and the log-sum-exp of its scores [B, Hq] for the periodic step."""
    step_query.copy_(q[:, :, -1].float() * scale)
    step_lse.copy_(lse)


def _use_kernel(q: Tensor) -> bool:
    """Decode reads use the Triton kernel where `kernel_switch.kernels_for(q)` allows it; elsewhere
    dequantize-then-attend, the definition (the tests route CPU tensors through the kernels by patching this)."""
    return kernel_switch.kernels_for(q)


def _decode(q: Tensor, k: Tensor, v: Tensor, state: ZipCacheState, slot_pos: Tensor, positions: Tensor,
            scale: float, step: list[Tensor], indices: Optional[Tensor] = None,
            num_selected: int = 0) -> tuple[Tensor, Optional[Tensor]]:
    """One decode step: store, attend over every slot or over `indices` [B, Hkv, K] plus the new token, pick
    the top `num_selected` cached slots if asked, keep the query and log-sum-exp in `step` for the periodic
    step. Returns (out, chosen slots or None)."""
    if q.shape[2] != 1:
        raise ValueError(f"ZipCache read variants are decode ops (one new token per row), got {q.shape[2]} tokens")
    _store_token(state, slot_pos, k, v, positions)
    batch, kv_heads, slots = q.shape[0], k.shape[1], slot_pos.shape[1]
    read = None
    if indices is not None:
        current = cache_slots(positions, slots, 0, 0)[:, None, :].expand(batch, kv_heads, 1)
        read = torch.cat([indices, current], dim=2)
    chosen = None
    # Slots a selection may pick: visible, the new token excluded (computed only for selection reads).
    cached = (slot_pos >= 0) & (slot_pos < positions[:, -1:]) if num_selected else None
    if _use_kernel(q) and num_selected:  # a full read through the gathered kernel, which also gives the scores
        every = torch.arange(slots, device=q.device).expand(batch, kv_heads, slots).contiguous()
        out, lse, scores = quant_decode_attention_triton(q[:, :, 0], state, slot_pos, positions[:, 0], scale,
                                                         indices=every, return_lse=True, return_scores=True)
        out = out[:, :, None]
        mass = group_mass(scores, lse).masked_fill(~cached[:, None, :], float("-inf"))
        chosen = topk_slots(mass, num_selected, slots - 1)
    elif _use_kernel(q):
        out, lse = quant_decode_attention_triton(q[:, :, 0], state, slot_pos, positions[:, 0], scale,
                                                 indices=None if read is None else read.contiguous(),
                                                 return_lse=True)
        out = out[:, :, None]
    else:
        keys, values = dequantize_state(state, slots)
        if read is None:
            key_pos = slot_pos[:, None, :].expand(batch, kv_heads, slots)
        else:
            key_pos = slot_positions(slot_pos, read)
            keys, values = gather_slots(keys, read), gather_slots(values, read)
        out, probs, lse = attend_per_head(q, None, keys, values, key_pos, positions, 0, 0, scale, with_probs=True)
        if num_selected:
            chosen = select_by_attention(probs, cached, num_selected, slots - 1)
        lse = lse[:, :, -1]
    _keep_step(*step, q, lse, scale)
    return out, chosen


def _prefill(q: Tensor, k: Tensor, v: Tensor, state: ZipCacheState, slot_pos: Tensor, positions: Tensor,
             probes: Tensor, scale: float, policy: Policy) -> Tensor:
    """A prefill chunk: full-precision attention, then the buffered + new tokens quantized as one block."""
    batch, kv_heads, seq, head_dim = k.shape
    slots, gap = slot_pos.shape[1], state.key_buffer.shape[2]
    cached_k, cached_v = dequantize_state(state, slots)
    keys, values = torch.cat([cached_k, k.float()], dim=2), torch.cat([cached_v, v.float()], dim=2)
    key_pos = torch.cat([slot_pos.long(), positions], dim=1)
    per_head = key_pos[:, None, :].expand(batch, kv_heads, -1)
    out = attend_per_head(q, None, keys, values, per_head, positions, 0, 0, scale)

    # Normalized attention of the probe queries (their rows of the attention matrix, computed apart).
    picked = probes.clamp(min=0)
    probe_pos = torch.where(probes >= 0, positions.gather(1, picked), -1)
    probe_q = q.gather(2, picked[:, None, :, None].expand(batch, q.shape[1], -1, head_dim))
    _, probs, _ = attend_per_head(probe_q, None, keys, values, per_head, probe_pos, 0, 0, scale, with_probs=True)
    saliency = normalized_attention_saliency(probs.sum(2), probe_pos, key_pos)

    # The block: buffered slots (from `quantized` on) and the real new tokens, in position order.
    column = torch.arange(slots + seq, device=q.device)
    in_block = (key_pos >= 0) & ((column >= slots) | (column >= state.quantized[:, None]))
    order = torch.argsort((~in_block).to(torch.int8), dim=1, stable=True)[:, :gap + seq]
    index = order[:, None, :, None].expand(batch, kv_heads, -1, head_dim)
    _quantize_block(state, keys.gather(2, index), values.gather(2, index),
                    saliency.gather(2, order[:, None, :].expand(batch, kv_heads, -1)), in_block.sum(1), policy)
    _store_positions(slot_pos, positions)
    return out


# --- the ops -------------------------------------------------------------------------------------------------
@torch.library.custom_op("kvcompile::zipcache_attention", mutates_args=("state", "slot_pos", "step"))
def zipcache_attention(q: Tensor, k: Tensor, v: Tensor, state: list[Tensor], slot_pos: Tensor, step: list[Tensor],
                       positions: Tensor, probes: Optional[Tensor], scale: float, high_bits: int, low_bits: int,
                       saliency_ratio: float, saliency: str) -> Tensor:
    """Attend `q` [B, Hq, S, D] over a ZipCache layer plus the new `k`, `v` [B, Hkv, S, D] at `positions`
    [B, S] (-1 = padding), then store them: a prefill chunk (S > 1, `probes` from `zipcache_probes`) is
    quantized at once, a decode token (S == 1, `probes` None) goes to the buffer and its scaled query and
    log-sum-exp to `step` ([B, Hq, D], [B, Hq] float32) for `quantize_buffers`. Per block, the
    `saliency_ratio` most salient tokens by `saliency` ("normalized" or "random", see `Policy`) are stored
    at `high_bits`, the rest at `low_bits`."""
    zip_state = state_of(state, high_bits, low_bits)
    if q.shape[2] > 1:
        if probes is None:
            raise ValueError("a ZipCache prefill step needs the probe queries of zipcache_probes")
        return _prefill(q, k, v, zip_state, slot_pos, positions, probes, scale, Policy(saliency_ratio, saliency))
    return _decode(q, k, v, zip_state, slot_pos, positions, scale, step)[0]


@zipcache_attention.register_fake
def _(q, k, v, state, slot_pos, step, positions, probes, scale, high_bits, low_bits, saliency_ratio, saliency):
    return q.new_empty(q.shape)


@torch.library.custom_op("kvcompile::zipcache_attention_select", mutates_args=("state", "slot_pos", "step"))
def zipcache_attention_select(q: Tensor, k: Tensor, v: Tensor, state: list[Tensor], slot_pos: Tensor,
                              step: list[Tensor], positions: Tensor, probes: Optional[Tensor], scale: float,
                              high_bits: int, low_bits: int, saliency_ratio: float, saliency: str,
                              num_selected: int) -> tuple[Tensor, Tensor]:
    """`zipcache_attention` of a decode token that also returns the `num_selected` visible cached slots (the new
    token excluded) with the most attention per KV head: `(out, indices int64 [B, Hkv, num_selected])`."""
    out, chosen = _decode(q, k, v, state_of(state, high_bits, low_bits), slot_pos, positions, scale, step,
                          num_selected=num_selected)
    return out, chosen


@zipcache_attention_select.register_fake
def _(q, k, v, state, slot_pos, step, positions, probes, scale, high_bits, low_bits, saliency_ratio, saliency,
      num_selected):
    return q.new_empty(q.shape), q.new_empty((q.shape[0], k.shape[1], num_selected), dtype=torch.long)


@torch.library.custom_op("kvcompile::zipcache_sparse_attention", mutates_args=("state", "slot_pos", "step"))
def zipcache_sparse_attention(q: Tensor, k: Tensor, v: Tensor, state: list[Tensor], slot_pos: Tensor,
                              step: list[Tensor], positions: Tensor, probes: Optional[Tensor], scale: float,
                              high_bits: int, low_bits: int, saliency_ratio: float, saliency: str,
                              indices: Tensor) -> Tensor:
    """`zipcache_attention` of a decode token that reads only the cache slots `indices` [B, Hkv, K] (per KV
    head; the scratch slot reads nothing) plus the new token."""
    return _decode(q, k, v, state_of(state, high_bits, low_bits), slot_pos, positions, scale, step,
                   indices=indices)[0]


@zipcache_sparse_attention.register_fake
def _(q, k, v, state, slot_pos, step, positions, probes, scale, high_bits, low_bits, saliency_ratio, saliency,
      indices):
    return q.new_empty(q.shape)
