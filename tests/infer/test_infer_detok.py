"""Incremental detokenization: never half a character, stop strings cut exactly, pieces add up."""

from hypothesis import given, settings
from hypothesis import strategies as st

from moelab.infer.detok import TextStream


def run(tokenizer, text: str, stop=(), prompt=""):
    stream = TextStream(tokenizer, tokenizer.encode(prompt), stop)
    pieces = [stream.push(t) for t in tokenizer.encode(text)]
    pieces.append(stream.flush())
    return pieces, stream


def test_multibyte_characters_are_released_whole(tokenizer):
    pieces, _ = run(tokenizer, "añb€c")
    assert "".join(pieces) == "añb€c"
    assert all("\ufffd" not in p for p in pieces)
    assert pieces[:3] == ["a", "", "ñ"]  # ñ is two byte tokens: nothing after the first


def test_stop_string_spanning_tokens_is_cut_and_never_leaked(tokenizer):
    pieces, stream = run(tokenizer, "hello END world", stop=["END"])
    assert "".join(pieces) == "hello "
    assert stream.stopped and stream.text == "hello "
    assert not any("E" in p for p in pieces)


def test_held_back_text_is_released_when_the_stop_does_not_complete(tokenizer):
    pieces, stream = run(tokenizer, "an ENd", stop=["END"])
    assert "".join(pieces) == "an ENd" and not stream.stopped
    assert pieces[4] == ""  # "E" was held while it could still start "END"


def test_earliest_of_several_stops_wins(tokenizer):
    pieces, _ = run(tokenizer, "abcXYdefZ", stop=["Z", "XY"])
    assert "".join(pieces) == "abc"


@settings(max_examples=100, deadline=None)
@given(
    text=st.text(max_size=30), stop=st.lists(st.text(min_size=1, max_size=3), max_size=2), prompt=st.text(max_size=5)
)
def test_pieces_concatenate_to_the_text_before_the_first_stop(tokenizer, text, stop, prompt):
    pieces, _ = run(tokenizer, text, stop, prompt)
    assert "".join(pieces) == text[: first_stop_cut(text, stop)]


def first_stop_cut(text: str, stop) -> int:
    """Where generation ends: at the first character after which the text holds a stop string (the rest is
    never generated), before the earliest stop found by then. Not simply the earliest occurrence in the whole
    text: with stops "0" and "100", "100" ends after "10" with "1" -- "0" completes first."""
    for end in range(1, len(text) + 1):
        hits = [i for i in (text[:end].find(s) for s in stop) if i >= 0]
        if hits:
            return min(hits)
    return len(text)


def test_a_stop_in_the_tail_released_at_the_end_still_stops(tokenizer):
    # found by the property above: a generated U+FFFD is held as if it were half a character, and the
    # final flush released it without looking for stop strings
    pieces, stream = run(tokenizer, "ab\ufffd", stop=["\ufffd"])
    assert "".join(pieces) == "ab" and stream.stopped


def test_a_stop_that_completes_first_wins_over_one_that_starts_earlier(tokenizer):
    # found by the property above: the reference once cut at the earliest start in the whole text
    pieces, stream = run(tokenizer, "100", stop=["0", "100"])
    assert "".join(pieces) == "1" and stream.stopped
