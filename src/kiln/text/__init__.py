"""Text in and out of the model: tokenizer, chat templates, history truncation, streaming
detokenization and stop strings. Imports only `kiln.config`, `kiln.errors` and
`kiln.kernels` (the compiled tokenizer's merging)."""

from kiln.text.chat_template import (
    ChatTemplate,
    available_templates,
    builtin_template,
    load_chat_template,
    validate_messages,
)
from kiln.text.detokenizer import IncrementalDetokenizer
from kiln.text.history import fit_history, render_prompt
from kiln.text.stop import StopStringMatcher
from kiln.text.tokenizer import Tokenizer

__all__ = [
    "ChatTemplate",
    "IncrementalDetokenizer",
    "StopStringMatcher",
    "Tokenizer",
    "available_templates",
    "builtin_template",
    "fit_history",
    "load_chat_template",
    "render_prompt",
    "validate_messages",
]
