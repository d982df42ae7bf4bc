"""Teacher-forced perplexity over a long token stream, computed chunk by chunk."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class PerplexityResult:
    """Per-token losses of one sequence.

    ``nll[i]`` is the negative log-likelihood of token ``i + 1`` given tokens ``0 .. i``.
    ``windows`` maps each requested ``(start, end)`` token range to its perplexity.
    """

    nll: torch.Tensor
    windows: dict[tuple[int, int], float] = field(default_factory=dict)

    @property
    def perplexity(self) -> float:
        """Perplexity over every predicted token."""
        return math.exp(self.nll.double().mean().item())

    def ppl_between(self, start: int, end: int) -> float:
        """Perplexity of predicting tokens ``start .. end - 1`` (token 0 is never predicted)."""
        losses = self.nll[max(start, 1) - 1 : end - 1]
        if losses.numel() == 0:
            raise ValueError(f"no predicted tokens in [{start}, {end})")
        return math.exp(losses.double().mean().item())


def token_nll(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Float32 negative log-likelihood of ``targets[N]`` under ``logits[N, V]``."""
    return F.cross_entropy(logits.float(), targets, reduction="none")


def perplexity(runnable, input_ids: torch.Tensor, *, windows=None, progress: bool = True) -> PerplexityResult:
    """Perplexity of one sequence ``input_ids[1, S]`` from ``runnable.logits_stream``.

    Only one chunk of logits is alive at a time. ``windows`` is an optional iterable of
    ``(start, end)`` token ranges whose perplexities are reported in ``result.windows``.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"perplexity expects input_ids of shape [1, S], got {tuple(input_ids.shape)}")
    seq_len = input_ids.shape[1]
    targets = input_ids[0, 1:]
    nll = torch.empty(seq_len - 1, dtype=torch.float32)
    done = 0
    with torch.no_grad(), tqdm(total=seq_len, unit="tok", desc="perplexity", disable=not progress) as bar:
        for start, logits in runnable.logits_stream(input_ids):
            if start != done:
                raise RuntimeError(f"logits_stream jumped to column {start}, expected {done}")
            width = logits.shape[1]
            n = min(width, seq_len - 1 - start)
            nll[start : start + n] = token_nll(logits[0, :n], targets[start : start + n].to(logits.device)).cpu()
            done += width
            bar.update(width)
    if done != seq_len:
        raise RuntimeError(f"logits_stream covered {done} of {seq_len} columns")
    result = PerplexityResult(nll)
    result.windows = {(s, e): result.ppl_between(s, e) for s, e in windows or ()}
    return result
