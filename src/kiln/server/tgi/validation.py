"""TGI's request validation (its router's ``validation.rs``): the same checks in the same order
with the same messages, each a 422 ``Input validation error: ...``; then the TGI parameters
mapped onto kiln's :class:`SamplingParams`."""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from kiln.errors import InvalidRequestError
from kiln.sampling import SamplingParams
from kiln.server.tgi.schemas import GenerateParameters, GenerateRequest
from kiln.serving.generation import Generation
from kiln.serving.limits import ContextWindow

MAX_BEST_OF = 1
MAX_STOP_SEQUENCES = 4
MAX_TOP_N_TOKENS = 5
DEFAULT_MAX_NEW_TOKENS = 100
_MAX_SEED = 2**64 - 1


def invalid(message: str) -> InvalidRequestError:
    return InvalidRequestError(f"Input validation error: {message}")


@dataclass(frozen=True)
class Prepared:
    """A validated request: what to feed the engine and what to put in the answer."""

    inputs: str
    prompt_ids: list[int]
    params: SamplingParams
    seed: int | None
    """The seed reported in ``details`` (set when sampling, as TGI)."""
    details: bool
    decoder_input_details: bool
    top_n_tokens: int
    return_full_text: bool


def _positive_finite(value: float) -> bool:
    return math.isfinite(value) and value > 0.0


def _check_parameters(p: GenerateParameters, window: ContextWindow, stream: bool) -> None:
    """TGI's checks, in TGI's order, with TGI's messages (plus the features kiln lacks)."""
    if p.watermark:
        raise invalid("`watermark` is not supported by this server")
    if p.grammar is not None:
        raise invalid("grammar is not supported")
    if p.adapter_id is not None:
        raise invalid("`adapter_id` is not supported by this server: it serves no LoRA adapters")
    if p.best_of is not None and p.best_of != MAX_BEST_OF:
        where = "when streaming tokens" if stream else "by this server (max_best_of is 1)"
        raise invalid(f"`best_of` != 1 is not supported {where}. Given: {p.best_of}")
    if p.temperature is not None and not _positive_finite(p.temperature):
        raise invalid("`temperature` must be strictly positive")
    if p.repetition_penalty is not None and not _positive_finite(p.repetition_penalty):
        raise invalid("`repetition_penalty` must be strictly positive")
    if p.frequency_penalty is not None and not -2.0 <= p.frequency_penalty <= 2.0:
        raise invalid("`frequency_penalty` must be >= -2.0 and <= 2.0")
    if p.top_p is not None and not 0.0 < p.top_p < 1.0:
        raise invalid("`top_p` must be > 0.0 and < 1.0")
    if p.typical_p is not None and not 0.0 < p.typical_p < 1.0:
        raise invalid("`typical_p` must be > 0.0 and < 1.0")
    if p.top_k is not None and p.top_k <= 0:
        raise invalid("`top_k` must be strictly positive")
    if p.max_new_tokens is not None and p.max_new_tokens <= 0:
        raise invalid("`max_new_tokens` must be strictly positive")
    if len(p.stop) > MAX_STOP_SEQUENCES:
        raise invalid(
            f"`stop` supports up to {MAX_STOP_SEQUENCES} stop sequences. Given: {len(p.stop)}"
        )
    for i, stop in enumerate(p.stop):
        check_unicode(stop, f"`stop[{i}]`")
    if p.seed is not None and not 0 <= p.seed <= _MAX_SEED:
        raise invalid(f"`seed` must be >= 0 and <= {_MAX_SEED}. Given: {p.seed}")
    if p.top_n_tokens is not None and not 0 <= p.top_n_tokens <= MAX_TOP_N_TOKENS:
        raise invalid(
            f"`top_n_tokens` must be >= 0 and <= {MAX_TOP_N_TOKENS}. Given: {p.top_n_tokens}"
        )
    if p.truncate is not None and not 0 < p.truncate <= window.max_input_tokens:
        raise invalid(
            f"`truncate` must be strictly positive and less than {window.max_input_tokens}. "
            f"Given: {p.truncate}"
        )
    if stream and p.decoder_input_details:
        raise invalid("`decoder_input_details` == true is not supported when streaming tokens")


