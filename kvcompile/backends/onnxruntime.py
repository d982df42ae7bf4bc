"""Run an exported directory with ONNX Runtime through kvcompile's generate loop.

    runner = kvcompile.backends.onnxruntime.load("out/", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
    runner.generate(input_ids, max_new_tokens=64)

Inputs, outputs and cache state are torch tensors bound to the session with IOBinding, on the device of the
session's execution provider: on CUDA the state never leaves the GPU. ONNX graphs cannot update a tensor in
place, so the state is double-buffered: a step reads `past.*` from one set and writes `present.*` into the other,
then the two swap (twice the state's memory, no copies between steps).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from kvcompile.backends.manifest import BATCH, Manifest
from kvcompile.errors import InputError, KVCompileError
from kvcompile.runtime import generate as runtime

_GPU_PROVIDERS = ("CUDAExecutionProvider", "TensorrtExecutionProvider")
_NUMPY_TYPES = {torch.float32: np.float32, torch.float16: np.float16, torch.float64: np.float64,
                torch.int64: np.int64, torch.int32: np.int32, torch.bool: np.bool_}


def load(path: Union[str, Path], providers: Optional[list] = None, session_options=None) -> "OnnxRuntimeRunner":
    """Open the directory written by `kvcompile.export(opt, path, format="onnx")`.

    `providers` are ONNX Runtime execution providers in order of preference (default: CUDA when this
    onnxruntime build has it, then CPU); the state lives on the device of the first one the session uses.
    """
    try:
        import onnxruntime
    except ImportError as error:
        raise KVCompileError("the ONNX Runtime backend needs the onnxruntime package: pip install "
                             "'kvcompile[onnx]' (or onnxruntime-gpu for CUDA).") from error
    directory = Path(path)
    manifest = Manifest.load(directory)
    if providers is None:
        available = onnxruntime.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
    sessions = {step.seq_len: onnxruntime.InferenceSession(str(directory / step.onnx), sess_options=session_options,
                                                           providers=providers)
                for step in manifest.steps}
    return OnnxRuntimeRunner(manifest, sessions)


def _session_device(session) -> torch.device:
    """The device an ONNX Runtime session computes on: its first GPU provider's, else the CPU."""
    options = session.get_provider_options()
    for provider in session.get_providers():
        if provider in _GPU_PROVIDERS:
            return torch.device("cuda", int(options.get(provider, {}).get("device_id", 0)))
    return torch.device("cpu")


class OnnxRuntimeRunner(runtime.Runner):
    """Exported step graphs under ONNX Runtime: a `StepRunner` with the generate API of `OptimizedModel`."""

    def __init__(self, manifest: Manifest, sessions: dict):
        self.manifest = manifest
        self.prefill_chunk = manifest.prefill_chunk
        self.generation_defaults = manifest.generation
        self._sessions = sessions
        self.device = _session_device(next(iter(sessions.values())))
        self._state: list[torch.Tensor] = []    # read by the next step as past.*
        self._spare: list[torch.Tensor] = []    # written by the next step as present.*, then swapped in
        self._batch: Optional[int] = None

    # --- the StepRunner protocol used by the generate loop -------------------------------------------------
    def reserve(self, batch: int, max_len: int) -> None:
        """Allocate (or empty) the cache state for `batch` rows of at most `max_len` tokens."""
        manifest = self.manifest
        if manifest.max_batch_size is not None and batch > manifest.max_batch_size:
            raise InputError(f"batch of {batch} rows exceeds the exported max_batch_size="
                             f"{manifest.max_batch_size}; split the batch or export with a larger max_batch_size.")
        if manifest.max_cache_len is not None and max_len > manifest.max_cache_len:
            raise InputError(f"prompt plus new tokens need {max_len} cache positions but the model was exported "
                             f"with max_cache_len={manifest.max_cache_len}; shorten the prompt or max_new_tokens, "
                             "or export(..., max_cache_len=N) with a larger N.")
        if batch == self._batch:
            for tensor, info in zip(self._state, manifest.state):
                tensor.fill_(info.initial)
            return
        self._state, self._spare = [], []
        for info in manifest.state:
            shape = [batch if d == BATCH else d for d in info.shape]
            dtype = getattr(torch, info.dtype)
            self._state.append(torch.full(shape, info.initial, dtype=dtype, device=self.device))
            self._spare.append(torch.empty(shape, dtype=dtype, device=self.device))
        self._batch = batch

    def run_step(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Logits [B, S, V] for one step of S new tokens per row; advances the cache state."""
        batch, seq_len = input_ids.shape
        if batch != self._batch:
            raise InputError(f"step of {batch} rows but the state holds {self._batch}; call reserve() first.")
        session = self._sessions.get(seq_len)
        if session is None:
            raise KVCompileError(f"no exported step runs {seq_len} tokens per row (have "
                                 f"{sorted(self._sessions)}).")
        logits_info = self.manifest.outputs[0]
        logits = torch.empty(batch, seq_len, logits_info.shape[-1], dtype=getattr(torch, logits_info.dtype),
                             device=self.device)
        # Sliced chunks are views: the session reads raw buffers, so pass contiguous int64 copies.
        inputs = {"input_ids": input_ids.to(self.device, torch.long).contiguous(),
                  "position_ids": positions.to(self.device, torch.long).contiguous()}
        binding = session.io_binding()
        for name, tensor in inputs.items():
            _bind(binding.bind_input, name, tensor)
        for info, past, present in zip(self.manifest.state, self._state, self._spare):
            _bind(binding.bind_input, info.input, past)
            _bind(binding.bind_output, info.output, present)
        _bind(binding.bind_output, logits_info.name, logits)
        if self.device.type == "cuda":
            # torch filled the inputs on its stream; ONNX Runtime computes on its own.
            torch.cuda.current_stream(self.device).synchronize()
        session.run_with_iobinding(binding)
        self._state, self._spare = self._spare, self._state
        return logits


def _bind(bind, name: str, tensor: torch.Tensor) -> None:
    """Bind a contiguous torch tensor's memory as a session input or output."""
    if tensor.dtype not in _NUMPY_TYPES:
        raise KVCompileError(f"{name} has dtype {tensor.dtype}, which the ONNX Runtime runner cannot bind; export "
                             "a float32 or float16 model.")
    bind(name, tensor.device.type, tensor.device.index or 0, _NUMPY_TYPES[tensor.dtype], list(tensor.shape),
         tensor.data_ptr())
