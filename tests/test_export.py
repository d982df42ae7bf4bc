"""ONNX export with explicit cache state: ONNX Runtime equals torch eager, graphs are valid and TensorRT-parsable."""
import importlib.util
from pathlib import Path

import pytest
import torch
from torch import fx

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

import onnx  # noqa: E402

import kvcompile  # noqa: E402
from conftest import VOCAB, left_padded_batch, rel_err, tiny_hf_model  # noqa: E402
from kvcompile.backends import onnxruntime as ort_backend  # noqa: E402
from kvcompile.backends import tensorrt as trt_backend  # noqa: E402
from kvcompile.backends.manifest import Manifest  # noqa: E402
from kvcompile.backends.onnx_export import FUNCTIONAL_FORMS  # noqa: E402
from kvcompile.cache import SLOTS, CacheLayout, KVState, StateSpec  # noqa: E402
from kvcompile.graph.functional import functionalise  # noqa: E402
from kvcompile.passes import StreamingLLM  # noqa: E402

NEW_TOKENS = 10
# Streaming cache of 2 sinks + 6 window slots: prompts of 4 fit it, prompts of 20 overflow it.
PASSES = {"dense": ["dense"], "streamingllm": [StreamingLLM(sink_tokens=2, window_tokens=6)]}
BATCHES = {"1x4": ([4], 4), "1x20": ([20], 20), "3x4": ([4, 1, 3], 4), "3x20": ([20, 4, 13], 20)}


@pytest.fixture(scope="module", params=list(PASSES))
def exported(request, tmp_path_factory):
    """(eager OptimizedModel, ONNX Runtime runner, export directory) per pass; streaming is left unpinned."""
    pinned = 32 if request.param == "dense" else None
    opt = kvcompile.optimize(tiny_hf_model("llama"), PASSES[request.param], prefill_chunk=8, max_cache_len=pinned)
    directory = kvcompile.export(opt, tmp_path_factory.mktemp(request.param), format="onnx")
    return opt, ort_backend.load(directory, providers=["CPUExecutionProvider"]), directory


@pytest.mark.parametrize("batch", list(BATCHES))
def test_generation_equals_eager(exported, batch):
    opt, runner, _ = exported
    ids, mask = left_padded_batch(*BATCHES[batch])
    kwargs = dict(max_new_tokens=NEW_TOKENS, return_dict_in_generate=True, output_logits=True, eos_token_id=[])
    ref = opt.generate(ids, mask, **kwargs)
    out = runner.generate(ids, mask, **kwargs)
    assert torch.equal(out.sequences, ref.sequences)
    for got, want in zip(out.logits, ref.logits, strict=True):
        assert rel_err(got, want) < 1e-4


def test_teacher_forced_logits_equal_eager(exported):
    opt, runner, _ = exported
    ids, mask = left_padded_batch([20, 4, 13], 20)
    real = mask.bool()
    assert rel_err(runner(ids, mask)[real], opt(ids, mask)[real]) < 1e-4


def test_graphs_pass_onnx_checker_and_tensorrt_op_check(exported):
    _, _, directory = exported
    for step in Manifest.load(directory).steps:
        path = Path(directory) / step.onnx
        onnx.checker.check_model(str(path), full_check=True)
        onnx.shape_inference.infer_shapes(onnx.load(str(path)), check_type=True, strict_mode=True)
        assert trt_backend.unsupported_ops(path) == {}
        trt_backend.check_ops(path)


def test_manifest_describes_every_graph_input_and_output(exported):
    opt, _, directory = exported
    manifest = Manifest.load(directory)
    assert [s.seq_len for s in manifest.steps] == [1, 8]
    assert len(manifest.state) == 3 * 2  # keys, values, slot positions per layer
    for step in manifest.steps:
        graph = onnx.load(str(Path(directory) / step.onnx)).graph
        shapes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                  for v in [*graph.input, *graph.output]}
        named = [*manifest.inputs, *manifest.outputs]
        assert set(shapes) == {t.name for t in named} | {s.input for s in manifest.state} | {
            s.output for s in manifest.state}
        for tensor in named:
            assert shapes[tensor.name] == [step.seq_len if d == "seq_len" else d for d in tensor.shape]
        for state in manifest.state:
            assert shapes[state.input] == shapes[state.output] == state.shape
            assert state.meaning and state.role in ("keys", "values", "positions")
    assert manifest.max_cache_len == (32 if opt.max_cache_len else None)


