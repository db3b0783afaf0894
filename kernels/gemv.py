"""One row times a weight matrix, with the op before it fused into the row's load: a Triton kernel and its reference.

A decode step at batch 1 multiplies one row by each weight matrix: bound by reading the weights, and at the small
shapes of a 1.7B model cuBLAS's kernels leave much of the bandwidth unused (ARCHITECTURE.md: the linear layers of a
1.7B step alone reach 55 % of the roofline). Here each program owns ``BLOCK_N`` output features, streams their
weight rows (contiguous along K) and keeps a [BLOCK_N, BLOCK_K] fp32 accumulator, reduced once at the end. Before
the product, the kernel computes the input the unfused model would have handed over:

- ``"rms_norm"``: RMSNorm of the row, after adding ``residual`` if given (kernels/rms_norm.py's op: the q/k/v and
  gate/up projections). Every program recomputes the row's norm (K values, read from L2); program 0 also writes the
  new residual stream. The norm's launch is gone.
- ``"silu_and_mul"``: ``silu(gate) * up`` of the row ``[gate | up]`` (kernels/activation.py's op, before the down
  projection). Its launch is gone too.
- ``"none"``: the row as it is (o_proj).

Roundings are the unfused ops': the prologue's result is rounded to the model dtype, then multiplied with fp32
accumulation (and the bias added) as F.linear does; results differ from cuBLAS's by summation order only.
Each program loads its first weight tile before anything else (launched with PDL, kernels/pdl.py, before it waits
for the kernel before to finish: no step writes weights). Triton pipelines the loads of a ``tl.dot`` loop, not of
this elementwise one, so a tile may ask (``PREFETCH``) for each weight tile's load to go out before the product
of the one before: two in flight per program instead of one. A split tile (``SPLIT_K`` > 1, given arrival counters)
cuts K among that many programs per output tile, each writing an fp32 partial product; the last to arrive (an
atomic count, as the decode attention's splits merge themselves) sums them in split order, adds the bias and stores:
more loads in flight for a projection of few outputs and a long K (the down projection), the same bits on every run.

On a GPU the runner chooses the tile of each (N, K, prologue, dtype) by timing its step's own launches replayed from
CUDA graphs (engine/gemv_tiles.py, through ``recording`` and ``serve_tile``); shapes without one are autotuned launch
by launch. The runner uses these kernels only if a batch-1 decode step replays faster with them than with cuBLAS
(``ModelRunner`` times both at start-up).
"""
import contextlib
import dataclasses
import functools
from typing import Iterator

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from relaykern.kernels.activation import silu_and_mul_reference
from relaykern.kernels.decode_attention import check_split_counters
from relaykern.kernels.pdl import INTERPRETED, launch_options, wait_for_earlier_kernels
from relaykern.kernels.rms_norm import rms_norm_reference
from relaykern.kernels.rope import round_to

PROLOGUES = {"none": 0, "rms_norm": 1, "silu_and_mul": 2}
PROLOGUE_NAMES = {code: name for name, code in PROLOGUES.items()}
# Under the interpreter, which runs programs one at a time: few programs for the tiny test models' projections, still
# several K steps each (tests/test_kernels_gemv.py runs every GPU tile under it too).
INTERPRETED_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_K": 32, "PREFETCH": 0, "SPLIT_K": 1})
INTERPRETED_SPLIT_CONFIG = triton.Config({"BLOCK_N": 16, "BLOCK_K": 32, "PREFETCH": 0, "SPLIT_K": 2})
GPU_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "PREFETCH": prefetch, "SPLIT_K": split}, num_warps=warps,
                             num_stages=3)
               for n, k, warps, prefetch, split in (
                   (4, 512, 4, 0, 1), (8, 256, 4, 0, 1), (8, 512, 4, 0, 1), (16, 512, 8, 0, 1), (4, 512, 4, 1, 1),
                   (8, 256, 4, 1, 1), (8, 512, 4, 1, 1), (16, 256, 4, 1, 1), (2, 2048, 4, 0, 1), (4, 1024, 4, 0, 1),
                   (4, 2048, 8, 0, 1),
                   (4, 512, 4, 0, 2), (4, 512, 4, 0, 4), (8, 512, 4, 0, 3), (8, 512, 4, 1, 4), (16, 512, 8, 0, 4))]
