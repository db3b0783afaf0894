"""``relaykern.generate``: the one-call API. Builds a RelayEngine, or reuses the last one for the same settings."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from relaykern.config import EngineConfig, RelayConfig, SamplingParams
from relaykern.engine.relay import RelayEngine
from relaykern.outputs import RelayOutput

_cached: tuple[tuple, RelayEngine] | None = None


def generate(prompts: Sequence[str] | Sequence[list[int]], *, slm: str | Path, llm: str | Path | None = None,
             sampling: SamplingParams | None = None, llm_sampling: SamplingParams | None = None,
             relay: RelayConfig | None = None, device: str | torch.device | None = None,
             llm_device: str | torch.device | None = None,
             dtype: torch.dtype | str | None = None) -> list[RelayOutput]:
    """Relays each prompt between the SLM at ``slm`` and the LLM at ``llm`` (HF-format directories).

    ``prompts`` are strings (encoded without special tokens: apply the chat template yourself) or token id lists.
    With ``llm=None`` the SLM runs alone. ``llm_device`` puts the LLM on another device (default: ``device``).
    The engine stays loaded for the next call with the same settings.
    """
    global _cached
    relay = relay or RelayConfig()
    key = (str(slm), str(llm), repr(relay), str(device), str(llm_device), str(dtype))
    if _cached is None or _cached[0] != key:
        _cached = None  # drop the old engine's memory before loading the new one
        engine = RelayEngine(slm, llm, relay=relay, slm_config=EngineConfig(device=device, dtype=dtype),
                             llm_config=EngineConfig(device=llm_device or device, dtype=dtype))
        _cached = (key, engine)
    return _cached[1].generate(prompts, sampling, llm_sampling)
