"""Tiny randomly initialised decoders of every supported family, and a plain SDPA module."""
from __future__ import annotations

import os

# Triton kernels run on the CPU through Triton's interpreter; it must be chosen before anything imports triton
# (transformers does, below).
os.environ.setdefault("TRITON_INTERPRET", "1")

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from torch import nn
from transformers import (GPTNeoXConfig, GPTNeoXForCausalLM, LlamaConfig, LlamaForCausalLM, MistralConfig,
                          MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM)

VOCAB = 96


def kernel_device() -> str:
    """Where the Triton kernels under test run: the interpreter takes CPU tensors, a compiled launch
    (TRITON_INTERPRET=0 on a GPU machine) CUDA ones."""
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


# Tests of a CUDA op path whose Triton kernels must run compiled (not interpreted).
compiled_kernels_only = pytest.mark.skipif(
    not torch.cuda.is_available() or kernel_device() == "cpu",
    reason="needs a GPU and the Triton kernels compiled (TRITON_INTERPRET=0)")


def rel_err(a, b):
    """Largest absolute difference relative to the largest magnitude of `b`."""
    return ((a - b).abs().max() / b.abs().max()).item()


def _common(layers: int, **extra):
    return dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                num_attention_heads=4, max_position_embeddings=512, **extra)


def tiny_hf_model(family: str, attn_implementation: str = "sdpa", layers: int = 2) -> nn.Module:
    """A random model of `family` with `layers` layers (two by default) in float32, eval mode."""
    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(**_common(layers, num_key_value_heads=2)))
    elif family == "mistral":
        model = MistralForCausalLM(MistralConfig(**_common(layers, num_key_value_heads=2, sliding_window=None)))
    elif family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**_common(layers, num_key_value_heads=1)))
    elif family == "gpt_neox":
        model = GPTNeoXForCausalLM(GPTNeoXConfig(**_common(layers, rotary_pct=0.5, use_parallel_residual=True)))
    else:
        raise ValueError(family)
    model.config._attn_implementation = attn_implementation
    return model.eval()


class PlainRotaryDecoder(nn.Module):
    """A plain (non-transformers) decoder: RoPE + `F.scaled_dot_product_attention(is_causal=True)`."""

    def __init__(self, vocab=VOCAB, dim=48, heads=6, kv_heads=2, layers=2):
        super().__init__()
        torch.manual_seed(0)
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.embed = nn.Embedding(vocab, dim)
        self.qkv = nn.ModuleList(nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim) for _ in range(layers))
        self.out = nn.ModuleList(nn.Linear(dim, dim) for _ in range(layers))
        self.head = nn.Linear(dim, vocab)
        self.register_buffer("inv_freq", 1.0 / 10000 ** (torch.arange(0, self.head_dim, 2) / self.head_dim))

    def rope(self, x, position_ids):
        angles = position_ids[:, None, :, None].float() * self.inv_freq
        cos, sin = angles.cos(), angles.sin()
        even, odd = x[..., ::2], x[..., 1::2]
        return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)

    def forward(self, input_ids, position_ids):
        x = self.embed(input_ids)
        b, s, _ = x.shape
        for qkv, out in zip(self.qkv, self.out):
            q, k, v = qkv(x).view(b, s, -1, self.head_dim).transpose(1, 2).split(
                [self.heads, self.kv_heads, self.kv_heads], dim=1)
            q, k = self.rope(q, position_ids), self.rope(k, position_ids)
            k = k.repeat_interleave(self.heads // self.kv_heads, dim=1)
            v = v.repeat_interleave(self.heads // self.kv_heads, dim=1)
            a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1 / math.sqrt(self.head_dim))
            x = x + out(a.transpose(1, 2).reshape(b, s, -1))
        return self.head(x)


FAMILIES = ["llama", "mistral", "qwen2", "gpt_neox"]


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def left_padded_batch(lengths, total, seed=1):
    """Random token ids [B, total] left-padded to `total`, with their attention mask."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (len(lengths), total), generator=gen)
    mask = torch.zeros(len(lengths), total, dtype=torch.long)
    for row, n in enumerate(lengths):
        mask[row, total - n:] = 1
    return ids * mask, mask


def hf_logits(model, ids, mask=None):
    """Transformers eager logits, with positions counted from each row's first real token."""
    if mask is None:
        return model(ids).logits
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    return model(ids, attention_mask=mask, position_ids=positions).logits
