"""Bad input gets a clear error naming what to change, and optimize never modifies the user's model."""
import pytest
import torch
from torch import nn
from transformers import T5Config, T5ForConditionalGeneration

import kvcompile
from conftest import PlainRotaryDecoder, VOCAB, tiny_hf_model
from kvcompile.passes import StreamingLLM


@pytest.fixture(scope="module")
def model():
    return tiny_hf_model("llama")


def test_unknown_pass_lists_the_available_ones(model):
    with pytest.raises(kvcompile.PassError, match=r"unknown pass 'nope'.*streamingllm: StreamingLLM \(arXiv"):
        kvcompile.optimize(model, ["nope"])


@pytest.mark.parametrize("passes", [5, None, {"streamingllm"}])
def test_passes_must_be_a_name_a_pass_or_a_list(model, passes):
    with pytest.raises(kvcompile.PassError, match="passes must be a pass name, a Pass object or a list of them"):
        kvcompile.optimize(model, passes)


def test_two_storage_passes_conflict(model):
    with pytest.raises(kvcompile.PassError, match="'dense' and 'streamingllm' both decide the storage"):
        kvcompile.optimize(model, ["dense", "streamingllm"])


@pytest.mark.parametrize("kwargs, message", [
    (dict(sink_tokens=-1), "sink_tokens must be an integer >= 0"),
    (dict(window_tokens=0), "window_tokens must be an integer >= 1"),
])
def test_impossible_budget(model, kwargs, message):
    with pytest.raises(kvcompile.PassError, match=message):
        kvcompile.optimize(model, [StreamingLLM(**kwargs)])


def test_pass_spec_strings(model):
    opt = kvcompile.optimize(model, ["streamingllm:sink_tokens=2,window_tokens=6"], prefill_chunk=4)
    assert opt.passes[0] == StreamingLLM(2, 6)
    with pytest.raises(kvcompile.PassError, match="bad options for pass 'streamingllm'"):
        kvcompile.optimize(model, ["streamingllm:sinks=2"])


def test_unknown_backend(model):
    with pytest.raises(kvcompile.KVCompileError, match="unknown backend 'tvm'"):
        kvcompile.optimize(model, backend="tvm")


def test_encoder_decoder_is_unsupported():
    t5 = T5ForConditionalGeneration(T5Config(vocab_size=32, d_model=16, d_ff=32, num_layers=1, num_heads=2,
                                             d_kv=8)).eval()
    with pytest.raises(kvcompile.UnsupportedModelError, match="encoder-decoder"):
        kvcompile.optimize(t5)


def test_plain_module_without_position_ids():
    class NoPositions(nn.Module):
        def forward(self, input_ids):
            return input_ids
    with pytest.raises(kvcompile.UnsupportedModelError, match="must accept `position_ids`"):
        kvcompile.optimize(NoPositions().eval())


def test_module_without_attention():
    class Bag(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(VOCAB, 8)
            self.head = nn.Linear(8, VOCAB)

        def forward(self, input_ids, position_ids):
            return self.head(self.embed(input_ids))
    with pytest.raises(kvcompile.UnrecognisedAttentionError, match="no attention found"):
        kvcompile.optimize(Bag().eval())


def test_unrecognised_softmax_attention_names_the_node():
    class OddAttention(PlainRotaryDecoder):
        def forward(self, input_ids, position_ids):
            x = self.embed(input_ids)
            weights = torch.softmax(self.out[0](x), dim=-1)   # softmax, but not over q·k scores
            return self.head(weights)
    with pytest.raises(kvcompile.UnrecognisedAttentionError, match="softmax 'softmax' looks like attention"):
        kvcompile.optimize(OddAttention().eval())


def test_training_mode_is_refused(model):
    model.train()
    try:
        with pytest.raises(kvcompile.KVCompileError, match="call model.eval"):
            kvcompile.optimize(model)
    finally:
        model.eval()


def test_failed_optimize_leaves_the_model_untouched(model):
    before = {k: v.clone() for k, v in model.state_dict().items()}
    implementation = model.config._attn_implementation
    with pytest.raises(kvcompile.PassError):
        kvcompile.optimize(model, ["dense", "nope"])
    kvcompile.optimize(model, ["streamingllm"], prefill_chunk=4)(torch.randint(0, VOCAB, (1, 5)))
    assert model.config._attn_implementation == implementation
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("bad, message", [
    (torch.ones(1, 4), "input_ids must be an integer tensor"),
    (torch.ones(4, dtype=torch.long), r"shape \[batch, sequence\]"),
])
def test_bad_input_ids(model, bad, message):
    opt = kvcompile.optimize(model, prefill_chunk=4)
    with pytest.raises(kvcompile.InputError, match=message):
        opt.generate(bad, max_new_tokens=2)


def test_right_padding_is_refused(model):
    opt = kvcompile.optimize(model, prefill_chunk=4)
    ids = torch.ones(2, 4, dtype=torch.long)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    with pytest.raises(kvcompile.InputError, match="left padding"):
        opt.generate(ids, mask, max_new_tokens=2)


def test_prompt_longer_than_the_pinned_cache(model):
    opt = kvcompile.optimize(model, prefill_chunk=4, max_cache_len=16, max_batch_size=2)
    with pytest.raises(kvcompile.InputError, match="max_cache_len=16"):
        opt.generate(torch.ones(1, 12, dtype=torch.long), max_new_tokens=8)
    with pytest.raises(kvcompile.InputError, match="max_batch_size=2"):
        opt.generate(torch.ones(3, 4, dtype=torch.long), max_new_tokens=2)
    streaming = kvcompile.optimize(model, [StreamingLLM(2, 6)], prefill_chunk=4, max_cache_len=16)
    assert streaming.kv_bytes() > 0  # pinned: allocated once, sized by the ring, not the context