def check_unicode(text: str, what: str) -> None:
    """JSON's ``"\ud800"`` escapes decode to lone surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise invalid(f"{what} is not valid Unicode: {e.reason} at position {e.start}") from e


async def encode(generation: Generation, text: str) -> list[int]:
    """``text``'s token ids, tokenized off the event loop."""
    check_unicode(text, "`inputs`")
    assert generation.model is not None
    return await generation.off_loop(generation.model.encode, text)


async def prepare(generation: Generation, request: GenerateRequest, *, stream: bool) -> Prepared:
    """Validate ``request`` with TGI's rules; raises :class:`InvalidRequestError` (HTTP 422)."""
    # NOTE: TGI's defaults for a request without `parameters` turn sampling on
    # (`default_parameters()` sets do_sample: true), unlike `"parameters": {}`.
    p = request.parameters or GenerateParameters(do_sample=True)
    window = generation.window
    _check_parameters(p, window, stream)
    if not request.inputs:
        raise invalid("`inputs` cannot be empty")

    prompt_ids = await encode(generation, request.inputs)
    if p.truncate is not None:
        prompt_ids = prompt_ids[-p.truncate :]  # TGI truncates on the left
    num_input = len(prompt_ids)
    max_total = window.max_total_tokens
    room = window.room(num_input)
    defaults = generation.model.generation_defaults if generation.model else {}
    if "max_new_tokens" not in p.model_fields_set:
        default = defaults.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        max_new_tokens = max(min(default, room), 1)
    elif p.max_new_tokens is None:  # TGI: explicit null means all the room there is
        max_new_tokens = max(room, 1)
    else:
        max_new_tokens = p.max_new_tokens
    if num_input + max_new_tokens > max_total:
        raise invalid(
            f"`inputs` tokens + `max_new_tokens` must be <= {max_total}. "
            f"Given: {num_input} `inputs` tokens and {max_new_tokens} `max_new_tokens`"
        )
    if num_input > window.max_input_tokens:
        raise invalid(
            f"`inputs` must have less than {window.max_input_tokens} tokens. Given: {num_input}"
        )

    # NOTE: TGI's rule: any warper set away from its neutral value turns sampling on, so
    # `temperature: 0.7` samples even with `do_sample: false`. Only what the request set
    # decides it; the model's defaults then fill the warpers the request left unset.
    sampling = (
        p.do_sample
        or (p.temperature is not None and p.temperature != 1.0)
        or bool(p.top_k)
        or (p.top_p is not None and p.top_p < 1.0)
        or (p.typical_p is not None and p.typical_p < 1.0)
    )

    def pick(given: float | int | None, name: str, neutral: float | int) -> float | int:
        return given if given is not None else defaults.get(name, neutral)

    temperature = pick(p.temperature, "temperature", 1.0)
    top_k = pick(p.top_k, "top_k", 0)
    top_p = pick(p.top_p, "top_p", 1.0)
    typical_p = 1.0 if p.typical_p is None else p.typical_p
    seed = (p.seed if p.seed is not None else random.getrandbits(64)) if sampling else None
    top_n_tokens = p.top_n_tokens or 0
    params = SamplingParams(
        max_new_tokens=max_new_tokens,
        temperature=temperature if sampling else 0.0,
        top_k=top_k,
        top_p=top_p,
        min_p=defaults.get("min_p", 0.0) if sampling else 0.0,
        typical_p=typical_p,
        repetition_penalty=pick(p.repetition_penalty, "repetition_penalty", 1.0),
        frequency_penalty=p.frequency_penalty or 0.0,
        seed=seed,
        stop=tuple(s for s in p.stop if s),
        # TGI's texts: a token's text includes special tokens, a stop sequence stays in.
        skip_special_tokens=False,
        include_stop_str_in_output=True,
        # Streamed tokens always carry their logprob; /generate only with `details`.
        logprobs=stream or p.details,
        top_logprobs=top_n_tokens if stream or p.details else 0,
    )
    return Prepared(
        inputs=request.inputs,
        prompt_ids=prompt_ids,
        params=params,
        seed=seed,
        details=p.details,
        decoder_input_details=p.decoder_input_details,
        top_n_tokens=top_n_tokens,
        return_full_text=bool(p.return_full_text),
    )