@pytest.mark.parametrize("exported", ["streamingllm"], indirect=True)
def test_streaming_export_generates_past_any_length(exported):
    opt, runner, _ = exported
    ids = torch.randint(1, VOCAB, (1, 5), generator=torch.Generator().manual_seed(2))
    assert torch.equal(runner.generate(ids, max_new_tokens=40, eos_token_id=[]),
                       opt.generate(ids, max_new_tokens=40, eos_token_id=[]))


def test_dense_export_needs_a_cache_size(tmp_path):
    opt = kvcompile.optimize(tiny_hf_model("llama"), ["dense"], prefill_chunk=8)
    with pytest.raises(kvcompile.KVCompileError, match="max_cache_len=N"):
        kvcompile.export(opt, tmp_path)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("exported", ["dense"], indirect=True)
def test_runner_refuses_more_tokens_than_exported(exported):
    _, runner, _ = exported
    ids, mask = left_padded_batch([20], 20)
    with pytest.raises(kvcompile.InputError, match="max_cache_len=32"):
        runner.generate(ids, mask, max_new_tokens=20)


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None and torch.cuda.is_available(),
                    reason="TensorRT and a GPU are present")
def test_tensorrt_without_tensorrt_or_gpu_fails_clearly(tmp_path):
    opt = kvcompile.optimize(tiny_hf_model("llama"), ["dense"], prefill_chunk=8, max_cache_len=16)
    with pytest.raises(kvcompile.KVCompileError, match="tensorrt|NVIDIA GPU"):
        kvcompile.export(opt, tmp_path, format="tensorrt")
    assert not any(tmp_path.iterdir())


def test_tensorrt_op_check_names_unsupported_ops(tmp_path):
    nodes = [onnx.helper.make_node("IsNaN", ["x"], ["nan"]), onnx.helper.make_node("Not", ["nan"], ["y"]),
             onnx.helper.make_node("Mystery", ["y"], ["z"], domain="custom")]
    vi = onnx.helper.make_tensor_value_info
    graph = onnx.helper.make_graph(nodes, "g", [vi("x", onnx.TensorProto.FLOAT, [2])],
                                   [vi("z", onnx.TensorProto.BOOL, [2])])
    path = tmp_path / "bad.onnx"
    onnx.save(onnx.helper.make_model(graph), str(path))
    assert trt_backend.unsupported_ops(path) == {"IsNaN": 1, "custom::Mystery": 1}
    with pytest.raises(kvcompile.KVCompileError, match=r"IsNaN \(x1\), custom::Mystery \(x1\)"):
        trt_backend.check_ops(path)


def test_state_read_outside_a_functional_op_is_named():
    state = KVState()
    target = state.declare(StateSpec("layer0_keys", "keys", CacheLayout(), (1, SLOTS, 4), torch.float32))
    graph = fx.Graph()
    x = graph.placeholder("x")
    graph.output(graph.call_function(torch.ops.aten.add.Tensor, (x, graph.get_attr(target))))
    root = torch.nn.Module()
    root.kv_state = state
    module = fx.GraphModule(root, graph)
    with pytest.raises(kvcompile.KVCompileError, match="'kv_state.layer0_keys' is used by node 'add_tensor'"):
        functionalise(module, ["layer0_keys"], FUNCTIONAL_FORMS)


def test_unknown_format_is_an_error(tmp_path):
    opt = kvcompile.optimize(tiny_hf_model("llama"), ["dense"], prefill_chunk=8, max_cache_len=16)
    with pytest.raises(kvcompile.KVCompileError, match="onnx, tensorrt"):
        kvcompile.export(opt, tmp_path, format="tflite")
