"""KV-cache passes: each rewrites the attention sites of a captured graph into one variant."""
from kvcompile.passes.base import Pass, StepGraph, available, from_spec, register, resolve
from kvcompile.passes.dense import Dense
from kvcompile.passes.streamingllm import StreamingLLM
from kvcompile.passes.tidaldecode import TidalDecode
from kvcompile.passes.tokenselect import TokenSelect
from kvcompile.passes.zipcache import ZipCache

__all__ = ["Pass", "StepGraph", "available", "from_spec", "register", "resolve", "Dense", "StreamingLLM",
           "TidalDecode", "TokenSelect", "ZipCache"]
