"""`kvcompile::skinny_linear` and `kvcompile::skinny_gated_linear` (the decode step's products): their Triton
kernels against `F.linear` (and silu * up), through Triton's interpreter on CPU or compiled on CUDA with
TRITON_INTERPRET=0 (bfloat16 only there: the interpreter's bfloat16 dots are wrong); the ops' choice of path;
and the Inductor backend's routing of a decode step's products."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

import kvcompile  # noqa: E402
from kvcompile.backends.inductor import with_skinny_products  # noqa: E402
from kvcompile.ops.skinny_linear import (MAX_ROWS, skinny_gated_linear, skinny_gated_linear_triton,  # noqa: E402
                                        skinny_linear, skinny_linear_triton)

from conftest import kernel_device, tiny_hf_model  # noqa: E402

LINEAR = torch.ops.aten.linear.default
SKINNY = torch.ops.kvcompile.skinny_linear.default
GATED = torch.ops.kvcompile.skinny_gated_linear.default
KERNEL_DEVICE = kernel_device()
DTYPES = [torch.float32, torch.float16,
          pytest.param(torch.bfloat16, marks=pytest.mark.skipif(KERNEL_DEVICE == "cpu", reason="compiled kernel only"))]
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def on_kernel_device(*tensors):
    return [None if t is None else t.to(KERNEL_DEVICE) for t in tensors]


def gated_reference(x, gate_weight, up_weight):
    """silu(x @ gate.T) * (x @ up.T) computed in float32, rounded to x's dtype after each op as eager rounds."""
    def rounded(t):
        return t.to(x.dtype).float()
    gate = rounded(F.linear(x.float(), gate_weight.float()))
    up = rounded(F.linear(x.float(), up_weight.float()))
    return (rounded(F.silu(gate)) * up).to(x.dtype)


