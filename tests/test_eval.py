"""Fast tests of kvcompile.eval on a tiny random Llama and a tiny byte-level BPE tokenizer."""

import math
import re

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from kvcompile.eval import (
    agreement,
    aligned_chunks,
    long_text_tokens,
    make_passkey_prompt,
    passkey_accuracy,
    perplexity,
)
from kvcompile.eval.passkey import FILLER_SENTENCES, NEEDLE
from kvcompile.eval.text import stdlib_sources


class HFRunnable:
    """Test adapter: a plain HF model as a runnable, one full forward or chunks through a KV cache."""

    def __init__(self, model, chunk_size=None):
        self.model = model
        self.chunk_size = chunk_size

    def logits_stream(self, input_ids, attention_mask=None):
        seq_len = input_ids.shape[1]
        if self.chunk_size is None:
            yield 0, self.model(input_ids, attention_mask=attention_mask).logits
            return
        cache = DynamicCache(config=self.model.config)
        for start in range(0, seq_len, self.chunk_size):
            end = min(seq_len, start + self.chunk_size)
            mask = None if attention_mask is None else attention_mask[:, :end]
            yield start, self.model(input_ids[:, start:end], attention_mask=mask, cache=cache).logits

    def generate(self, input_ids, attention_mask=None, **kwargs):
        return self.model.generate(input_ids, attention_mask=attention_mask, **kwargs)


class OracleRunnable:
    """Answers passkey prompts perfectly (or never, with ``wrong=True``) to check the scoring."""

    def __init__(self, tokenizer, wrong=False):
        self.tokenizer = tokenizer
        self.wrong = wrong

    def generate(self, input_ids, attention_mask=None, max_new_tokens=8, **kwargs):
        key = re.search(r"pass key is (\d+)", self.tokenizer.decode(input_ids[0])).group(1)
        answer = " 0" if self.wrong else f" {key}."
        new = self.tokenizer(answer, add_special_tokens=False, return_tensors="pt")["input_ids"]
        return torch.cat([input_ids, new[:, :max_new_tokens]], dim=1)


