"""The relay command grammar: the one definition the engine, the reference relay, the kernels and the trainer share.

The SLM asks the LLM for N tokens by writing the plain text ``<call>N</call>``: the bytes ``<call>``, optional ASCII
whitespace, one or more ASCII digits, optional ASCII whitespace, ``</call>``. With the Qwen3 tokenizer this is
several ordinary tokens, and its first and last bytes may share a token with neighbouring text (``.<``, ``>,``).

Everything here works on **bytes** (a byte-level BPE token is a byte string, possibly a partial UTF-8 character;
all grammar characters are ASCII), so offsets are byte offsets in the response.

Rules (``RelayConfig`` holds the knobs):

- ``N = 0`` is no call: the command stays in the text and the SLM goes on.
- N is served as ``min(N, max_call_tokens, tokens left of max_tokens)``; huge N is clamped to ``N_CLAMP`` first.
- After ``max_calls`` served calls, later commands are left as text (``after_max_calls="continue"``) or end the
  request with ``finish_reason="max_calls"`` (``"finish"``).
- Text after a complete ``<call>`` that cannot become a command (``<call>abc``, ``<call></call>``, ``<call>5</x``)
  is malformed: the request ends with ``finish_reason="malformed_call"``, keeping its text. A partial ``<cal``
  followed by other text is just text.
- An unterminated command when ``max_tokens`` runs out is left as text (``finish_reason="length"``).
- The LLM sees the prompt plus the response with **every** command's bytes removed (served or not), each with the
  ASCII whitespace the SLM wrote right before it, and the whitespace after a run's last command when nothing else
  follows it (``view_cuts``), so that a call's context ends ``x =``, not ``x = `` (a lone space token, a state
  Qwen3's BPE rarely writes) or ``x =\n\n`` (from a token ``>\n\n``). This approximates the official code, which
  cuts the SLM's text at ``</call>`` and strips what it hands the LLM at its ends only (an earlier command leaves a
  space there, and ``str.strip`` takes non-ASCII whitespace too). A token that straddles a cut's boundary keeps
  only its outside bytes, re-encoded (see ``strip_commands``). The SLM sees everything: its own command followed by
  the LLM's tokens.
- The LLM's EOS ends the request (``finish_reason="stop"``).
- Call ratio = LLM-generated tokens / all response tokens.

Two implementations of the grammar live here and are tested against each other: ``find_commands`` (regexes over
the whole text: the specification) and ``scan`` (a byte automaton, incremental per token: what the engine and the
fused detection kernel run, the latter through the per-token transition table built from ``scan``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

OPEN = b"<call>"
CLOSE = b"</call>"
WHITESPACE = b" \t\n\r\f\v"
DIGITS = b"0123456789"
N_CLAMP = 2**31 - 1
"""N larger than this is reported as N_CLAMP (it is capped far lower anyway)."""

COMMAND_RE = re.compile(rb"<call>\s*(\d+)\s*</call>")
"""The official RL parser's pattern; on bytes, ``\\s`` and ``\\d`` are ASCII only."""
_UNTERMINATED_RE = re.compile(rb"<call>\s*(?:\d+\s*(?:<(?:/(?:c(?:a(?:l(?:l)?)?)?)?)?)?)?\Z")

# Automaton states. 0: plain text. 1..5: matched that many bytes of b"<call". 6: after "<call>".
# 7: in the digits. 8: whitespace after the digits. 9..14: matched that many-8 bytes of b"</call".
TEXT, OPENED, DIGITS_STATE, AFTER_DIGITS = 0, 6, 7, 8
OPENING = OPENED - 1
"""``<call`` matched: from here on a command is most likely being written."""
CLOSE_FIRST = 9
NUM_STATES = 15

EVENT_NONE, EVENT_CALL, EVENT_MALFORMED = 0, 1, 2


@dataclass(frozen=True)
class Command:
    """A complete command at byte offsets [start, end) of the response."""

    start: int
    end: int
    n: int


@dataclass(frozen=True)
class ParsedResponse:
    commands: tuple[Command, ...]
    malformed_at: int | None
    """Byte offset where the first malformed command's ``<call>`` begins; nothing after it counts."""
    pending_at: int | None
    """Byte offset of an unterminated command prefix at the end of the text (``<call>1`` or just ``<ca``)."""


