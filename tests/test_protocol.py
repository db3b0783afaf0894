"""The relay grammar: ``find_commands`` (the regex specification) against ``scan`` (the byte automaton) and
``token_transition`` (its per-token lift, the GPU detection table's contract), on rules and on random texts."""
import itertools
import random
import unicodedata

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaykern.protocol import (
    CLOSE_FIRST,
    DIGITS_STATE,
    EVENT_CALL,
    EVENT_MALFORMED,
    EVENT_NONE,
    N_CLAMP,
    NUM_STATES,
    OPEN,
    TEXT,
    Command,
    Event,
    ParsedResponse,
    ScanState,
    find_commands,
    scan,
    serve_length,
    strip_commands,
    token_transition,
    view_cuts,
)
from relaykern.engine.llm_view import end_run_at_call, feed_llm_view, note_slm_token
from relaykern.tokenizer import encode_bytes, load_qwen3_tokenizer, token_bytes


@pytest.fixture(scope="session")
def tokenizer():
    return load_qwen3_tokenizer()


@pytest.fixture(scope="session")
def vocab_bytes(tokenizer):
    return token_bytes(tokenizer)


def scan_chunks(chunks: list[bytes]) -> tuple[ParsedResponse, int | None]:
    """``scan`` fed chunk by chunk, offsets made absolute; also the offending byte of a malformed command."""
    state, commands, base = ScanState(), [], 0
    for chunk in chunks:
        for event in scan(state, chunk):
            if event.kind == EVENT_MALFORMED:
                return ParsedResponse(tuple(commands), base + event.start, None), base + event.end
            commands.append(Command(base + event.start, base + event.end, event.n))
        base += len(chunk)
    return ParsedResponse(tuple(commands), None, base + state.start if state.state != TEXT else None), None


def replay_transitions(chunks: list[bytes]) -> tuple[ParsedResponse, int | None]:
    """What the GPU detection table does: per token, the state, ``N ← min(a·N + b, N_CLAMP)`` and the start."""
    state, n, start, commands, base = TEXT, 0, -1, [], 0
    for chunk in chunks:
        move = token_transition(state, chunk)
        n = min(move.a * n + move.b, N_CLAMP)
        if move.event == EVENT_MALFORMED:
            return ParsedResponse(tuple(commands), start, None), base + move.event_end
        if move.event == EVENT_CALL:
            commands.append(Command(start, base + move.event_end, n))
            n = 0
        if move.start_offset >= 0:
            start = base + move.start_offset
        state = move.next_state
        base += len(chunk)
    return ParsedResponse(tuple(commands), None, start if state != TEXT else None), None


def check_against_spec(text: bytes, got: tuple[ParsedResponse, int | None]) -> None:
    parsed, offending = got
    assert parsed == find_commands(text)
    if parsed.malformed_at is not None:  # the offending byte is the first that no command can continue with
        assert find_commands(text[:offending]) == ParsedResponse(parsed.commands, None, parsed.malformed_at)
        assert find_commands(text[: offending + 1]).malformed_at == parsed.malformed_at


def spec_and_scan(text: bytes) -> ParsedResponse:
    """find_commands, after checking that scan agrees with it fed whole and fed byte by byte."""
    for chunks in ([text], [text[i : i + 1] for i in range(len(text))]):
        check_against_spec(text, scan_chunks(chunks))
    return find_commands(text)


# ---- the rules, one by one ----------------------------------------------------------------------------------


def test_command_and_n():
    assert spec_and_scan(b"Ask <call>12</call> ok") == ParsedResponse((Command(4, 19, 12),), None, None)
    assert spec_and_scan(b"<call>0</call>").commands == (Command(0, 14, 0),)  # N=0: reported; the engine skips it
    assert spec_and_scan(b"<call>007</call>").commands[0].n == 7
    assert serve_length(0, 4096, 100) == 0


@pytest.mark.parametrize("digits, n", [(str(N_CLAMP), N_CLAMP), (str(N_CLAMP + 1), N_CLAMP), ("9" * 40, N_CLAMP)])
def test_huge_n_is_clamped(digits, n):
    assert spec_and_scan(b"<call>%s</call>" % digits.encode()).commands[0].n == n


def test_n_with_more_digits_than_int_conversion_allows():
    text = b"<call>" + b"1" * 5000 + b"</call>"
    assert scan(ScanState(), text) == [Event(EVENT_CALL, N_CLAMP, 0, len(text))]
    assert find_commands(text).commands == (Command(0, len(text), N_CLAMP),)


