"""Passkey retrieval: find a number hidden at some depth of a long, repetitive filler text."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

INTRO = (
    "There is an important info hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about the important information there."
)
FILLER_SENTENCES = (
    "The grass is green.", "The sky is blue.", "The sun is yellow.", "Here we go.", "There and back again.",
)
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? The pass key is"


@dataclass
class PasskeyPrompt:
    """A passkey prompt as text and as ``input_ids[1, L]``, with the key it hides."""

    text: str
    input_ids: torch.Tensor
    passkey: str


@dataclass
class PasskeyResult:
    """Retrieval accuracy overall and per ``(length, depth)`` cell, each cell over ``trials`` keys."""

    accuracy: float
    cells: dict[tuple[int, float], float]
    trials: int


def _filler(num_sentences: int) -> list[str]:
    """The first ``num_sentences`` sentences of the endlessly repeated filler."""
    return [FILLER_SENTENCES[i % len(FILLER_SENTENCES)] for i in range(num_sentences)]


def _num_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def make_passkey_prompt(tokenizer, length: int, depth: float, passkey=None, seed: int = 0) -> PasskeyPrompt:
    """Build a prompt of about ``length`` tokens hiding ``passkey`` after a ``depth`` fraction of the filler.

    Without ``passkey``, a 5-digit key is drawn from ``random.Random(seed)``.
    """
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    key = str(passkey) if passkey is not None else str(random.Random(seed).randrange(10_000, 100_000))
    needle = NEEDLE.format(key=key)
    fixed = _num_tokens(tokenizer, " ".join((INTRO, needle, QUESTION)))
    cycle = " " + " ".join(FILLER_SENTENCES)
    per_sentence = _num_tokens(tokenizer, cycle) / len(FILLER_SENTENCES)
    sentences = max(0, round((length - fixed) / per_sentence))
    before = round(depth * sentences)
    filler = _filler(sentences)
    text = " ".join((INTRO, *filler[:before], needle, *filler[before:], QUESTION))
    input_ids = tokenizer(text, return_tensors="pt")["input_ids"]
    return PasskeyPrompt(text=text, input_ids=input_ids, passkey=key)


def retrieves(runnable, tokenizer, prompt: PasskeyPrompt, max_new_tokens: int = 8) -> bool:
    """Whether the greedy continuation of ``prompt`` contains its passkey."""
    ids = prompt.input_ids
    out = runnable.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False
    )
    return prompt.passkey in tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


def passkey_accuracy(
    runnable,
    tokenizer,
    lengths,
    depths,
    trials: int,
    seed: int = 0,
    max_new_tokens: int = 8,
    progress: bool = True,
) -> PasskeyResult:
    """Fraction of ``trials`` random keys retrieved for every prompt ``length`` and needle ``depth``.

    The same keys (drawn from ``seed``) are used in every cell, so cells are comparable.
    """
    if trials < 1 or not lengths or not depths:
        raise ValueError("passkey_accuracy needs trials >= 1 and at least one length and depth")
    rng = random.Random(seed)
    keys = [rng.randrange(10_000, 100_000) for _ in range(trials)]
    cells = {}
    with tqdm(total=len(lengths) * len(depths) * trials, desc="passkey", disable=not progress) as bar:
        for length in lengths:
            for depth in depths:
                hits = 0
                for key in keys:
                    prompt = make_passkey_prompt(tokenizer, length, depth, passkey=key)
                    hits += retrieves(runnable, tokenizer, prompt, max_new_tokens)
                    bar.update(1)
                cells[(length, depth)] = hits / trials
    accuracy = sum(cells.values()) / len(cells)
    return PasskeyResult(accuracy=accuracy, cells=cells, trials=trials)
