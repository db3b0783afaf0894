"""Checks on checkpoint directories done before any work starts: paths, tokenizer, and SLM/LLM compatibility."""
from __future__ import annotations

import hashlib
from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from relaykern.loader import safetensors_files
from relaykern.models.config import ModelConfig


def check_dir(path: str | Path, role: str) -> Path:
    """The loader's own checks (config.json, safetensors shards), run before the tokenizer is parsed so a bad path
    fails first, with the model's role in the message."""
    path = Path(path)
    try:
        ModelConfig.from_dir(path)
        safetensors_files(path)
    except ValueError as err:
        raise ValueError(f"{role} checkpoint: {err}") from None
    return path


def load_tokenizer(path: str | Path, role: str = "SLM") -> PreTrainedTokenizerBase:
    """Parsing Qwen3's 11 MB tokenizer.json takes seconds: done once per distinct set of tokenizer files (keyed by
    their digest), so an SLM and LLM with one tokenizer, or engines built again, share one instance."""
    path = check_dir(path, role)
    digest = _tokenizer_digest(path)
    if digest not in _tokenizers:
        try:
            _tokenizers[digest] = AutoTokenizer.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise ValueError(f"cannot load a tokenizer from {path}: {err}") from err
    return _tokenizers[digest]


_tokenizers: dict[str, PreTrainedTokenizerBase] = {}


def _tokenizer_digest(path: Path) -> str:
    digest = hashlib.sha1()
    for file in sorted(path.glob("tokenizer*")) + sorted(path.glob("special_tokens_map.json")):
        digest.update(file.name.encode() + file.read_bytes())
    return digest.hexdigest()


def validate_pair(slm: str | Path, llm: str | Path, slm_tokenizer: PreTrainedTokenizerBase) -> None:
    """The relay passes token ids between the models, so their vocabularies must be identical."""
    llm_tokenizer = load_tokenizer(llm, "LLM")
    if llm_tokenizer is not slm_tokenizer and llm_tokenizer.get_vocab() != slm_tokenizer.get_vocab():
        raise ValueError(f"SLM {slm} and LLM {llm} have different vocabularies: the relay needs one tokenizer")
