"""What the LLM reads of the SLM's text: each SLM run (its tokens since the LLM's last turn) minus the text of the
commands in it, the whitespace before each and, at the call that ends the run, after it (``protocol.view_cuts``,
found here token by token as the detection reports commands; ``protocol.strip_commands``: untouched tokens kept
by id, each group of consecutive tokens touching a cut re-encoded from the bytes it keeps outside the cuts).

A run is appended to the LLM's view at the call that ends it, or, while the LLM reads ahead
(``RelayConfig.llm_prefetch_tokens``, ``early_catchup_tokens``), up to a *safe point* first and the rest at the call.
A safe point follows a token that touches no cut, leaves the detection automaton in plain text and ends in a byte
other than whitespace: no cut found later can reach back before it, and no group of touching tokens spans it, so the
stripped prefix is already final and the whole run's view is that prefix followed by the stripped rest.
"""
from __future__ import annotations

from typing import Callable

from relaykern.engine.sequence import Sequence
from relaykern.protocol import EVENT_CALL, TEXT, WHITESPACE, strip_commands


def note_slm_token(seq: Sequence, data: bytes, event: int, start_offset: int, event_end: int) -> None:
    """Takes the SLM's token ``len(seq.response) - 1`` (bytes ``data``) into the run: the detection's ``event``,
    the offsets in ``data`` where a command may begin (``start_offset``, -1 if none) and where the completed one
    ends (``event_end``), and ``seq.scan_state`` after it."""
    token_start = seq.run_bytes
    seq.run_bytes += len(data)
    if event == EVENT_CALL:
        seq.run_cuts.append((seq.pending_cut, token_start + event_end))
    if start_offset >= 0:  # the command's cut reaches back over the whitespace before it (protocol.view_cuts)
        text = data[:start_offset].rstrip(WHITESPACE)
        seq.pending_cut = token_start + len(text) if text else seq.run_text_end
    text = data.rstrip(WHITESPACE)
    if text:
        seq.run_text_end = token_start + len(text)
    if event != EVENT_CALL and seq.scan_state == TEXT and seq.run_text_end == seq.run_bytes:
        seq.run_safe = len(seq.response) - seq.run_start


def end_run_at_call(seq: Sequence, data: bytes) -> None:
    """The run ends at the call its last command (ending in the token ``data``) makes: the cut of that command takes
    whitespace after it in the token too, so the run's view is ``protocol.view_cuts`` of the whole run."""
    start, end = seq.run_cuts[-1]
    if not data[len(data) - (seq.run_bytes - end):].strip(WHITESPACE):
        seq.run_cuts[-1] = (start, seq.run_bytes)


def feed_llm_view(seq: Sequence, upto: int, token_bytes: list[bytes], encode: Callable[[bytes], list[int]],
                  vocab_size: int | None = None) -> None:
    """Appends the run's tokens ``[seq.run_fed, upto)`` (run-relative), stripped, to the LLM's view; ``upto`` is
    the run's end (at a call) or a safe point. A re-encoded id the LLM has no embedding for (``vocab_size``, its
    rows: a checkpoint with fewer than its tokenizer has ids; None: unchecked) finishes the request with an error
    instead."""
    run = seq.response[seq.run_start + seq.run_fed:seq.run_start + upto]
    data = [token_bytes[token] for token in run]
    offset = seq.run_fed_bytes  # the commands' byte ranges count from the run's start
    ranges = [(start - offset, end - offset) for start, end in seq.run_cuts if end > offset]
    view = strip_commands(run, data, ranges, encode)
    if vocab_size is not None and max(view, default=0) >= vocab_size:
        return seq.finish("error", f"the LLM's view of the response holds token id {max(view)} (text around a command, "
                                   f"encoded again), past the LLM's {vocab_size} embedding rows: its checkpoint has "
                                   "fewer rows than its tokenizer has ids")
    seq.llm.tokens += view
    seq.run_fed, seq.run_fed_bytes = upto, offset + sum(len(piece) for piece in data)
