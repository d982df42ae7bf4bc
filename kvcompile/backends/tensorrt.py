"""TensorRT: build engines from an exported ONNX directory, and check graphs against TensorRT's ONNX parser.

    kvcompile.export(opt, "out/", format="tensorrt")     # ONNX export, then out/prefill.engine, out/decode.engine

Engines have one optimization profile: batch 1 to `max_batch_size`, every other dimension static (as exported).
The manifest gains each step's engine file; state inputs/outputs keep the ONNX names.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path
from typing import Optional, Union

from kvcompile.backends.manifest import Manifest
from kvcompile.errors import KVCompileError

DEFAULT_MAX_BATCH = 8

# ONNX operators (default domain) that TensorRT's ONNX parser supports, taken conservatively from onnx-tensorrt's
# docs/operators.md (TensorRT 8.6 and 10.x): operators added only in later releases, or supported only for a few
# types or attribute values, are left out so a graph that passes here parses on every recent TensorRT.
TENSORRT_ONNX_OPS = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast Ceil Celu Clip
Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace DequantizeLinear Div Dropout
Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather GatherElements GatherND Gemm GlobalAveragePool
GlobalMaxPool Greater GreaterOrEqual HardSigmoid HardSwish Hardmax Identity If InstanceNormalization
LayerNormalization LeakyRelu Less LessOrEqual Log LogSoftmax LRN MatMul Max MaxPool Mean Min Mul Neg NonZero
Not OneHot Or Pad Pow PRelu QuantizeLinear Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp
ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize Round ScatterElements
ScatterND Selu Shape Sigmoid Sign Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze
Sub Sum Tan Tanh ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Where Xor
""".split())


def unsupported_ops(model) -> Counter:
    """Op types in `model` (an `onnx.ModelProto` or a path) outside `TENSORRT_ONNX_OPS`, with their counts.

    Subgraphs (If branches) and local functions are searched too; ops of non-standard domains count as
    unsupported.
    """
    import onnx

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model), load_external_data=False)
    found = Counter()
    graphs = [model.graph, *model.functions]
    while graphs:
        graph = graphs.pop()
        for node in graph.node:
            if node.domain not in ("", "ai.onnx") or node.op_type not in TENSORRT_ONNX_OPS:
                found[f"{node.domain}::{node.op_type}" if node.domain else node.op_type] += 1
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.HasField("g") else attr.graphs)
    return found


def check_ops(path: Union[str, Path]) -> None:
    """Raise `KVCompileError` naming every op of the ONNX file `path` that TensorRT's parser may reject."""
    found = unsupported_ops(path)
    if found:
        listed = ", ".join(f"{op} (x{n})" for op, n in sorted(found.items()))
        raise KVCompileError(f"{path} uses ONNX operators outside TensorRT's ONNX parser support list: {listed}. "
                             "Give the op that produces them a lowering from supported ops.")


def require():
    """The `tensorrt` module, or a clear error when it or a CUDA GPU is missing."""
    try:
        import tensorrt
    except ImportError as error:
        raise KVCompileError("building TensorRT engines needs the tensorrt package (pip install "
                             "'kvcompile[tensorrt]') and an NVIDIA GPU; format='onnx' exports without it.") from error
    import torch

    if not torch.cuda.is_available():
        raise KVCompileError("building TensorRT engines needs an NVIDIA GPU and none is visible to this process; "
                             "build on the GPU machine that will run the engines (engines are GPU-specific).")
    return tensorrt


def build_engines(directory: Union[str, Path], *, max_batch_size: Optional[int] = None, fp16: bool = False,
                  workspace_bytes: Optional[int] = None) -> list[Path]:
    """Build `<step>.engine` for every ONNX step graph in the exported `directory`; returns the engine paths.

    `max_batch_size` defaults to the exported one, else 8. Records each engine in `manifest.json`.
    """
    trt = require()
    directory = Path(directory)
    manifest = Manifest.load(directory)
    max_batch = max_batch_size or manifest.max_batch_size or DEFAULT_MAX_BATCH
    logger = trt.Logger(trt.Logger.WARNING)
    engines = []
    for step in manifest.steps:
        onnx_path = directory / step.onnx
        check_ops(onnx_path)
        engine_path = onnx_path.with_suffix(".engine")
        engine_path.write_bytes(_build(trt, logger, onnx_path, max_batch, fp16, workspace_bytes))
        step.engine = engine_path.name
        engines.append(engine_path)
    manifest.save(directory)
    return engines


def _build(trt, logger, onnx_path: Path, max_batch: int, fp16: bool, workspace_bytes: Optional[int]) -> bytes:
    """A serialized engine for one ONNX graph whose only dynamic dimension is the leading batch."""
    builder = trt.Builder(logger)
    # TensorRT 10 networks are always explicit-batch; 8.x needs the flag.
    explicit = getattr(trt.NetworkDefinitionCreationFlag, "EXPLICIT_BATCH", None)
    network = builder.create_network(0 if explicit is None else 1 << int(explicit))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from a file, so external weight data is found beside it
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise KVCompileError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    if workspace_bytes:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    if fp16:
        config.set_flag(trt.BuilderFlag.FP16)
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        dims = list(tensor.shape)
        if any(d < 0 for d in dims[1:]):
            raise KVCompileError(f"{onnx_path}: input {tensor.name} has dynamic dimensions {dims} beyond the batch; "
                                 "export fixes every other dimension.")
        profile.set_shape(tensor.name, [1, *dims[1:]], [max_batch, *dims[1:]], [max_batch, *dims[1:]])
    config.add_optimization_profile(profile)
    engine = builder.build_serialized_network(network, config)
    if engine is None:
        raise KVCompileError(f"TensorRT failed to build an engine from {onnx_path}; its log above says why.")
    return bytes(engine)
