"""Fused command detection: every row's grammar automaton advances by its sampled token in one launch.

The byte automaton of ``relaykern.protocol`` (``scan``) is lifted to whole tokens by ``token_transition``: from
state s, token t moves to ``next_state``, may raise one ``event`` (call / malformed), maps the running N to
``min(a·N + b, N_CLAMP)`` (the value at the event, if any), and reports ``start_offset`` (where in t the match still
pending after it began, -1 if earlier or none) and ``event_end`` (byte offset in t just after ``</call>``; for a
malformed event, of the offending byte). Tokens with the same transitions from every state share a table column;
nearly all tokens share one "plain text" column, so the table is small ([NUM_STATES, 75] for Qwen3).

How the engine reads the result of step t (token t of a row, ``offset`` = bytes of the response before it):
a call spans [pending start, offset + event_end) where the pending start is the last ``offset' + start_offset``
seen before this token; then, if ``start_offset >= 0``, the pending start becomes ``offset + start_offset``.
A malformed command began at the pending start (no real vocabulary token holds a whole ``<call>``).
"""
from __future__ import annotations

import functools
from dataclasses import astuple, dataclass

import torch
import triton
import triton.language as tl

from relaykern.protocol import (
    CLOSE, DIGITS, DIGITS_STATE, EVENT_CALL, EVENT_NONE, N_CLAMP, NUM_STATES, OPEN, TEXT, WHITESPACE, token_transition,
)

NEXT_STATE, EVENT, A, B, START_OFFSET, EVENT_END = range(6)
"""Field order of a table record: that of ``TokenTransition``."""
RECORD = 8
"""int64 slots per record: the six fields plus two of padding, so a record is an aligned 64-byte half line."""


@dataclass(frozen=True)
class DetectionTable:
    """Device tables of the token-lifted automaton.

    ``column_of_token[t]`` is token t's column; ``records[s, c]`` is the transition of column c from state s, its
    fields at ``records[s, c, NEXT_STATE .. EVENT_END]`` (all int64). Packing the fields of one (state, column) into
    one 64-byte record, rather than six [NUM_STATES, num_columns] tensors, makes the per-row lookup one gather: a
    row reads ``column_of_token[token]`` and then one half cache line, instead of six scattered lines. The
    per-field properties are strided views of ``records`` (what the kernel is given).
    """

    column_of_token: torch.Tensor
    records: torch.Tensor

    @property
    def num_columns(self) -> int:
        return self.records.shape[1]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.column_of_token, self.records))

    @property
    def next_state(self) -> torch.Tensor:
        return self.records[..., NEXT_STATE]

    @property
    def event(self) -> torch.Tensor:
        return self.records[..., EVENT]

    @property
    def a(self) -> torch.Tensor:
        return self.records[..., A]

    @property
    def b(self) -> torch.Tensor:
        return self.records[..., B]

    @property
    def start_offset(self) -> torch.Tensor:
        return self.records[..., START_OFFSET]

    @property
    def event_end(self) -> torch.Tensor:
        return self.records[..., EVENT_END]


@dataclass
class DetectionResult:
    """Per row: ``event`` (EVENT_NONE/CALL/MALFORMED; NONE for inactive rows), ``n`` (N at the event, else the
    running N), ``start_offset`` and ``event_end`` (token byte offsets, -1 when none). int32 except ``n`` int64."""

    event: torch.Tensor
    n: torch.Tensor
    start_offset: torch.Tensor
    event_end: torch.Tensor


# Bytes the automaton tells apart: ``step`` only compares a byte with the characters of OPEN and CLOSE and tests
# membership in WHITESPACE and DIGITS, and ``scan`` skips plain text by searching for b"<". So every whitespace
# byte acts like b" ", and every byte outside OPEN + CLOSE + DIGITS + WHITESPACE acts like one placeholder.
_PLACEHOLDER = b"x"
_SKELETON = bytes(
    byte if byte in OPEN + CLOSE + DIGITS else b" "[0] if byte in WHITESPACE else _PLACEHOLDER[0] for byte in range(256)
)
assert _PLACEHOLDER[0] not in OPEN + CLOSE + DIGITS + WHITESPACE


