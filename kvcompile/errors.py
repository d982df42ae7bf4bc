"""Errors for bad input: each says what was wrong and what to change."""


class KVCompileError(ValueError):
    """Base class of every error kvcompile raises for bad input."""


class UnsupportedModelError(KVCompileError):
    """The model cannot be captured (wrong kind of model, missing inputs, unsupported position scheme)."""


class UnrecognisedAttentionError(KVCompileError):
    """The captured graph holds attention whose pattern kvcompile does not recognise."""


class PassError(KVCompileError):
    """A pass name, a pass configuration or a combination of passes is invalid."""


class InputError(KVCompileError):
    """Inputs to generate / logits_stream are invalid (dtype, device, shape, or longer than the cache allows)."""
