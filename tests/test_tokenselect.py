"""`tokenselect` against the paper reference (teacher forcing and generation, with and without the selection
cache), dense equivalence when the budget covers the context, state reset between calls, compilation, explain()."""
import pytest
import torch

import kvcompile
from conftest import VOCAB, left_padded_batch, rel_err, tiny_hf_model
from kvcompile.errors import PassError
from kvcompile.passes import TokenSelect
from kvcompile.reference.tokenselect import tokenselect_logits

BUDGET = 8          # 1 init + 5 top-k + 2 local by the paper's shares
CACHE = 0.2         # a threshold the random model's consecutive queries often pass, so the cache is exercised


@pytest.fixture(scope="module")
def llama():
    return tiny_hf_model("llama")


@pytest.fixture(scope="module")
def cached(llama):
    return kvcompile.optimize(llama, [TokenSelect(token_budget=BUDGET, similarity_threshold=CACHE)], prefill_chunk=1)


def test_budget_split_follows_the_paper():
    assert TokenSelect().split() == (128, 512, 2048)
    assert TokenSelect(token_budget=256).split() == (12, 49, 195)
    assert TokenSelect(token_budget=BUDGET).split() == (1, 2, 5)


@pytest.mark.parametrize("threshold", [None, CACHE], ids=["no-cache", "selection-cache"])
def test_teacher_forced_decode_matches_reference(llama, cached, threshold):
    ids = torch.randint(1, VOCAB, (1, 24), generator=torch.Generator().manual_seed(3))
    opt = cached if threshold else kvcompile.optimize(
        llama, [TokenSelect(token_budget=BUDGET, similarity_threshold=None)], prefill_chunk=1)
    ours = opt(ids)
    assert rel_err(ours, tokenselect_logits(llama, ids, 1, 2, 5, threshold)) < 1e-4
    assert rel_err(ours, llama(ids).logits) > 1e-2  # the budget really is binding
    if threshold:  # the cache was used: reusing selections changed the result
        assert rel_err(ours, tokenselect_logits(llama, ids, 1, 2, 5, None)) > 1e-3


def test_other_families_match_reference():
    for family in ("qwen2", "mistral"):
        model = tiny_hf_model(family)
        ids = torch.randint(1, VOCAB, (1, 16), generator=torch.Generator().manual_seed(5))
        opt = kvcompile.optimize(model, [TokenSelect(token_budget=BUDGET, similarity_threshold=CACHE)], prefill_chunk=1)
        assert rel_err(opt(ids), tokenselect_logits(model, ids, 1, 2, 5, CACHE)) < 1e-4


def test_generation_matches_reference(llama):
    ids = torch.randint(1, VOCAB, (1, 10), generator=torch.Generator().manual_seed(4))
    opt = kvcompile.optimize(llama, [TokenSelect(token_budget=BUDGET, similarity_threshold=CACHE)], prefill_chunk=4)
    out = opt.generate(ids, max_new_tokens=12, return_dict_in_generate=True, output_logits=True, eos_token_id=[])
    ref = tokenselect_logits(llama, out.sequences, 1, 2, 5, CACHE, dense_tokens=10)
    for step, logits in enumerate(out.logits):
        assert rel_err(logits[0], ref[0, 9 + step]) < 1e-4


def test_selection_cache_is_reset_between_calls(cached):
    ids = torch.randint(1, VOCAB, (1, 18), generator=torch.Generator().manual_seed(7))
    first = cached(ids)
    cached(torch.randint(1, VOCAB, (1, 18), generator=torch.Generator().manual_seed(8)))
    assert torch.equal(cached(ids), first)


def test_budget_covering_the_context_equals_dense(llama):
    ids, mask = left_padded_batch([16, 9, 2], 16)
    dense = kvcompile.optimize(llama, ["dense"], prefill_chunk=8)(ids, mask)
    ts = kvcompile.optimize(llama, [TokenSelect(token_budget=16)], prefill_chunk=1)
    real = mask.bool()
    assert rel_err(ts(ids, mask)[real], dense[real]) < 1e-5


def test_batched_left_padding_equals_rows_run_alone(cached):
    ids, mask = left_padded_batch([15, 11, 4], 15)
    batched = cached(ids, mask)
    for row, n in enumerate([15, 11, 4]):
        assert rel_err(batched[row, 15 - n:], cached(ids[row:row + 1, 15 - n:])[0]) < 1e-5


def test_inductor_matches_eager(llama):
    ids, mask = left_padded_batch([12, 7], 12)
    kwargs = dict(max_new_tokens=6, return_dict_in_generate=True, output_logits=True, eos_token_id=[])
    passes = [TokenSelect(token_budget=BUDGET, similarity_threshold=CACHE)]
    compiled = kvcompile.optimize(llama, passes, backend="inductor", prefill_chunk=1)
    eager = kvcompile.optimize(llama, passes, backend="eager", prefill_chunk=1)
    a, b = compiled.generate(ids, mask, **kwargs), eager.generate(ids, mask, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert max(rel_err(x, y) for x, y in zip(a.logits, b.logits)) < 1e-4


def test_explain_shows_selection_and_cache(cached):
    text = cached.explain()
    assert "tokenselect: 1 init + 2 local (new token included) + top 5 slots by per-head soft voting" in text
    assert "kv_state.layer1_tokenselect_query" in text and "read by 'sparse_cached_attention" in text


def test_bad_configurations_are_errors(llama):
    with pytest.raises(PassError, match="no top-k tokens"):
        kvcompile.optimize(llama, [TokenSelect(token_budget=8, init_tokens=4, local_tokens=4)])
    with pytest.raises(PassError, match="similarity_threshold"):
        kvcompile.optimize(llama, [TokenSelect(similarity_threshold=1.5)])
    with pytest.raises(PassError, match="cannot be combined"):
        kvcompile.optimize(llama, [TokenSelect(), "tidaldecode"])