def column_key(token: bytes) -> bytes:
    """A short byte string with the same ``token_transition`` from every state as ``token`` (same offsets too).

    The skeleton (bytes mapped as above) has the same length and transitions. Then the skeleton is cut just after
    the first placeholder that no b"<" follows: a placeholder sends every state to TEXT or raises malformed (which
    ends the scan), and from TEXT only b"<" leaves TEXT, so the bytes after it change nothing (no event, state TEXT,
    N unchanged, no pending start) and every offset before the cut is kept. Qwen3's 151k tokens give ~450 keys.
    """
    skeleton = token.translate(_SKELETON)
    cut = skeleton.find(_PLACEHOLDER, skeleton.rfind(b"<") + 1)
    return skeleton if cut < 0 else skeleton[: cut + 1]


def token_column(token: bytes) -> tuple:
    """The naive column: the token's ``TokenTransition`` from every state (what ``column_key`` must preserve)."""
    return tuple(astuple(token_transition(state, token)) for state in range(NUM_STATES))


def build_detection_table(token_bytes: list[bytes], device: torch.device | str) -> DetectionTable:
    """The table for a vocabulary (``token_bytes[i]``: token i's bytes; padding ids b""), memoised per vocabulary
    and device. Raises ValueError if a token cannot be represented (it would hold a whole command, or two events)."""
    return _build_detection_table(tuple(token_bytes), torch.device(device))


@functools.lru_cache(maxsize=4)
def _build_detection_table(token_bytes: tuple[bytes, ...], device: torch.device) -> DetectionTable:
    column_of_key: dict[bytes, int] = {}
    column_index: dict[tuple, int] = {}
    column_of_token = []
    for token_id, token in enumerate(token_bytes):
        key = column_key(token)
        if key not in column_of_key:
            try:
                column = token_column(key)
            except ValueError as error:
                raise ValueError(f"token {token_id} ({token!r}) cannot go in the detection table: {error}") from None
            _check_representable(token_id, token, column)
            column_of_key[key] = column_index.setdefault(column, len(column_index))
        column_of_token.append(column_of_key[key])
    columns = list(column_index)  # dicts keep insertion order: columns[i] has index i
    records = torch.zeros(NUM_STATES, len(columns), RECORD, dtype=torch.int64)
    records[..., :EVENT_END + 1] = torch.tensor(columns, dtype=torch.int64).transpose(0, 1)
    return DetectionTable(
        column_of_token=torch.tensor(column_of_token, dtype=torch.int32, device=device),
        records=records.to(device),
    )


def _check_representable(token_id: int, token: bytes, column: tuple) -> None:
    """After a call N restarts at 0, so a token must not go on into the digits of another command."""
    for state, (next_state, event, *_rest) in enumerate(column):
        if event == EVENT_CALL and next_state >= DIGITS_STATE:
            raise ValueError(f"token {token_id} ({token!r}) ends a command and begins the next one's number from "
                             f"state {state}; the detection table cannot represent it")


@triton.jit(do_not_specialize=["num_rows"])  # the batch changes every step
def _detect_kernel(
    tokens_ptr, state_ptr, n_ptr, column_of_token_ptr,
    next_state_ptr, event_ptr, a_ptr, b_ptr, start_offset_ptr, event_end_ptr, stride_state, stride_column,
    event_out_ptr, n_out_ptr, start_offset_out_ptr, event_end_out_ptr,
    num_rows, N_CLAMP: tl.constexpr, BLOCK: tl.constexpr,
):
    # One program per BLOCK rows. The six field pointers are views of one packed record per (state, column):
    # record(s, c) = s * stride_state + c * stride_column, so a row's six loads hit one 64-byte record.
    rows = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_batch = rows < num_rows
    token = tl.load(tokens_ptr + rows, mask=in_batch, other=-1)
    active = token >= 0
    running_n = tl.load(n_ptr + rows, mask=in_batch, other=0)
    state = tl.load(state_ptr + rows, mask=active, other=0).to(tl.int64)
    column = tl.load(column_of_token_ptr + token, mask=active, other=0).to(tl.int64)
    record = state * stride_state + column * stride_column
    next_state = tl.load(next_state_ptr + record, mask=active, other=0)
    event = tl.load(event_ptr + record, mask=active, other=0)
    a = tl.load(a_ptr + record, mask=active, other=1)
    b = tl.load(b_ptr + record, mask=active, other=0)
    start_offset = tl.load(start_offset_ptr + record, mask=active, other=-1)
    event_end = tl.load(event_end_ptr + record, mask=active, other=-1)
    # a, b and N are at most N_CLAMP < 2**31, so a * N + b cannot overflow int64.
    n = tl.minimum(a * running_n + b, N_CLAMP)
    tl.store(state_ptr + rows, next_state.to(tl.int32), mask=active)
    tl.store(n_ptr + rows, tl.where(event == 0, n, 0), mask=active)  # a call or malformed restarts N at 0
    tl.store(event_out_ptr + rows, event.to(tl.int32), mask=in_batch)
    tl.store(n_out_ptr + rows, n, mask=in_batch)
    tl.store(start_offset_out_ptr + rows, start_offset.to(tl.int32), mask=in_batch)
    tl.store(event_end_out_ptr + rows, event_end.to(tl.int32), mask=in_batch)


