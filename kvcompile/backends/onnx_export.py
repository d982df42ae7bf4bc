"""Export an optimized model's step graphs to ONNX, cache state as explicit inputs and outputs, plus a manifest.

Each step graph (prefill chunk, decode) becomes `<step>.onnx` computing
`(input_ids, position_ids, past.<state>...) -> (logits, present.<state>...)`; the batch is dynamic, the sequence
length and cache sizes are static. Weights go to `<step>.onnx.data` when a graph would pass ONNX's 2 GB limit.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Optional

import torch

from kvcompile.backends.manifest import BATCH, Manifest, StateInfo, StepInfo, TensorInfo
from kvcompile.cache import StateSpec
from kvcompile.graph.functional import functionalise
from kvcompile.ops.cached_attention_onnx import lower_cached_attention
from kvcompile.runtime.generate import generation_defaults

OPSET = 18  # torch's ONNX op library targets 18; ONNX Runtime and TensorRT 8.6+ parse it

# In-place op -> functional form (returns the updated state), and functional form -> ONNX lowering.
FUNCTIONAL_FORMS = {
    torch.ops.kvcompile.cached_attention.default: torch.ops.kvcompile.cached_attention_functional.default}
LOWERINGS = {torch.ops.kvcompile.cached_attention_functional.default: lower_cached_attention}

_ROLE_MEANING = {
    "keys": "cached keys after rotary embedding, [batch, kv_heads, slots, head_dim]",
    "values": "cached values, [batch, kv_heads, slots, head_dim]",
    "positions": "stream position held by each cache slot, [batch, slots]; -1 marks an empty slot",
}


def export_onnx(opt, directory: Path, max_cache_len: int, unbounded: bool,
                max_batch_size: Optional[int]) -> Manifest:
    """Write one ONNX graph per step of `opt` and `manifest.json` into `directory`; return the manifest.

    State is sized for sequences of `max_cache_len` tokens; `unbounded` records that every cache is a ring
    already at full size, so generation length is not limited.
    """
    directory.mkdir(parents=True, exist_ok=True)
    specs = list(opt.state.specs.values())
    names = [spec.name for spec in specs]
    example_state = [torch.full(spec.shape(2, max_cache_len), spec.fill, dtype=spec.dtype, device=opt.device)
                     for spec in specs]
    steps, vocab = [], None
    for seq_len, step in sorted(opt.steps.items()):
        name = "decode" if seq_len == 1 else "prefill"
        module = functionalise(step.module, names, FUNCTIONAL_FORMS).eval()
        vocab = module.graph.output_node().args[0][0].meta["val"].shape[-1]
        _export_step(module, seq_len, names, example_state, opt.device, directory / f"{name}.onnx")
        steps.append(StepInfo(name, seq_len, f"{name}.onnx"))
    config = opt.generation_config
    manifest = Manifest(
        model=opt.model_name,
        passes=[p.describe() for p in opt.passes],
        prefill_chunk=opt.prefill_chunk,
        max_cache_len=None if unbounded else max_cache_len,
        max_batch_size=max_batch_size,
        opset=OPSET,
        steps=steps,
        inputs=[TensorInfo("input_ids", [BATCH, "seq_len"], "int64", "token ids of the step's new tokens; any id "
                           "on padding"),
                TensorInfo("position_ids", [BATCH, "seq_len"], "int64", "stream position of each new token, "
                           "counted from the row's first real token; -1 marks padding, which the cache ignores")],
        outputs=[TensorInfo("logits", [BATCH, "seq_len", int(vocab)], _dtype_name(opt.dtype),
                            "next-token logits after each new token")],
        state=[_state_info(spec, max_cache_len) for spec in specs],
        generation=generation_defaults(config),
    )
    manifest.save(directory)
    return manifest


def _export_step(module: torch.fx.GraphModule, seq_len: int, names: list[str], example_state: list[torch.Tensor],
                 device: torch.device, path: Path) -> None:
    input_ids = torch.zeros(2, seq_len, dtype=torch.long, device=device)
    position_ids = torch.arange(seq_len, device=device).expand(2, seq_len).contiguous()
    args = (input_ids, position_ids, *example_state)
    batch = torch.export.Dim(BATCH, min=1, max=4096)
    # The exporter logs a warning for every torchvision op it cannot register; none is used here.
    registry_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry_log.level
    registry_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # Every input shares the one batch dimension, which the exporter reports once per input.
            warnings.filterwarnings("ignore", message="# The axis name")
            program = torch.onnx.export(
                module, args, dynamo=True, opset_version=OPSET, verbose=False,
                input_names=["input_ids", "position_ids", *(f"past.{n}" for n in names)],
                output_names=["logits", *(f"present.{n}" for n in names)],
                dynamic_shapes=tuple({0: batch} for _ in args),
                custom_translation_table=LOWERINGS)
    finally:
        registry_log.setLevel(level)
    program.save(path)  # weights inline, or in `<file>.data` past ONNX's 2 GB protobuf limit


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _state_info(spec: StateSpec, max_cache_len: int) -> StateInfo:
    shape = list(spec.shape(1, max_cache_len))
    meaning = (f"{spec.name}: {_ROLE_MEANING.get(spec.role, spec.role)}; {spec.layout.describe()}, then one scratch "
               "slot that is never read")
    return StateInfo(input=f"past.{spec.name}", output=f"present.{spec.name}", shape=[BATCH, *shape[1:]],
                     dtype=_dtype_name(spec.dtype), initial=spec.fill, role=spec.role,
                     sink_tokens=spec.layout.sink_tokens, window_tokens=spec.layout.window_tokens, meaning=meaning)
