"""Checks on checkpoint directories done before any work starts: paths, tokenizer, and SLM/LLM compatibility."""
from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer, PreTrainedTokenizerBase


def check_dir(path: str | Path, role: str) -> Path:
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{role} checkpoint directory not found: {path}")
    if not (path / "config.json").is_file():
        raise ValueError(f"{role} checkpoint {path} has no config.json")
    if not any(path.glob("*.safetensors")):
        raise ValueError(f"{role} checkpoint {path} has no *.safetensors weights (pickled .bin is not loaded)")
    return path


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = check_dir(path, "SLM")
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a tokenizer from {path}: {err}") from err


def validate_pair(slm: str | Path, llm: str | Path, slm_tokenizer: PreTrainedTokenizerBase) -> None:
    """The relay passes token ids between the models, so their vocabularies must be identical."""
    llm = check_dir(llm, "LLM")
    try:
        llm_tokenizer = AutoTokenizer.from_pretrained(llm, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(f"cannot load a tokenizer from {llm}: {err}") from err
    if llm_tokenizer.get_vocab() != slm_tokenizer.get_vocab():
        raise ValueError(f"SLM {slm} and LLM {llm} have different vocabularies: the relay needs one tokenizer")
