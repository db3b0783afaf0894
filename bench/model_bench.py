"""One model's forwards timed outside the relay loop: decode steps, a prefill, a catch-up, a chain of decodes.

A ``Probe`` allocates sequences of random tokens straight in a ``ModelRunner``'s block manager (ids far above the
engine's request ids) and times ``runner.execute`` on rows it builds, reading the sampled tokens back to the host
each forward, or (a decode sweep's steps) once after a chain of steps, each fed the tokens the one before sampled
on the device, as the engine's overlapped loop runs them. A repeated forward rewrites the same KV slots, so timing
it again is exact. The context before a row is never computed (timing does not depend on the KV's content), yet
its blocks enter the prefix cache under their tokens' hashes when allocated: every probe sequence starts with
``PROBE_MARKER`` followed by tokens from the probe's own random stream, so that no request's prompt can ever match
those blocks.
"""
from __future__ import annotations

import dataclasses
import random
from contextlib import contextmanager
from typing import Callable, Iterator

import torch

from relaykern.config import SamplingParams
from relaykern.engine.relay import RelayEngine
from relaykern.engine.row import Row
from relaykern.engine.runner import ModelRunner
from relaykern.bench.timing import median_ms, timed
from relaykern.bench.presets import Preset

GREEDY = SamplingParams(temperature=0)
FIRST_PROBE_ID = 1 << 40
LOWEST_TOKEN = 1000
"""Random token ids start here (clear of the digits and punctuation that commands are made of)."""
PROBE_MARKER = 0
PROBE_SEED = 0xB0BE
PIPELINED_STEPS = 16
MIXED_CATCHUP_TOKENS = (16, 256)
"""Catch-ups beside a full decode batch (the most that ``ModelRunner._split_logits`` replays in two parts)."""


@contextmanager
def eager(runner: ModelRunner) -> Iterator[None]:
    """The runner's forwards without its CUDA graphs inside the block (each kernel launched by the host)."""
    graphs, runner.graphs = runner.graphs, None
    try:
        yield
    finally:
        runner.graphs = graphs


