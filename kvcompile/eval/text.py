"""Deterministic long evaluation text: the Python standard library's own source code."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

# Large, long-lived pure-Python stdlib modules, read in this (sorted) order.
STDLIB_MODULES = tuple(
    sorted(
        (
            "argparse", "collections", "dataclasses", "difflib", "enum", "inspect",
            "logging", "pathlib", "pydoc", "subprocess", "tarfile", "threading",
            "typing", "zipfile",
        )
    )
)


def stdlib_sources() -> list[tuple[str, str]]:
    """``(relative path, source)`` of each module in ``STDLIB_MODULES`` found in this install."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = []
    for name in STDLIB_MODULES:
        for rel in (f"{name}.py", f"{name}/__init__.py"):
            if (root / rel).is_file():
                found.append((rel, (root / rel).read_text(encoding="utf-8")))
                break
    return found


def long_text_tokens(tokenizer, num_tokens: int) -> torch.Tensor:
    """Return ``LongTensor[1, num_tokens]``: the first tokens of the concatenated stdlib sources."""
    ids: list[int] = []
    for rel, source in stdlib_sources():
        ids += tokenizer(f"# File: {rel}\n{source}\n\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= num_tokens:
            return torch.tensor([ids[:num_tokens]], dtype=torch.long)
    raise ValueError(
        f"requested {num_tokens} tokens but the standard library sources {STDLIB_MODULES} "
        f"found in {sysconfig.get_paths()['stdlib']} give only {len(ids)}"
    )
