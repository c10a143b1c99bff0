"""StopStringMatcher: streamed stop-string detection."""

from __future__ import annotations

import random

import pytest

from kiln.text import StopStringMatcher


def _run(stops, deltas):
    """Feed all deltas; return (emitted text, hit, matcher)."""
    matcher = StopStringMatcher(stops)
    emitted = []
    for delta in deltas:
        text, hit = matcher.feed(delta)
        emitted.append(text)
        if hit:
            return "".join(emitted), True, matcher
    emitted.append(matcher.flush())
    return "".join(emitted), False, matcher


def _random_split(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    pieces, i = [], 0
    while i < len(text):
        n = rng.randint(0, 4)  # empty deltas happen (a held-back character) and must be fine
        pieces.append(text[i : i + n])
        i += n
    return pieces


def test_stop_within_one_delta():
    assert _run(["END"], ["Hello END world"])[:2] == ("Hello ", True)


def test_stop_across_delta_boundaries():
    emitted, hit, matcher = _run(["<|end|>"], ["Hello <", "|e", "nd", "|> tail"])
    assert (emitted, hit, matcher.matched) == ("Hello ", True, "<|end|>")


def test_text_is_held_only_while_it_could_be_a_stop():
    matcher = StopStringMatcher(["###"])
    assert matcher.feed("a #") == ("a ", False)
    assert matcher.feed("#") == ("", False)
    assert matcher.feed("x") == ("##x", False)  # not a stop after all: released at once
    assert matcher.feed("## done ##") == ("## done ", False)
    assert matcher.feed("#") == ("", True)
    assert matcher.flush() == ""


def test_earliest_match_wins():
    emitted, hit, matcher = _run(["world", "lo w", "Hello"], ["xx Hel", "lo world"])
    assert (emitted, hit, matcher.matched) == ("xx ", True, "Hello")


def test_first_completed_stop_wins_however_the_text_is_split():
    # "cd" completes before "bcde" does, so a character stream would stop at "cd": so must
    # every other split of the same text.
    stops = ["bcde", "cd"]
    for deltas in (["abcdef"], ["ab", "cdef"], list("abcdef"), ["abc", "d", "ef"]):
        emitted, _, matcher = _run(stops, deltas)
        assert (emitted, matcher.matched) == ("ab", "cd")


def test_same_end_prefers_the_longer_stop():
    emitted, _, matcher = _run(["r:", "User:"], ["ok User: hi"])
    assert (emitted, matcher.matched) == ("ok ", "User:")


def test_stop_at_start():
    assert _run(["Stop"], ["Stop right there"])[:2] == ("", True)
    assert _run(["Stop"], ["St", "op"])[:2] == ("", True)


def test_after_a_hit_nothing_more_is_emitted():
    matcher = StopStringMatcher(["x"])
    assert matcher.feed("abxcd") == ("ab", True)
    assert matcher.feed("more") == ("", True)
    assert matcher.flush() == ""
    assert matcher.stopped


def test_unicode_stops():
    emitted, hit, _ = _run(["。终", "🛑"], ["你好", "。", "终了"])
    assert (emitted, hit) == ("你好", True)
    emitted, hit, _ = _run(["🛑"], ["go go ", "🛑 never"])
    assert (emitted, hit) == ("go go ", True)


@pytest.mark.parametrize("seed", range(20))
def test_no_leaks_and_no_losses(seed):
    rng = random.Random(seed)
    stops = ["</s>", "<|im_end|>", "\n\nHuman:", "ééé", "aaab"]
    # Text full of near-misses: stop prefixes that never complete.
    parts = ["</", "<|im_", "\n\nHum", "éé", "aaa", "aa", "hello", " ", "<", "\n", "é", "b"]
    text = "".join(rng.choice(parts) for _ in range(60))
    found = [(text.index(s) + len(s), text.index(s)) for s in stops if s in text]
    # The stop that ends first wins.
    expected = (text[: min(found)[1]], True) if found else (text, False)
    assert _run(stops, _random_split(text, seed))[:2] == expected
    assert _run(stops, [text])[:2] == expected


@pytest.mark.parametrize("seed", range(20))
def test_result_independent_of_delta_boundaries(seed):
    rng = random.Random(seed)
    stops = ["abc", "bc", "cab", "ca", "abcab"]
    text = "".join(rng.choice("abcx") for _ in range(30))
    whole = _run(stops, [text])
    by_char = _run(stops, list(text))
    split = _run(stops, _random_split(text, seed))
    assert whole[:2] == by_char[:2] == split[:2]
    assert whole[2].matched == by_char[2].matched == split[2].matched


def test_nothing_held_without_a_partial_match():
    matcher = StopStringMatcher(["STOP"])
    for piece in ["a", "b", " ", "xyz"]:
        assert matcher.feed(piece) == (piece, False)


def test_no_stops_and_empty_stops():
    assert StopStringMatcher([]).feed("anything") == ("anything", False)
    matcher = StopStringMatcher(["", "z"])
    assert matcher.stops == ("z",)
    assert matcher.feed("abc") == ("abc", False)
    with pytest.raises(TypeError):
        StopStringMatcher("stop")  # type: ignore[arg-type]


@pytest.mark.parametrize("seed", range(20))
def test_keep_stop_emits_every_delta_whole_and_stops_where_cutting_would(seed):
    rng = random.Random(seed)
    stops = ["abc", "bc", "cab", "ca", "abcab"]
    text = "".join(rng.choice("abcx") for _ in range(30))
    cutting = StopStringMatcher(stops)
    keeping = StopStringMatcher(stops, keep_stop=True)
    for delta in _random_split(text, seed):
        out, hit = keeping.feed(delta)
        assert out == delta  # nothing cut, nothing held back
        assert hit == cutting.feed(delta)[1]  # the same delta completes the first stop
        if hit:
            assert keeping.matched == cutting.matched
            break
    assert keeping.flush() == ""


def test_keep_stop_finds_a_stop_split_over_many_deltas():
    matcher = StopStringMatcher(["STOP"], keep_stop=True)
    assert [matcher.feed(d) for d in ["xS", "T", "O", "Pyz"]] == [
        ("xS", False),
        ("T", False),
        ("O", False),
        ("Pyz", True),
    ]
