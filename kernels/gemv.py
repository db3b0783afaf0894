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
of the one before: two in flight per program instead of one.

On a GPU the runner chooses the tile of each (N, K, prologue, dtype) by timing its step's own launches replayed from
CUDA graphs (engine/gemv_tiles.py, through ``recording`` and ``serve_tile``); shapes without one are autotuned launch
by launch. The runner uses these kernels only if a batch-1 decode step replays faster with them than with cuBLAS
(``ModelRunner`` times both at start-up).
"""
import contextlib
import dataclasses
import functools
import os
from typing import Iterator

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from relaykern.kernels.activation import silu_and_mul_reference
from relaykern.kernels.pdl import launch_options, wait_for_earlier_kernels
from relaykern.kernels.rms_norm import rms_norm_reference
from relaykern.kernels.rope import round_to

PROLOGUES = {"none": 0, "rms_norm": 1, "silu_and_mul": 2}
PROLOGUE_NAMES = {code: name for name, code in PROLOGUES.items()}
INTERPRETED_CONFIG = triton.Config({"BLOCK_N": 4, "BLOCK_K": 32, "PREFETCH": 0})
GPU_CONFIGS = [triton.Config({"BLOCK_N": n, "BLOCK_K": k, "PREFETCH": prefetch}, num_warps=warps, num_stages=3)
               for n, k, warps, prefetch in ((4, 512, 4, 0), (8, 256, 4, 0), (8, 512, 4, 0), (16, 256, 4, 0),
                                             (32, 128, 4, 0), (16, 512, 8, 0), (32, 256, 8, 0), (4, 512, 4, 1),
                                             (8, 256, 4, 1), (8, 512, 4, 1), (16, 256, 4, 1), (2, 2048, 4, 0),
                                             (4, 1024, 4, 0), (4, 2048, 8, 0))]
"""The tiles tried on a GPU: 1-8K weights per program step, up to 32 fp32 accumulators and 32 weights per thread
(64 with PREFETCH: two tiles in registers; tests/test_kernels_compile.py compiles each for sm_90 and checks that
none spills). The long rows (BLOCK_K 1024, 2048) load a 1.7B projection's row slice in one to three steps (K 2048
or 6144), the first before the PDL wait: with the H200's measured tiles every program held ~4 KB in flight, and the
o and down projections (8 and 25 MB) read at 1.7 and 2.0 TB/s: latency-bound."""


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
def _weight_tile(weight_ptr, offs_n, n_mask, stride_w, k_start, K: tl.constexpr, BLOCK_K: tl.constexpr):
    offs_k = k_start + tl.arange(0, BLOCK_K)
    return tl.load(weight_ptr + offs_n[:, None].to(tl.int64) * stride_w + offs_k[None, :],
                   mask=n_mask[:, None] & (offs_k < K)[None, :], other=0.0)


@triton.jit
def _gemv_kernel(
    x_ptr, residual_ptr, norm_weight_ptr, weight_ptr, bias_ptr, out_ptr, residual_out_ptr, eps, N, stride_w,
    K: tl.constexpr, PROLOGUE: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_ROW: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PREFETCH: tl.constexpr,
    PDL: tl.constexpr,
):
    pid = tl.program_id(0)
    dtype = out_ptr.dtype.element_ty
    offs_n = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    w = _weight_tile(weight_ptr, offs_n, n_mask, stride_w, 0, K, BLOCK_K)  # (with PDL: while the kernel before ends)
    wait_for_earlier_kernels(PDL)
    inv_rms = 0.0
    if PROLOGUE == 1:  # the row's norm (and residual sum), as kernels/rms_norm.py computes it
        offs = tl.arange(0, BLOCK_ROW)
        row = tl.load(x_ptr + offs, mask=offs < K, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            row = round_to(row + tl.load(residual_ptr + offs, mask=offs < K, other=0.0).to(tl.float32), dtype)
            if pid == 0:
                tl.store(residual_out_ptr + offs, row.to(dtype), mask=offs < K)
        inv_rms = tl.rsqrt(tl.sum(row * row, axis=0) / K + eps)
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k_start in range(0, K, BLOCK_K):
        x = _input_tile(x_ptr, residual_ptr, norm_weight_ptr, inv_rms, k_start, K, dtype, PROLOGUE,
                        HAS_RESIDUAL, BLOCK_K)
        if PREFETCH:  # (past K the load is masked off: no memory traffic)
            next_w = _weight_tile(weight_ptr, offs_n, n_mask, stride_w, k_start + BLOCK_K, K, BLOCK_K)
            acc += w.to(tl.float32) * x[None, :]
            w = next_w
        else:
            acc += w.to(tl.float32) * x[None, :]
            w = _weight_tile(weight_ptr, offs_n, n_mask, stride_w, k_start + BLOCK_K, K, BLOCK_K)
    y = tl.sum(acc, axis=1)
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs_n, y.to(dtype), mask=n_mask)


_INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
# Shapes without a served tile, tuned on first use: short timings keep it quick (~11 configs per shape).
_gemv = (triton.autotune([INTERPRETED_CONFIG], key=[]) if _INTERPRETED else
         triton.autotune(GPU_CONFIGS, key=["N", "K", "PROLOGUE", "HAS_RESIDUAL", "PDL"],
                         do_bench=functools.partial(triton.testing.do_bench, warmup=5, rep=25)))(_gemv_kernel)

ShapeKey = tuple[int, int, int, torch.dtype, bool]
"""(N, K, prologue, weight dtype, PDL): what a served tile is chosen for (launched with PDL, a program loads its
first weight tile before it waits for the kernel before: another tile may win)."""
_served_tiles: dict[ShapeKey, triton.Config] = {}
_recorded: list["Launch"] | None = None


@dataclasses.dataclass
class Launch:
    """One ``gemv`` call's kernel arguments (its tensors kept alive), to launch again with any tile."""

    args: tuple
    constexprs: dict

    @property
    def key(self) -> ShapeKey:
        constexprs = self.constexprs
        return self.args[8], constexprs["K"], constexprs["PROLOGUE"], self.weight.dtype, constexprs["PDL"]

    @property
    def weight(self) -> torch.Tensor:
        return self.args[3]

    def run(self, tile: triton.Config | None) -> None:
        """Launches with ``tile``; None: the autotuner's."""
        n = self.args[8]
        if tile is None:
            _gemv[lambda meta: (triton.cdiv(n, meta["BLOCK_N"]),)](*self.args, **self.constexprs)
        else:
            _gemv_kernel[(triton.cdiv(n, tile.kwargs["BLOCK_N"]),)](
                *self.args, **self.constexprs, **tile.kwargs, num_warps=tile.num_warps, num_stages=tile.num_stages)


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
    return name + " prefetch" if tile.kwargs["PREFETCH"] else name


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
                     out: torch.Tensor, residual_out: torch.Tensor, pdl: bool = False) -> tuple[tuple, dict]:
    """The kernel's positional arguments, constexprs (all but the tile) and launch options for ``gemv``'s inputs and
    outputs."""
    k = _check_inputs(x, weight, bias, prologue, residual, norm_weight)
    args = (x, residual if residual is not None else x, norm_weight if norm_weight is not None else x, weight,
            bias if bias is not None else weight, out, residual_out, eps, weight.shape[0], weight.stride(0))
    constexprs = dict(K=k, PROLOGUE=PROLOGUES[prologue], HAS_RESIDUAL=residual is not None,
                      HAS_BIAS=bias is not None, BLOCK_ROW=triton.next_power_of_2(k), PDL=pdl, **launch_options(pdl))
    return args, constexprs


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, prologue: str = "none",
         residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
         pdl: bool = False, tile: triton.Config | None = None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``prologue(x) @ weight.T + bias`` for one row ``x`` [1, K] ([1, 2K] for silu_and_mul) → [1, N]; with the
    rms_norm prologue, (that, the residual stream: ``residual + x``, or ``x`` itself without ``residual``), as
    ``RMSNorm.forward`` returns them. ``pdl``: launched with programmatic dependent launch (kernels/pdl.py).
    ``tile``: one of ``GPU_CONFIGS`` instead of the served or autotuned one (the benchmarks' tile sweep)."""
    out = torch.empty((1, weight.shape[0]), dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(x) if residual is not None else x
    launch = Launch(*launch_arguments(x, weight, bias, prologue, residual, norm_weight, eps, out, residual_out, pdl))
    if _recorded is not None:
        _recorded.append(launch)
        tile = tile or GPU_CONFIGS[0]
    launch.run(tile or _served_tiles.get(launch.key))
    return (out, residual_out) if prologue == "rms_norm" else out


def gemv_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, prologue: str = "none",
                   residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None, eps: float = 1e-6,
                   ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The unfused ops: the prologue's reference, then ``F.linear``."""
    _check_inputs(x, weight, bias, prologue, residual, norm_weight)
    if prologue == "silu_and_mul":
        return F.linear(silu_and_mul_reference(x), weight, bias)
    if prologue == "none":
        return F.linear(x, weight, bias)
    normed, stream = rms_norm_reference(x, norm_weight, eps, residual) if residual is not None else \
        (rms_norm_reference(x, norm_weight, eps), x)
    return F.linear(normed, weight, bias), stream
