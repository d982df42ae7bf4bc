"""A Llama-family decoder run one token at a time, with a pluggable choice of which earlier tokens each layer's
attention reads. The shared skeleton of the token-selection references (TidalDecode, TokenSelect).

Everything is float64 and spelled out: the model's own projections, norms, rotary embedding and MLPs; per layer a
list of the keys (rotated by their positions) and values of every token so far; attention of the new token's
query over the chosen earlier tokens plus itself.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from kvcompile.reference.streamingllm import rotate


@dataclass
class LayerView:
    """What a read policy sees at one layer for the token at `position`."""

    layer: int
    position: int
    query: torch.Tensor         # [Hq, D], rotated
    query_unrotated: torch.Tensor  # [Hq, D]
    keys: torch.Tensor          # [t + 1, Hkv, D]: every token so far, the new one last
    probs: torch.Tensor         # [Hq, t + 1]: full-attention probabilities of the new token
    group: int                  # query heads per KV head


# A read policy returns, per KV head, the earlier tokens (indices < position) this layer reads, or None for all.
ReadPolicy = Callable[[LayerView], Optional[list[list[int]]]]


@dataclass
class TokenByToken:
    """Runs `model` (a Llama-family *ForCausalLM) token by token; `caches` hold every layer's keys/values."""

    model: nn.Module
    keys: list[list[torch.Tensor]] = field(default_factory=list)
    values: list[list[torch.Tensor]] = field(default_factory=list)

    def __post_init__(self):
        layers = len(self.model.model.layers)
        self.keys = [[] for _ in range(layers)]
        self.values = [[] for _ in range(layers)]

    def truncate(self, length: int) -> None:
        """Forget every token at position >= `length`."""
        for keys, values in zip(self.keys, self.values):
            del keys[length:], values[length:]

    @torch.no_grad()
    def step(self, token: int, policy: Optional[ReadPolicy] = None) -> torch.Tensor:
        """Logits [V] of the next token after `token`, appended at the next position (full attention if no
        policy)."""
        body = self.model.model
        position = len(self.keys[0])
        hidden = body.embed_tokens(torch.tensor([[token]]))
        cos, sin = body.rotary_emb(hidden, torch.tensor([[position]]))
        cos, sin = cos[0].double(), sin[0].double()
        for index, layer in enumerate(body.layers):
            attn = layer.self_attn
            x = layer.input_layernorm(hidden)
            head_dim = attn.head_dim
            q_raw = attn.q_proj(x).view(-1, head_dim).double()
            k = rotate(attn.k_proj(x).view(-1, head_dim).double(), cos, sin)
            v = attn.v_proj(x).view(-1, head_dim).double()
            q = rotate(q_raw, cos, sin)
            self.keys[index].append(k)
            self.values[index].append(v)
            keys, values = torch.stack(self.keys[index]), torch.stack(self.values[index])
            group = q.shape[0] // k.shape[0]
            scores = torch.einsum("hd,thd->ht", q, keys.repeat_interleave(group, dim=1)) * attn.scaling
            probs = torch.softmax(scores, dim=-1)
            chosen = policy(LayerView(index, position, q, q_raw, keys, probs, group)) if policy else None
            out = torch.empty_like(q)
            for head in range(q.shape[0]):
                read = (list(range(position + 1)) if chosen is None
                        else sorted(set(chosen[head // group]) | {position}))
                p = torch.softmax(scores[head, read], dim=-1)
                out[head] = p @ values[read, head // group]
            hidden = hidden + attn.o_proj(out.reshape(1, 1, -1).to(hidden.dtype))
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        return self.model.lm_head(body.norm(hidden))[0, 0]


def top_tokens(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the `count` largest entries of the 1-D `scores` (all of them if there are fewer)."""
    return scores.topk(min(count, scores.numel())).indices.tolist()
