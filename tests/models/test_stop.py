from __future__ import annotations

from ringlet.models.stop import StopMatcher


def stream(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = "".join(matcher.feed(p) for p in pieces)
    return out + matcher.flush(), matcher.stopped


def test_stop_split_across_pieces_is_never_emitted():
    assert stream(["Hello", " wor", "ld\n\nUs", "er: hi"], ["\n\nUser:"]) == ("Hello world", True)


def test_partial_match_is_released_when_it_diverges():
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("ab ST") == "ab "
    assert matcher.feed("AR") == "STAR"
    assert not matcher.stopped


def test_held_back_text_flushed_at_end():
    assert stream(["a", "S", "T"], ["STOP"]) == ("aST", False)


def test_earliest_of_several_stops_wins_and_is_the_one_matched():
    assert stream(["x", "yBz", "A"], ["A", "B"]) == ("xy", True)
    matcher = StopMatcher(["A", "B"])
    matcher.feed("xyBzA")
    assert matcher.matched == "B"
    assert StopMatcher(["A"]).matched is None


def test_nothing_after_stop():
    matcher = StopMatcher(["."])
    assert matcher.feed("one. two") == "one"
    assert matcher.feed("three") == "" and matcher.flush() == ""


def test_no_stops_passes_through():
    assert stream(["a", "b"], []) == ("ab", False)
