"""Each one-row projection's GEMV tile, chosen by timing the step's own launches replayed from CUDA graphs.

Triton's autotuner times a tile launch by launch: for kernels of 5-40 us the host's launch cost blurs the ranking
(on an H200 it picked tiles that replayed slower in a step). A served step replays its kernels from a graph, one
after another, and reads each layer's weights once. So the runner records the GEMV launches of one batch-1 step,
groups them by shape (N, K, prologue, dtype: one launch per layer, e.g. a model's 28 o projections, whose weights
together outgrow the L2), replays each group from a graph with every tile, and serves the fastest
(``kernels.gemv.serve_tile``). A step launched with PDL is recorded and timed apart: its programs load their first
weight tile while the kernel before ends, which favours other tiles; it times only the few tiles fastest without PDL,
since each tile timed costs a compile per kernel variant too (about 0.2 s: some 80 per model for every tile),
which run on all cores at once before the timing.
"""
from __future__ import annotations

import collections
import functools
import math
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable

import torch
import triton

from relaykern.engine.cuda_graphs import graph_ms
from relaykern.kernels import gemv

REPLAY_MS = 10
"""Timing per tile and shape (a few dozen replays): the choice costs about a second per model."""
PDL_CANDIDATES = 4
"""A shape launched with PDL times this many tiles: those fastest without PDL."""
COMPILE_THREADS = 16
"""At most this many compiles at once (each LLVM and ptxas run takes a few hundred MB)."""
_timed: dict[gemv.ShapeKey, list[tuple[triton.Config, float]]] = {}
"""ms per launch of each tile timed, by shape, for this process: a later runner with the same shapes (another engine
of the same model) serves the same tiles without timing them again."""


def choose_tiles(step: Callable[[], object], min_group_bytes: int | None = None) -> dict[str, dict[str, float]]:
    """Runs ``step`` (a batch-1 forward whose projections run as GEMV kernels) once, recording its launches, and
    serves each shape the tile whose replays are fastest. Returns the ms per launch of every tile, by shape (no tile
    timed, ``{}``: the shape is autotuned).
    A shape whose weights in the step total less than ``min_group_bytes`` (default: the device's L2) is left to the
    autotuner: replayed, they would be read from the L2, which a served step has long since filled with others."""
    with gemv.recording() as launches:
        step()
    groups: dict[gemv.ShapeKey, list[gemv.Launch]] = collections.defaultdict(list)
    for launch in launches:
        groups[launch.key].append(launch)
    if min_group_bytes is None and launches:
        device = launches[0].weight.device
        min_group_bytes = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
    timed_groups = {key: group for key, group in groups.items()
                    if sum(launch.weight.nbytes for launch in group) >= min_group_bytes}
    candidates = {key: _candidates(key, group[0].tiles) for key, group in timed_groups.items() if key not in _timed}
    _compile_at_once([(launch, tiles) for key, tiles in candidates.items()
                      for launch in _one_per_variant(timed_groups[key])])
    timing = {}
    for key, group in groups.items():
        n, k, prologue, _, pdl, _ = key
        name = f"N{n} K{k} {gemv.PROLOGUE_NAMES[prologue]}" + " pdl" * pdl
        if key not in timed_groups:
            timing[name] = {}
            continue
        if key not in _timed:
            _timed[key] = [(tile, _replay_ms(group, tile)) for tile in candidates[key]]
        timing[name] = {gemv.tile_name(tile): ms for tile, ms in _timed[key]}
        fastest = served_tile(timing[name])
        if fastest is not None:
            gemv.serve_tile(key, next(tile for tile, _ in _timed[key] if gemv.tile_name(tile) == fastest))
    return timing


def served_tile(ms_by_tile: dict[str, float]) -> str | None:
    """The tile ``choose_tiles`` serves a shape, from its timings (one of its values): the fastest that ran; None
    where none ran or none was timed (the shape is autotuned)."""
    ran = {tile: ms for tile, ms in ms_by_tile.items() if ms < math.inf}
    return min(ran, key=ran.get) if ran else None


def _candidates(key: gemv.ShapeKey, tiles: list[triton.Config]) -> list[triton.Config]:
    """The tiles to time for ``key``: all, or (launched with PDL, its twin without PDL timed) the
    ``PDL_CANDIDATES`` fastest of the twin's."""
    n, k, prologue, dtype, pdl, split = key
    twin = _timed.get((n, k, prologue, dtype, False, split))
    if not pdl or twin is None:
        return tiles
    ranked = sorted((timed for timed in twin if timed[1] < math.inf), key=lambda timed: timed[1])
    return [tile for tile, _ in ranked[:PDL_CANDIDATES]] or tiles


def _one_per_variant(group: list[gemv.Launch]) -> list[gemv.Launch]:
    """A launch of each compiled variant in ``group`` (e.g. layer 0's q/k/v projection, which adds no residual)."""
    return list({tuple(sorted(launch.constexprs.items())): launch for launch in group}.values())


def _compile_at_once(work: list[tuple[gemv.Launch, list[triton.Config]]]) -> None:
    """Compiles (unless interpreted) each launch with each of its tiles on up to ``COMPILE_THREADS`` threads at
    once (Triton's ``AsyncCompileMode``: its compiler passes and ptxas run outside the GIL; on 2 cores 1.6x faster
    than one by one, at ~0.2 s a compile). A tile that does not compile fails (and is left out) where it is timed:
    Triton compiles it again there, or raises the error it kept."""
    if not work or gemv.INTERPRETED or not hasattr(triton, "AsyncCompileMode"):
        return
    threads = min(len(os.sched_getaffinity(0)), COMPILE_THREADS)
    try:
        with ThreadPoolExecutor(threads) as pool, triton.AsyncCompileMode(pool, ignore_errors=True):
            for launch, tiles in work:
                for tile in tiles:
                    launch.compile(tile)
    except Exception as err:  # noqa: BLE001 - compiled one by one when timed instead
        warnings.warn(f"GEMV tiles not compiled ahead: {err}")


def _replay_ms(group: list[gemv.Launch], tile: triton.Config) -> float:
    """ms per launch of ``group`` replayed with ``tile``; inf if the tile does not compile or launch for this shape
    (the launches run once before the capture: a failure leaves no capture open)."""
    try:
        return graph_ms(functools.partial(_launch, group, tile), len(group), REPLAY_MS)
    except Exception as err:  # noqa: BLE001 - e.g. out of registers or shared memory for this shape: not served
        warnings.warn(f"GEMV tile {gemv.tile_name(tile)} left out for N={group[0].key[0]} K={group[0].key[1]}: {err}")
        return math.inf


def _launch(group: list[gemv.Launch], tile: triton.Config, index: int) -> None:
    group[index].run(tile)
