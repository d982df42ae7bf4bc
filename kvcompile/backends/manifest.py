"""`manifest.json`: what an exported directory holds and how to run it, read by every runner.

It names each step graph (file, tokens per row), the graph inputs and outputs, and every piece of cache state
a pass added: its input/output names, shape (`"batch"` for the dynamic batch), dtype, initial fill and meaning.
A runner allocates the state from it, passes `present.*` outputs back as the next step's `past.*` inputs, and
needs nothing else from kvcompile's passes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Union

from kvcompile.errors import KVCompileError

FILENAME = "manifest.json"
VERSION = 1
BATCH = "batch"

Dim = Union[int, str]


@dataclass
class TensorInfo:
    """A graph input or output that is not cache state."""

    name: str
    shape: list[Dim]
    dtype: str
    meaning: str


@dataclass
class StateInfo:
    """One cache-state tensor: fed as `input`, returned updated as `output`, and passed on to the next step."""

    input: str
    output: str
    shape: list[Dim]
    dtype: str
    initial: int          # fill value of an empty cache (0 for keys/values, -1 for slot positions)
    role: str             # "keys" | "values" | "positions"
    sink_tokens: int      # cache layout: 0 window tokens is a dense cache
    window_tokens: int
    meaning: str


@dataclass
class StepInfo:
    """One step graph: `seq_len` new tokens per row (the prefill chunk, or 1 for decode)."""

    name: str
    seq_len: int
    onnx: str
    engine: Optional[str] = None   # TensorRT engine file, once built


@dataclass
class Manifest:
    """Everything a runner needs to allocate state and drive the exported steps."""

    model: str
    passes: list[str]
    prefill_chunk: int
    max_cache_len: Optional[int]     # longest prompt + generation the state holds; None: unbounded (ring caches)
    max_batch_size: Optional[int]    # None: any batch (the ONNX graphs are batch-dynamic)
    opset: int
    steps: list[StepInfo]
    inputs: list[TensorInfo]
    outputs: list[TensorInfo]
    state: list[StateInfo]
    generation: dict = field(default_factory=dict)   # generation_config defaults (eos, pad, sampling)
    version: int = VERSION

    def step(self, seq_len: int) -> StepInfo:
        """The step graph that runs `seq_len` tokens per row."""
        for step in self.steps:
            if step.seq_len == seq_len:
                return step
        raise KVCompileError(f"no exported step runs {seq_len} tokens per row; this export has "
                             f"{[s.seq_len for s in self.steps]}.")

    def save(self, directory: Path) -> Path:
        """Write `manifest.json` into `directory`."""
        path = Path(directory) / FILENAME
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, directory: Union[str, Path]) -> "Manifest":
        """Read `manifest.json` from an exported directory."""
        path = Path(directory) / FILENAME
        if not path.is_file():
            raise KVCompileError(f"{path} not found; pass the directory written by kvcompile.export(opt, path).")
        data = json.loads(path.read_text())
        if data.get("version") != VERSION:
            raise KVCompileError(f"{path} has manifest version {data.get('version')}, this kvcompile reads "
                                 f"version {VERSION}; export the model again with this version.")
        return cls(**{**data,
                      "steps": [StepInfo(**s) for s in data["steps"]],
                      "inputs": [TensorInfo(**t) for t in data["inputs"]],
                      "outputs": [TensorInfo(**t) for t in data["outputs"]],
                      "state": [StateInfo(**s) for s in data["state"]]})
