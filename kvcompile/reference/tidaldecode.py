"""Reference for TidalDecode (arXiv:2410.05076) on Llama-family models, written directly from the paper.

Tokens before `dense_tokens` (the prompt) are prefilled with full attention. Every later token is a decode step:
layers before the first token-selection layer read every earlier token; a token-selection layer reads every
earlier token and then keeps, per KV head, the `token_budget - 1` earlier tokens with the most attention summed
over that head's query group; every other layer reads the tokens kept by the last selection layer above it, plus
the new token itself.

Cache correction: after every `correction_interval` decoded tokens, those tokens are recomputed with full
attention over the (already corrected) earlier cache, replacing their keys and values; the logits of the last one
are those of the recomputation.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from kvcompile.reference.token_by_token import LayerView, TokenByToken, top_tokens


def tidal_policy(token_budget: int, selection_layers: tuple[int, ...]):
    """The read policy of one TidalDecode decode step (it carries the selection from layer to layer)."""
    kept: list[list[int]] = []

    def policy(view: LayerView) -> Optional[list[list[int]]]:
        if view.layer < selection_layers[0]:
            return None
        if view.layer in selection_layers:
            kv_heads = view.keys.shape[1]
            mass = view.probs[:, :view.position].reshape(kv_heads, view.group, view.position).sum(dim=1)
            kept[:] = [top_tokens(head_mass, token_budget - 1) for head_mass in mass]
            return None
        return kept

    return policy


@torch.no_grad()
def tidaldecode_logits(model: nn.Module, input_ids: torch.Tensor, token_budget: int,
                       selection_layers: tuple[int, ...], dense_tokens: int = 0,
                       correction_interval: Optional[int] = None) -> torch.Tensor:
    """Logits [1, S, V] of `input_ids` [1, S]: the first `dense_tokens` prefilled densely, the rest decoded."""
    if input_ids.shape[0] != 1:
        raise ValueError("the reference runs one sequence at a time")
    tokens = input_ids[0].tolist()
    runner = TokenByToken(model)
    logits, decoded = [], 0
    for t, token in enumerate(tokens):
        if t < dense_tokens:
            logits.append(runner.step(token))
            continue
        decoded += 1
        if correction_interval and decoded % correction_interval == 0:
            start = t - correction_interval + 1
            runner.truncate(start)
            for u in range(start, t + 1):
                out = runner.step(tokens[u])
            logits.append(out)
        else:
            logits.append(runner.step(token, tidal_policy(token_budget, tuple(selection_layers))))
    return torch.stack(logits)[None]
