"""The export face of `kvcompile::cached_attention`: a functional form and its ONNX lowering.

ONNX has no mutable state, so export replaces the in-place op by `kvcompile::cached_attention_functional`, which
returns the updated cache instead of writing it: `(out, new_k_cache, new_v_cache, new_slot_pos)`. Its PyTorch
implementation runs the in-place op on copies, so both forms share one reference semantics.

`lower_cached_attention` builds the same computation from standard ONNX ops (Concat, MatMul, Softmax, Where,
ScatterElements, ...) that ONNX Runtime and TensorRT's ONNX parser both accept. It is traced by
`torch.onnx.export(..., custom_translation_table=...)` with the op's arguments: tensors as graph values, the
layout integers and the scale as Python numbers.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from onnxscript import ir, opset18 as op
from torch import Tensor

import kvcompile.ops.cached_attention  # noqa: F401  (registers torch.ops.kvcompile.cached_attention)


@torch.library.custom_op("kvcompile::cached_attention_functional", mutates_args=())
def cached_attention_functional(q: Tensor, q_sink: Optional[Tensor], k: Tensor, v: Tensor, k_cache: Tensor,
                                v_cache: Tensor, slot_pos: Tensor, positions: Tensor, sink_tokens: int,
                                window_tokens: int, scale: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """`cached_attention` that returns `(out, new_k_cache, new_v_cache, new_slot_pos)` and mutates nothing."""
    k_cache, v_cache, slot_pos = k_cache.clone(), v_cache.clone(), slot_pos.clone()
    out = torch.ops.kvcompile.cached_attention(q, q_sink, k, v, k_cache, v_cache, slot_pos, positions,
                                               sink_tokens, window_tokens, scale)
    return out, k_cache, v_cache, slot_pos


@cached_attention_functional.register_fake
def _(q, q_sink, k, v, k_cache, v_cache, slot_pos, positions, sink_tokens, window_tokens, scale):
    return q.new_empty(q.shape), torch.empty_like(k_cache), torch.empty_like(v_cache), torch.empty_like(slot_pos)


def _static_dims(value, what: str) -> tuple[int, ...]:
    """The dimensions of an exported value after the batch, which capture keeps static."""
    dims = tuple(value.shape)[1:]
    if not all(isinstance(d, int) for d in dims):
        raise ValueError(f"cached_attention ONNX lowering needs static non-batch dimensions for {what}, got "
                         f"{tuple(value.shape)}; steps are captured with a fixed sequence length and cache size.")
    return dims


def _slots(positions, capacity: int, sink_tokens: int, window_tokens: int):
    """ONNX form of `cache_slots`: the slot of each new token, the scratch slot for dropped ones."""
    scratch = capacity - 1
    slots = positions
    if window_tokens:
        # Integer Div truncates in ONNX Runtime and TensorRT alike; on non-negative values that is the floor
        # that `remainder` needs. Positions below the sinks are replaced just after, so clamping them is harmless.
        offset = op.Max(op.Sub(positions, sink_tokens), op.Constant(value_int=0))
        ring = op.Add(op.Sub(offset, op.Mul(op.Div(offset, window_tokens), window_tokens)), sink_tokens)
        is_sink = op.Less(positions, sink_tokens)
        slots = op.Where(is_sink, positions, ring)
        newest = op.ReduceMax(positions, op.Constant(value_ints=[1]), keepdims=1)
        kept = op.Or(is_sink, op.Greater(positions, op.Sub(newest, window_tokens)))
        slots = op.Where(kept, slots, scratch)
    return op.Where(op.GreaterOrEqual(positions, 0), slots, scratch)


def _visible(query_pos, key_pos, sink_tokens: int, window_tokens: int):
    """ONNX form of `visible_keys`: boolean [B, S, T]."""
    qp = op.Unsqueeze(query_pos, op.Constant(value_ints=[2]))
    kp = op.Unsqueeze(key_pos, op.Constant(value_ints=[1]))
    visible = op.And(op.GreaterOrEqual(kp, 0), op.LessOrEqual(kp, qp))
    if window_tokens:
        in_window = op.Or(op.Less(kp, sink_tokens), op.Greater(kp, op.Sub(qp, window_tokens)))
        visible = op.And(visible, in_window)
    return visible


def lower_cached_attention(q, q_sink, k, v, k_cache, v_cache, slot_pos, positions, sink_tokens: int,
                           window_tokens: int, scale: float):
    """ONNX ops computing `cached_attention_functional` (same arguments, same four outputs)."""
    q_heads, seq, head_dim = _static_dims(q, "q")
    kv_heads, capacity, _ = _static_dims(k_cache, "k_cache")
    group = q_heads // kv_heads
    float32 = ir.DataType.FLOAT

    keys = op.Concat(k_cache, op.CastLike(k, k_cache), axis=2)
    values = op.Concat(v_cache, op.CastLike(v, v_cache), axis=2)
    key_pos = op.Concat(slot_pos, op.CastLike(positions, slot_pos), axis=1)
    keys_t = op.Transpose(op.Cast(keys, to=float32), perm=[0, 1, 3, 2])

    def scores_of(query):
        # Reshape dims of 0 copy the (dynamic) batch; grouped queries share their KV head's keys (GQA).
        grouped = op.Reshape(op.Cast(query, to=float32), op.Constant(value_ints=[0, kv_heads, group * seq, head_dim]))
        scores = op.Reshape(op.MatMul(grouped, keys_t), op.Constant(value_ints=[0, kv_heads, group, seq, -1]))
        return op.Mul(scores, op.Constant(value_float=scale))

    scores = scores_of(q)
    if q_sink is not None:
        is_sink = op.Unsqueeze(op.Less(key_pos, sink_tokens), op.Constant(value_ints=[1, 2, 3]))
        scores = op.Where(is_sink, scores_of(q_sink), scores)
    visible = op.Unsqueeze(_visible(positions, key_pos, sink_tokens, window_tokens), op.Constant(value_ints=[1, 2]))
    # The reference masks with -inf and maps the NaN of fully masked rows (padding) to 0. A finite minimum gives
    # the same probabilities for every other row without NaN (IsNaN is not universally supported by TensorRT).
    lowest = op.Constant(value_float=float(np.finfo(np.float32).min))
    probs = op.Softmax(op.Where(visible, scores, lowest), axis=-1)
    probs = op.Where(visible, probs, op.Constant(value_float=0.0))
    probs = op.Reshape(probs, op.Constant(value_ints=[0, kv_heads, group * seq, -1]))
    out = op.MatMul(probs, op.Cast(values, to=float32))
    out = op.CastLike(op.Reshape(out, op.Constant(value_ints=[0, q_heads, seq, head_dim])), q)

    slots = _slots(positions, capacity, sink_tokens, window_tokens)
    index = op.Expand(op.Unsqueeze(slots, op.Constant(value_ints=[1, 3])), op.Shape(k))
    # Only the scratch slot can receive two tokens of one step, and it is never read.
    new_k_cache = op.ScatterElements(k_cache, index, op.CastLike(k, k_cache), axis=2)
    new_v_cache = op.ScatterElements(v_cache, index, op.CastLike(v, v_cache), axis=2)
    new_slot_pos = op.ScatterElements(slot_pos, slots, op.CastLike(positions, slot_pos), axis=1)
    is_scratch = op.Constant(value=_bool_row(capacity, capacity - 1))
    new_slot_pos = op.Where(is_scratch, op.CastLike(op.Constant(value_int=-1), slot_pos), new_slot_pos)
    return out, new_k_cache, new_v_cache, new_slot_pos


def _bool_row(length: int, index: int):
    """A constant boolean row [length] that is true at `index` only."""
    row = np.zeros(length, dtype=np.bool_)
    row[index] = True
    return ir.tensor(row)
