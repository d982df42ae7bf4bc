"""Quality tools for anything with ``logits_stream`` and ``generate``: perplexity, agreement, passkey."""

from kvcompile.eval.agreement import AgreementResult, agreement, aligned_chunks
from kvcompile.eval.passkey import PasskeyPrompt, PasskeyResult, make_passkey_prompt, passkey_accuracy
from kvcompile.eval.perplexity import PerplexityResult, perplexity
from kvcompile.eval.text import long_text_tokens

__all__ = [
    "AgreementResult",
    "PasskeyPrompt",
    "PasskeyResult",
    "PerplexityResult",
    "agreement",
    "aligned_chunks",
    "long_text_tokens",
    "make_passkey_prompt",
    "passkey_accuracy",
    "perplexity",
]