def test_serve_length():
    assert serve_length(50, 4096, 1000) == 50
    assert serve_length(5000, 4096, 10**6) == 4096
    assert serve_length(50, 4096, 10) == 10
    assert serve_length(N_CLAMP, 100, 10**9) == 100
    assert serve_length(50, 4096, 0) == 0
    assert serve_length(50, 4096, -3) == 0


@pytest.mark.parametrize("text, commands, malformed_at", [
    ("<call>abc", 0, 0),
    ("<call></call>", 0, 0),
    ("<call>5</x", 0, 0),
    ("<call><call>1</call>", 0, 0),
    ("ok <call>1 2</call>", 0, 3),
    ("<call>-1</call>", 0, 0),
    ("<call>5</CALL>", 0, 0),
    ("<call>5</call >", 0, 0),
    ("<call>5<call>6</call>", 0, 0),
    ("<call>\u00a05</call>", 0, 0),  # non-ASCII whitespace is not whitespace here
    ("<call>\x1c5</call>", 0, 0),  # nor are the separators str.isspace() accepts
    ("<call>5\x85</call>", 0, 0),
    ("<call>\u0663</call>", 0, 0),  # nor are non-ASCII digits
    ("<call>5</call>x<call>y <call>1</call>", 1, 15),  # nothing after a malformed command counts
])
def test_malformed(text, commands, malformed_at):
    parsed = spec_and_scan(text.encode())
    assert (len(parsed.commands), parsed.malformed_at, parsed.pending_at) == (commands, malformed_at, None)


@pytest.mark.parametrize("text", ["<cal is text", "<call is text", "< call>1</call>", "</call>", "call>",
                                  "<Call>1</call>", "<tool_call>1</tool_call>", "<\u0338call>"])
def test_partial_or_other_tags_are_text(text):
    assert spec_and_scan(text.encode()) == ParsedResponse((), None, None)


def test_partial_tag_then_command():
    assert spec_and_scan(b"<calx<call>1</call>").commands == (Command(5, 19, 1),)


def test_overlapping_starts():
    assert spec_and_scan(b"<<call>1</call>").commands == (Command(1, 15, 1),)
    assert spec_and_scan(b"<call<call>2</call>").commands == (Command(5, 19, 2),)
    assert spec_and_scan(b"<c<ca<call>3</call>").commands == (Command(5, 19, 3),)
    assert spec_and_scan(b"<call>1</call><call>2</call>").commands == (Command(0, 14, 1), Command(14, 28, 2))


@pytest.mark.parametrize("text, pending_at", [
    ("<", 0), ("abc <ca", 4), ("x<call", 1), ("<call>", 0), ("<call> ", 0), ("<call>12", 0), ("<call>7 ", 0),
    ("<call>12<", 0), ("<call>12</ca", 0), ("<call>1 </call", 0), ("<call>1</call><c", 14), ("<<", 1), ("<cal<", 4),
])
def test_unterminated_at_end(text, pending_at):
    assert spec_and_scan(text.encode()) == ParsedResponse(
        (Command(0, 14, 1),) if text.startswith("<call>1</call>") else (), None, pending_at)


@pytest.mark.parametrize("before, after", [(" ", ""), ("", "\t"), ("\n", "\n"), ("\r\n", " "), ("\x0b", "\x0c"),
                                           (" \t\n\r\x0b\x0c", " \t\n\r\x0b\x0c"), ("   ", "")])
def test_whitespace_around_n(before, after):
    text = f"<call>{before}42{after}</call>".encode()
    assert spec_and_scan(text).commands == (Command(0, len(text), 42),)


def test_scan_offsets_are_relative_to_each_chunk():
    state = ScanState()
    chunks = [b"x.<", b"call", b">", b"3", b"</", b"call", b">,"]
    events = [scan(state, chunk) for chunk in chunks]
    assert events[:-1] == [[]] * 6
    assert events[-1] == [Event(EVENT_CALL, 3, -13, 1)]  # '<' was 13 bytes before the last chunk
    state = ScanState()
    assert scan(state, b"<call>1</call><call>x<call>2</call>") == [Event(EVENT_CALL, 1, 0, 14),
                                                                  Event(EVENT_MALFORMED, 0, 14, 20)]
    assert (state.state, state.n) == (TEXT, 0)


