"""What the LLM reads of the SLM's text: each SLM run (its tokens since the LLM's last turn) minus the text of the
commands in it (``protocol.strip_commands``: untouched tokens kept by id, each group of consecutive tokens touching a
command re-encoded from the bytes it keeps outside the commands).

A run is appended to the LLM's view at the call that ends it, or, while the LLM reads ahead
(``RelayConfig.llm_prefetch_tokens``), up to a *safe point* first and the rest at the call. A safe point follows a
token that touches no command and leaves the detection automaton in plain text: no command found later can reach
back before it, and no group of touching tokens spans it, so the stripped prefix is already final and the whole
run's view is that prefix followed by the stripped rest.
"""
from __future__ import annotations

from typing import Callable

from relaykern.engine.sequence import Sequence
from relaykern.protocol import EVENT_CALL, TEXT, strip_commands


def note_safe_point(seq: Sequence, event: int) -> None:
    """After the SLM's token ``len(seq.response) - 1`` (its detection ``event``; ``seq.scan_state`` after it)."""
    if event != EVENT_CALL and seq.scan_state == TEXT:
        seq.run_safe = len(seq.response) - seq.run_start


def feed_llm_view(seq: Sequence, upto: int, token_bytes: list[bytes], encode: Callable[[bytes], list[int]]) -> None:
    """Appends the run's tokens ``[seq.run_fed, upto)`` (run-relative), stripped, to the LLM's view; ``upto`` is
    the run's end (at a call) or a safe point."""
    run = seq.response[seq.run_start + seq.run_fed:seq.run_start + upto]
    data = [token_bytes[token] for token in run]
    offset = seq.run_fed_bytes  # the commands' byte ranges count from the run's start
    ranges = [(start - offset, end - offset) for start, end in seq.run_commands if end > offset]
    seq.llm.tokens += strip_commands(run, data, ranges, encode)
    seq.run_fed, seq.run_fed_bytes = upto, offset + sum(len(piece) for piece in data)