class Probe:
    def __init__(self, runner: ModelRunner, repeats: int) -> None:
        self.runner = runner
        self.repeats = repeats
        self.rng = random.Random(PROBE_SEED)
        self.next_id = FIRST_PROBE_ID
        self.top_token = min(runner.model_config.vocab_size, 150000)
        self.tokens: dict[int, list[int]] = {}

    def sequences(self, count: int, length: int) -> list[int]:
        """Allocates ``count`` sequences of ``length`` tokens; returns their ids."""
        ids = []
        for _ in range(count):
            tokens = [PROBE_MARKER] + [self.rng.randrange(LOWEST_TOKEN, self.top_token) for _ in range(length - 1)]
            if not self.runner.blocks.can_allocate(tokens):
                self.free(ids)
                raise ValueError(f"the {self.runner.num_blocks}-block KV pool cannot hold {count} x {length} tokens: "
                                 "raise the preset's num_blocks / kv_cache_gb or shrink the shape")
            self.runner.blocks.allocate(self.next_id, tokens)
            self.tokens[self.next_id] = tokens
            ids.append(self.next_id)
            self.next_id += 1
        return ids

    def free(self, ids: list[int]) -> None:
        for seq_id in ids:
            self.runner.blocks.free(seq_id)
            del self.tokens[seq_id]

    def _row(self, seq_id: int, num_tokens: int, start: int) -> Row:
        return Row(seq_id, self.tokens[seq_id][start:start + num_tokens], start, True, GREEDY, 0, 0, [], False)

    def _execute(self, rows: list[Row]) -> list[int]:
        return self.runner.execute(rows)[0].tolist()

    @contextmanager
    def decode_rows(self, batch: int, context: int) -> Iterator[list[Row]]:
        """The rows of a decode step of ``batch`` sequences, each over ``context`` cached tokens."""
        ids = self.sequences(batch, context + 1)
        try:
            yield [self._row(seq_id, 1, context) for seq_id in ids]
        finally:
            self.free(ids)

    @contextmanager
    def decode_step(self, batch: int, context: int) -> Iterator[Callable[[], list[int]]]:
        """One decode step of ``batch`` sequences, each over ``context`` cached tokens."""
        with self.decode_rows(batch, context) as rows:
            yield lambda: self._execute(rows)

    @contextmanager
    def forward_rows(self, new_tokens: int, context: int, rows: int = 1) -> Iterator[list[Row]]:
        """``rows`` rows, each feeding ``new_tokens`` after ``context`` cached ones: prefills (context 0) or
        catch-ups."""
        ids = self.sequences(rows, context + new_tokens)
        try:
            yield [self._row(seq_id, new_tokens, context) for seq_id in ids]
        finally:
            self.free(ids)

    @contextmanager
    def forward(self, new_tokens: int, context: int, rows: int = 1) -> Iterator[Callable[[], list[int]]]:
        """One forward of ``forward_rows``, its tokens read back."""
        with self.forward_rows(new_tokens, context, rows) as batch:
            yield lambda: self._execute(batch)

    @contextmanager
    def decode_chain(self, steps: int, context: int) -> Iterator[Callable[[], None]]:
        """``steps`` successive decode steps of one sequence, starting after ``context`` cached tokens. The sequence
        grows by a token a step, as in the engine (a block table never holds blocks past the step's position)."""
        ids = self.sequences(1, context + steps)
        seq_id = ids[0]
        tokens = self.tokens[seq_id]
        rows = [self._row(seq_id, 1, context + i) for i in range(steps)]
        blocks = self.runner.blocks
        try:
            def chain() -> None:
                blocks.free(seq_id)
                blocks.allocate(seq_id, tokens[:context + 1])
                for i, row in enumerate(rows):
                    if i:
                        blocks.append(seq_id, row.tokens)
                    self._execute([row])

            yield chain
        finally:
            self.free(ids)

    def decode_ms(self, batch: int, context: int) -> float:
        """A step read back before the next is launched: each step waits on the host's work too."""
        with self.decode_step(batch, context) as step:
            return median_ms(step, self.runner.device, self.repeats)

    def pipelined_decode_ms(self, batch: int, context: int, steps: int = PIPELINED_STEPS) -> float:
        """A step within ``steps`` each launched before the one before is read back, fed its sampled tokens on the
        device, as the engine's overlapped loop runs them (``RelayConfig.overlap_steps``): the host prepares a
        step while the GPU runs the last. Every step rewrites the same position's KV."""
        with self.decode_rows(batch, context) as rows:
            def chain() -> None:
                fed = None
                for _ in range(steps):
                    fed, _ = self.runner.execute(rows, fed_tokens=fed)
                fed.tolist()

            return median_ms(chain, self.runner.device, self.repeats) / steps

    def forward_ms(self, new_tokens: int, context: int, rows: int = 1) -> float:
        with self.forward(new_tokens, context, rows) as forward:
            return median_ms(forward, self.runner.device, self.repeats)

    def mixed_ms(self, decode_rows: int, new_tokens: int, context: int) -> float:
        """A step of ``decode_rows`` decode rows and one row feeding ``new_tokens`` (a catch-up), all after
        ``context`` cached tokens."""
        with self.decode_rows(decode_rows, context) as decode, self.forward_rows(new_tokens, context) as catchup:
            rows = decode + catchup
            return median_ms(lambda: self._execute(rows), self.runner.device, self.repeats)

    def decode_chain_ms(self, steps: int, context: int) -> float:
        """Total time of the chain (fewer repeats for long chains)."""
        with self.decode_chain(steps, context) as chain:
            return median_ms(chain, self.runner.device, max(1, min(self.repeats, 300 // steps)))


def weight_bytes(runner: ModelRunner) -> int:
    """Bytes of weights a decode step reads: every parameter but the input embedding (a few rows are gathered),
    which is read in full only when it is tied to the LM head."""
    model = runner.model
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    embedding = model.model.embed_tokens.weight
    return total if runner.model_config.tie_word_embeddings else total - embedding.numel() * embedding.element_size()


def kv_bytes_per_token(runner: ModelRunner) -> int:
    mc = runner.model_config
    return mc.num_layers * 2 * mc.num_kv_heads * mc.head_dim * torch.empty((), dtype=runner.dtype).element_size()


def measure_model(runner: ModelRunner, preset: Preset, bandwidth_gb_per_s: float, mix_context: int) -> dict:
    """Decode sweep (ms/step of pipelined steps against the roofline: weights plus the batch's KV read at the copy
    bandwidth; ``synced_ms``: the step read back before the next is launched), one decode at the relay workload's
    shape (for the ideal mix), and one long prefill."""
    probe = Probe(runner, preset.repeats)
    weights, per_token = weight_bytes(runner), kv_bytes_per_token(runner)

    def decode_point(batch: int, context: int) -> dict:
        ms = probe.pipelined_decode_ms(batch, context)
        roofline_ms = (weights + batch * context * per_token) / bandwidth_gb_per_s / 1e6
        return {"batch": batch, "context": context, "ms": ms, "synced_ms": probe.decode_ms(batch, context),
                "roofline_ms": roofline_ms, "fraction_of_roofline": roofline_ms / ms, "tokens_per_s": batch / ms * 1e3}

    decode = [decode_point(batch, preset.decode_context) for batch in preset.decode_batch_sizes]
    at_relay_shape = decode_point(preset.relay_batch, mix_context)
    prefill_ms = probe.forward_ms(preset.prefill_length, 0)
    # A catch-up beside more decode rows than extend graphs take: two graph replays, against launched eagerly.
    batch = max(preset.decode_batch_sizes)
    mixed = [{"decode_rows": batch - 1, "catchup_tokens": tokens, "context": preset.decode_context,
              "ms": probe.mixed_ms(batch - 1, tokens, preset.decode_context)} for tokens in MIXED_CATCHUP_TOKENS]
    with eager(runner):
        for point in mixed:
            point["eager_ms"] = probe.mixed_ms(batch - 1, point["catchup_tokens"], preset.decode_context)
    return {
        "weight_bytes": weights,
        "weight_roofline_ms": weights / bandwidth_gb_per_s / 1e6,
        "kv_bytes_per_token": per_token,
        "decode": decode,
        "decode_at_relay_shape": at_relay_shape,
        "prefill": {"tokens": preset.prefill_length, "ms": prefill_ms,
                    "tokens_per_s": preset.prefill_length / prefill_ms * 1e3},
        "mixed_steps": mixed,
        # The runner's start-up choice for batch-1 steps: cuBLAS, the fused GEMV kernels, or those launched with PDL,
        # each with separate or fused decode attention kernels (empty on a CPU).
        "batch1_projections": dict(runner.gemv_timing, chosen=min(runner.gemv_timing, key=runner.gemv_timing.get)
                                   .removesuffix("_ms") if runner.gemv_timing else "cublas"),
        "gemv_tiles": runner.gemv_tiles,  # ms per launch of each tile by shape, from graph replays (the fastest serves)
    }


def engine_decode_alone(engine: RelayEngine, prompt: list[int], tokens: int) -> dict:
    """One request alone through ``engine.generate``, SLM only (no command is ever written), greedy, no logits
    processor: the engine's whole decode loop per token (CUDA graphs, sampling, detection, host bookkeeping),
    timed as ``HF generate`` is (prefill included). Warmed up on another prompt first."""
    sampling = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)
    engine.generate([[PROBE_MARKER] + prompt[1:]], dataclasses.replace(sampling, max_tokens=4))
    outs, seconds = timed(lambda: engine.generate([prompt], sampling), engine.slm.device)
    out = outs[0]
    return {"batch": 1, "prompt_length": len(prompt), "tokens": len(out.token_ids), "seconds": seconds,
            "ms_per_token": seconds / len(out.token_ids) * 1e3}
