"""`streamingllm` against the paper reference, dense equivalence, chunking invariance and bounded memory."""
import pytest
import torch

import kvcompile
from conftest import VOCAB, left_padded_batch, rel_err, tiny_hf_model
from kvcompile.passes import StreamingLLM
from kvcompile.reference.streamingllm import attended_tokens, streaming_logits

SINKS, WINDOW = 3, 8


def test_attended_tokens_example_from_the_issue():
    assert attended_tokens(9, 4, 4) == [0, 1, 2, 3, 6, 7, 8, 9]


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
@pytest.mark.parametrize("prompt_len", [6, 30], ids=["shorter-than-cache", "longer-than-cache"])
def test_teacher_forced_logits_match_reference(family, prompt_len):
    model = tiny_hf_model(family)
    ids = torch.randint(1, VOCAB, (1, prompt_len), generator=torch.Generator().manual_seed(3))
    opt = kvcompile.optimize(model, [StreamingLLM(SINKS, WINDOW)], prefill_chunk=4)
    assert rel_err(opt(ids), streaming_logits(model, ids, SINKS, WINDOW)) < 1e-4


@pytest.mark.parametrize("sinks", [SINKS, 0])
def test_generation_past_the_cache_matches_reference(sinks):
    model = tiny_hf_model("llama")
    ids = torch.randint(1, VOCAB, (1, 7), generator=torch.Generator().manual_seed(4))
    opt = kvcompile.optimize(model, [StreamingLLM(sinks, WINDOW)], prefill_chunk=4)
    out = opt.generate(ids, max_new_tokens=20, return_dict_in_generate=True, output_logits=True, eos_token_id=[])
    ref = streaming_logits(model, out.sequences, sinks, WINDOW)
    for step, logits in enumerate(out.logits):
        assert rel_err(logits[0], ref[0, 6 + step]) < 1e-4


def test_chunking_does_not_change_the_result():
    model = tiny_hf_model("llama")
    ids = torch.randint(1, VOCAB, (1, 37), generator=torch.Generator().manual_seed(5))
    outs = [kvcompile.optimize(model, [StreamingLLM(SINKS, WINDOW)], prefill_chunk=c)(ids) for c in (1, 5, 16, 64)]
    for out in outs[1:]:
        assert rel_err(out, outs[0]) < 1e-5


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_window_covering_the_sequence_equals_dense(family):
    model = tiny_hf_model(family)
    ids, mask = left_padded_batch([21, 14, 3], 21)
    dense = kvcompile.optimize(model, ["dense"], prefill_chunk=8)(ids, mask)
    streaming = kvcompile.optimize(model, [StreamingLLM(4, 21)], prefill_chunk=8)(ids, mask)
    real = mask.bool()
    assert rel_err(streaming[real], dense[real]) < 1e-5


def test_batched_left_padding_equals_rows_run_alone():
    model = tiny_hf_model("llama")
    ids, mask = left_padded_batch([25, 16, 4], 25)
    opt = kvcompile.optimize(model, [StreamingLLM(SINKS, WINDOW)], prefill_chunk=8)
    batched = opt(ids, mask)
    for row, n in enumerate([25, 16, 4]):
        alone = opt(ids[row:row + 1, 25 - n:])
        assert rel_err(batched[row, 25 - n:], alone[0]) < 1e-5


def test_cache_memory_is_bounded_by_the_budget():
    model = tiny_hf_model("llama")
    opt = kvcompile.optimize(model, [StreamingLLM(SINKS, WINDOW)], prefill_chunk=8)
    sizes = []
    for length in (40, 400):
        opt(torch.randint(1, VOCAB, (1, length)))
        sizes.append(opt.kv_bytes())
    assert sizes[0] == sizes[1]
    slots = SINKS + WINDOW + 1
    layers, kv_heads, head_dim = 2, 2, 16
    assert sizes[0] == layers * (2 * kv_heads * slots * head_dim * 4 + slots * 8)


def test_inductor_streaming_matches_eager():
    model = tiny_hf_model("llama")
    ids, mask = left_padded_batch([13, 5, 9], 13)
    kwargs = dict(max_new_tokens=12, return_dict_in_generate=True, output_logits=True, eos_token_id=[])
    compiled = kvcompile.optimize(model, [StreamingLLM(2, 6)], backend="inductor", prefill_chunk=8)
    eager = kvcompile.optimize(model, [StreamingLLM(2, 6)], backend="eager", prefill_chunk=8)
    a, b = compiled.generate(ids, mask, **kwargs), eager.generate(ids, mask, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert max(rel_err(x, y) for x, y in zip(a.logits, b.logits)) < 1e-4


def test_explain_names_sites_and_rewrites():
    opt = kvcompile.optimize(tiny_hf_model("llama"), ["streamingllm"], prefill_chunk=8)
    text = opt.explain()
    assert "2 attention sites" in text and "layer 1" in text
    assert "ring of 4 sink + 2000 window slots" in text and "re-rotated to its rank position" in text


def test_rotary_computed_with_a_matmul_is_rerooted():
    """transformers 5.17 computes rotary angles as inv_freq @ positions (a matmul of a buffer, not a weight)."""
    from conftest import PlainRotaryDecoder

    class MatmulRotary(PlainRotaryDecoder):
        def rope(self, x, position_ids):
            freqs = self.inv_freq[None, :, None].expand(x.shape[0], -1, 1) @ position_ids[:, None, :].float()
            angles = freqs.transpose(1, 2)[:, None]
            even, odd = x[..., ::2], x[..., 1::2]
            cos, sin = angles.cos(), angles.sin()
            return torch.stack([even * cos - odd * sin, even * sin + odd * cos], dim=-1).flatten(-2)

    model = MatmulRotary().eval()
    ids = torch.randint(0, VOCAB, (1, 30))
    plain = kvcompile.optimize(PlainRotaryDecoder().eval(), [StreamingLLM(SINKS, WINDOW)], prefill_chunk=8)(ids)
    assert rel_err(kvcompile.optimize(model, [StreamingLLM(SINKS, WINDOW)], prefill_chunk=8)(ids), plain) < 1e-5


def test_absolute_position_embeddings_are_refused():
    from conftest import PlainRotaryDecoder

    class AbsolutePositions(PlainRotaryDecoder):
        def __init__(self):
            super().__init__()
            self.position_embed = torch.nn.Embedding(512, 48)

        def rope(self, x, position_ids):  # positions enter through a learned embedding, not a rotation
            return x + self.position_embed(position_ids.clamp(min=0))[:, None, :, :x.shape[-1]]

    with pytest.raises(kvcompile.UnsupportedModelError, match="positions reach the queries"):
        kvcompile.optimize(AbsolutePositions().eval(), [StreamingLLM(SINKS, WINDOW)], prefill_chunk=8)