def test_token_transition_examples():
    after_close = CLOSE_FIRST + 5  # "</call" matched
    move = token_transition(TEXT, b".<")
    assert (move.next_state, move.event, move.a, move.b, move.start_offset) == (1, EVENT_NONE, 1, 0, 1)
    move = token_transition(after_close, b">,")
    assert (move.next_state, move.event, move.event_end, move.start_offset) == (TEXT, EVENT_CALL, 1, -1)
    move = token_transition(after_close, b"><")
    assert (move.next_state, move.event, move.event_end, move.start_offset) == (1, EVENT_CALL, 1, 1)
    move = token_transition(DIGITS_STATE, b"7")
    assert (move.next_state, move.a, move.b, move.start_offset) == (DIGITS_STATE, 10, 7, -1)
    move = token_transition(DIGITS_STATE, b"x")
    assert (move.next_state, move.event, move.event_end) == (TEXT, EVENT_MALFORMED, 0)
    with pytest.raises(ValueError, match="whole command"):
        token_transition(TEXT, b"<call>1</call>")
    with pytest.raises(ValueError, match="more than one"):
        token_transition(after_close, b"><call>x")


def test_no_real_token_makes_token_transition_raise(vocab_bytes):
    """Every token from every state. token_transition raises only for a call event (two events need one: scan stops
    at a malformed), and a call event is raised by the '>' ending ``</call>``: tokens without b">" cannot raise."""
    closing = [data for data in vocab_bytes if b">" in data]
    assert len(closing) > 100
    for state in range(NUM_STATES):
        for data in closing:
            token_transition(state, data)
    # replay_transitions takes a malformed command's start from the table's tracked start: exact as long as no
    # token holds a whole b"<call>" (only then could one token both begin and break a command).
    assert not any(OPEN in data for data in vocab_bytes)


# ---- strip_commands ---------------------------------------------------------------------------------------------


def llm_view(tokenizer, vocab_bytes, ids: list[int]) -> list[int]:
    text = b"".join(vocab_bytes[i] for i in ids)
    cuts = view_cuts(text, [(c.start, c.end) for c in find_commands(text).commands])
    return strip_commands(ids, [vocab_bytes[i] for i in ids], cuts, lambda data: encode_bytes(tokenizer, data))


def test_view_cuts_take_the_whitespace_before_each_command():
    text = b"So x = <call>20</call> 4.\n\n<call>0</call>\t <call>3</call>"
    commands = [(c.start, c.end) for c in find_commands(text).commands]
    assert view_cuts(text, commands) == [(6, 22), (25, 41), (41, 57)]  # (the third stops at the second's end)
    assert view_cuts(b"  <call>1</call>", [(2, 15)]) == [(0, 15)]  # back to the run's start


def test_the_llm_reads_no_whitespace_before_a_command(tokenizer, vocab_bytes):
    """As the official code strips what it hands the LLM: a call's context ends ``x =``, not in a lone space."""
    ids = tokenizer.encode("So x = <call>20</call> 4") + tokenizer.encode("\n\n") + tokenizer.encode("<call>5</call>")
    assert b"".join(vocab_bytes[i] for i in llm_view(tokenizer, vocab_bytes, ids)) == b"So x = 4"
    spaced = tokenizer.encode("Thus,") + tokenizer.encode(" ") + [27, 6659, 29, 20, 522, 6659, 29]
    assert llm_view(tokenizer, vocab_bytes, spaced) == tokenizer.encode("Thus,")
    ending = tokenizer.encode("So x =") + tokenizer.encode(" <call>20</call>\n\n")  # ... "</" "call" ">\n\n"
    assert vocab_bytes[ending[-1]] == b">\n\n"
    assert llm_view(tokenizer, vocab_bytes, ending) == tokenizer.encode("So x =")


def test_strip_straddling_tokens(tokenizer, vocab_bytes):
    ids = tokenizer.encode("x.<call>3</call>, y")
    assert ids == [87, 15757, 6659, 29, 18, 522, 6659, 8066, 379]  # 'x' '.<' ... '>,' ' y'
    assert llm_view(tokenizer, vocab_bytes, ids) == [87, 2572, 379]  # '.<' + '>,' keep '.,' → one token
    ids = tokenizer.encode("see.<call>2</call>")
    assert llm_view(tokenizer, vocab_bytes, ids) == [4060, 13]  # a run at the very end: 'see' '.'


def test_strip_several_commands_in_one_run(tokenizer, vocab_bytes):
    ids = tokenizer.encode("a<call>1</call><call>2</call>b")
    assert [vocab_bytes[i] for i in ids][7] == b"><"  # the token straddling both commands
    assert llm_view(tokenizer, vocab_bytes, ids) == tokenizer.encode("a") + tokenizer.encode("b")


