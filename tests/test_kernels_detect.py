"""Fused command detection: table construction, kernel == reference, and the token stream == protocol.find_commands.

The stream tests feed Qwen3-tokenized responses token by token (many responses as the rows of one batch) and
rebuild the commands from the events as the engine does (see kernels/detect.py's docstring).
"""
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relaykern.kernels.detect import (
    _build_detection_table, build_detection_table, column_key, detect_commands, detect_commands_reference,
    token_column,
)
from relaykern.protocol import (
    EVENT_CALL, EVENT_MALFORMED, N_CLAMP, NUM_STATES, OPEN, TEXT, Command, ParsedResponse, find_commands,
)
from relaykern.tokenizer import load_qwen3_tokenizer, token_bytes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
QWEN3_VOCAB_SIZE = 151936  # embedding rows; ids past the tokenizer's are padding (b"")


@pytest.fixture(scope="module")
def tokenizer():
    return load_qwen3_tokenizer()


@pytest.fixture(scope="module")
def vocab(tokenizer) -> list[bytes]:
    data = token_bytes(tokenizer)
    return data + [b""] * (QWEN3_VOCAB_SIZE - len(data))


@pytest.fixture(scope="module")
def table(vocab):
    return build_detection_table(vocab, DEVICE)


def test_full_vocabulary_build_is_fast_small_and_memoised(vocab):
    _build_detection_table.cache_clear()
    began = time.perf_counter()
    table = build_detection_table(vocab, DEVICE)
    seconds = time.perf_counter() - began
    print(f"\nQwen3 detection table: {table.num_columns} columns, {table.nbytes} bytes "
          f"({table.records.numel() * 8} in records), built in {seconds:.2f} s")
    assert seconds < 10
    assert table.column_of_token.shape == (QWEN3_VOCAB_SIZE,) and table.num_columns < 500
    assert table.records.shape[0] == NUM_STATES
    assert build_detection_table(list(vocab), DEVICE) is table
    # No Qwen3 token holds a whole b"<call>", so a malformed command always began in an earlier token.
    assert not any(OPEN in token for token in vocab)


GRAMMAR_BYTES = st.sampled_from([b"<", b"c", b"a", b"l", b">", b"/", b" ", b"\t", b"\n", b"0", b"7", b"9", b"x",
                                 b"\xe4", b"L", b"C"])


@settings(max_examples=600, deadline=None, database=None)
@given(st.lists(GRAMMAR_BYTES, max_size=14).map(b"".join))
def test_column_key_preserves_every_transition(token):
    """column_key's equivalence argument, checked: same transitions from every state, or both unrepresentable."""
    try:
        expected = token_column(token)
    except ValueError:
        with pytest.raises(ValueError):
            token_column(column_key(token))
        return
    assert token_column(column_key(token)) == expected


def table_column(table, token_id: int) -> tuple:
    column = int(table.column_of_token[token_id])
    return tuple(tuple(record[:6]) for record in table.records[:, column].tolist())


def test_table_matches_naive_construction(vocab, table):
    generator = torch.Generator().manual_seed(0)
    interesting = [i for i, token in enumerate(vocab) if any(ch in token for ch in b"<>/")][:1500]
    sample = torch.randint(0, len(vocab), (1000,), generator=generator).tolist() + interesting
    for token_id in sample:
        assert table_column(table, token_id) == token_column(vocab[token_id]), (token_id, vocab[token_id])


def test_unrepresentable_tokens_raise():
    with pytest.raises(ValueError, match="token 1"):
        build_detection_table([b"a", b"<call>5</call>"], "cpu")
    with pytest.raises(ValueError, match="token 0"):
        build_detection_table([b"l><call>7"], "cpu")


