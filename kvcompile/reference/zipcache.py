"""Reference for ZipCache (arXiv:2405.14256) on Llama-family models, from the paper and its official code.

Prefill (the first `prompt_length` tokens): the prompt attends to itself in full precision. Each layer then
scores its prompt tokens by the normalized attention score of the probe queries (`probe_queries`: the most
recent 5% plus 5% drawn at random; one draw per prompt, shared by every layer), keeps per KV head the
`saliency_ratio` most salient tokens at `high_bits` and the rest at `low_bits`, and fixes its channel scales
from the prompt.

Decode (every later token): the token attends over the quantized tokens plus a full-precision buffer of the
tokens since the last quantization, itself included. When the buffer holds `streaming_gap` tokens, that step's
attention probabilities (summed over the query group) rank them per KV head and they are quantized as one
block, after the step's output is computed.

Quantization is `kvcompile.ops.quantization.fake_quantize` (the definition of what the packed cache reads
back); everything else is float64 and spelled out, with the model's own projections, norms and MLPs.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from kvcompile.ops.quantization import (HIGH_BITS, LOW_BITS, PROBE_RATIO, SALIENCY_RATIO, STREAMING_GAP,
                                        channel_scales, fake_quantize, normalized_attention_saliency,
                                        probe_queries, select_salient)
from kvcompile.reference.streamingllm import rotate


@dataclass
class _Settings:
    high_bits: int
    low_bits: int
    saliency_ratio: float
    streaming_gap: int


@dataclass
class _LayerCache:
    """One layer: the quantized tokens (as read back) [Hkv, n, D], channel scales, and the buffer."""

    keys: Optional[torch.Tensor] = None
    values: Optional[torch.Tensor] = None
    key_channel: Optional[torch.Tensor] = None
    value_channel: Optional[torch.Tensor] = None
    buffer_keys: list = field(default_factory=list)
    buffer_values: list = field(default_factory=list)

    def quantize(self, keys: torch.Tensor, values: torch.Tensor, salient: torch.Tensor, cfg: _Settings) -> None:
        """Append a block [Hkv, T, D] with its salient mask [Hkv, T]; the first block sets the channel scales."""
        bits = (cfg.high_bits, cfg.low_bits)
        if self.keys is None:
            valid = torch.ones(1, keys.shape[1], dtype=torch.bool)
            self.key_channel = channel_scales(keys[None], valid, *bits)
            self.value_channel = channel_scales(values[None], valid, *bits)
            self.keys, self.values = keys[:, :0], values[:, :0]
        k = fake_quantize(keys[None], salient[None], self.key_channel, *bits)[0]
        v = fake_quantize(values[None], salient[None], self.value_channel, *bits)[0]
        self.keys, self.values = torch.cat([self.keys, k], dim=1), torch.cat([self.values, v], dim=1)


def _project(attn: nn.Module, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """Rotated queries [Hq, S, D], rotated keys and values [Hkv, S, D] of `x` [1, S, hidden], float64."""
    seq, head_dim = x.shape[1], attn.head_dim

    def heads(proj: nn.Module) -> torch.Tensor:
        return proj(x).view(seq, -1, head_dim).transpose(0, 1).double()

    return rotate(heads(attn.q_proj), cos, sin), rotate(heads(attn.k_proj), cos, sin), heads(attn.v_proj)


def _group_sum(probs: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Attention probabilities [Hq, ...] summed over each KV head's query group -> [Hkv, ...]."""
    return probs.view(kv_heads, -1, *probs.shape[1:]).sum(dim=1)


def _prefill(model: nn.Module, ids: torch.Tensor, probes: torch.Tensor, caches: list[_LayerCache],
             cfg: _Settings) -> torch.Tensor:
    body = model.model
    seq = ids.shape[1]
    positions = torch.arange(seq)
    hidden = body.embed_tokens(ids)
    cos, sin = body.rotary_emb(hidden, positions[None])
    cos, sin = cos[0].double(), sin[0].double()
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    for layer, cache in zip(body.layers, caches):
        attn = layer.self_attn
        q, k, v = _project(attn, layer.input_layernorm(hidden), cos, sin)
        group = q.shape[0] // k.shape[0]
        scores = q @ k.repeat_interleave(group, dim=0).transpose(-1, -2) * attn.scaling
        probs = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1)
        out = probs @ v.repeat_interleave(group, dim=0)
        # Only the probe rows of the attention matrix are needed: what a flash-attention prefill computes apart.
        probe_probs = _group_sum(probs[:, probes], k.shape[0])
        saliency = normalized_attention_saliency(probe_probs[None], probes[None], positions[None])
        every_token = torch.ones(1, seq, dtype=torch.bool)
        cache.quantize(k, v, select_salient(saliency, every_token, cfg.saliency_ratio)[0], cfg)
        hidden = hidden + attn.o_proj(out.transpose(0, 1).reshape(1, seq, -1).to(hidden.dtype))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(body.norm(hidden))