def find_commands(text: bytes) -> ParsedResponse:
    """The specification, by regex over the whole response. Commands do not overlap; scanning resumes after each."""
    commands: list[Command] = []
    pos = 0
    while True:
        start = text.find(OPEN, pos)
        if start < 0:
            return ParsedResponse(tuple(commands), None, _open_prefix_at_end(text, pos))
        match = COMMAND_RE.match(text, start)
        if match is not None:
            commands.append(Command(start, match.end(), _clamped_int(match.group(1))))
            pos = match.end()
        elif _UNTERMINATED_RE.match(text, start):
            return ParsedResponse(tuple(commands), None, start)
        else:
            return ParsedResponse(tuple(commands), start, None)


def _clamped_int(digits: bytes) -> int:
    """min(int(digits), N_CLAMP) without converting thousands of digits (Python refuses past 4,300)."""
    digits = digits.lstrip(b"0")
    return N_CLAMP if len(digits) > len(str(N_CLAMP)) else min(int(digits or b"0"), N_CLAMP)


def _open_prefix_at_end(text: bytes, pos: int) -> int | None:
    """Start of a proper prefix of ``<call`` that ends the text (a command that may still come), if any."""
    for length in range(min(len(OPEN) - 1, len(text) - pos), 0, -1):
        if text.endswith(OPEN[:length]):
            return len(text) - length
    return None


@dataclass(frozen=True)
class Event:
    kind: int
    n: int
    start: int
    """Offset of the command's ``<`` (relative to the scanned stream, may be negative: it began earlier)."""
    end: int
    """For a call, the offset just after ``</call>``; for malformed, the offset of the offending byte."""


@dataclass
class ScanState:
    """Where the automaton stands: ``state``, the running N, and where the pending match began."""

    state: int = TEXT
    n: int = 0
    start: int = 0


def step(state: int, byte: int) -> int:
    """One byte of the automaton. Returns the next state; ``-1`` means malformed, ``NUM_STATES`` a complete call."""
    if state < OPENED:  # inside "<call": a mismatch is plain text, but '<' may begin a new match
        if byte == OPEN[state]:
            return state + 1
        return 1 if byte == OPEN[0] else TEXT
    if state == OPENED:
        return OPENED if byte in WHITESPACE else DIGITS_STATE if byte in DIGITS else -1
    if state == DIGITS_STATE:
        if byte in DIGITS:
            return DIGITS_STATE
        return AFTER_DIGITS if byte in WHITESPACE else CLOSE_FIRST if byte == CLOSE[0] else -1
    if state == AFTER_DIGITS:
        return AFTER_DIGITS if byte in WHITESPACE else CLOSE_FIRST if byte == CLOSE[0] else -1
    matched = state - CLOSE_FIRST + 1
    if byte != CLOSE[matched]:
        return -1
    return NUM_STATES if matched == len(CLOSE) - 1 else state + 1


def scan(scan_state: ScanState, data: bytes) -> list[Event]:
    """Advances ``scan_state`` over ``data`` in place; returns the events, in order (after a malformed, none).

    Offsets are relative to the start of ``data``; ``scan_state.start`` is kept relative to the next chunk, so the
    caller can feed a response token by token.
    """
    events: list[Event] = []
    state, n, start = scan_state.state, scan_state.n, scan_state.start
    i = 0
    while i < len(data):
        if state == TEXT:  # fast path: only '<' can leave plain text
            i = data.find(OPEN[:1], i)
            if i < 0:
                break
        byte = data[i]
        nxt = step(state, byte)
        if nxt == 1:
            start = i
        if nxt == DIGITS_STATE:
            n = min(n * 10 + byte - DIGITS[0], N_CLAMP)
        if nxt < 0:
            events.append(Event(EVENT_MALFORMED, n, start, i))
            scan_state.state, scan_state.n, scan_state.start = TEXT, 0, 0
            return events
        if nxt == NUM_STATES:
            events.append(Event(EVENT_CALL, n, start, i + 1))
            nxt, n = TEXT, 0
        state = nxt
        i += 1
    scan_state.state, scan_state.n, scan_state.start = state, n, start - len(data)
    return events


@dataclass(frozen=True)
class TokenTransition:
    """The effect of one token from one state, for the fused detection table.

    ``N ← min(a·N + b, N_CLAMP)`` over the token's digits (applied before the event); after a call N restarts at 0.
    ``start_offset``: where, in this token, the match still pending after it began (-1: before this token, or
    nothing pending). ``event_end``: for a call, the byte offset just after ``</call>`` in this token.
    """

    next_state: int
    event: int
    a: int
    b: int
    start_offset: int
    event_end: int


