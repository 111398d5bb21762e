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
    cut = min([i for i in (text.find(s) for s in stop) if i >= 0], default=len(text))
    assert "".join(pieces) == text[:cut]
