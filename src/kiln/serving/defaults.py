"""Sampling defaults a checkpoint asks for in its ``generation_config.json``.

A request that omits a sampling field gets the model's value when the checkpoint sets one (as
vLLM does: Llama 3's ``temperature: 0.6, top_p: 0.9``), else the API's documented default. The
keys read are vLLM's; ``do_sample`` is not read (vLLM ignores it too): whether a request
samples is the request's choice.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from kiln.errors import InvalidRequestError
from kiln.sampling import SamplingParams

logger = logging.getLogger(__name__)

SAMPLING_KEYS = (
    "temperature",
    "top_k",
    "top_p",
    "min_p",
    "repetition_penalty",
    "max_new_tokens",
)
"""``generation_config.json`` keys that are also :class:`SamplingParams` fields."""


def sampling_defaults(generation_config: Mapping[str, Any] | None) -> dict[str, Any]:
    """The sampling fields ``generation_config`` sets, checked as :class:`SamplingParams`
    checks them; a checkpoint whose values are out of range gets none (and a warning), so one
    bad file never fails every request."""
    if not generation_config:
        return {}
    defaults = {
        k: generation_config[k] for k in SAMPLING_KEYS if generation_config.get(k) is not None
    }
    if not defaults:
        return {}
    try:
        SamplingParams(**defaults)
    except (InvalidRequestError, TypeError) as e:
        logger.warning("generation_config.json: ignoring its sampling defaults: %s", e)
        return {}
    return defaults
