"""``StopRule``: which token ends a request, as the engine and the reference relay both decide it."""
from relaykern import SamplingParams
from relaykern.stop_rule import StopRule

EOS = 7


def ends_at(rule: StopRule, pieces: list[tuple[int, bytes]]) -> int | None:
    """The index of the first token that ends the request, feeding ``(token, bytes)`` pieces in order."""
    text = bytearray()
    for index, (token, data) in enumerate(pieces):
        before = len(text)
        text += data
        if rule.ends(token, text, before, index + 1):
            return index
    return None


def test_eos_and_stop_ids_end_the_request_unless_eos_is_ignored():
    pieces = [(1, b"a"), (EOS, b""), (3, b"b")]
    assert ends_at(StopRule.of(SamplingParams(), [EOS]), pieces) == 1
    assert ends_at(StopRule.of(SamplingParams(ignore_eos=True), [EOS]), pieces) is None
    assert ends_at(StopRule.of(SamplingParams(ignore_eos=True, stop_token_ids=[3]), [EOS]), pieces) == 2


def test_a_stop_string_ends_the_token_it_ends_in_once_only():
    rule = StopRule.of(SamplingParams(stop=["STOP"]), [EOS])
    assert ends_at(rule, [(1, b"xS"), (2, b"TO"), (3, b"Px"), (4, b"y")]) == 2  # split over three tokens
    # A match that ended in an earlier token is not found again by a later one.
    assert not rule.ends(5, bytearray(b"STOPz"), 4, 2)


def test_nothing_ends_a_response_shorter_than_min_tokens():
    rule = StopRule.of(SamplingParams(min_tokens=3, stop=["!"]), [EOS])
    assert ends_at(rule, [(EOS, b""), (1, b"!"), (EOS, b""), (2, b"!")]) == 2