def test_kernel_matches_reference_on_random_rows(table):
    generator = torch.Generator().manual_seed(1)
    common = torch.mode(table.column_of_token.cpu()).values
    special = torch.nonzero(table.column_of_token.cpu() != common).flatten()
    for batch in (1, 5, 128, 300):
        picks = special[torch.randint(0, special.numel(), (batch,), generator=generator)]
        tokens = torch.where(torch.rand(batch, generator=generator) < 0.3,
                             torch.randint(-1, QWEN3_VOCAB_SIZE, (batch,), generator=generator), picks)
        state = torch.randint(0, NUM_STATES, (batch,), generator=generator, dtype=torch.int32)
        n = torch.randint(0, 10**9, (batch,), generator=generator)
        n[torch.rand(batch, generator=generator) < 0.2] = N_CLAMP
        n[torch.rand(batch, generator=generator) < 0.2] = 0
        inputs = [t.to(DEVICE) for t in (tokens, state, n)]
        state_ref, n_ref = inputs[1].clone(), inputs[2].clone()
        got = detect_commands(*inputs, table)
        want = detect_commands_reference(inputs[0], state_ref, n_ref, table)
        for name in ("event", "n", "start_offset", "event_end"):
            assert getattr(got, name).dtype == getattr(want, name).dtype
            assert torch.equal(getattr(got, name), getattr(want, name)), name
        assert torch.equal(inputs[1], state_ref) and torch.equal(inputs[2], n_ref)
        inactive = inputs[0] < 0
        assert (got.event[inactive] == 0).all() and torch.equal(inputs[1][inactive], state.to(DEVICE)[inactive])


def test_bad_inputs_raise(table):
    tokens = torch.zeros(3, dtype=torch.int64, device=DEVICE)
    state = torch.zeros(3, dtype=torch.int32, device=DEVICE)
    with pytest.raises(ValueError, match="state"):
        detect_commands(tokens, state.long(), torch.zeros(3, dtype=torch.int64, device=DEVICE), table)
    with pytest.raises(ValueError, match="n must"):
        detect_commands(tokens, state, torch.zeros(2, dtype=torch.int64, device=DEVICE), table)


# --- Streams of real Qwen3 tokens against the specification --------------------------------------------------------

def run_stream(detect, table, rows: list[list[int]]):
    """Feeds each row's tokens step by step (rows as one batch). Returns per row: [(event, n, start, end)], state."""
    steps = max(map(len, rows), default=0)
    tokens = torch.full((steps, len(rows)), -1, dtype=torch.int64)
    for b, row in enumerate(rows):
        tokens[: len(row), b] = torch.tensor(row, dtype=torch.int64)
    tokens = tokens.to(DEVICE)
    state = torch.full((len(rows),), TEXT, dtype=torch.int32, device=DEVICE)
    n = torch.zeros(len(rows), dtype=torch.int64, device=DEVICE)
    outputs = []
    for step in range(steps):
        result = detect(tokens[step], state, n, table)
        outputs.append(torch.stack([result.event.long(), result.n, result.start_offset.long(),
                                    result.event_end.long()], dim=1))
    per_row = torch.stack(outputs, dim=1).tolist() if outputs else [[] for _ in rows]
    return per_row, state.tolist()


def parse_stream(row: list[int], events: list, final_state: int, vocab: list[bytes]) -> ParsedResponse:
    """What the engine rebuilds from the events: commands (start = token offset + start_offset), malformed."""
    commands, pending, offset = [], None, 0
    for token_id, (event, n, start_offset, event_end) in zip(row, events):
        if event == EVENT_CALL:
            commands.append(Command(pending, offset + event_end, n))
        if event == EVENT_MALFORMED:
            return ParsedResponse(tuple(commands), pending, None)
        if start_offset >= 0:
            pending = offset + start_offset
        offset += len(vocab[token_id])
    return ParsedResponse(tuple(commands), None, pending if final_state != TEXT else None)


