"""CUDA graphs of whole forward steps, captured at start-up (on GPU only; the CPU path runs eagerly).

A small step is launch-bound: one replay replaces hundreds of launches. Two families are captured:

- **decode**: B rows of one token each, for B = 1, 2, 4, ..., ``max_num_seqs`` (the decode attention kernel);
- **extend**: up to B rows of any lengths, T tokens in all, for T = 16 ... 1024 and B = 1, 2, 4, ... 64 (the
  extend attention kernel, its tile sized for T): the relay's catch-ups (the LLM reading an SLM run, the SLM
  reading the LLM's N tokens), alone or packed beside decode rows, and prompts. Launched kernel by kernel, a forward
  costs the host about as long whatever its tokens (on an H200, ~20 ms for Qwen3-8B, 14-23 ms for 1.7B): up to
  about a thousand tokens that is longer than the GPU's work (an 8B catch-up of 512 tokens took 20.8 ms eagerly, as
  one of 16 tokens did, against 10.7 ms for 256 tokens replayed).

A graph holds the whole step from its inputs to the logits (injection, KV slots and sequence lengths, the model,
the LM head), so the host's work per step is two copies (one packed int64 vector: token ids, row bounds, row start
positions, the real token count; the block tables) and the replay; the sampler then runs on the graph's logits. (A
step no one graph holds may replay two, their logits joined: ``ModelRunner._split_logits``.)

A step replays the smallest captured shape that holds it; the rest is padding. Padding rows have start -1: they
attend to nothing (sequence length 0). Padding tokens (the token count is a device scalar) store no K/V (slot -1).
In a decode shape each padding row owns one padding token; in an extend shape the rows between the real ones and
the last own none, and the last row (always padding: an extend shape has one row more than the batch it serves)
owns every padding token. Each shape has its own buffers, so a replay never sees rows left by another shape. The
block-table buffer is as wide as the longest sequence the model accepts (the attention kernels' split count,
chosen from that width, is fixed per graph); entries past a row's own blocks may be stale but are never read,
since a row reads only the blocks its sequence length covers.

``capture=False`` "replays" by running the same step eagerly on the same buffers: CPU tests check the buffer
handling with it, where CUDA graphs do not exist.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch
import triton

from relaykern.kernels.inject import inject_tokens, inject_tokens_reference
from relaykern.models.attention import AttentionContext

if TYPE_CHECKING:
    from relaykern.engine.runner import ModelRunner

PADDING = -1
"""The start position of a padding row."""
BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
EXTEND_TOKENS = (16, 32, 64, 128, 256, 512, 768, 1024)
"""Above 512 tokens an 8B step is compute-bound (H200: catch-ups of 1024 and 2048 tokens took ~0.032 ms a token)
and launching it eagerly costs about its own GPU time (~21 ms at 512), so padding a 513-token step to 1024 would
cost more than it saves; the 768 shape halves that padding. For the 8B these shapes save host time more than
latency; for the 1.7B (an eager forward ~14-23 ms of host time) they save both."""
MAX_EXTEND_BATCH = 64
"""Extend graphs serve small batches, where a mixed step is launch-bound (in a larger one, the extend kernel would
serve each one-token row with a tile sized for the shape's token count). A larger mixed step replays a decode graph
for its one-token rows and an extend graph for the others when each fits one (``ModelRunner._split_logits``), else
runs eagerly."""


@dataclass(frozen=True)
class GraphShape:
    rows: int
    """Row slots (the batch served, plus one padding row for an extend shape)."""
    tokens: int
    decode: bool

    @property
    def batch(self) -> int:
        """The most real rows it serves."""
        return self.rows if self.decode else self.rows - 1


def graph_ms(call: Callable[[int], object], copies: int, rep_ms: int) -> float:
    """ms of one ``call(i)`` replayed from a CUDA graph of ``call(0) ... call(copies - 1)`` (median; the calls run
    once outside the capture first: compiles, autotuning)."""
    for i in range(copies):
        call(i)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    # A capture stream of the current device: torch's shared default one lives on the device first used (with the
    # LLM on another GPU, that of the SLM).
    with torch.cuda.graph(graph, stream=torch.cuda.Stream()):
        for i in range(copies):
            call(i)
    return triton.testing.do_bench(graph.replay, warmup=max(1, rep_ms // 4), rep=rep_ms, return_mode="median") / copies


def capture_shapes(max_num_seqs: int, max_num_batched_tokens: int, max_model_len: int) -> list[GraphShape]:
    """Every shape to capture, largest first (the smaller ones then reuse its memory pool). An extend shape's padding
    row owns positions up to its token count, which its block table and RoPE table must reach: none beyond
    ``max_model_len``."""
    decode_sizes = _batch_sizes(max_num_seqs)
    extend_sizes = _batch_sizes(min(max_num_seqs, MAX_EXTEND_BATCH))
    shapes = [GraphShape(size, size, True) for size in decode_sizes]
    shapes += [GraphShape(batch + 1, tokens, False) for tokens in EXTEND_TOKENS
               if tokens <= min(max_num_batched_tokens, max_model_len) for batch in extend_sizes if batch <= tokens]
    return sorted(shapes, key=lambda s: (s.tokens, s.rows), reverse=True)


def _batch_sizes(largest: int) -> list[int]:
    sizes = [size for size in BATCH_SIZES if size <= largest]
    return sizes if sizes[-1] == largest else sizes + [largest]


class StepGraphs:
    def __init__(self, runner: "ModelRunner", capture: bool = True, shapes: list[GraphShape] | None = None) -> None:
        """``shapes``: those to capture (default: ``capture_shapes`` of the runner's batching limits). The steps run
        the one-row projections as ``runner.gemv`` says, and launch their Triton kernels with PDL if ``runner.pdl``."""
        self.model = runner.model
        self.block_size = runner.block_size
        self.backend = runner.backend
        self.gemv = runner.gemv
        self.pdl = runner.pdl
        self.split_counters = runner.split_counters
        self.gemv_counters = runner.gemv_counters
        self.inject = inject_tokens if runner.backend == "triton" else inject_tokens_reference
        self.pin = runner.device.type == "cuda"
        config = runner.config
        self.shapes = shapes or capture_shapes(config.max_num_seqs, config.max_num_batched_tokens, runner.max_model_len)
        device = runner.device
        self.token_index = torch.arange(max(s.tokens for s in self.shapes), device=device)
        self.inputs: dict[GraphShape, torch.Tensor] = {}  # int64: ids [tokens], cu [rows + 1], start [rows], total
        self.tables: dict[GraphShape, torch.Tensor] = {}  # int32 [rows, max_blocks_per_seq]
        # One fp32 logits buffer for every shape (a model's steps run one at a time): per shape, the buffers took
        # ~0.9 GB per model at max_num_seqs 256 (Qwen3's vocabulary).
        vocab = runner.model_config.vocab_size
        self.logits_buffer = torch.empty(max(s.rows for s in self.shapes), vocab, dtype=torch.float32, device=device)
        self.logits: dict[GraphShape, torch.Tensor] = {}  # the buffer's first rows, written by each replay
        self.cuda_graphs: dict[GraphShape, torch.cuda.CUDAGraph] = {}
        """Each shape's captured graph; empty when not captured (``capture=False``: the steps run eagerly)."""
        pool = None
        for shape in self.shapes:
            self.inputs[shape] = torch.tensor(self._pack(shape, [], []), dtype=torch.int64, device=device)
            self.tables[shape] = torch.zeros(shape.rows, runner.max_blocks_per_seq, dtype=torch.int32, device=device)
            self.logits[shape] = self._step(shape)  # warm-up: compiles and autotunes outside the capture
            if capture:
                graph = torch.cuda.CUDAGraph()
                # Captured on the runner's own stream, not torch's one default capture stream: a captured cuBLAS
                # call keeps the workspace of its capture stream, so two models captured on one stream would share
                # a workspace while their graphs replay at once on their two streams.
                with torch.cuda.graph(graph, pool, stream=runner.stream):
                    self.logits[shape] = self._step(shape)
                pool = graph.pool()
                self.cuda_graphs[shape] = graph
        if capture:
            torch.cuda.synchronize(device)

    @staticmethod
    def _pack(shape: GraphShape, tokens: list[list[int]], starts: list[int]) -> list[int]:
        """The host side of a shape's input buffer for real rows ``tokens`` starting at ``starts``."""
        batch, total = len(tokens), sum(len(t) for t in tokens)
        cu = [0]
        for row in tokens:
            cu.append(cu[-1] + len(row))
        if shape.decode:
            cu += list(range(total + 1, shape.rows + 1))
        else:
            cu += [total] * (shape.rows - 1 - batch) + [shape.tokens]
        ids = [t for row in tokens for t in row]
        return ids + [0] * (shape.tokens - total) + cu + starts + [PADDING] * (shape.rows - batch) + [total]

    def _step(self, shape: GraphShape) -> torch.Tensor:
        """The captured work: the shape's input buffers → its logits."""
        buffer, rows, tokens = self.inputs[shape], shape.rows, shape.tokens
        cu = buffer[tokens:tokens + rows + 1].to(torch.int32)
        start = buffer[tokens + rows + 1:tokens + 2 * rows + 1]
        real_tokens = self.token_index[:tokens] < buffer[-1]
        start_pos = start.clamp(min=0).to(torch.int32)
        injected = self.inject(buffer[:tokens], cu, start_pos, self.tables[shape], self.block_size)
        ctx = AttentionContext(
            slot_mapping=torch.where(real_tokens, injected.slot_mapping, -1),
            block_tables=self.tables[shape],
            seq_lens=torch.where(start != PADDING, start_pos + (cu[1:] - cu[:-1]), 0).to(torch.int32),
            cu_seqlens_q=cu,
            max_q_len=1 if shape.decode else tokens,
            backend=self.backend,
            gemv=self.gemv,
            pdl=self.pdl,
            split_counters=self.split_counters,
            gemv_counters=self.gemv_counters,
        )
        hidden = self.model(injected.input_ids, injected.positions, ctx)
        if not shape.decode:  # each row's last token (an empty padding row takes some other row's: ignored)
            hidden = hidden[(cu[1:] - 1).long()]
        return self.model.compute_logits(hidden, self.logits_buffer[:shape.rows])

    def replay_ms(self, shape: GraphShape, repeats: int = 20) -> float:
        """Mean time of a replay of ``shape`` (CUDA events, after a few warm-up replays)."""
        for _ in range(3):
            self.replay(shape)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            self.replay(shape)
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / repeats

    def replay(self, shape: GraphShape) -> None:
        """The shape's step from its input buffers: its graph replayed, or run kernel by kernel if not captured."""
        if self.cuda_graphs:
            self.cuda_graphs[shape].replay()
        else:
            self._step(shape)

    def shape_for(self, lengths: list[int], least_rows: int = 0) -> GraphShape | None:
        """The smallest captured shape holding rows of these token counts, and at least ``least_rows`` rows; None if
        none does."""
        decode = all(n == 1 for n in lengths)
        total = sum(lengths)
        rows = max(len(lengths), least_rows)
        fitting = [s for s in self.shapes if s.decode == decode and s.batch >= rows and s.tokens >= total]
        return min(fitting, key=lambda s: (s.tokens, s.rows), default=None)

    def run(self, shape: GraphShape, tokens: list[list[int]], starts: list[int], block_tables: torch.Tensor,
            fed_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [B, vocab] of B rows (each: its new tokens, the position of the first, its block table: host int32
        [B, width], width <= max_blocks_per_seq), from the last token of each row. ``fed_tokens``: the tokens of the
        first rows, one each, as a device tensor, in place of theirs in ``tokens``. The result is a view of the
        logits buffer, valid until the next replay (of any shape)."""
        host = torch.tensor(self._pack(shape, tokens, starts), dtype=torch.int64, pin_memory=self.pin)
        self.inputs[shape].copy_(host, non_blocking=True)
        if fed_tokens is not None:  # the buffer starts with the ids, the first rows' one each
            self.inputs[shape][:len(fed_tokens)].copy_(fed_tokens)
        tables = block_tables.pin_memory() if self.pin else block_tables
        self.tables[shape][:len(tokens), :tables.shape[1]].copy_(tables, non_blocking=True)
        self.replay(shape)
        return self.logits[shape][:len(tokens)]