def test_strip_command_with_no_straddle(tokenizer, vocab_bytes):
    before, after = tokenizer.encode("Hi"), tokenizer.encode(" ok")
    command = [27, 6659, 29, 20, 522, 6659, 29]  # '<' 'call' '>' '5' '</' 'call' '>'
    assert llm_view(tokenizer, vocab_bytes, before + command + after) == before + after
    plain = tokenizer.encode("no command < here > at all")
    assert llm_view(tokenizer, vocab_bytes, plain) == plain


def test_strip_unserved_ranges_are_explicit(tokenizer, vocab_bytes):
    ids = tokenizer.encode("A<call>1</call>B<call>2</call>C")
    data = [vocab_bytes[i] for i in ids]
    stripped = strip_commands(ids, data, [(1, 15)], lambda raw: encode_bytes(tokenizer, raw))
    assert b"".join(vocab_bytes[i] for i in stripped) == b"AB<call>2</call>C"


# ---- random texts -------------------------------------------------------------------------------------------

WHITESPACE = st.text(alphabet=" \t\n\r\x0b\x0c", max_size=3)
DIGIT_STRINGS = st.one_of(st.integers(0, 5000).map(str), st.text(alphabet="0123456789", min_size=1, max_size=24))
MALFORMED = ["<call>abc", "<call></call>", "<call>5</x", "<call><call>1</call>", "<call>1 2</call>", "<call>-3",
             "<call>\u00a05</call>", "<call>5</Call>", "<call>4<call>", "<call>8</call >"]
PARTIALS = ["<", "<c", "<ca", "<cal", "<call", "<call>", "</", "</call", "call>", "</call>", ">", "<<", "<call<",
            "<call>12", "<call> 3 </", "<call>7</cal", "l>", "<tool_call>", "<think>", "<|im_end|>"]
TRICKY_CHARS = list("ab <>/cal0123456789 \n\t\x0b.,é中😀\u00a0\u0338\x1c\x85")  # U+0338: NFC composes "<\u0338"
PLAIN = st.text(alphabet=st.one_of(st.sampled_from(TRICKY_CHARS), st.characters(codec="utf-8")), max_size=10)


@st.composite
def commands(draw) -> str:
    return f"<call>{draw(WHITESPACE)}{draw(DIGIT_STRINGS)}{draw(WHITESPACE)}</call>"


# Valid commands and plain text are drawn more often, so that most texts hold several commands before any break;
# an optional partial tag at the end makes unterminated commands common. NFC: the tokenizer normalises.
PIECE = st.one_of(commands(), commands(), PLAIN, PLAIN, st.sampled_from(PARTIALS), st.sampled_from(MALFORMED))
TEXTS = st.builds(
    lambda pieces, tail: unicodedata.normalize("NFC", "".join(pieces) + tail).encode(),
    st.lists(PIECE, max_size=10),
    st.sampled_from(["", "", *PARTIALS]),
)


@st.composite
def texts_and_cuts(draw, max_chunk: int | None = None) -> tuple[bytes, list[bytes]]:
    text = draw(TEXTS)
    rng = random.Random(draw(st.integers(0, 2**32)))  # far cheaper to draw than a list of cuts; still replayable
    if max_chunk is None:  # any cuts, empty chunks included
        cuts = sorted(rng.randint(0, len(text)) for _ in range(rng.randint(0, len(text))))
    else:
        cuts = [0]
        while cuts[-1] < len(text):
            cuts.append(cuts[-1] + rng.randint(1, max_chunk))
        cuts = cuts[1:-1]
    bounds = [0, *cuts, len(text)]
    return text, [text[a:b] for a, b in zip(bounds, bounds[1:])]


FAST = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@settings(max_examples=4000, **FAST)
@given(texts_and_cuts())
def test_scan_in_random_chunks_matches_spec(case):
    text, chunks = case
    check_against_spec(text, scan_chunks(chunks))


@settings(max_examples=2500, **FAST)
@given(text=TEXTS)
def test_scan_and_table_over_real_tokens_match_spec(tokenizer, vocab_bytes, text):
    chunks = [vocab_bytes[i] for i in encode_bytes(tokenizer, text)]
    assert b"".join(chunks) == text
    check_against_spec(text, scan_chunks(chunks))
    check_against_spec(text, replay_transitions(chunks))


@settings(max_examples=3000, **FAST)
@given(texts_and_cuts(max_chunk=6))
def test_table_in_short_random_chunks_matches_spec(case):
    """Chunks of at most 6 bytes: too short to hold a whole command or to both begin and break one (7 bytes)."""
    text, chunks = case
    check_against_spec(text, replay_transitions(chunks))


