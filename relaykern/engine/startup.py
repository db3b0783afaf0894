"""What a runner compiles and chooses at start-up on a GPU, before it serves: the kernel variants serving would
otherwise compile mid-run, and the fastest batch-1 step (cuBLAS, the fused GEMV kernels with their tiles chosen
from graph replays, those launched with PDL; a small decode step's attention fused or in separate kernels).
Each runs forwards of a scratch sequence whose KV is forgotten."""
from __future__ import annotations

import warnings
from typing import TYPE_CHECKING

import torch

from relaykern.config import SamplingParams
from relaykern.engine.cuda_graphs import GraphShape, StepGraphs
from relaykern.engine.gemv_tiles import choose_tiles, served_tile
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
    with every Triton kernel launched with PDL (kernels/pdl.py; their tiles chosen apart); each with separate
    attention kernels (q/k norm + RoPE + K/V store, attention, merge) and fused into one (``*_fused_attention_ms``:
    kernels/attention.py, for decode steps of a few sequences). The fastest serves: sets ``runner.gemv``,
    ``runner.pdl`` and ``runner.split_counters`` (fused: the counters). Which wins depends on the GPU and the shapes.
    Each variant is checked against another (``_checked_against``): the GEMV kernels must give cuBLAS's logits up to
    float rounding, PDL exactly the logits of the step without it (the same kernels in the same order) where each
    projection was served the same tile both ways (else up to float rounding: another tile sums in another order),
    and the fused attention the logits of the separate kernels up to float rounding; else the variant, and those
    checked against it, are dropped with a warning."""
    # (a small pool may hold fewer: the step's own token needs a place too)
    context = min(BATCH1_CONTEXT, runner.max_model_len - 1, runner.blocks.num_free_blocks * runner.block_size - 1)
    if context < 1:  # a pool of one slot: nothing to time the step with (cuBLAS serves)
        return {}
    projections = {"cublas": (False, False), "gemv": (True, False)}
    if pdl_supported(runner.device):
        projections["gemv_pdl"] = (True, True)
    counters = runner.split_counters
    variants = {f"{name}_ms": (gemv, pdl, None) for name, (gemv, pdl) in projections.items()}
    if counters is not None:
        variants.update({f"{name}_fused_attention_ms": (gemv, pdl, counters)
                         for name, (gemv, pdl) in projections.items()})
    runner.gemv_tiles = {}
    for pdl in sorted({pdl for _, pdl in projections.values()}):
        runner.gemv, runner.pdl = True, pdl
        try:
            runner.gemv_tiles.update(choose_tiles(lambda: StepGraphs(runner, capture=False, shapes=[BATCH1])))
        except Exception as err:  # noqa: BLE001 - PDL launches a driver cannot capture: the variant goes below
            if not pdl:
                raise
            warnings.warn(f"GEMV tiles for PDL launches not chosen: {err}")
    timing, logits = {}, {}
    runner.blocks.allocate(WARMUP_SEQ_ID, [0] * context)
    try:  # K/V for the timed step to attend to, then the step at the position after them
        greedy = SamplingParams(temperature=0)
        runner.execute([Row(WARMUP_SEQ_ID, [0] * context, 0, True, greedy, 0, 0, [], False)])
        runner.blocks.append(WARMUP_SEQ_ID, [0])
        tables = runner.blocks.block_tables([WARMUP_SEQ_ID], runner.blocks_needed(context + 1))
        for name, (gemv, pdl, split_counters) in variants.items():
            runner.gemv, runner.pdl, runner.split_counters = gemv, pdl, split_counters
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
    _drop_wrong_variants(timing, logits, _same_tiles_with_pdl(runner.gemv_tiles))
    runner.gemv, runner.pdl, runner.split_counters = variants[min(timing, key=timing.get)]
    return timing


def _drop_wrong_variants(timing: dict[str, float], logits: dict[str, torch.Tensor], same_tiles: bool) -> None:
    """Drops from ``timing`` (in order: each variant after the one it is checked against) the variants whose logits
    disagree with their reference's, or whose reference was dropped, with a warning."""
    for name in list(timing):
        reference, exactly = _checked_against(name, same_tiles)
        if reference not in logits:
            continue
        if reference not in timing:
            warnings.warn(f"the batch-1 step {name.removesuffix('_ms')} is checked against "
                          f"{reference.removesuffix('_ms')}, which gave wrong logits: served without both")
            del timing[name]
        elif not _agree(logits[name], logits[reference], exactly):
            warnings.warn(f"the batch-1 step {name.removesuffix('_ms')} gave other logits than "
                          f"{reference.removesuffix('_ms')}: served without")
            del timing[name]


def _checked_against(name: str, same_tiles: bool) -> tuple[str | None, bool]:
    """The variant whose logits variant ``name``'s must give, and whether bit for bit: fused attention the separate
    kernels', PDL the same kernels' without PDL (bit for bit if served the same tiles), GEMV kernels cuBLAS's."""
    if "_fused_attention" in name:
        return name.replace("_fused_attention", ""), False
    if "_pdl" in name:
        return name.replace("_pdl", ""), same_tiles
    return ("cublas_ms", False) if name == "gemv_ms" else (None, False)


def _same_tiles_with_pdl(tiles: dict[str, dict[str, float]]) -> bool:
    """Whether every projection shape was timed and served the same GEMV tile launched with PDL as without
    (``choose_tiles``' timings by shape; an autotuned shape, no timings, may differ)."""
    served = {shape: served_tile(ms) for shape, ms in tiles.items()}
    return all(tile is not None and served.get(f"{shape} pdl") == tile
               for shape, tile in served.items() if not shape.endswith(" pdl"))


def _agree(logits: torch.Tensor, plain: torch.Tensor, exactly: bool) -> bool:
    """Bit for bit, or (other kernels: other summation orders) within 5 % of the largest logit, which a race or a
    wrong kernel would be far outside."""
    if exactly:
        return torch.equal(logits, plain)
    return bool((logits - plain).abs().max() <= 0.05 * plain.abs().max())
