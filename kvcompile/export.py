"""`kvcompile.export`: write an optimized model as ONNX graphs that carry their cache, or as TensorRT engines.

    opt = kvcompile.optimize(model, ["streamingllm"], max_cache_len=4096)
    kvcompile.export(opt, "out/", format="onnx")        # prefill.onnx, decode.onnx, manifest.json
    from kvcompile.backends import onnxruntime
    runner = onnxruntime.load("out/", providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from kvcompile.errors import KVCompileError
from kvcompile.optimized import OptimizedModel

FORMATS = ("onnx", "tensorrt")


def export(opt, path: Union[str, Path], format: str = "onnx", *, max_cache_len: Optional[int] = None,
           max_batch_size: Optional[int] = None, fp16: bool = False) -> Path:
    """Export `opt` (an `OptimizedModel`) into the directory `path`; returns the directory.

    The cache has a fixed size in exported graphs: `max_cache_len` (prompt + generated tokens) defaults to the
    one pinned by `optimize(..., max_cache_len=N)`. Ring caches (e.g. `streamingllm`) need neither: they are
    exported at full ring size and generate without a length limit. The batch stays dynamic;
    `max_batch_size` (default: the pinned one) caps it and sets TensorRT's optimization profile (default 8).
    `format="tensorrt"` also builds `<step>.engine` files (needs the `tensorrt` package and an NVIDIA GPU;
    `fp16=True` lets TensorRT use half precision).
    """
    if format not in FORMATS:
        raise KVCompileError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}.")
    if fp16 and format != "tensorrt":
        raise KVCompileError("fp16=True applies to TensorRT engines; ONNX graphs keep the model's dtype "
                             "(optimize a half-precision model to export one).")
    if not isinstance(opt, OptimizedModel):
        raise KVCompileError(f"export() takes the OptimizedModel returned by kvcompile.optimize(), got "
                             f"{type(opt).__name__}.")
    max_cache_len = opt.max_cache_len if max_cache_len is None else max_cache_len
    max_batch_size = opt.max_batch_size if max_batch_size is None else max_batch_size
    for name, value in (("max_cache_len", max_cache_len), ("max_batch_size", max_batch_size)):
        if value is not None and (not isinstance(value, int) or value < 1):
            raise KVCompileError(f"{name} must be a positive integer, got {value!r}.")
    cache_len, unbounded = _cache_length(opt, max_cache_len)
    if format == "tensorrt":
        from kvcompile.backends import tensorrt
        tensorrt.require()  # fail before the slow ONNX export
    from kvcompile.backends.onnx_export import export_onnx
    directory = Path(path)
    export_onnx(opt, directory, cache_len, unbounded, max_batch_size)
    if format == "tensorrt":
        tensorrt.build_engines(directory, max_batch_size=max_batch_size, fp16=fp16)
    return directory


def _cache_length(opt, max_cache_len: Optional[int]) -> tuple[int, bool]:
    """The sequence length the exported state is sized for, and whether generation is unbounded with it."""
    layouts = {spec.layout for spec in opt.state.specs.values()}
    ring_len = max((l.sink_tokens + l.window_tokens for l in layouts), default=0)
    all_rings = bool(layouts) and all(l.window_tokens for l in layouts)
    if max_cache_len is None:
        if not all_rings:
            raise KVCompileError(
                "export needs a fixed cache size: pass optimize(..., max_cache_len=N) or "
                "export(..., max_cache_len=N), N being the longest prompt + generated tokens to serve "
                "(streaming passes such as streamingllm need none).")
        return ring_len, True
    return max_cache_len, all_rings and max_cache_len >= ring_len
