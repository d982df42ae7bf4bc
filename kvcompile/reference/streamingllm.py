"""Reference for StreamingLLM (arXiv:2309.17453) on Llama-family models, written directly from the paper.

For every token t, the attended set is the first `sink_tokens` tokens and the last `window_tokens` tokens up
to and including t. Positions are assigned within that set by rank (0..n-1): keys are rotated by their rank and
the query by n-1. Attention is computed token by token from pre-rotary queries and keys, with the model's own
projections, norms and MLPs. `window_tokens >= len(input)` is plain causal attention.
"""
from __future__ import annotations

import torch
from torch import nn


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding (the rotate-half form used by Llama)."""
    half = x.shape[-1] // 2
    rotated_half = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated_half * sin


def attended_tokens(t: int, sink_tokens: int, window_tokens: int) -> list[int]:
    """Indices token `t` attends to: the sinks and the window ending at `t`."""
    return [j for j in range(t + 1) if j < sink_tokens or j > t - window_tokens]


def _attention(attn: nn.Module, rotary: nn.Module, x: torch.Tensor, sink_tokens: int,
               window_tokens: int) -> torch.Tensor:
    seq = x.shape[1]
    head_dim = attn.head_dim
    q = attn.q_proj(x).view(1, seq, -1, head_dim).transpose(1, 2).double()
    k = attn.k_proj(x).view(1, seq, -1, head_dim).transpose(1, 2).double()
    v = attn.v_proj(x).view(1, seq, -1, head_dim).transpose(1, 2).double()
    group = q.shape[1] // k.shape[1]
    out = torch.zeros_like(q)
    for t in range(seq):
        keep = attended_tokens(t, sink_tokens, window_tokens)
        cos, sin = rotary(x, torch.arange(len(keep))[None])
        cos, sin = cos[0].double(), sin[0].double()
        keys = rotate(k[0][:, keep], cos, sin).repeat_interleave(group, dim=0)
        query = rotate(q[0][:, t:t + 1], cos[-1:], sin[-1:])
        probs = torch.softmax(query @ keys.transpose(-1, -2) * attn.scaling, dim=-1)
        out[0, :, t] = (probs @ v[0][:, keep].repeat_interleave(group, dim=0))[:, 0]
    return attn.o_proj(out.transpose(1, 2).reshape(1, seq, -1).to(x.dtype))


@torch.no_grad()
def streaming_logits(model: nn.Module, input_ids: torch.Tensor, sink_tokens: int,
                     window_tokens: int) -> torch.Tensor:
    """Teacher-forced logits [1, S, V] of a Llama-family `*ForCausalLM` under StreamingLLM attention."""
    if input_ids.shape[0] != 1:
        raise ValueError("the reference runs one sequence at a time")
    body = model.model
    hidden = body.embed_tokens(input_ids)
    for layer in body.layers:
        hidden = hidden + _attention(layer.self_attn, body.rotary_emb, layer.input_layernorm(hidden),
                                     sink_tokens, window_tokens)
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(body.norm(hidden))
