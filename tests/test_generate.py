"""The generate loop: transformers-compatible outputs, sampling, eos, streamer."""
import pytest
import torch

import kvcompile
from conftest import VOCAB, tiny_hf_model
from kvcompile.runtime.sampling import next_tokens


def test_return_dict_layout_like_transformers():
    model = tiny_hf_model("llama")
    ids = torch.randint(1, VOCAB, (2, 5))
    res = kvcompile.optimize(model, prefill_chunk=4).generate(
        ids, max_new_tokens=4, return_dict_in_generate=True, output_logits=True, eos_token_id=[])
    theirs = model.generate(ids, max_new_tokens=4, do_sample=False, return_dict_in_generate=True,
                            output_logits=True, eos_token_id=None, pad_token_id=0)
    assert torch.equal(res.sequences, theirs.sequences)
    assert len(res.logits) == 4 and res.logits[0].shape == (2, VOCAB)
    assert max((a - b).abs().max().item() for a, b in zip(res.logits, theirs.logits)) < 1e-4


def test_eos_stops_and_pads_finished_rows():
    model = tiny_hf_model("llama")
    opt = kvcompile.optimize(model, prefill_chunk=4)
    ids = torch.randint(1, VOCAB, (2, 5))
    greedy = opt.generate(ids, max_new_tokens=6, eos_token_id=[])
    eos = int(greedy[0, 5])  # row 0's first new token
    out = opt.generate(ids, max_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert out[0, 5] == eos and (out[0, 6:] == 0).all()
    first_eos = (greedy[1, 5:] == eos).nonzero()
    stop = int(first_eos[0]) + 1 if len(first_eos) else 6
    assert torch.equal(out[1, 5:5 + stop], greedy[1, 5:5 + stop])


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 2.0, 1.0]]).repeat(200, 1)
    assert (next_tokens(logits, True, top_k=1) == 1).all()
    assert set(next_tokens(logits, True, top_k=2).tolist()) == {1, 2}
    assert set(next_tokens(logits, True, top_p=0.5).tolist()) == {1}
    assert set(next_tokens(logits, True, temperature=100.0).tolist()) == {0, 1, 2, 3}
    assert (next_tokens(logits, False) == 1).all()


def test_streamer_receives_prompt_then_each_token():
    class Recorder:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.ended = True

    model = tiny_hf_model("llama")
    ids = torch.randint(1, VOCAB, (1, 5))
    recorder = Recorder()
    out = kvcompile.optimize(model, prefill_chunk=4).generate(ids, max_new_tokens=3, streamer=recorder,
                                                             eos_token_id=[])
    assert recorder.ended and torch.equal(recorder.chunks[0], ids)
    assert [int(c) for c in recorder.chunks[1:]] == out[0, 5:].tolist()


@pytest.mark.parametrize("max_cache_len", [32, None], ids=["length-pinned", "rows-only"])
def test_smaller_batch_than_pinned_is_padded(max_cache_len):
    """A cache pinned for 3 rows serves 1 or 2 rows (padded to the pinned shape) as an unpinned one does, with or
    without a pinned length."""
    model = tiny_hf_model("llama")
    pinned = kvcompile.optimize(model, prefill_chunk=4, max_cache_len=max_cache_len, max_batch_size=3)
    free = kvcompile.optimize(model, prefill_chunk=4)
    for rows in (1, 2):
        ids = torch.randint(1, VOCAB, (rows, 6), generator=torch.Generator().manual_seed(rows))
        kwargs = dict(max_new_tokens=5, return_dict_in_generate=True, output_logits=True, eos_token_id=[])
        a, b = pinned.generate(ids, **kwargs), free.generate(ids, **kwargs)
        assert torch.equal(a.sequences, b.sequences)
        assert max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits)) < 1e-5
