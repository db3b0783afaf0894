"""Qwen3 decoder over packed rows and a paged KV cache; Qwen2 and Llama are the same network with other switches.

- qwen3: RMSNorm on each q and k head before RoPE (``qk_norm``), no biases.
- qwen2: biases on q/k/v (``qkv_bias``), no q/k norm.
- llama: neither; optionally llama3 RoPE scaling.

Parameter names follow Hugging Face's, except the fused ``qkv_proj`` (q, k, v stacked) and ``gate_up_proj``
(gate, up stacked); ``packed_modules_mapping`` tells the loader which checkpoint tensor fills which shard.
"""
from __future__ import annotations

import torch
from torch import nn

from relaykern.kernels.rope import NewKV
from relaykern.models.attention import Attention, AttentionContext
from relaykern.models.config import ModelConfig
from relaykern.models.layers import (Embedding, Linear, MergedLinear, RMSNorm, RotaryEmbedding, norm_linear,
                                     silu_linear)


class Qwen3Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.qkv_proj = MergedLinear(config.hidden_size, [self.q_size, self.kv_size, self.kv_size], config.qkv_bias)
        self.o_proj = Linear(self.q_size, config.hidden_size)
        if config.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)

    def forward(self, rope: RotaryEmbedding, positions: torch.Tensor, qkv: torch.Tensor, ctx: AttentionContext
                ) -> torch.Tensor:
        """``qkv``: this layer's ``qkv_proj`` output (computed with the norm before it, see the decoder layer)."""
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        norms = (self.q_norm.weight, self.k_norm.weight, self.q_norm.eps) if self.qk_norm else ()
        o = self.attn(q, NewKV(k, v, positions, rope.cos_sin_cache, ctx.slot_mapping, *norms), ctx)
        return self.o_proj(o.flatten(1), ctx)


class Qwen3MLP(nn.Module):
    """The MLP's weights; the decoder layer computes ``down(silu(gate) * up)`` (``norm_linear``, ``silu_linear``)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.gate_up_proj = MergedLinear(config.hidden_size, [config.intermediate_size] * 2)
        self.down_proj = Linear(config.intermediate_size, config.hidden_size)


class Qwen3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self_attn = Qwen3Attention(config)
        self.mlp = Qwen3MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, rope: RotaryEmbedding, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None,
        ctx: AttentionContext,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``residual`` is the stream before this layer's input norm (None at layer 0, where ``x`` is the stream).
        Each norm is computed with the projection after it, so that a one-row step can fuse the two."""
        qkv, residual = norm_linear(x, residual, self.input_layernorm, self.self_attn.qkv_proj, ctx)
        x = self.self_attn(rope, positions, qkv, ctx)
        gate_up, residual = norm_linear(x, residual, self.post_attention_layernorm, self.mlp.gate_up_proj, ctx)
        return silu_linear(gate_up, self.mlp.down_proj, ctx), residual


class Qwen3Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.embed_tokens = Embedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.max_position_embeddings, config.rope_theta,
                                          config.rope_scaling)
        self.layers = nn.ModuleList([Qwen3DecoderLayer(config) for _ in range(config.num_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        x, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            x, residual = layer(self.rotary_emb, positions, x, residual, ctx)
        x, _ = self.norm(x, ctx.ops, residual)
        return x


class Qwen3ForCausalLM(nn.Module):
    """``forward`` → final hidden states of every row; ``compute_logits`` on the rows the runner samples from."""

    packed_modules_mapping = {
        "q_proj": ("qkv_proj", 0),
        "k_proj": ("qkv_proj", 1),
        "v_proj": ("qkv_proj", 2),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.model = Qwen3Model(config)
        # Tied: the logits reuse the embedding matrix, so there is no lm_head parameter at all.
        self.lm_head = None if config.tie_word_embeddings else Linear(config.hidden_size, config.vocab_size)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        """``input_ids``, ``positions`` ``[T]`` → hidden ``[T, hidden_size]``; writes the rows' K/V to the cache."""
        return self.model(input_ids, positions, ctx)

    def compute_logits(self, hidden: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``[N, hidden_size]`` → fp32 ``[N, vocab_size]`` (the product runs in the model dtype, as in HF), written
        to ``out`` if given."""
        weight = self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        logits = torch.nn.functional.linear(hidden, weight)
        return logits.float() if out is None else out.copy_(logits)

    def bind_kv_cache(self, pool: torch.Tensor) -> None:
        """Gives layer ``l`` the view ``pool[l]`` of ``pool[num_layers, 2, num_blocks, block_size, Hkv, head_dim]``."""
        c = self.config
        expected = (c.num_layers, 2, c.num_kv_heads, c.head_dim)
        got = (pool.shape[0], pool.shape[1], pool.shape[4], pool.shape[5]) if pool.dim() == 6 else None
        if got != expected:
            raise ValueError(f"KV pool shape {tuple(pool.shape)} does not fit the model: expected "
                             f"[{c.num_layers}, 2, num_blocks, block_size, {c.num_kv_heads}, {c.head_dim}]")
        for layer, cache in zip(self.model.layers, pool):
            layer.self_attn.attn.kv_cache = cache