@pytest.fixture(scope="module")
def tokenizer():
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<eos>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    bpe.train_from_iterator([source for _, source in stdlib_sources()[:2]], trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>", pad_token="<eos>")


def tiny_model(tokenizer, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096, initializer_range=0.2,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, bos_token_id=None,
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture(scope="module")
def ids(tokenizer):
    return long_text_tokens(tokenizer, 300)


def test_long_text_tokens_is_deterministic_real_text(tokenizer):
    ids = long_text_tokens(tokenizer, 30_000)
    assert ids.shape == (1, 30_000) and ids.dtype == torch.long
    assert torch.equal(ids[:, :500], long_text_tokens(tokenizer, 500))
    assert tokenizer.decode(ids[0, :50]).startswith("# File: argparse.py\n")


def test_long_text_tokens_raises_when_text_runs_out(tokenizer):
    with pytest.raises(ValueError, match="standard library"):
        long_text_tokens(tokenizer, 10**9)


def test_perplexity_matches_one_full_forward(model, ids):
    with torch.no_grad():
        logits = model(ids).logits[0, :-1]
    expected_nll = F.cross_entropy(logits, ids[0, 1:], reduction="none")
    result = perplexity(HFRunnable(model), ids, windows=[(0, 64)], progress=False)
    assert result.nll.dtype == torch.float32 and result.nll.shape == (ids.shape[1] - 1,)
    torch.testing.assert_close(result.nll, expected_nll)
    assert result.perplexity == pytest.approx(math.exp(expected_nll.mean().item()), rel=1e-5)
    assert result.windows[(0, 64)] == pytest.approx(math.exp(expected_nll[:63].mean().item()), rel=1e-5)
    assert result.ppl_between(100, 200) == pytest.approx(math.exp(expected_nll[99:199].mean().item()), rel=1e-5)


def test_chunked_nll_equals_unchunked(model, ids):
    full = perplexity(HFRunnable(model), ids, progress=False)
    chunked = perplexity(HFRunnable(model, chunk_size=37), ids, progress=False)
    torch.testing.assert_close(chunked.nll, full.nll, atol=1e-4, rtol=1e-4)


def test_perplexity_rejects_a_stream_with_gaps(model, ids):
    class Gappy(HFRunnable):
        def logits_stream(self, input_ids, attention_mask=None):
            for start, logits in super().logits_stream(input_ids, attention_mask):
                if start != 10:
                    yield start, logits

    with pytest.raises(RuntimeError, match="jumped"):
        perplexity(Gappy(model, chunk_size=10), ids, progress=False)


def test_agreement_with_itself_is_perfect(model, ids):
    batch = torch.cat([ids, ids.flip(1)])
    result = agreement(HFRunnable(model, chunk_size=29), HFRunnable(model, chunk_size=41), batch, progress=False)
    assert result.top1 == 1.0
    assert result.mean_kl == pytest.approx(0.0, abs=1e-6)
    assert result.positions == batch.numel()


def test_agreement_with_another_model_is_not(model, tokenizer, ids):
    result = agreement(HFRunnable(tiny_model(tokenizer, seed=1)), HFRunnable(model), ids, progress=False)
    assert result.top1 < 0.5 and result.mean_kl > 0.1


def test_agreement_skips_masked_positions(model, ids):
    mask = torch.ones_like(ids)
    mask[:, :100] = 0
    result = agreement(HFRunnable(model), HFRunnable(model), ids, attention_mask=mask, progress=False)
    assert result.positions == ids.shape[1] - 100


def test_aligned_chunks_rejects_streams_of_different_lengths():
    a = [(0, torch.zeros(1, 4, 3))]
    b = [(0, torch.zeros(1, 3, 3))]
    with pytest.raises(RuntimeError, match="different numbers"):
        list(aligned_chunks(a, b))


@pytest.mark.parametrize("length", [300, 1000])
@pytest.mark.parametrize("depth", [0.0, 0.3, 1.0])
def test_passkey_prompt_hides_key_at_depth(tokenizer, length, depth):
    prompt = make_passkey_prompt(tokenizer, length, depth, passkey=12345)
    assert prompt.passkey == "12345"
    assert abs(prompt.input_ids.shape[1] - length) <= max(5, 0.02 * length)
    before, after = prompt.text.split(NEEDLE.format(key="12345"))
    n_before = sum(before.count(s) for s in FILLER_SENTENCES)
    n_after = sum(after.count(s) for s in FILLER_SENTENCES)
    assert n_before + n_after > 10 and n_before == round(depth * (n_before + n_after))
    assert prompt.text.endswith("What is the pass key? The pass key is")
    assert "12345" in tokenizer.decode(prompt.input_ids[0])


def test_passkey_prompt_is_deterministic_given_seed(tokenizer):
    a, b = (make_passkey_prompt(tokenizer, 200, 0.5, seed=7) for _ in range(2))
    assert a.passkey == b.passkey and torch.equal(a.input_ids, b.input_ids)
    assert len(a.passkey) == 5 and a.passkey.isdigit()


def test_passkey_accuracy_scores_an_oracle(tokenizer):
    perfect = passkey_accuracy(OracleRunnable(tokenizer), tokenizer, [100, 200], [0.0, 1.0], trials=3, progress=False)
    assert perfect.accuracy == 1.0 and set(perfect.cells.values()) == {1.0}
    never = passkey_accuracy(OracleRunnable(tokenizer, wrong=True), tokenizer, [100], [0.5], trials=3, progress=False)
    assert never.accuracy == 0.0


def test_passkey_accuracy_runs_on_a_tiny_model(model, tokenizer):
    result = passkey_accuracy(
        HFRunnable(model), tokenizer, [64, 128], [0.0, 0.5, 1.0], trials=2, max_new_tokens=4, progress=False
    )
    assert set(result.cells) == {(length, depth) for length in (64, 128) for depth in (0.0, 0.5, 1.0)}
    assert all(value in (0.0, 0.5, 1.0) for value in result.cells.values())
    assert 0.0 <= result.accuracy <= 1.0 and result.trials == 2