"""The tiles tried on a GPU: 1-8K weights per program step, up to 32 fp32 accumulators and 32 weights per thread
(64 with PREFETCH: two tiles in registers; tests/test_kernels_compile.py compiles each for sm_90 and checks that
none spills). The long rows (BLOCK_K 1024, 2048) load a 1.7B projection's row slice in one to three steps (K 2048
or 6144), the first before the PDL wait: with the H200's measured tiles every program held ~4 KB in flight, and the
o and down projections (8 and 25 MB) read at 1.7 and 2.0 TB/s: latency-bound. The split tiles (``SPLIT_K`` > 1,
served only where the caller gives arrival counters) cut K among that many programs per output tile, for more
loads in flight at once: the 1.7B down projection's 2048 outputs and 12 K steps of 512 made 512 programs of 12
dependent loads each (47 % of the copy bandwidth on the H200, cuBLAS 48 %). Left out since: 32x128, 32x256 and
16x256 without PREFETCH: on the H200 the slowest, or never the fastest, at every projection of both models."""
MAX_SPLIT_K = max(tile.kwargs["SPLIT_K"] for tile in GPU_CONFIGS)


@triton.jit
def _input_tile(x_ptr, residual_ptr, norm_weight_ptr, inv_rms, k_start, K: tl.constexpr, dtype: tl.constexpr,
                PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, BLOCK_K: tl.constexpr):
    """Values k_start... of the input the unfused model would have handed the projection, in fp32."""
    offs_k = k_start + tl.arange(0, BLOCK_K)
    k_mask = offs_k < K
    x = tl.load(x_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
    if PROLOGUE == 1:
        if HAS_RESIDUAL:
            x = round_to(x + tl.load(residual_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32), dtype)
        norm_weight = tl.load(norm_weight_ptr + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        x = round_to(norm_weight * round_to(x * inv_rms, dtype), dtype)
    elif PROLOGUE == 2:
        up = tl.load(x_ptr + K + offs_k, mask=k_mask, other=0.0).to(tl.float32)
        x = round_to(round_to(x / (1.0 + tl.exp(-x)), dtype) * up, dtype)
    return x


@triton.jit
def _weight_tile(weight_ptr, offs_n, n_mask, stride_w, k_start, k_end, BLOCK_K: tl.constexpr):
    offs_k = k_start + tl.arange(0, BLOCK_K)
    return tl.load(weight_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :],
                   mask=n_mask[:, None] & (offs_k < k_end)[None, :], other=0.0)


@triton.jit
def _store_output(out_ptr, bias_ptr, y, offs_n, n_mask, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, y.to(out_ptr.dtype.element_ty), mask=n_mask)


@triton.jit
def _gemv_kernel(
    x_ptr, residual_ptr, norm_weight_ptr, weight_ptr, bias_ptr, out_ptr, residual_out_ptr, partials_ptr,
    counters_ptr, eps, N, stride_w,
    K: tl.constexpr, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
    SPLIT_K: tl.constexpr, PDL: tl.constexpr,
):
    """Program (n tile, split): the output features of its n tile over K steps [split * K_STEPS, ...) of the row."""
    pid = tl.program_id(0)
    dtype = out_ptr.dtype.element_ty
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    K_STEPS: tl.constexpr = (K + SPLIT_K * BLOCK_K - 1) // (SPLIT_K * BLOCK_K) * BLOCK_K
    if SPLIT_K == 1:
        k_begin = 0
        k_end = K
    else:
        k_begin = tl.program_id(1) * K_STEPS
        k_end = tl.minimum(k_begin + K_STEPS, K)
    w = _weight_tile(weight_ptr, offs_n, n_mask, stride_w, k_begin, k_end, BLOCK_K)  # (with PDL: while the kernel
    wait_for_earlier_kernels(PDL)                                                    # before ends)
    inv_rms = 0.0
    if PROLOGUE == 1:  # the row's norm (and residual sum), as kernels/rms_norm.py computes it
        offs = tl.arange(0, BLOCK_ROW)
        row = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            row = round_to(row + tl.load(residual_ptr + offs, mask=offs < K, other=0.0).to(tl.float32), dtype)
            if (pid == 0) & (tl.program_id(1) == 0):
                tl.store(residual_out_ptr + offs, row.to(dtype), mask=offs < K)
        inv_rms = tl.rsqrt(tl.sum(row * row, axis=0) / K + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for step in range(0, K_STEPS, BLOCK_K):
        k_start = k_begin + step
        x = _input_tile(x_ptr, residual_ptr, norm_weight_ptr, inv_rms, k_start, K, dtype, PROLOGUE,
                        HAS_RESIDUAL, BLOCK_K)
        if PREFETCH:  # (past the split's end the load is masked off: no memory traffic)
            next_w = _weight_tile(weight_ptr, offs_n, n_mask, stride_w, k_start + BLOCK_K, k_end, BLOCK_K)
            acc += w.to(tl.float32) * x[None, :]
            w = next_w
        else:
            acc += w.to(tl.float32) * x[None, :]
            w = _weight_tile(weight_ptr, offs_n, n_mask, stride_w, k_start + BLOCK_K, k_end, BLOCK_K)
    y = tl.sum(acc, axis=1)
    if SPLIT_K == 1:
        _store_output(out_ptr, bias_ptr, y, offs_n, n_mask, HAS_BIAS)
    else:  # the last of the n tile's splits to arrive sums their partial products, in split order
        tl.store(partials_ptr + tl.program_id(1) * N + offs_n, y, mask=n_mask)
        # Every thread's partial stores come before the arrival, whose release makes them visible to the program
        # that sees the last arrival (its acquire), as kernels/decode_attention.py's splits merge themselves.
        tl.debug_barrier()
        arrived = tl.atomic_add(counters_ptr + pid, 1, sem="acq_rel", scope="gpu")
        if arrived == SPLIT_K - 1:
            tl.store(counters_ptr + pid, 0)  # ready for the next launch
            y = tl.zeros([BLOCK_N], tl.float32)
            for split in tl.static_range(SPLIT_K):  # (L1 skipped: other programs just wrote them)
                y += tl.load(partials_ptr + split * N + offs_n, mask=n_mask, other=0.0, cache_modifier=".cg")
            _store_output(out_ptr, bias_ptr, y, offs_n, n_mask, HAS_BIAS)


def tiles(split: bool) -> list[triton.Config]:
    """The GPU tiles a launch may use: the split ones only given arrival counters."""
    return [tile for tile in GPU_CONFIGS if split or tile.kwargs["SPLIT_K"] == 1]


if INTERPRETED:
    AUTOTUNED = {split: triton.autotune([INTERPRETED_SPLIT_CONFIG if split else INTERPRETED_CONFIG], key=[])(
        _gemv_kernel) for split in (False, True)}
else:
    AUTOTUNED = dict.fromkeys((False, True), triton.autotune(
        tiles(split=False), key=["N", "K", "PROLOGUE", "HAS_RESIDUAL", "PDL"],
        do_bench=functools.partial(triton.testing.do_bench, warmup=5, rep=25))(_gemv_kernel))
"""The kernel autotuned for shapes without a served tile (tuned on first use, short timings keeping it quick), by
whether the launch has arrival counters. On a GPU over the unsplit tiles only: split ones serve through start-up's
replays (engine/gemv_tiles.py), and tuned launch by launch they would cost compiles for shapes whose weights sit in
the L2, where they gain nothing. The interpreter runs a split tile given counters, so that CPU tests cover it.
``AUTOTUNED[split].best_config``: the last autotuned launch's tile."""

ShapeKey = tuple[int, int, int, torch.dtype, bool, bool]
"""(N, K, prologue, weight dtype, PDL, split): what a served tile is chosen for (launched with PDL, a program loads
its first weight tile before it waits for the kernel before: another tile may win; split: the launch has arrival
counters, so split tiles may serve it)."""
_served_tiles: dict[ShapeKey, triton.Config] = {}
_recorded: list["Launch"] | None = None


@dataclasses.dataclass
class Launch:
    """One ``gemv`` call's kernel arguments (its tensors kept alive), to launch again with any tile."""

    args: tuple
    constexprs: dict
    n: int
    split: bool
    """Arrival counters given: split tiles may serve."""

    @property
    def key(self) -> ShapeKey:
        constexprs = self.constexprs
        return self.n, constexprs["K"], constexprs["PROLOGUE"], self.weight.dtype, constexprs["PDL"], self.split

    @property
    def weight(self) -> torch.Tensor:
        return self.args[3]

    @property
    def tiles(self) -> list[triton.Config]:
        return tiles(self.split)

    def run(self, tile: triton.Config | None) -> None:
        """Launches with ``tile``; None: the autotuner's."""
        n = self.n
        if tile is None:
            AUTOTUNED[self.split][lambda meta: (triton.cdiv(n, meta["BLOCK_N"]), meta["SPLIT_K"])](
                *self.args, **self.constexprs)
            return
        _gemv_kernel[self._grid(tile)](*self.args, **self.constexprs, **tile.kwargs, num_warps=tile.num_warps,
                                       num_stages=tile.num_stages)

    def compile(self, tile: triton.Config) -> None:
        """Compiles the kernel ``run(tile)`` launches, without launching it."""
        _gemv_kernel.warmup(*self.args, grid=self._grid(tile), **self.constexprs, **tile.kwargs,
                            num_warps=tile.num_warps, num_stages=tile.num_stages)

    def _grid(self, tile: triton.Config) -> tuple[int, int]:
        if tile.kwargs["SPLIT_K"] > 1 and not self.split:
            raise ValueError(f"the tile {tile_name(tile)} splits K: it needs split_counters")
        return triton.cdiv(self.n, tile.kwargs["BLOCK_N"]), tile.kwargs["SPLIT_K"]


@contextlib.contextmanager
def recording() -> Iterator[list[Launch]]:
    """Collects the launches of the ``gemv`` calls made inside, each run with ``GPU_CONFIGS[0]`` (no autotuning)."""
    global _recorded
    _recorded = launches = []
    try:
        yield launches
    finally:
        _recorded = None


def tile_name(tile: triton.Config) -> str:
    name = f"{tile.kwargs['BLOCK_N']}x{tile.kwargs['BLOCK_K']} warps {tile.num_warps}"
    name += " prefetch" if tile.kwargs["PREFETCH"] else ""
    return name + f" split {tile.kwargs['SPLIT_K']}" if tile.kwargs["SPLIT_K"] > 1 else name


def serve_tile(key: ShapeKey, tile: triton.Config) -> None:
    """Later ``gemv`` calls of shape ``key`` launch ``tile``."""
    _served_tiles[key] = tile


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prologue: str,
                  residual: torch.Tensor | None, norm_weight: torch.Tensor | None) -> int:
    """The row length K the product needs (x holds 2K values for silu_and_mul)."""
    if prologue not in PROLOGUES:
        raise ValueError(f"gemv prologue must be one of {tuple(PROLOGUES)}, got {prologue!r}")
    if x.dim() != 2 or x.shape[0] != 1 or not x.is_contiguous():
        raise ValueError(f"gemv takes one contiguous row x [1, K], got {tuple(x.shape)} strides {x.stride()}")
    k = x.shape[1] // 2 if prologue == "silu_and_mul" else x.shape[1]
    if weight.dim() != 2 or weight.shape[1] != k or weight.stride(1) != 1 or weight.dtype != x.dtype:
        raise ValueError(f"weight must be [N, {k}] with contiguous rows in {x.dtype}, got {tuple(weight.shape)} "
                         f"{weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [{weight.shape[0]}], got {tuple(bias.shape)}")
    if (prologue == "rms_norm") != (norm_weight is not None) or (residual is not None and prologue != "rms_norm"):
        raise ValueError("norm_weight (and optionally residual) go with the 'rms_norm' prologue, and only with it")
    if norm_weight is not None and norm_weight.shape != (k,):
        raise ValueError(f"norm_weight must be [{k}], got {tuple(norm_weight.shape)}")
    if residual is not None and (residual.shape != x.shape or not residual.is_contiguous()):
        raise ValueError(f"residual must be contiguous like x {tuple(x.shape)}, got {tuple(residual.shape)}")
    return k


def launch_arguments(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, prologue: str,
                     residual: torch.Tensor | None, norm_weight: torch.Tensor | None, eps: float,
                     out: torch.Tensor, residual_out: torch.Tensor, split_counters: torch.Tensor | None,
                     pdl: bool = False) -> Launch:
    """The kernel's arguments, constexprs (all but the tile) and launch options for ``gemv``'s inputs and outputs."""
    k = _check_inputs(x, weight, bias, prologue, residual, norm_weight)
    n = weight.shape[0]
    check_split_counters(split_counters, n, x.device, per="output features")
    # The split tiles' partial products, fp32 [splits, N] (an unsplit launch reads neither: stand-ins).
    partials = torch.empty(MAX_SPLIT_K, n, dtype=torch.float32, device=x.device) if split_counters is not None else out
    args = (x, residual if residual is not None else x, norm_weight if norm_weight is not None else x, weight,
            bias if bias is not None else weight, out, residual_out, partials,
            split_counters if split_counters is not None else out, eps, n, weight.stride(0))
    constexprs = dict(K=k, PROLOGUE=PROLOGUES[prologue], HAS_RESIDUAL=residual is not None,
                      HAS_BIAS=bias is not None, BLOCK_ROW=triton.next_power_of_2(k), PDL=pdl, **launch_options(pdl))
    return Launch(args, constexprs, n, split_counters is not None)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, prologue: str = "none",
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
         pdl: bool = False, tile: triton.Config | None = None, split_counters: torch.Tensor | None = None,
         ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``prologue(x) @ weight.T + bias`` for one row ``x`` [1, K] ([1, 2K] for silu_and_mul) → [1, N]; with the
    rms_norm prologue, (that, the residual stream: ``residual + x``, or ``x`` itself without ``residual``), as
    ``RMSNorm.forward`` returns them. ``pdl``: launched with programmatic dependent launch (kernels/pdl.py).
    ``tile``: one of ``GPU_CONFIGS`` instead of the served or autotuned one (the benchmarks' tile sweep).
    ``split_counters``: int32 zeros, at least N of them (left zero again), which no other launch uses at the same
    time; given, tiles that split K among several programs per output tile may serve, the last to arrive summing
    their partial products in a fixed order."""
    out = torch.empty((1, weight.shape[0]), dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(x) if residual is not None else x
    launch = launch_arguments(x, weight, bias, prologue, residual, norm_weight, eps, out, residual_out, split_counters,
                              pdl)
    if _recorded is not None:
        _recorded.append(launch)
        tile = tile or GPU_CONFIGS[0]
    launch.run(tile or _served_tiles.get(launch.key))
    return (out, residual_out) if prologue == "rms_norm" else out


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, prologue: str = "none",
                   residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                   split_counters: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The unfused ops: the prologue's reference, then ``F.linear`` (``split_counters`` unused)."""
    _check_inputs(x, weight, bias, prologue, residual, norm_weight)
    if prologue == "silu_and_mul":
        return F.linear(silu_and_mul_reference(x), weight, bias)
    if prologue == "none":
        return F.linear(x, weight, bias)
    normed, stream = rms_norm_reference(x, norm_weight, eps, residual) if residual is not None else \
        (rms_norm_reference(x, norm_weight, eps), x)
    return F.linear(normed, weight, bias), stream
