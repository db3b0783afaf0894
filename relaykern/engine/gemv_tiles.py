"""Each one-row projection's GEMV tile, chosen by timing the step's own launches replayed from CUDA graphs.

Triton's autotuner times a tile launch by launch: for kernels of 5-40 us the host's launch cost blurs the ranking
(on an H200 it picked tiles that replayed slower in a step). A served step replays its kernels from a graph, one
after another, and reads each layer's weights once. So the runner records the GEMV launches of one batch-1 step,
groups them by shape (N, K, prologue, dtype: one launch per layer, e.g. a model's 28 o projections, whose weights
together outgrow the L2), replays each group from a graph with every tile, and serves the fastest
(``kernels.gemv.serve_tile``). A step launched with PDL is recorded and timed apart: its programs load their first
weight tile while the kernel before ends, which favours other tiles.
"""
from __future__ import annotations

import collections
import functools
import math
import warnings
from typing import Callable

import torch
import triton

from relaykern.engine.cuda_graphs import graph_ms
from relaykern.kernels import gemv

REPLAY_MS = 10
"""Timing per tile and shape (a few dozen replays): the choice costs about a second per model."""
_timed: dict[gemv.ShapeKey, list[float]] = {}
"""ms per launch of each tile, by shape, for this process: a later runner with the same shapes (another engine of
the same model) serves the same tiles without timing them again."""


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
    timing = {}
    for key, group in groups.items():
        n, k, prologue, _, pdl, _ = key
        name = f"N{n} K{k} {gemv.PROLOGUE_NAMES[prologue]}" + " pdl" * pdl
        if sum(launch.weight.nbytes for launch in group) < min_group_bytes:
            timing[name] = {}
            continue
        if key not in _timed:
            _timed[key] = [_replay_ms(group, tile) for tile in group[0].tiles]
        ms, tiles = _timed[key], group[0].tiles
        if min(ms) < math.inf:
            gemv.serve_tile(key, tiles[ms.index(min(ms))])
        timing[name] = dict(zip(map(gemv.tile_name, tiles), ms))
    return timing


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