def check_rows(detect, table, vocab, rows: list[list[int]]) -> None:
    per_row, final_states = run_stream(detect, table, rows)
    for row, events, final_state in zip(rows, per_row, final_states):
        text = b"".join(vocab[t] for t in row)
        assert parse_stream(row, events, final_state, vocab) == find_commands(text), (text, row)


def encode_cases(tokenizer, cases: list[tuple[str, list[int]]]) -> list[list[int]]:
    """Each response cut at the given character positions, each piece encoded alone: commands split every way."""
    pieces, owners = [], []
    for index, (text, cuts) in enumerate(cases):
        bounds = sorted({0, len(text), *(cut % (len(text) + 1) for cut in cuts)})
        for lo, hi in zip(bounds, bounds[1:]):
            pieces.append(text[lo:hi])
            owners.append(index)
    rows: list[list[int]] = [[] for _ in cases]
    for owner, encoding in zip(owners, tokenizer.backend_tokenizer.encode_batch(pieces, add_special_tokens=False)):
        rows[owner] += encoding.ids
    return rows


# A response is decoded from a few Hypothesis-drawn bytes (drawing text piece by piece would dominate the test's
# time): a byte < 80 appends a text fragment, 80..159 a well-formed command (the next byte picks its number),
# >= 160 cuts the tokenization at the current position.
FRAGMENTS = ["a", "b c", ".", ",", "x.", "\n", " ", "\t", "é", "你好", "l", "9", "42", "0.5", " <", "<", "<c",
             "<cal", "<call", "<call>", "<call> ", "</", "</cal", "</call", "</call>", "call>", ">", "/", ">,",
             "<tool_call>", "<<", "abc", "5</x", " x ", "ll>", "c"]
NUMBERS = ["0", "00", "1", "7", "12", "007", "4096", "2147483647", "2147483648", "99999999999999999999999", "5",
           "123456789012"]
WHITESPACE = ["", " ", "\n", " \t"]


def decode_case(data: bytes) -> tuple[str, list[int]]:
    text, cuts, stream = "", [], iter(data)
    for byte in stream:
        if byte >= 160:
            cuts.append(len(text))
        elif byte >= 80:
            number = NUMBERS[next(stream, 0) % len(NUMBERS)]
            text += f"<call>{WHITESPACE[byte % 4]}{number}{WHITESPACE[byte // 4 % 4]}</call>"
        else:
            text += FRAGMENTS[byte % len(FRAGMENTS)]
    return text, cuts


BATCH = st.lists(st.binary(max_size=24).map(decode_case), min_size=95, max_size=105)


def test_reference_stream_matches_find_commands(tokenizer, vocab, table):
    """The bulk: >= 10,000 Hypothesis responses, each batch of ~100 run as the rows of one reference stream."""
    cases_seen = []

    @settings(max_examples=110, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(BATCH)
    def check(batch):
        cases_seen.append(len(batch))
        check_rows(detect_commands_reference, table, vocab, encode_cases(tokenizer, batch))

    check()
    assert sum(cases_seen) >= 10_000


def test_kernel_stream_matches_find_commands(tokenizer, vocab, table):
    """The Triton kernel on a few hundred Hypothesis responses (the interpreter is slow on CPU)."""

    @settings(max_examples=3, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(BATCH)
    def check(batch):
        check_rows(detect_commands, table, vocab, encode_cases(tokenizer, batch))

    check()


@pytest.mark.parametrize("text", ["x.<call>3</call>,", "a<call> 12 \n</call>b<cal<call>0</call>", "<call>5</x",
                                  "<<call>99999999999999999999</call><call>\t7", "q<call></call>"])
def test_every_two_cut_split(tokenizer, vocab, table, text):
    """Every way of cutting the text at two character positions (each piece encoded alone)."""
    cases = [(text, [i, j]) for i in range(len(text) + 1) for j in range(i, len(text) + 1)]
    check_rows(detect_commands_reference, table, vocab, encode_cases(tokenizer, cases))
