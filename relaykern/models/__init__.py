"""Model definitions: one decoder file (qwen3.py) covers Qwen3, Qwen2 and Llama through ``ModelConfig`` switches."""
from torch import nn

from relaykern.models.config import ModelConfig
from relaykern.models.qwen3 import Qwen3ForCausalLM


def build_model(config: ModelConfig) -> nn.Module:
    """An unloaded model (``torch.empty`` parameters) in the current default device and dtype."""
    return Qwen3ForCausalLM(config)


__all__ = ["ModelConfig", "Qwen3ForCausalLM", "build_model"]
