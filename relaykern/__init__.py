"""relaykern: RelayLLM inference and training — a small model that calls a large one, paged KV for both."""
import torch  # noqa: F401  (loads libtorch before relaykern._C)

from relaykern.config import EngineConfig, RelayConfig, SamplingParams
from relaykern.outputs import CallRecord, RelayOutput, RelayStats


def __getattr__(name: str):
    # The engine pulls in models, kernels and Triton: load it on first use so `import relaykern` stays light.
    if name == "generate":
        from relaykern.api import generate

        return generate
    if name in ("RelayEngine", "Engine"):
        from relaykern.engine.relay import RelayEngine

        return RelayEngine
    if name == "BackgroundEngine":
        from relaykern.engine.background import BackgroundEngine

        return BackgroundEngine
    if name in ("load_qwen3_tokenizer", "TextStream"):
        from relaykern import tokenizer

        return getattr(tokenizer, name)
    raise AttributeError(f"module 'relaykern' has no attribute {name!r}")


__all__ = ["generate", "RelayEngine", "Engine", "BackgroundEngine", "SamplingParams", "RelayConfig", "EngineConfig",
           "RelayOutput", "RelayStats", "CallRecord", "load_qwen3_tokenizer", "TextStream"]