@pytest.mark.parametrize("rows,n,k", [(1, 40, 64), (8, 70, 200), (16, 9000, 96), (3, 5, 300)],
                         ids=["one-row", "ragged", "wide", "k-over-a-block"])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kernel_matches_linear(rows, n, k, with_bias, dtype):
    gen = torch.Generator().manual_seed(rows * n + k)
    x = torch.randn(rows, 1, k, generator=gen).to(dtype)
    weight = (torch.randn(n, k, generator=gen) / 4).to(dtype)
    bias = torch.randn(n, generator=gen).to(dtype) if with_bias else None
    out = skinny_linear_triton(*on_kernel_device(x, weight, bias)).cpu()
    expected = F.linear(x.float(), weight.float(), None if bias is None else bias.float())
    assert out.shape == (rows, 1, n) and out.dtype == dtype
    assert torch.allclose(out.float(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_kernel_keeps_half_precision_and_reads_strided_rows():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=gen).to(torch.float16).t()  # [6, 64], column-major
    weight = (torch.randn(48, 64, generator=gen) / 8).to(torch.float16)
    out = skinny_linear_triton(*on_kernel_device(x, weight)).cpu()
    assert out.dtype == torch.float16
    assert torch.allclose(out.float(), F.linear(x.float(), weight.float()), rtol=1e-2, atol=1e-2)


def test_kernel_takes_a_k_below_one_dot_tile():
    x, weight = torch.randn(2, 3), torch.randn(5, 3)
    assert torch.allclose(skinny_linear_triton(*on_kernel_device(x, weight)).cpu(), F.linear(x, weight), rtol=1e-5,
                          atol=1e-5)


def test_kernel_rejects_what_it_cannot_read():
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows"):
        skinny_linear_triton(torch.randn(MAX_ROWS + 1, 8), torch.randn(4, 8))
    with pytest.raises(ValueError, match="bias"):
        skinny_linear_triton(torch.randn(2, 8), torch.randn(4, 8), torch.randn(8)[::2])  # strided bias


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,n,k", [(1, 40, 64), (8, 70, 200), (16, 300, 24)], ids=["one-row", "ragged", "narrow-k"])
def test_gated_kernel_matches_silu_times_up(rows, n, k, dtype):
    gen = torch.Generator().manual_seed(rows + n + k)
    x = torch.randn(rows, 1, k, generator=gen).to(dtype)
    gate_weight, up_weight = ((torch.randn(n, k, generator=gen) / 4).to(dtype) for _ in range(2))
    out = skinny_gated_linear_triton(*on_kernel_device(x, gate_weight, up_weight)).cpu()
    assert out.shape == (rows, 1, n) and out.dtype == dtype
    expected = gated_reference(x, gate_weight, up_weight).float()
    assert torch.allclose(out.float(), expected, rtol=TOLERANCE[dtype], atol=TOLERANCE[dtype])


def test_gated_kernel_rejects_mismatched_weights():
    with pytest.raises(ValueError, match="two contiguous"):
        skinny_gated_linear_triton(torch.randn(2, 8), torch.randn(4, 8), torch.randn(5, 8))
    with pytest.raises(ValueError, match=f"at most {MAX_ROWS} rows"):
        skinny_gated_linear_triton(torch.randn(MAX_ROWS + 1, 8), torch.randn(4, 8), torch.randn(4, 8))


@pytest.fixture
def kernels_on_cpu(monkeypatch):
    """The op's kernel path on CPU tensors (the interpreter), as on CUDA."""
    if KERNEL_DEVICE != "cpu":
        pytest.skip("the kernels take CPU tensors only under the interpreter")
    monkeypatch.setattr("kvcompile.ops.kernel_switch.kernels_for", lambda t: True)


@pytest.mark.parametrize("case", ["kernel", "strided-bias", "too-many-rows", "empty-k"])
def test_op_equals_linear_whichever_path_it_takes(kernels_on_cpu, case):
    gen = torch.Generator().manual_seed(1)
    rows, k = (MAX_ROWS + 1, 8) if case == "too-many-rows" else (4, 0 if case == "empty-k" else 24)
    x, weight = torch.randn(rows, 1, k, generator=gen), torch.randn(6, k, generator=gen)
    bias = torch.randn(12, generator=gen)[::2] if case == "strided-bias" else torch.randn(6, generator=gen)
    assert torch.allclose(skinny_linear(x, weight, bias), F.linear(x, weight, bias), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["kernel", "too-many-rows", "strided-weight"])
def test_gated_op_equals_silu_times_up_whichever_path_it_takes(kernels_on_cpu, case):
    gen = torch.Generator().manual_seed(2)
    rows = MAX_ROWS + 1 if case == "too-many-rows" else 4
    x = torch.randn(rows, 1, 24, generator=gen)
    gate_weight = torch.randn(6, 24, generator=gen)
    up_weight = torch.randn(24, 6, generator=gen).t() if case == "strided-weight" else torch.randn(6, 24, generator=gen)
    expected = F.silu(F.linear(x, gate_weight)) * F.linear(x, up_weight)
    assert torch.allclose(skinny_gated_linear(x, gate_weight, up_weight), expected, rtol=1e-5, atol=1e-5)


def test_op_registration():
    x, weight, bias = torch.randn(4, 1, 16), torch.randn(8, 16), torch.randn(8)
    torch.library.opcheck(SKINNY, (x, weight, bias))
    torch.library.opcheck(SKINNY, (x, weight, None))
    torch.library.opcheck(GATED, (x, weight, torch.randn(8, 16)))


class _Marked(torch.Tensor):
    """A tensor subclass standing in for a quantized weight."""


def test_products_over_a_tensor_subclass_keep_their_linear():
    root = torch.nn.Module()
    root.plain = torch.nn.Parameter(torch.randn(4, 8))
    root.marked = torch.nn.Parameter(torch.randn(4, 8).as_subclass(_Marked))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    products = [graph.call_function(LINEAR, (x, graph.get_attr(name))) for name in ("plain", "marked")]
    graph.output(tuple(products))
    routed = with_skinny_products(torch.fx.GraphModule(root, graph))
    assert [n.target for n in routed.graph.nodes if n.op == "call_function"] == [SKINNY, LINEAR]


def test_decode_step_products_are_routed_in_a_copy_sharing_the_cache():
    opt = kvcompile.optimize(tiny_hf_model("qwen2"), "dense", prefill_chunk=4)  # biased q/k/v
    step = opt.steps[1].module
    routed = with_skinny_products(step)
    targets = [n.target for n in routed.graph.nodes]
    assert LINEAR not in targets and targets.count(SKINNY) == [n.target for n in step.graph.nodes].count(LINEAR)
    assert SKINNY not in [n.target for n in step.graph.nodes]  # the exporters' graph is left alone

    opt.reserve(2, 16)  # fresh cache buffers after the copy was made: the copy must read them
    for position in range(4):  # fill positions 0-3 through the original
        step(torch.tensor([[5 + position], [7]]), torch.tensor([[position], [position]]))
    filled = [b.clone() for b in step.kv_state.buffers()]
    ids, pos = torch.tensor([[9], [3]]), torch.tensor([[4], [4]])
    from_copy = routed(ids, pos)  # attends over positions 0-3 only if it reads the original's cache
    for buffer, saved in zip(step.kv_state.buffers(), filled):
        buffer.copy_(saved)  # forget position 4 again
    assert torch.equal(from_copy, step(ids, pos))


def _mlp(case: str) -> torch.fx.GraphModule:
    """x -> silu(x @ gate.T) * (x @ up.T) -> @ down.T, or a variant of it that `case` names."""
    root = torch.nn.Module()
    for name, shape in (("gate", (1 if case == "broadcast-gate" else 12, 8)), ("up", (12, 8)), ("down", (8, 12))):
        root.register_parameter(name, torch.nn.Parameter(torch.randn(*shape)))
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    gate_in = graph.call_function(torch.ops.aten.neg.default, (x,)) if case == "other-input" else x
    gate_args = (gate_in, graph.get_attr("gate")) + ((None,) if case == "explicit-no-bias" else ())
    gate = graph.call_function(LINEAR, gate_args)
    up = gate if case == "one-product" else graph.call_function(LINEAR, (x, graph.get_attr("up")))
    silu = graph.call_function(torch.ops.aten.silu.default, (gate,))
    operands = (up, silu) if case == "swapped" else (silu, up)
    hidden = graph.call_function(torch.ops.aten.mul.Tensor, operands)
    down = graph.call_function(LINEAR, (hidden, graph.get_attr("down")))
    graph.output((down, gate) if case == "gate-read-elsewhere" else down)
    return torch.fx.GraphModule(root, graph)


@pytest.mark.parametrize("case,fused", [("plain", True), ("swapped", True), ("explicit-no-bias", True),
                                        ("gate-read-elsewhere", False), ("one-product", False),
                                        ("other-input", False), ("broadcast-gate", False)])
def test_gated_mlp_becomes_one_call_only_where_it_is_one(kernels_on_cpu, case, fused):
    module = _mlp(case)
    routed = with_skinny_products(module)
    targets = [n.target for n in routed.graph.nodes if n.op == "call_function"]
    assert (GATED in targets) == fused and (torch.ops.aten.silu.default in targets) != fused
    x = torch.randn(3, 8)
    for got, want in zip(torch.utils._pytree.tree_leaves(routed(x)), torch.utils._pytree.tree_leaves(module(x))):
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gated_op_rejects_weights_of_two_shapes():
    with pytest.raises(ValueError, match="one shape"):
        skinny_gated_linear(torch.randn(3, 8), torch.randn(1, 8), torch.randn(12, 8))


def test_decode_step_gated_mlps_are_fused():
    opt = kvcompile.optimize(tiny_hf_model("llama", layers=3), "dense", prefill_chunk=4, fuse_projections=False)
    step = opt.steps[1].module
    routed = with_skinny_products(step)
    targets = [n.target for n in routed.graph.nodes]
    assert targets.count(GATED) == 3 and torch.ops.aten.silu.default not in targets
    opt.reserve(1, 8)
    ids, pos = torch.tensor([[3]]), torch.tensor([[0]])
    from_copy = routed(ids, pos)  # writing the same token at the same position again leaves the cache as it is
    assert torch.allclose(from_copy, step(ids, pos), rtol=1e-5, atol=1e-5)
