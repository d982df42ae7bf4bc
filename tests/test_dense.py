"""`dense` reproduces transformers eager logits for every supported family, attention form and backend."""
import pytest
import torch

import kvcompile
from conftest import FAMILIES, PlainRotaryDecoder, VOCAB, hf_logits, left_padded_batch, tiny_hf_model


def assert_close_on_real_tokens(out, ref, mask, rtol=1e-4):
    real = mask.bool()
    scale = ref[real].abs().max()
    assert ((out - ref)[real].abs().max() / scale) < rtol


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("lengths", [[19], [19, 12, 5]], ids=["batch1", "batch3"])
def test_dense_matches_transformers(family, attn, lengths):
    model = tiny_hf_model(family, attn)
    ids, mask = left_padded_batch(lengths, 19)
    opt = kvcompile.optimize(model, ["dense"], prefill_chunk=8)
    assert_close_on_real_tokens(opt(ids, mask), hf_logits(model, ids, mask), mask)


def test_dense_greedy_generation_matches_transformers():
    model = tiny_hf_model("llama")
    ids, mask = left_padded_batch([9, 6, 3], 9)
    opt = kvcompile.optimize(model, ["dense"], prefill_chunk=4)
    ours = opt.generate(ids, mask, max_new_tokens=12, pad_token_id=0, eos_token_id=[])
    theirs = model.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0,
                            eos_token_id=None)
    assert torch.equal(ours, theirs)


def test_plain_module_with_sdpa():
    model = PlainRotaryDecoder().eval()
    ids = torch.randint(0, VOCAB, (3, 17))
    opt = kvcompile.optimize(model, ["dense"], prefill_chunk=8)
    ref = model(ids, torch.arange(17).expand(3, 17))
    assert ((opt(ids) - ref).abs().max() / ref.abs().max()) < 1e-4
    site = opt.steps[1].sites[0]
    assert (site.num_heads, site.num_kv_heads) == (6, 2)  # repeat_interleave recognised as GQA


@pytest.mark.parametrize("family", FAMILIES)
def test_inductor_backend_matches_transformers_batch1_and_3(family):
    model = tiny_hf_model(family)
    compiled = kvcompile.optimize(model, ["dense"], backend="inductor", prefill_chunk=8)
    for lengths in ([11], [11, 7, 2]):
        ids, mask = left_padded_batch(lengths, 11)
        out = compiled.generate(ids, mask, max_new_tokens=5, return_dict_in_generate=True, output_logits=True,
                               eos_token_id=[])
        ref = hf_logits(model, out.sequences, torch.cat([mask, torch.ones(len(lengths), 5, dtype=torch.long)], 1))
        for step, logits in enumerate(out.logits):
            assert ((logits - ref[:, 10 + step]).abs().max() / ref.abs().max()) < 1e-4
