"""Reference for TokenSelect (arXiv:2411.02886) on Llama-family models, written directly from the paper.

Tokens before `dense_tokens` (the prompt) are prefilled with full attention. At every later token, in every
layer, when more tokens exist than `init + top_k + local`, the query reads the first `init` tokens, the last
`local` tokens (itself included) and the `top_k` other earlier tokens with the most soft votes: each query head's
criticality q·k (unscaled), softmax-normalised per head over the candidates and summed over all heads.
Selection cache: a layer reuses its last fresh choice of top-k tokens while the cosine similarity between the
current query (all heads, before rotary) and the query that made that choice is at least `threshold` (less
the ops' 1e-6 `SIMILARITY_SLACK`, so float rounding of an identical query's similarity does not decide).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kvcompile.ops.sparse_attention import SIMILARITY_SLACK
from kvcompile.reference.token_by_token import LayerView, TokenByToken, top_tokens


class TokenSelectPolicy:
    """TokenSelect's read policy; holds each layer's selection cache across decode steps."""

    def __init__(self, init: int, local: int, top_k: int, threshold: Optional[float]):
        self.init, self.local, self.top_k, self.threshold = init, local, top_k, threshold
        self.cache: dict[int, tuple[torch.Tensor, list[int]]] = {}

    def __call__(self, view: LayerView) -> Optional[list[list[int]]]:
        t = view.position
        if t + 1 <= self.init + self.local + self.top_k:
            return None
        pinned = [j for j in range(t) if j < self.init or j > t - self.local]
        middle = [j for j in range(t) if j not in set(pinned)]
        fingerprint = view.query_unrotated.flatten()
        cached = self.cache.get(view.layer)
        if (cached is not None and self.threshold is not None
                and torch.cosine_similarity(fingerprint, cached[0], dim=0) >= self.threshold - SIMILARITY_SLACK):
            chosen = cached[1]
        else:
            keys = view.keys[middle].repeat_interleave(view.group, dim=1)        # [M, Hq, D]
            criticality = torch.einsum("hd,mhd->hm", view.query, keys)
            votes = torch.softmax(criticality, dim=-1).sum(dim=0)
            chosen = [middle[i] for i in top_tokens(votes, self.top_k)]
            self.cache[view.layer] = (fingerprint, chosen)
        kv_heads = view.keys.shape[1]
        return [pinned + chosen for _ in range(kv_heads)]


@torch.no_grad()
def tokenselect_logits(model: nn.Module, input_ids: torch.Tensor, init: int, local: int, top_k: int,
                       threshold: Optional[float] = 0.9, dense_tokens: int = 0) -> torch.Tensor:
    """Logits [1, S, V] of `input_ids` [1, S]: the first `dense_tokens` prefilled densely, the rest decoded."""
    if input_ids.shape[0] != 1:
        raise ValueError("the reference runs one sequence at a time")
    runner, policy = TokenByToken(model), TokenSelectPolicy(init, local, top_k, threshold)
    logits = [runner.step(token, policy if t >= dense_tokens else None)
              for t, token in enumerate(input_ids[0].tolist())]
    return torch.stack(logits)[None]