def _check_inputs(tokens: torch.Tensor, state: torch.Tensor, n: torch.Tensor, table: DetectionTable) -> None:
    batch = tokens.shape[0] if tokens.dim() == 1 else -1
    for name, tensor, dtype in (("tokens", tokens, torch.int64), ("state", state, torch.int32), ("n", n, torch.int64)):
        if tensor.shape != (batch,) or tensor.dtype != dtype or not tensor.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} vector of the batch size ({batch} rows, from "
                             f"tokens); got {tensor.dtype} {tuple(tensor.shape)}")
        if tensor.device != table.records.device:
            raise ValueError(f"{name} is on {tensor.device} but the detection table on {table.records.device}; "
                             "build the table for the engine's device")


def detect_commands(tokens: torch.Tensor, state: torch.Tensor, n: torch.Tensor, table: DetectionTable,
                    ) -> DetectionResult:
    """Advances each row's automaton (``state`` int32[B], running ``n`` int64[B], both updated in place) by its
    token (int64[B]; < 0 = inactive row, left untouched). Token ids must be < len(column_of_token) (unchecked: no
    device sync). One launch for the batch."""
    _check_inputs(tokens, state, n, table)
    batch = tokens.shape[0]
    result = DetectionResult(
        event=torch.empty(batch, dtype=torch.int32, device=tokens.device),
        n=torch.empty(batch, dtype=torch.int64, device=tokens.device),
        start_offset=torch.empty(batch, dtype=torch.int32, device=tokens.device),
        event_end=torch.empty(batch, dtype=torch.int32, device=tokens.device),
    )
    if batch == 0:
        return result
    block = 128
    _detect_kernel[(triton.cdiv(batch, block),)](
        tokens, state, n, table.column_of_token,
        table.next_state, table.event, table.a, table.b, table.start_offset, table.event_end,
        table.records.stride(0), table.records.stride(1),
        result.event, result.n, result.start_offset, result.event_end,
        batch, N_CLAMP=N_CLAMP, BLOCK=block,
    )
    return result


def detect_commands_reference(tokens: torch.Tensor, state: torch.Tensor, n: torch.Tensor, table: DetectionTable,
                              ) -> DetectionResult:
    """``detect_commands`` in plain torch: the same gathers, row by row semantics, in place updates."""
    _check_inputs(tokens, state, n, table)
    active = tokens >= 0
    column = table.column_of_token[tokens.clamp(min=0)].long()
    record = table.records[torch.where(active, state, TEXT).long(), column]  # [B, RECORD]: one gather per row
    event = torch.where(active, record[:, EVENT], EVENT_NONE)
    a = torch.where(active, record[:, A], 1)
    b = torch.where(active, record[:, B], 0)
    result_n = torch.clamp(a * n + b, max=N_CLAMP)
    no_offset = torch.full_like(tokens, -1)
    result = DetectionResult(
        event=event.int(),
        n=result_n,
        start_offset=torch.where(active, record[:, START_OFFSET], no_offset).int(),
        event_end=torch.where(active, record[:, EVENT_END], no_offset).int(),
    )
    state.copy_(torch.where(active, record[:, NEXT_STATE].int(), state))
    n.copy_(torch.where(event == EVENT_NONE, result_n, 0))
    return result
