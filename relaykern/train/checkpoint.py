"""Checkpoints that a run killed at any moment (even ``kill -9``) resumes from exactly.

Layout: ``<root>/step_<N>/`` holds the HF model (``model.save_pretrained``: safetensors + config, loadable by
transformers and by relaykern's loader), the tokenizer, ``trainer_state.pt`` (step, data position, optimizer,
scheduler, config) and ``rng_rank<r>.pt`` (python/numpy/torch RNG states of each rank). A checkpoint is written
under a temporary name and renamed when complete, and ``<root>/latest`` names the newest complete one (written
the same way), so a kill mid-save leaves the previous checkpoint in charge.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from relaykern.train.runtime import Runtime

LATEST = "latest"
STATE_FILE = "trainer_state.pt"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_checkpoint(root: str | Path, step: int, model: torch.nn.Module, tokenizer: Any, state: dict[str, Any],
                    runtime: Runtime, keep_last: int = 2) -> Path:
    """Writes checkpoint ``step`` (collective: every rank must call it) and returns its directory.

    ``model`` is the unwrapped HF module; ``state`` holds what the trainer needs besides weights (optimizer and
    scheduler state dicts, data position, config); rank 0 writes it, every rank writes its RNG state.
    """
    root = Path(root)
    final = root / f"step_{step:08d}"
    tmp = root / f".tmp-step_{step:08d}"
    if runtime.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        torch.save({"step": step, **state}, tmp / STATE_FILE)
    runtime.barrier()
    torch.save(rng_state(), tmp / f"rng_rank{runtime.rank}.pt")
    runtime.barrier()
    if runtime.is_main:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _write_atomic(root / LATEST, final.name)
        for old in sorted(root.glob("step_*"))[:-keep_last] if keep_last > 0 else []:
            shutil.rmtree(old, ignore_errors=True)
    runtime.barrier()
    return final


def latest_checkpoint(root: str | Path) -> Path | None:
    """The newest complete checkpoint under ``root``, or None."""
    pointer = Path(root) / LATEST
    if not pointer.is_file():
        return None
    path = Path(root) / pointer.read_text().strip()
    if not (path / STATE_FILE).is_file():
        raise ValueError(f"{pointer} names {path}, which has no {STATE_FILE}; delete {pointer} to start afresh")
    return path


def load_trainer_state(path: Path, runtime: Runtime) -> dict[str, Any]:
    """The trainer state of checkpoint ``path``; restores this rank's RNG state as a side effect."""
    state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=False)
    rng_file = path / f"rng_rank{runtime.rank}.pt"
    if not rng_file.is_file():
        raise ValueError(f"{path} has no {rng_file.name}: it was saved with fewer ranks than this run's "
                         f"{runtime.world_size}; resume with the same number of processes")
    set_rng_state(torch.load(rng_file, map_location="cpu", weights_only=False))
    return state
