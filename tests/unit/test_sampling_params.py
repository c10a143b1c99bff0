"""SamplingParams: defaults, normalisation, and a named error for every bad value."""

from __future__ import annotations

import dataclasses
import math

import pytest

from kiln.errors import InvalidRequestError
from kiln.sampling import MAX_TOP_LOGPROBS, SamplingParams


def test_defaults_sample_without_any_warper() -> None:
    p = SamplingParams()
    assert p.max_new_tokens == 256
    assert p.min_new_tokens == 0
    assert (p.temperature, p.top_k, p.top_p, p.typical_p, p.min_p) == (1.0, 0, 1.0, 1.0, 0.0)
    assert (p.repetition_penalty, p.frequency_penalty, p.presence_penalty) == (1.0, 0.0, 0.0)
    assert p.seed is None
    assert p.stop == () and p.stop_token_ids == ()
    assert not p.ignore_eos and not p.logprobs and p.top_logprobs == 0
    assert p.skip_special_tokens
    assert not p.greedy and not p.is_plain_greedy and not p.wants_logprobs


def test_lists_become_tuples_and_a_lone_stop_string_a_tuple() -> None:
    p = SamplingParams(stop=["\n\n", "User:"], stop_token_ids=[7, 9])
    assert p.stop == ("\n\n", "User:")
    assert p.stop_token_ids == (7, 9)
    assert SamplingParams(stop="###").stop == ("###",)
    # Normalised params are hashable and compare equal to the tuple-built ones.
    assert hash(p) == hash(SamplingParams(stop=("\n\n", "User:"), stop_token_ids=(7, 9)))


def test_int_floats_become_floats() -> None:
    p = SamplingParams(temperature=1, top_p=1, repetition_penalty=2, frequency_penalty=-1)
    assert isinstance(p.temperature, float) and p.temperature == 1.0
    assert isinstance(p.repetition_penalty, float) and p.repetition_penalty == 2.0
    assert isinstance(p.frequency_penalty, float)


def test_greedy_flags() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(temperature=1e-7).greedy  # would overflow logits / temperature
    assert not SamplingParams(temperature=0.01).greedy
    g = SamplingParams.greedy_params(max_new_tokens=5)
    assert g.greedy and g.is_plain_greedy and g.max_new_tokens == 5
    # Anything that changes the logits or asks for logprobs leaves the bare-argmax path.
    assert not g.replace(repetition_penalty=1.1).is_plain_greedy
    assert not g.replace(frequency_penalty=0.5).is_plain_greedy
    assert not g.replace(presence_penalty=-0.5).is_plain_greedy
    assert not g.replace(min_new_tokens=1).is_plain_greedy
    assert not g.replace(logprobs=True).is_plain_greedy
    assert not g.replace(top_logprobs=2).is_plain_greedy
    assert g.replace(top_logprobs=2).wants_logprobs
    # Warpers do not matter to a greedy row.
    assert g.replace(top_k=3, top_p=0.5, min_p=0.2, typical_p=0.5).is_plain_greedy


def test_frozen_and_replace_revalidates() -> None:
    p = SamplingParams()
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.temperature = 0.5  # type: ignore[misc]
    with pytest.raises(InvalidRequestError, match="top_p"):
        p.replace(top_p=0.0)


# Annotations are strings there (`from __future__ import annotations`): "float", not float.
FLOAT_FIELDS = {f.name for f in dataclasses.fields(SamplingParams) if f.type == "float"}
BOUNDARY_VALUES = [
    {
        "max_new_tokens": 1,
        "min_new_tokens": 1,
        "temperature": 0.0,
        "top_k": 0,
        "top_p": 1.0,
        "typical_p": 1.0,
        "min_p": 0.0,
        "repetition_penalty": 1e-3,
        "frequency_penalty": -2.0,
        "presence_penalty": 2.0,
        "seed": 0,
        "stop": ["x"],
        "stop_token_ids": [0],
        "top_logprobs": MAX_TOP_LOGPROBS,
    },
    {
        "top_p": 1e-6,
        "typical_p": 1e-6,
        "min_p": 0.999,
        "seed": 2**64 - 1,
        "temperature": 100,
        "frequency_penalty": 2,
        "presence_penalty": -2,
        "top_logprobs": 0,
    },
]


def test_boundary_values_are_accepted() -> None:
    assert {"temperature", "top_p", "repetition_penalty"} <= FLOAT_FIELDS
    for values in BOUNDARY_VALUES:
        p = SamplingParams(**values)
        for name, value in values.items():
            held = getattr(p, name)
            if name in FLOAT_FIELDS:
                # an int given for a float field is held as the equal float (as documented)
                assert type(held) is float and held == float(value), (name, held)
            elif isinstance(value, list):
                assert held == tuple(value) and type(held) is tuple, (name, held)
            else:
                assert type(held) is type(value) and held == value, (name, held)


BAD_VALUES = [
    ("max_new_tokens", 0),
    ("max_new_tokens", -5),
    ("max_new_tokens", 2.5),
    ("max_new_tokens", True),
    ("min_new_tokens", -1),
    ("min_new_tokens", 300),  # > max_new_tokens (256)
    ("temperature", -0.1),
    ("temperature", math.inf),
    ("temperature", math.nan),
    ("temperature", "hot"),
    ("temperature", True),
    ("top_k", -1),
    ("top_k", 1.5),
    ("top_p", 0.0),
    ("top_p", 1.01),
    ("top_p", math.nan),
    ("typical_p", 0.0),
    ("typical_p", 1.5),
    ("min_p", -0.1),
    ("min_p", 1.0),
    ("repetition_penalty", 0.0),
    ("repetition_penalty", -1.0),
    ("repetition_penalty", math.inf),
    ("frequency_penalty", 2.01),
    ("frequency_penalty", -2.5),
    ("presence_penalty", 3.0),
    ("presence_penalty", -2.01),
    ("seed", -1),
    ("seed", 2**64),
    ("seed", "42"),
    ("stop", [""]),
    ("stop", ["ok", 3]),
    ("stop", 5),
    ("stop_token_ids", [-1]),
    ("stop_token_ids", [1.5]),
    ("stop_token_ids", "12"),
    ("stop_token_ids", 7),
    ("ignore_eos", "yes"),
    ("logprobs", 1),
    ("skip_special_tokens", None),
    ("top_logprobs", -1),
    ("top_logprobs", MAX_TOP_LOGPROBS + 1),
]


@pytest.mark.parametrize(("field", "value"), BAD_VALUES)
def test_bad_value_raises_naming_the_field(field: str, value: object) -> None:
    with pytest.raises(InvalidRequestError, match=field) as info:
        SamplingParams(**{field: value})
    # The message is a user-facing one-liner that also says what is allowed.
    message = str(info.value)
    assert "must" in message
    assert isinstance(info.value, ValueError)  # InvalidRequestError is a ValueError too


@pytest.mark.parametrize(
    ("field", "value", "allowed"),
    [
        ("top_p", 0.0, "(0, 1]"),
        ("typical_p", 2.0, "(0, 1]"),
        ("min_p", 1.0, "[0, 1)"),
        ("frequency_penalty", 3.0, "[-2, 2]"),
        ("presence_penalty", -3.0, "[-2, 2]"),
        ("top_logprobs", 21, "[0, 20]"),
        ("repetition_penalty", 0.0, "> 0"),
        ("temperature", -1.0, ">= 0"),
        ("max_new_tokens", 0, ">= 1"),
    ],
)
def test_message_states_the_allowed_range(field: str, value: object, allowed: str) -> None:
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{field: value})
    assert allowed in str(info.value)
    assert str(value) in str(info.value)
