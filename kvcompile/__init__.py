"""kvcompile: rewrite the attention of traced LLMs into KV-cache-efficient variants, then compile or export.

    opt = kvcompile.optimize(model, passes=["streamingllm"], backend="inductor")
    out = opt.generate(input_ids, max_new_tokens=64)
"""
from kvcompile import passes
from kvcompile.errors import (InputError, KVCompileError, PassError, UnrecognisedAttentionError,
                              UnsupportedModelError)
from kvcompile.export import export
from kvcompile.models import load_default_model, load_default_tokenizer
from kvcompile.optimized import OptimizedModel, optimize

__all__ = ["optimize", "OptimizedModel", "export", "passes", "load_default_model", "load_default_tokenizer",
           "KVCompileError", "InputError", "PassError", "UnrecognisedAttentionError", "UnsupportedModelError"]
__version__ = "0.1.0"
