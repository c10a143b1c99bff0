"""Checkpoint: everything read from a model source, in Hugging Face terms."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tokenizers
import torch

from kiln.quantization import GroupQuantized
from kiln.text.compiled_tokenizer import CompiledTokenizer

WeightIterator = Iterator[tuple[str, torch.Tensor]]
QuantizedWeightIterator = Iterator[tuple[str, torch.Tensor | GroupQuantized]]


@dataclass
class Checkpoint:
    """A resolved model: config, tokenizer and a lazy stream of weights.

    Every source (a Hugging Face directory, a hub id, a GGUF file) is turned into this one shape,
    so models only ever see Hugging Face parameter names and config keys.
    """

    name: str
    """What the user asked for (hub id, path), shown in logs and by the server."""
    path: Path
    """Local directory or file the weights are read from."""
    config: dict[str, Any]
    """Hugging Face ``config.json`` contents (rebuilt from metadata for GGUF)."""
    tokenizer: tokenizers.Tokenizer | CompiledTokenizer
    """``tokenizer.json`` parsed, or an exported artifact's compiled form of it."""
    tokenizer_config: dict[str, Any]
    """``tokenizer_config.json`` contents: ``chat_template``, ``bos_token``, ``eos_token``,
    ``add_bos_token``, ``add_eos_token``, ``added_tokens_decoder``..."""
    load_weights: Callable[[], WeightIterator]
    """Yields ``(hf_parameter_name, tensor)`` pairs; called once, when the model is built."""
    generation_config: dict[str, Any] = field(default_factory=dict)
    load_quantized_weights: Callable[[], QuantizedWeightIterator] | None = None
    """Like ``load_weights``, but tensors stored quantized in a form kiln keeps (GGUF's Q4_0,
    Q4_1, Q4_K, Q8_0) come as :class:`GroupQuantized`, never as floats; None for formats
    without quantized tensors."""
    weight_formats: dict[str, str] = field(default_factory=dict)
    """How each tensor is stored, by Hugging Face name, where the format says (a GGUF file:
    ``"Q4_1"``, ``"F32"``...); empty for float checkpoints."""
    num_weights: int | None = None
    """How many pairs ``load_weights`` yields, when the format says without reading tensors
    (safetensors headers, GGUF); the total of the loading progress bar."""