@settings(max_examples=1000, **FAST)
@given(text=TEXTS)
def test_strip_commands_removes_exactly_the_command_bytes_and_the_whitespace_before(tokenizer, vocab_bytes, text):
    ids = encode_bytes(tokenizer, text)
    commands = [(c.start, c.end) for c in find_commands(text).commands]
    ranges = view_cuts(text, commands)
    floors = [0] + [end for _, end in commands[:-1]]
    for (cut, end), (start, _), floor in zip(ranges, commands, floors):
        assert cut == floor or text[cut - 1] not in b" \t\n\r\x0b\x0c"  # all of the whitespace run...
        assert not text[cut:start].strip(b" \t\n\r\x0b\x0c")  # ...and nothing else
    out = llm_view(tokenizer, vocab_bytes, ids)
    kept = bytearray(text)
    for start, end in reversed(ranges):
        del kept[start:end]
    assert b"".join(vocab_bytes[i] for i in out) == bytes(kept)
    token_ends = itertools.accumulate(len(vocab_bytes[i]) for i in ids)
    untouched = sum(1 for end in token_ends if not ranges or end <= ranges[0][0])
    assert out[:untouched] == ids[:untouched]  # tokens before the first cut are untouched


def _run_as_the_engine_reads_it(ids: list, chunks: list[bytes], encode) -> tuple[int, bool, list, list]:
    """The engine's bookkeeping over one SLM run (engine/llm_view.py), the detection's events and N from the table,
    the view fed at every safe point and the rest where the run ends: at the first command with N > 0 (the call),
    else after the last token. ``(tokens taken, whether a call ended the run, its cuts, its view)``; a malformed
    command's token ends the request, and the run, unread."""
    llm = type("View", (), {"tokens": []})()
    seq = type("Seq", (), dict(response=[], run_start=0, run_bytes=0, run_text_end=0, pending_cut=0, run_cuts=[],
                               run_fed=0, run_fed_bytes=0, run_safe=0, scan_state=TEXT, llm=llm))()
    table = dict(zip(ids, chunks))
    n, called = 0, False
    for token, chunk in zip(ids, chunks):
        move = token_transition(seq.scan_state, chunk)
        if move.event == EVENT_MALFORMED:
            break
        n = min(move.a * n + move.b, N_CLAMP)
        seq.response.append(token)
        seq.scan_state = move.next_state
        note_slm_token(seq, chunk, move.event, move.start_offset, move.event_end)
        if move.event == EVENT_CALL and n > 0:
            end_run_at_call(seq, chunk)
            called = True
            break
        n = 0 if move.event == EVENT_CALL else n
        if seq.run_safe > seq.run_fed:
            feed_llm_view(seq, seq.run_safe, table, encode)
    feed_llm_view(seq, len(seq.response), table, encode)
    return len(seq.response), called, seq.run_cuts, seq.llm.tokens


def _check_the_engine_against_the_specification(ids: list, chunks: list[bytes], encode) -> None:
    taken, called, cuts, view = _run_as_the_engine_reads_it(ids, chunks, encode)
    ids, chunks = ids[:taken], chunks[:taken]
    run = b"".join(chunks)
    commands = [(c.start, c.end) for c in find_commands(run).commands]
    # A run that no call ended goes on: whitespace after its last command is not its end.
    expected_cuts = view_cuts(run if called else run + b".", commands)
    assert cuts == expected_cuts
    assert view == strip_commands(ids, chunks, expected_cuts, encode)


@settings(max_examples=1000, **FAST)
@given(text=TEXTS)
def test_the_engine_cuts_and_reads_ahead_as_the_specification_strips(tokenizer, vocab_bytes, text):
    """Token by token, with the view read up to each safe point as it comes: the same cuts and view as stripping
    the whole run at once."""
    ids = encode_bytes(tokenizer, text)
    _check_the_engine_against_the_specification(ids, [vocab_bytes[i] for i in ids],
                                                lambda data: encode_bytes(tokenizer, data))


@settings(max_examples=2000, **FAST)
@given(texts_and_cuts(max_chunk=6))
def test_the_engine_cuts_the_same_over_any_tokenization(case):
    """Chunks of up to 6 bytes as tokens (a lone space before ``<``, empty tokens, ...); ids are the chunks'
    indices and re-encoded bytes stand for themselves."""
    _, chunks = case
    _check_the_engine_against_the_specification(list(range(len(chunks))), chunks, lambda data: [data])
