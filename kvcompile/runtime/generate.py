"""The one generate loop, shared by every backend: chunked prefill, decode, sampling, eos, streaming.

A backend provides a `StepRunner`: `reserve(batch, max_len)` sizes the cache for a call, and
`run_step(input_ids, positions)` runs `prefill_chunk` or 1 new tokens per row and returns their logits.
Positions are per-row stream positions with -1 for padding, so left-padded batches need no mask.
"""
from __future__ import annotations

from typing import Iterator, Optional, Protocol

import torch
from tqdm.auto import tqdm

from kvcompile.errors import InputError
from kvcompile.runtime.sampling import next_tokens


# generation_config fields that unset `generate` arguments default to, for every runner.
GENERATION_DEFAULTS = ("do_sample", "temperature", "top_k", "top_p", "eos_token_id", "pad_token_id")


def generation_defaults(config) -> dict:
    """The `GENERATION_DEFAULTS` a transformers `GenerationConfig` (or None) sets."""
    return {k: getattr(config, k) for k in GENERATION_DEFAULTS if getattr(config, k, None) is not None}


def with_defaults(kwargs: dict, defaults: dict) -> dict:
    """`kwargs` with unset (None) arguments taken from `defaults`; those still None are dropped."""
    merged = {**defaults, **{k: v for k, v in kwargs.items() if v is not None}}
    return {k: v for k, v in merged.items() if v is not None}


class StepRunner(Protocol):
    """What the generate loop needs from a backend."""

    prefill_chunk: int
    device: torch.device

    def reserve(self, batch: int, max_len: int) -> None: ...

    def run_step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor: ...


class Runner:
    """The user API every runner shares — `logits_stream`, `__call__`, `generate` — over its `StepRunner` methods.

    Subclasses provide `prefill_chunk`, `device`, `reserve`, `run_step` and `generation_defaults` (the
    generation_config values that unset `generate` arguments take).
    """

    generation_defaults: dict

    def logits_stream(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                      progress: bool = False):
        """Teacher-forced logits, yielded as `(start, logits [B, C, V])` chunk by chunk (bounded memory)."""
        positions = positions_from_mask(input_ids, attention_mask, self.device)
        self.reserve(input_ids.shape[0], input_ids.shape[1])
        yield from stream_logits(self, input_ids, positions, progress)

    def __call__(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Teacher-forced logits [B, S, V] for the whole input."""
        return torch.cat([logits for _, logits in self.logits_stream(input_ids, attention_mask)], dim=1)

    def generate(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, **kwargs):
        """Generate like transformers: greedy or sampling (temperature, top_k, top_p), eos, streamer,
        `return_dict_in_generate` / `output_logits`. Unset arguments default to the model's generation_config.
        """
        return generate(self, input_ids, attention_mask, **with_defaults(kwargs, self.generation_defaults))


def positions_from_mask(input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor],
                        device: torch.device) -> torch.Tensor:
    """Validate inputs and return per-token positions [B, S] (-1 on left padding)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dtype not in (torch.long, torch.int32):
        raise InputError(f"input_ids must be an integer tensor of token ids, got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}; tokenize with "
                         "return_tensors='pt'.")
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise InputError(f"input_ids must have shape [batch, sequence] with at least one token, got "
                         f"{tuple(input_ids.shape)}; add a batch dimension with input_ids[None].")
    if input_ids.device != torch.device(device):
        raise InputError(f"input_ids are on {input_ids.device} but the model is on {device}; move them with "
                         f"input_ids.to('{device}').")
    if attention_mask is None:
        return torch.arange(input_ids.shape[1], device=device).expand_as(input_ids).contiguous()
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask shape {tuple(attention_mask.shape)} differs from input_ids shape "
                         f"{tuple(input_ids.shape)}.")
    mask = attention_mask.to(device=device, dtype=torch.long)
    if not bool((mask[:, -1] == 1).all()):
        raise InputError("every row must end with a real token: use left padding "
                         "(tokenizer.padding_side = 'left').")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise InputError("attention_mask must be 0 on left padding and 1 after it (no holes).")
    return torch.where(mask.bool(), mask.cumsum(dim=1) - 1, -1)


def stream_logits(runner: StepRunner, input_ids: torch.Tensor, positions: torch.Tensor,
                  progress: bool = False) -> Iterator[tuple[int, torch.Tensor]]:
    """Run `input_ids` through the cache in chunks; yield `(start, logits)` for each chunk of columns."""
    chunk = runner.prefill_chunk
    batch, length = input_ids.shape
    starts = range(0, length, chunk)
    for start in tqdm(starts, desc="prefill", unit="chunk", disable=not progress or len(starts) < 2):
        ids, pos = input_ids[:, start:start + chunk], positions[:, start:start + chunk]
        real = ids.shape[1]
        if real < chunk:  # pad the last chunk on the right with tokens the cache ignores
            pad = chunk - real
            ids = torch.cat([ids, ids.new_zeros(batch, pad)], dim=1)
            pos = torch.cat([pos, pos.new_full((batch, pad), -1)], dim=1)
        yield start, runner.run_step(ids, pos)[:, :real]


def generate(runner: StepRunner, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None, *,
             max_new_tokens: int = 20, do_sample: bool = False, temperature: float = 1.0,
             top_k: Optional[int] = None, top_p: Optional[float] = None, eos_token_id=None,
             pad_token_id: Optional[int] = None, streamer=None, return_dict_in_generate: bool = False,
             output_logits: bool = False):
    """Generate like `transformers` `generate`: returns sequences [B, S + new] (or an output object)."""
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens must be >= 1, got {max_new_tokens}.")
    if temperature <= 0:
        raise InputError(f"temperature must be > 0, got {temperature}; use do_sample=False for greedy decoding.")
    if streamer is not None and input_ids.shape[0] != 1:
        raise InputError("a streamer takes batch size 1; generate rows one at a time to stream them.")
    positions = positions_from_mask(input_ids, attention_mask, runner.device)
    batch, length = input_ids.shape
    runner.reserve(batch, length + max_new_tokens)
    eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []),
                       device=runner.device, dtype=torch.long)
    pad = pad_token_id if pad_token_id is not None else (int(eos[0]) if len(eos) else 0)

    last_logits = None
    for _, logits in stream_logits(runner, input_ids, positions):
        last_logits = logits[:, -1]
    if streamer is not None:
        streamer.put(input_ids.cpu())
    sequences, step_logits = input_ids, []
    finished = torch.zeros(batch, dtype=torch.bool, device=runner.device)
    next_position = positions[:, -1:] + 1
    for step in range(max_new_tokens):
        step_logits.append(last_logits.float())
        tokens = next_tokens(last_logits, do_sample, temperature, top_k, top_p)
        tokens = torch.where(finished, pad, tokens)
        sequences = torch.cat([sequences, tokens[:, None]], dim=1)
        if streamer is not None:
            streamer.put(tokens.cpu())
        finished |= torch.isin(tokens, eos)
        if step == max_new_tokens - 1 or (len(eos) and bool(finished.all())):  # no host sync without eos
            break
        last_logits = runner.run_step(tokens[:, None], next_position)[:, -1]
        next_position = next_position + 1
    if streamer is not None:
        streamer.end()
    if not return_dict_in_generate:
        return sequences
    from transformers.generation.utils import GenerateDecoderOnlyOutput
    return GenerateDecoderOnlyOutput(sequences=sequences, logits=tuple(step_logits) if output_logits else None)
