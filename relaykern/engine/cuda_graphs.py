"""CUDA graphs for decode steps (one new token per row), captured at start-up for batch sizes 1, 2, 4, 8, 16, 32,
… up to ``max_num_seqs``. At small batch a decode step is launch-bound: one replay replaces hundreds of launches.
A graph holds the whole step from its inputs to the logits (injection, KV slots and sequence lengths, the model,
the LM head), so the host's work per step is two copies (the rows' tokens and positions; their block tables) and
the replay; the sampler then runs on the graph's logits.

A batch of B rows replays the smallest captured size S >= B. Rows B..S are padding, marked by position -1: they
store no K/V (slot -1) and attend to nothing (sequence length 0). Each size has its own input buffers, so a replay
never sees rows left by another size. The block-table buffer is as wide as the longest sequence the model accepts
(the decode kernel's split count, chosen from that width, is fixed per graph); entries past a row's own blocks may
be stale but are never read, since a row reads only the blocks its sequence length covers.

``capture=False`` "replays" by running the same step eagerly on the same buffers: CPU tests check the buffer
handling with it, where CUDA graphs do not exist.
"""
from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch

from relaykern.kernels.inject import inject_tokens, inject_tokens_reference
from relaykern.models.attention import AttentionContext

if TYPE_CHECKING:
    from relaykern.engine.runner import ModelRunner

PADDING = -1
"""The position of a padding row."""


class DecodeGraphs:
    def __init__(self, runner: "ModelRunner", capture: bool = True) -> None:
        self.model = runner.model
        self.block_size = runner.block_size
        self.backend = runner.backend
        self.inject = inject_tokens if runner.backend == "triton" else inject_tokens_reference
        self.pin = runner.device.type == "cuda"
        max_bs = runner.config.max_num_seqs
        self.sizes = [bs for bs in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if bs <= max_bs]
        if self.sizes[-1] < max_bs:
            self.sizes.append(max_bs)
        device = runner.device
        self.cu_rows = torch.arange(self.sizes[-1] + 1, dtype=torch.int32, device=device)  # one row per token
        self.inputs: dict[int, torch.Tensor] = {}  # size -> int64 [2, size]: token ids, positions
        self.tables: dict[int, torch.Tensor] = {}  # size -> int32 [size, max_blocks_per_seq]
        self.logits: dict[int, torch.Tensor] = {}  # size -> fp32 [size, vocab], written by each replay
        self.replays = {}
        pool = None
        for size in reversed(self.sizes):  # the largest first: the smaller ones reuse its memory pool
            self.inputs[size] = torch.tensor([[0] * size, [PADDING] * size], dtype=torch.int64, device=device)
            self.tables[size] = torch.zeros(size, runner.max_blocks_per_seq, dtype=torch.int32, device=device)
            self.logits[size] = self._step(size)  # warm-up: compiles and autotunes outside the capture
            if capture:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool):
                    self.logits[size] = self._step(size)
                pool = graph.pool()
                self.replays[size] = graph.replay
            else:
                self.replays[size] = functools.partial(self._eager_replay, size)
        if capture:
            torch.cuda.synchronize(device)

    def _step(self, size: int) -> torch.Tensor:
        """The captured work: the size's input buffers → its logits."""
        token_ids, positions = self.inputs[size]
        real = positions != PADDING
        start = positions.clamp(min=0).to(torch.int32)
        injected = self.inject(token_ids, self.cu_rows[:size + 1], start, self.tables[size], self.block_size)
        ctx = AttentionContext(
            slot_mapping=torch.where(real, injected.slot_mapping, -1),
            block_tables=self.tables[size],
            seq_lens=torch.where(real, start + 1, 0).to(torch.int32),
            cu_seqlens_q=self.cu_rows[:size + 1],
            max_q_len=1,
            backend=self.backend,
        )
        return self.model.compute_logits(self.model(injected.input_ids, injected.positions, ctx))

    def _eager_replay(self, size: int) -> None:
        self.logits[size].copy_(self._step(size))

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.sizes[-1]

    def run(self, token_ids: list[int], positions: list[int], block_tables: torch.Tensor) -> torch.Tensor:
        """Logits [B, vocab] of B decode rows: each row's new token, its position, its block table (host int32
        [B, width], width <= max_blocks_per_seq). The result is a view of the graph's buffer, valid until the
        next replay of that size."""
        bs = len(token_ids)
        size = next(s for s in self.sizes if s >= bs)
        pad = size - bs
        host = torch.tensor([token_ids + [0] * pad, positions + [PADDING] * pad], dtype=torch.int64,
                            pin_memory=self.pin)
        self.inputs[size].copy_(host, non_blocking=True)
        tables = block_tables.pin_memory() if self.pin else block_tables
        self.tables[size][:bs, :tables.shape[1]].copy_(tables, non_blocking=True)
        self.replays[size]()
        return self.logits[size][:bs]