def token_transition(state: int, token: bytes) -> TokenTransition:
    """Lifts the byte automaton to one token. Raises if the token would raise two events (no real vocabulary does)."""

    def run(n_in: int) -> tuple[ScanState, Event | None]:
        probe = ScanState(state, n_in, -len(token) - 1)  # a start before this token
        events = scan(probe, token)
        if len(events) > 1:
            raise ValueError(f"token {token!r} raises more than one command event from state {state}")
        return probe, events[0] if events else None

    after, event = run(0)
    after_one, event_one = run(1)
    if event is not None and event.kind == EVENT_CALL and event.start >= 0:
        raise ValueError(f"token {token!r} holds a whole command; the table cannot represent it")
    # N is affine in the incoming N over the token's digits: b from N=0, a from N=1 (clamped, monotone).
    b = event.n if event is not None else after.n
    a = (event_one.n if event_one is not None else after_one.n) - b
    pending_start = after.start + len(token)
    return TokenTransition(
        next_state=after.state,
        event=event.kind if event is not None else EVENT_NONE,
        a=a,
        b=b,
        start_offset=pending_start if after.state != TEXT and pending_start >= 0 else -1,
        event_end=event.end if event is not None else -1,
    )


def serve_length(n: int, max_call_tokens: int, tokens_left: int) -> int:
    """How many tokens the LLM writes for a command asking for ``n``."""
    return max(0, min(n, max_call_tokens, tokens_left))


def view_cuts(data: bytes, commands: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """The byte ranges of an SLM run ``data`` that the LLM's view leaves out: each command ``(start, end)`` (in
    order) widened back over the ASCII whitespace before it, down to the run's start or the previous command's end;
    the last also forward to the run's end when only whitespace follows it (a run the LLM reads whole ends at the
    call its last command makes, so that whitespace is part of the command's last token)."""
    cuts = []
    floor = 0
    for start, end in commands:
        cut = start
        while cut > floor and data[cut - 1] in WHITESPACE:
            cut -= 1
        cuts.append((cut, end))
        floor = end
    if cuts and not data[floor:].strip(WHITESPACE):
        cuts[-1] = (cuts[-1][0], len(data))
    return cuts


def strip_commands(
    token_ids: Sequence[int],
    token_bytes: Sequence[bytes],
    command_ranges: Sequence[tuple[int, int]],
    encode: Callable[[bytes], list[int]],
) -> list[int]:
    """The LLM's view of a run of SLM tokens: their bytes minus the byte ranges ``command_ranges`` (the commands'
    ``view_cuts``), offsets into the concatenation of ``token_bytes``.

    Tokens that touch no range are kept as they are. Each maximal run of consecutive tokens that touch a range is
    replaced by the encoding of the bytes it keeps outside the ranges (often nothing; ``.<`` → ``.``).
    """
    out: list[int] = []
    kept_outside = bytearray()
    touching_run = False
    offset = 0
    for token_id, data in zip(token_ids, token_bytes):
        lo, hi = offset, offset + len(data)
        offset = hi
        inside = [(max(lo, s), min(hi, e)) for s, e in command_ranges if s < hi and e > lo]
        if not inside:
            if touching_run:
                out += encode(bytes(kept_outside)) if kept_outside else []
                kept_outside.clear()
                touching_run = False
            out.append(token_id)
            continue
        touching_run = True
        cursor = lo
        for s, e in sorted(inside):
            kept_outside += data[cursor - lo : s - lo]
            cursor = max(cursor, e)
        kept_outside += data[cursor - lo :]
    if kept_outside:
        out += encode(bytes(kept_outside))
    return out


def llm_view(
    response: Sequence[int],
    spans: Sequence[tuple[str, int, int]],
    token_bytes: Sequence[bytes],
    encode: Callable[[bytes], list[int]],
) -> list[int]:
    """The LLM's view of a whole response, rebuilt from scratch: LLM tokens as they are, each SLM run (``spans``:
    ``(source, start, end)``) minus every command found in it and the whitespace around it (``view_cuts``).
    Commands never span an LLM turn, so per-run stripping is exact."""
    view: list[int] = []
    for source, start, end in spans:
        ids = response[start:end]
        if source == "llm":
            view += ids
            continue
        data = [token_bytes[t] if t < len(token_bytes) else b"" for t in ids]
        run = b"".join(data)
        cuts = view_cuts(run, [(c.start, c.end) for c in find_commands(run).commands])
        view += strip_commands(ids, data, cuts, encode)
    return view