def _decode(model: nn.Module, token: int, position: int, caches: list[_LayerCache], cfg: _Settings) -> torch.Tensor:
    body = model.model
    hidden = body.embed_tokens(torch.tensor([[token]]))
    cos, sin = body.rotary_emb(hidden, torch.tensor([[position]]))
    cos, sin = cos[0].double(), sin[0].double()
    for layer, cache in zip(body.layers, caches):
        attn = layer.self_attn
        q, k, v = _project(attn, layer.input_layernorm(hidden), cos, sin)
        kv_heads = k.shape[0]
        group = q.shape[0] // kv_heads
        cache.buffer_keys.append(k[:, 0])
        cache.buffer_values.append(v[:, 0])
        keys = torch.cat([cache.keys, torch.stack(cache.buffer_keys, dim=1)], dim=1)
        values = torch.cat([cache.values, torch.stack(cache.buffer_values, dim=1)], dim=1)
        probs = torch.softmax(q @ keys.repeat_interleave(group, dim=0).transpose(-1, -2) * attn.scaling, dim=-1)
        out = probs @ values.repeat_interleave(group, dim=0)
        if len(cache.buffer_keys) == cfg.streaming_gap:
            gap = cfg.streaming_gap
            block_probs = _group_sum(probs[:, :, -gap:], kv_heads)  # [Hkv, 1, gap]
            block_pos = torch.arange(position - gap + 1, position + 1)
            saliency = normalized_attention_saliency(block_probs[None], torch.tensor([[position]]), block_pos[None])
            salient = select_salient(saliency, torch.ones(1, gap, dtype=torch.bool), cfg.saliency_ratio)[0]
            cache.quantize(keys[:, -gap:], values[:, -gap:], salient, cfg)
            cache.buffer_keys.clear()
            cache.buffer_values.clear()
        hidden = hidden + attn.o_proj(out.transpose(0, 1).reshape(1, 1, -1).to(hidden.dtype))
        hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
    return model.lm_head(body.norm(hidden))


@torch.no_grad()
def zipcache_logits(model: nn.Module, input_ids: torch.Tensor, prompt_length: int, *, high_bits: int = HIGH_BITS,
                    low_bits: int = LOW_BITS, saliency_ratio: float = SALIENCY_RATIO,
                    probe_ratio: float = PROBE_RATIO, streaming_gap: int = STREAMING_GAP,
                    seed: int = 0) -> torch.Tensor:
    """Teacher-forced logits [1, S, V] of a Llama-family `*ForCausalLM` under ZipCache: the first
    `prompt_length` tokens prefilled, the rest decoded one by one. `seed` draws the random probe queries
    (`probe_queries(prompt_length, probe_ratio, torch.Generator().manual_seed(seed))`)."""
    if input_ids.shape[0] != 1:
        raise ValueError("the reference runs one sequence at a time")
    if not 1 <= prompt_length <= input_ids.shape[1]:
        raise ValueError(f"prompt_length must be in [1, {input_ids.shape[1]}], got {prompt_length}")
    cfg = _Settings(high_bits, low_bits, saliency_ratio, streaming_gap)
    caches = [_LayerCache() for _ in model.model.layers]
    probes = probe_queries(prompt_length, probe_ratio, torch.Generator().manual_seed(seed))
    logits = [_prefill(model, input_ids[:, :prompt_length], probes, caches, cfg)]
    tokens = input_ids[0].tolist()
    for position in range(prompt_length, len(tokens)):
        logits.append(_decode(model, tokens[position], position, caches, cfg))
    return torch.cat(logits, dim=1)
