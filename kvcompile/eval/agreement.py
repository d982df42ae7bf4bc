"""How closely a runnable's next-token distributions follow a reference's."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@dataclass
class AgreementResult:
    """Top-1 match rate and mean ``KL(reference || runnable)`` over ``positions`` next-token predictions."""

    top1: float
    mean_kl: float
    positions: int


def aligned_chunks(stream_a, stream_b) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Zip two ``logits_stream``s whose chunk sizes may differ into ``(start, logits_a, logits_b)``
    slices covering the same columns."""
    it_a, it_b = iter(stream_a), iter(stream_b)
    start_a, logits_a = next(it_a, (None, None))
    start_b, logits_b = next(it_b, (None, None))
    while logits_a is not None and logits_b is not None:
        if start_a != start_b:
            raise RuntimeError(f"logits streams disagree on columns: {start_a} vs {start_b}")
        n = min(logits_a.shape[1], logits_b.shape[1])
        yield start_a, logits_a[:, :n], logits_b[:, :n]
        start_a, logits_a = start_a + n, logits_a[:, n:]
        start_b, logits_b = start_b + n, logits_b[:, n:]
        if logits_a.shape[1] == 0:
            start_a, logits_a = next(it_a, (None, None))
        if logits_b.shape[1] == 0:
            start_b, logits_b = next(it_b, (None, None))
    if logits_a is not None or logits_b is not None:
        raise RuntimeError("logits streams cover different numbers of columns")


def agreement(
    runnable, reference, input_ids: torch.Tensor, *, attention_mask=None, progress: bool = True
) -> AgreementResult:
    """Compare ``runnable`` against ``reference`` on ``input_ids[B, S]`` (masked positions skipped)."""
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    matches, kl_sum, count = 0, 0.0, 0
    ours_stream = runnable.logits_stream(input_ids, attention_mask)
    theirs_stream = reference.logits_stream(input_ids, attention_mask)
    bar = tqdm(total=input_ids.shape[1], unit="tok", desc="agreement", disable=not progress)
    with torch.no_grad(), bar:
        for start, ours, theirs in aligned_chunks(ours_stream, theirs_stream):
            keep = mask[:, start : start + ours.shape[1]].to(ours.device)
            log_p = F.log_softmax(theirs.float().to(ours.device), dim=-1)[keep]
            log_q = F.log_softmax(ours.float(), dim=-1)[keep]
            matches += (log_p.argmax(-1) == log_q.argmax(-1)).sum().item()
            kl_sum += F.kl_div(log_q, log_p, log_target=True, reduction="sum").item()
            count += log_p.shape[0]
            bar.update(ours.shape[1])
    if count == 0:
        raise ValueError("no unmasked positions to compare")
    return AgreementResult(top1=matches / count, mean_kl=kl_sum / count, positions=count)
