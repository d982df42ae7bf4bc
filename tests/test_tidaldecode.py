"""`tidaldecode` against the paper reference (teacher forcing and generation, with cache correction), dense
equivalence when the budget covers the context, batching, compilation and explain()."""
import pytest
import torch

import kvcompile
from conftest import VOCAB, hf_logits, left_padded_batch, rel_err, tiny_hf_model
from kvcompile.errors import PassError
from kvcompile.passes import TidalDecode
from kvcompile.passes.tidaldecode import default_selection_layers
from kvcompile.reference.tidaldecode import tidaldecode_logits
from kvcompile.runtime.cache_correction import enable_cache_correction

LAYERS = (1, 3)  # layer 0 full, 1 selects, 2 reuses, 3 re-selects, 4 reuses
BUDGET = 6


@pytest.fixture(scope="module")
def llama():
    """Deep enough for full, selection and reusing layers."""
    return tiny_hf_model("llama", layers=5)


@pytest.fixture(scope="module")
def tidal(llama):
    """Every step a decode step, so teacher forcing exercises the sparse path."""
    return kvcompile.optimize(llama, [TidalDecode(token_budget=BUDGET, selection_layers=LAYERS)], prefill_chunk=1)


def test_default_layers_follow_the_official_placement():
    assert default_selection_layers(32) == (2, 13)      # Llama-3-8B, the official configuration
    assert default_selection_layers(30) == (2, 12)      # SmolLM2-135M
    assert default_selection_layers(4) == (2,)
    assert default_selection_layers(2) == (1,)


def test_teacher_forced_decode_matches_reference(llama, tidal):
    ids = torch.randint(1, VOCAB, (1, 20), generator=torch.Generator().manual_seed(3))
    ours = tidal(ids)
    assert rel_err(ours, tidaldecode_logits(llama, ids, BUDGET, LAYERS)) < 1e-4
    assert rel_err(ours, llama(ids).logits) > 1e-2  # the budget really is binding


def test_multi_query_model_matches_reference():
    model = tiny_hf_model("qwen2", layers=4)
    ids = torch.randint(1, VOCAB, (1, 14), generator=torch.Generator().manual_seed(3))
    opt = kvcompile.optimize(model, [TidalDecode(token_budget=5, selection_layers=(1,))], prefill_chunk=1)
    assert rel_err(opt(ids), tidaldecode_logits(model, ids, 5, (1,))) < 1e-4


@pytest.mark.parametrize("correction", [None, 5])
def test_generation_matches_reference(llama, correction):
    ids = torch.randint(1, VOCAB, (1, 9), generator=torch.Generator().manual_seed(4))
    opt = kvcompile.optimize(llama, [TidalDecode(BUDGET, LAYERS, correction_interval=correction)], prefill_chunk=4)
    if correction:
        enable_cache_correction(opt)
    out = opt.generate(ids, max_new_tokens=12, return_dict_in_generate=True, output_logits=True, eos_token_id=[])
    ref = tidaldecode_logits(llama, out.sequences, BUDGET, LAYERS, dense_tokens=9, correction_interval=correction)
    for step, logits in enumerate(out.logits):
        assert rel_err(logits[0], ref[0, 8 + step]) < 1e-4
    if correction:
        assert opt.cache_correction.corrections == 2
        plain = tidaldecode_logits(llama, out.sequences, BUDGET, LAYERS, dense_tokens=9)
        assert rel_err(torch.cat(out.logits), plain[0, 8:20]) > 1e-2  # correction changed the result


def test_budget_covering_the_context_equals_dense(llama):
    ids, mask = left_padded_batch([16, 9, 2], 16)
    tidal = kvcompile.optimize(llama, [TidalDecode(token_budget=16, selection_layers=LAYERS)], prefill_chunk=1)
    real = mask.bool()
    assert rel_err(tidal(ids, mask)[real], hf_logits(llama, ids, mask)[real]) < 1e-4


def test_batched_left_padding_equals_rows_run_alone(tidal):
    ids, mask = left_padded_batch([14, 9, 3], 14)
    batched = tidal(ids, mask)
    for row, n in enumerate([14, 9, 3]):
        assert rel_err(batched[row, 14 - n:], tidal(ids[row:row + 1, 14 - n:])[0]) < 1e-5


def test_composes_with_streamingllm_storage(llama):
    """Selection over a ring cache: with a budget covering the ring it is streamingllm itself."""
    ids = torch.randint(1, VOCAB, (1, 14), generator=torch.Generator().manual_seed(6))
    ring = kvcompile.optimize(llama, ["streamingllm:sink_tokens=2,window_tokens=8"], prefill_chunk=1)(ids)
    both = kvcompile.optimize(llama, ["streamingllm:sink_tokens=2,window_tokens=8",
                                      TidalDecode(token_budget=11, selection_layers=LAYERS)], prefill_chunk=1)(ids)
    assert rel_err(both, ring) < 1e-5


def test_inductor_matches_eager(llama):
    ids, mask = left_padded_batch([11, 6], 11)
    kwargs = dict(max_new_tokens=6, return_dict_in_generate=True, output_logits=True, eos_token_id=[])
    passes = [TidalDecode(token_budget=4, selection_layers=LAYERS)]
    compiled = kvcompile.optimize(llama, passes, backend="inductor", prefill_chunk=1)
    eager = kvcompile.optimize(llama, passes, backend="eager", prefill_chunk=1)
    a, b = compiled.generate(ids, mask, **kwargs), eager.generate(ids, mask, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert max(rel_err(x, y) for x, y in zip(a.logits, b.logits)) < 1e-4


def test_explain_shows_the_selection_edge(tidal):
    text = tidal.explain()
    assert "tidaldecode: full attention" in text
    assert "token-selection layer" in text and "read by layers 2-2" in text and "read by layers 4-4" in text
    assert "chosen at layer 1 (" in text and "chosen at layer 3 (" in text


def test_bad_configurations_are_errors(llama, tidal):
    with pytest.raises(PassError, match="token_budget"):
        kvcompile.optimize(llama, [TidalDecode(token_budget=1)])
    with pytest.raises(PassError, match="layer 9"):
        kvcompile.optimize(llama, [TidalDecode(selection_layers=(2, 9))])
    with pytest.raises(PassError, match="prefill_chunk"):
        enable_cache_correction(tidal, interval=8)
