"""Fused projections (q/k/v of one input in one product): same logits, shared weights, the model untouched."""
import pytest
import torch
from torch import nn

import kvcompile
from kvcompile.graph import fuse_linear
from conftest import rel_err, tiny_hf_model

aten = torch.ops.aten


def _linears(module) -> int:
    return sum(1 for n in module.graph.nodes if n.target == aten.linear.default)


@pytest.mark.parametrize("family", ["llama", "qwen2"])  # qwen2's q/k/v carry biases
def test_fused_program_equals_unfused(family):
    model = tiny_hf_model(family)
    before = {name: (p.data_ptr(), p.clone()) for name, p in model.named_parameters()}
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    plain = kvcompile.optimize(model, "dense", prefill_chunk=4, fuse_projections=False)
    fused = kvcompile.optimize(model, "dense", prefill_chunk=4)
    # per layer q/k/v become one product, and the tiny model's gate/up too: 7 products -> 4
    layers = model.config.num_hidden_layers
    assert _linears(plain.steps[1].module) - _linears(fused.steps[1].module) == 3 * layers
    assert rel_err(fused(ids), plain(ids)) < 1e-5
    assert torch.equal(fused.generate(ids, max_new_tokens=5, do_sample=False),
                       plain.generate(ids, max_new_tokens=5, do_sample=False))
    after = dict(model.named_parameters())  # the caller's model keeps its own weights, unchanged
    assert after.keys() == before.keys()
    for name, p in after.items():
        assert p.data_ptr() == before[name][0] and torch.equal(p, before[name][1])


def test_fused_nodes_carry_their_shapes():
    model = tiny_hf_model("llama")
    graph = kvcompile.optimize(model, "dense", prefill_chunk=1).steps[1].module.graph
    fused = [n for n in graph.nodes if n.target == aten.linear.default
             and n.args[1].target.startswith("fused_projection_")]
    assert fused
    for product in fused:
        width = sum(part.meta["val"].shape[-1] for part in product.users)
        assert product.meta["val"].shape[-1] == width
        assert all(part.meta["val"].stride() == product.meta["val"].stride() for part in product.users)


def test_steps_share_one_concatenation_and_drop_the_separate_weights():
    model = tiny_hf_model("llama")
    opt = kvcompile.optimize(model, "dense", prefill_chunk=4)
    decode, prefill = opt.steps[1].module, opt.steps[4].module
    assert decode.fused_projection_0_weight.data_ptr() == prefill.fused_projection_0_weight.data_ptr()
    names = {name for name, _ in decode.named_parameters()}
    assert not any("q_proj" in name or "k_proj" in name for name in names)
    assert any("o_proj" in name for name in names)  # read alone: kept as the model's own parameter


def test_products_of_large_weights_stay_apart(monkeypatch):
    monkeypatch.setattr(fuse_linear, "SMALL_PRODUCT_BYTES", 64 * 32 * 4)  # every tiny weight counts as large
    model = tiny_hf_model("llama")
    fused = kvcompile.optimize(model, "dense", prefill_chunk=1)
    plain = kvcompile.optimize(model, "dense", prefill_chunk=1, fuse_projections=False)
    assert _linears(fused.steps[1].module) == _linears(plain.steps[1].module)


def test_a_group_with_and_without_bias_stays_apart():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 4, bias=True), nn.Linear(8, 4, bias=False)

        def forward(self, x):
            return self.a(x) + self.b(x)

    module = torch.export.export(Mixed(), (torch.randn(2, 8),)).module()
    assert fuse_linear.fuse_linear_projections(module, {}) == 0
