"""CUDA graphs for decode forwards (every row feeds one token), captured at start-up for batch sizes 1, 2, 4, 8,
16, 32, … up to ``max_num_seqs``. Small models are launch-bound at small batch: replaying one graph replaces
hundreds of kernel launches.

A batch of B rows replays the smallest captured size ≥ B; padded rows store nothing (slot -1) and their outputs are
ignored. The block-table buffer is as wide as the longest sequence the model accepts, so the decode kernel's split
count (chosen from the table width) is fixed per graph.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from relaykern.models.attention import AttentionContext

if TYPE_CHECKING:
    from relaykern.engine.runner import ModelRunner


class DecodeGraphs:
    def __init__(self, runner: "ModelRunner") -> None:
        self.model = runner.model
        max_bs = runner.config.max_num_seqs
        self.sizes = [bs for bs in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if bs <= max_bs]
        if self.sizes[-1] < max_bs:
            self.sizes.append(max_bs)
        device, largest = runner.device, self.sizes[-1]
        hidden = runner.model_config.hidden_size
        self.input_ids = torch.zeros(largest, dtype=torch.int64, device=device)
        self.positions = torch.zeros(largest, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((largest,), -1, dtype=torch.int64, device=device)
        self.block_tables = torch.zeros(largest, runner.max_blocks_per_seq, dtype=torch.int32, device=device)
        self.seq_lens = torch.ones(largest, dtype=torch.int32, device=device)
        self.cu_seqlens_q = torch.arange(largest + 1, dtype=torch.int32, device=device)
        self.output = torch.zeros(largest, hidden, dtype=runner.dtype, device=device)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        pool = None
        for bs in reversed(self.sizes):
            graph = torch.cuda.CUDAGraph()
            ctx = self._context(bs)
            self.output[:bs] = self.model(self.input_ids[:bs], self.positions[:bs], ctx)  # warm-up / autotune
            with torch.cuda.graph(graph, pool):
                self.output[:bs] = self.model(self.input_ids[:bs], self.positions[:bs], ctx)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(device)

    def _context(self, bs: int) -> AttentionContext:
        return AttentionContext(slot_mapping=self.slot_mapping[:bs], block_tables=self.block_tables[:bs],
                                seq_lens=self.seq_lens[:bs], cu_seqlens_q=self.cu_seqlens_q[:bs + 1], max_q_len=1,
                                backend="triton")

    def fits(self, batch_size: int) -> bool:
        return batch_size <= self.sizes[-1]

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, ctx: AttentionContext) -> torch.Tensor:
        bs = input_ids.shape[0]
        size = next(s for s in self.sizes if s >= bs)
        self.input_ids[:bs] = input_ids
        self.positions[:bs] = positions
        self.slot_mapping[:size].fill_(-1)
        self.slot_mapping[:bs] = ctx.slot_mapping
        self.seq_lens[:size].fill_(1)
        self.seq_lens[:bs] = ctx.seq_lens
        width = ctx.block_tables.shape[1]
        self.block_tables[:bs, :width] = ctx.block_tables
        self.block_tables[bs:size, 0] = 0  # padded rows read one valid block (the export pads with -1)
        self.graphs[size].replay()
        return self.output[:bs]
