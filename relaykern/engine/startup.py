"""What a runner compiles and chooses at start-up on a GPU, before it serves: the kernel variants serving would
otherwise compile mid-run, and the fastest batch-1 step (cuBLAS, the fused GEMV kernels with their tiles chosen
from graph replays, those launched with PDL). Each runs forwards of a scratch sequence whose KV is forgotten."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from relaykern.config import SamplingParams
from relaykern.engine.cuda_graphs import GraphShape, StepGraphs
from relaykern.engine.gemv_tiles import choose_tiles
from relaykern.engine.row import Row
from relaykern.kernels.extend_attention import choose_extend_tile
from relaykern.kernels.pdl import pdl_supported

if TYPE_CHECKING:
    from relaykern.engine.runner import ModelRunner

BATCH1 = GraphShape(rows=1, tokens=1, decode=True)
WARMUP_SEQ_ID = -1
"""The scratch sequence (request ids are >= 0)."""
BATCH1_CONTEXT = 256
"""Tokens of context behind the timed batch-1 step (its attention reads them)."""


def compile_forward_variants(runner: ModelRunner) -> None:
    """Runs one forward per tile size of the extend kernel (prefill and catch-up rows) and samples with and without
    temperature and log-probs, so that Triton compiles those variants now: compiled on first use, each would stall
    serving for a second or more at some later step."""
    mc = runner.model_config
    group = mc.num_heads // mc.num_kv_heads
    lengths = {}
    for q_len in (2, 4, 8, 16, 32, 64, 128):
        lengths.setdefault(choose_extend_tile(q_len, group, runner.dtype), q_len)
    sampled = [SamplingParams(temperature=0), SamplingParams(temperature=1),
               SamplingParams(temperature=1, top_p=0.9, logprobs=True)]
    for index, q_len in enumerate(lengths.values()):
        sampling = sampled[index % len(sampled)]
        runner.blocks.allocate(WARMUP_SEQ_ID, [0] * q_len)
        try:
            runner.execute([Row(WARMUP_SEQ_ID, [0] * q_len, 0, True, sampling, 0, 0, [], sampling.logprobs)])
        finally:
            runner.blocks.free(WARMUP_SEQ_ID, keep_cached=False)


def choose_batch1_step(runner: ModelRunner) -> dict[str, float]:
    """ms of a batch-1 decode step replayed from a CUDA graph, with the projections on cuBLAS, as the fused GEMV
    kernels (kernels/gemv.py, their tiles chosen first: engine/gemv_tiles.py), and (on Hopper and later) as those
    with every Triton kernel launched with PDL (kernels/pdl.py). The fastest serves: sets ``runner.gemv`` and
    ``runner.pdl``. Which wins depends on the GPU and the shapes. PDL must give exactly the plain GEMV step's logits
    (the same kernels in the same order), or it is dropped with a warning."""
    # (a small pool may hold fewer: the step's own token needs a place too)
    context = min(BATCH1_CONTEXT, runner.max_model_len - 1, runner.blocks.num_free_blocks * runner.block_size - 1)
    if context < 1:  # a pool of one slot: nothing to time the step with (cuBLAS serves)
        return {}
    variants = {"cublas_ms": (False, False), "gemv_ms": (True, False)}
    if pdl_supported(runner.device):
        variants["gemv_pdl_ms"] = (True, True)
    runner.gemv, runner.pdl = True, False  # (timed without PDL: a driver may not capture its launches)
    runner.gemv_tiles = choose_tiles(lambda: StepGraphs(runner, capture=False, shapes=[BATCH1]))
    timing, logits = {}, {}
    runner.blocks.allocate(WARMUP_SEQ_ID, [0] * context)
    try:  # K/V for the timed step to attend to, then the step at the position after them
        greedy = SamplingParams(temperature=0)
        runner.execute([Row(WARMUP_SEQ_ID, [0] * context, 0, True, greedy, 0, 0, [], False)])
        runner.blocks.append(WARMUP_SEQ_ID, [0])
        tables = runner.blocks.block_tables([WARMUP_SEQ_ID], runner.blocks_needed(context + 1))
        for name, (gemv, pdl) in variants.items():
            runner.gemv, runner.pdl = gemv, pdl
            try:
                graphs = StepGraphs(runner, shapes=[BATCH1])
            except Exception as err:  # noqa: BLE001 - a driver that cannot capture PDL launches: serve without
                if not pdl:
                    raise
                warnings.warn(f"batch-1 step with PDL launches not captured, served without: {err}")
                continue
            logits[name] = graphs.run(BATCH1, [[0]], [context], tables).clone()
            timing[name] = graphs.replay_ms(BATCH1)
    finally:
        runner.blocks.free(WARMUP_SEQ_ID, keep_cached=False)
    if "gemv_pdl_ms" in timing and not torch.equal(logits["gemv_pdl_ms"], logits["gemv_ms"]):
        warnings.warn("the batch-1 step with PDL launches gave other logits than without: served without")
        del timing["gemv_pdl_ms"]
    runner.gemv, runner.pdl = variants[min(timing, key=timing.get)]
    return timing
