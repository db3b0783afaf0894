"""Every Triton kernel compiles for sm_90 (H100/H200) with the launch parameters its launcher really passes.

The interpreter accepts code the compiler rejects, so CPU tests alone cannot tell that the kernels build on a GPU.
Here each case calls a real launcher (paged_attention, store_kv, the norms, detect_commands, ...) on
CPU tensors with its kernels swapped for stand-ins: ``kernel[grid](*args, **kwargs)`` becomes ``kernel.warmup(...)``
for a CUDA sm_90 target, i.e. the exact signature, pointer/int specialization, constexprs and num_warps/num_stages the
launch would compile, lowered to a cubin by the ptxas bundled with Triton. No GPU is needed.

Why a child process: TRITON_INTERPRET (set by conftest without CUDA) acts at *import*: under it every @triton.jit,
triton.language's own (tl.cdiv, tl.sum, ...) included, is an InterpretedFunction, which the compiler cannot lower.
So the compiles run in this file executed as a script, without TRITON_INTERPRET and with TRITON_CACHE_DIR in a
tmp dir, on two processes (one per core). Without a CUDA backend or ptxas the whole file is skipped.
"""
from __future__ import annotations

import importlib
import itertools
import json
import math
import os
import pkgutil
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import triton
from filelock import FileLock

import relaykern.kernels
from relaykern.kernels import (activation, attention, attention_common, detect, gemv, inject, rms_norm, rope, sample,
                               store_kv)
from relaykern.kernels.extend_attention import choose_extend_tile

TARGET = ("cuda", 90, 32)  # H100 / H200
H100_SMS = 132  # choose_num_splits sizes the split-KV grid by the SM count
H100_MAX_SHARED = 227 * 1024  # opt-in dynamic shared memory per block on sm_90
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128)
BLOCK_SIZES = (16, 32, 256)
GROUPS = (1, 2, 4, 8)  # Qwen3-0.6B/1.7B: 16 q / 8 kv heads; 4B/8B: 32 / 8
NUM_KV_HEADS = 8
SHORT_CONTEXT, LONG_CONTEXT = 300, 4096  # one split / several splits on an H100 at these batch sizes
QWEN3_VOCAB_SIZE = 151936
CHILD_TIMEOUT_S = 300


@dataclass(frozen=True)
class Case:
    id: str
    launcher: str  # a key of LAUNCHERS
    params: dict


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _extend_query_lengths(dtype: torch.dtype) -> list[tuple[int, int]]:
    """(group, max_q_len): for every group, the shortest max_q_len giving each tile choose_extend_tile returns for
    ``dtype`` (from 2: paged_attention sends max_q_len 1 to the decode kernel)."""
    first_q_len = {}
    for group, max_q_len in itertools.product(GROUPS, range(2, 257)):
        first_q_len.setdefault((group, choose_extend_tile(max_q_len, group, dtype)), max_q_len)
    return [(group, max_q_len) for (group, _tile), max_q_len in first_q_len.items()]


def _extend_tile(case: Case) -> tuple[int, int, int]:
    """(group, BLOCK_M, BLOCK_Q) the launcher picks for an extend case."""
    params = case.params
    return (params["group"], *choose_extend_tile(max(params["q_lens"]), params["group"], params["dtype"]))


def _cases() -> list[Case]:
    cases = []
    for i, (dtype, head_dim) in enumerate(itertools.product(DTYPES, HEAD_DIMS)):
        slot_dtype = (torch.int64, torch.int32)[i % 2]
        cases.append(Case(f"store_kv-{_name(dtype)}-d{head_dim}-{_name(slot_dtype)}", "store_kv",
                          dict(dtype=dtype, head_dim=head_dim, num_kv_heads=NUM_KV_HEADS, num_q_heads=32,
                               slot_dtype=slot_dtype)))
    # Decode: every dtype x head_dim, short (1 split) and long (several) contexts; block size, group, batch rotate.
    combos = itertools.product(DTYPES, HEAD_DIMS, (SHORT_CONTEXT, LONG_CONTEXT))
    for i, (dtype, head_dim, context) in enumerate(combos):
        block_size, group, num_seqs = BLOCK_SIZES[i % 3], GROUPS[i % 4], (1, 3, 16)[i % 3]
        cases.append(Case(f"decode-{_name(dtype)}-d{head_dim}-bs{block_size}-g{group}-b{num_seqs}-ctx{context}",
                          "attention", dict(dtype=dtype, head_dim=head_dim, block_size=block_size, group=group,
                                            q_lens=(1,) * num_seqs, context=context)))
    # Extend: every (BLOCK_M, BLOCK_Q) choose_extend_tile returns for each group, 16-bit and fp32 (whose tiles are
    # smaller); the largest tiles (most shared memory and registers) at head_dim 128. Block size, batch, context
    # and the 16-bit dtype rotate.
    extend = [(dtype, group, q) for dtype in (torch.bfloat16, torch.float32)
              for group, q in _extend_query_lengths(dtype)]
    for i, (tile_dtype, group, max_q_len) in enumerate(extend):
        block_m, block_q = choose_extend_tile(max_q_len, group, tile_dtype)
        largest = block_m == choose_extend_tile(256, group, tile_dtype)[0]
        sixteen_bit = DTYPES[1 + (GROUPS.index(group) if largest else i) % 2]  # largest tiles: both 16-bit dtypes
        dtype = tile_dtype if tile_dtype == torch.float32 else sixteen_bit
        head_dim = 128 if largest else HEAD_DIMS[i % 2]
        block_size, context = BLOCK_SIZES[i % 3], (SHORT_CONTEXT, LONG_CONTEXT)[i // 2 % 2] + max_q_len
        q_lens = (max_q_len,) if i % 2 else (max_q_len, 1, (max_q_len + 1) // 2)
        cases.append(Case(f"extend-{_name(dtype)}-d{head_dim}-bs{block_size}-g{group}-m{block_m}q{block_q}"
                          f"-b{len(q_lens)}-ctx{context}", "attention",
                          dict(dtype=dtype, head_dim=head_dim, block_size=block_size, group=group, q_lens=q_lens,
                               context=context)))
    # The tiny test models the GPU engine tests load: fp32, head_dim 16, 4 q / 2 kv heads.
    tiny = dict(dtype=torch.float32, head_dim=16, block_size=16, num_kv_heads=2, group=2, context=40)
    # A one-block table: its row stride 1 is specialized to a constant, as at launch.
    cases.append(Case("tiny-decode-one-block", "attention", dict(tiny, q_lens=(1, 1), context=12)))
    cases.append(Case("tiny-decode-rope-self-merge", "attention", dict(tiny, q_lens=(1, 1), self_merge=True,
                                                                      from_projections=True)))
    cases.append(Case("tiny-extend", "attention", dict(tiny, q_lens=(7, 1))))
    # As the model calls them (from the raw projections: norm, RoPE and the K/V store in the decode kernel), the
    # decode splits merging themselves: every dtype and group, split; with and without the per-head norm.
    for i, (dtype, group) in enumerate(itertools.product(DTYPES, GROUPS)):
        cases.append(Case(f"decode-rope-self-merge-{_name(dtype)}-g{group}", "attention", dict(
            dtype=dtype, head_dim=HEAD_DIMS[i % 2], block_size=16, group=group, q_lens=(1,) * (1 + i % 3),
            context=LONG_CONTEXT, self_merge=True, from_projections=True, with_norm=i % 2 == 0)))
    cases.append(Case("decode-rope-merge-kernel", "attention", dict(
        dtype=torch.bfloat16, head_dim=128, block_size=16, group=2, q_lens=(1,), context=LONG_CONTEXT,
        from_projections=True)))
    cases.append(Case("tiny-store_kv", "store_kv", dict(dtype=torch.float32, head_dim=16, num_kv_heads=2,
                                                        num_q_heads=4, slot_dtype=torch.int64)))
    # The layers' elementwise kernels at Qwen3-1.7B / 8B widths in bf16, and the tiny models' in fp32.
    for dtype, hidden, intermediate, heads, head_dim in ((torch.bfloat16, 2048, 6144, (16, 8), 128),
                                                         (torch.bfloat16, 4096, 12288, (32, 8), 128),
                                                         (torch.float32, 64, 128, (4, 2), 16)):
        for residual in (False, True):
            cases.append(Case(f"rms_norm-{_name(dtype)}-h{hidden}-residual{int(residual)}", "rms_norm",
                              dict(dtype=dtype, hidden=hidden, residual=residual)))
        for with_norm in (True, False):
            cases.append(Case(f"qk_norm_rope_store-{_name(dtype)}-h{heads[0]}x{heads[1]}-d{head_dim}-"
                              f"norm{int(with_norm)}", "qk_norm_rope_store",
                              dict(dtype=dtype, heads=heads, head_dim=head_dim, with_norm=with_norm)))
        cases.append(Case(f"silu_and_mul-{_name(dtype)}-i{intermediate}", "silu_and_mul",
                          dict(dtype=dtype, intermediate=intermediate)))
    # The batch-1 projections: every tile the GPU autotuner may pick, at Qwen3-1.7B widths (and one 8B case each);
    # the tiny models' fp32 with the largest tile.
    gemv_shapes = [("rms_norm", 2048, 4096, True, False), ("none", 2048, 2048, False, False),
                   ("silu_and_mul", 6144, 2048, False, False)]
    for (prologue, k, n, residual, bias), index in itertools.product(gemv_shapes, range(len(gemv.GPU_CONFIGS))):
        cases.append(Case(f"gemv-bf16-{prologue}-k{k}-n{n}-tile{index}", "gemv", dict(
            dtype=torch.bfloat16, prologue=prologue, k=k, n=n, residual=residual, bias=bias, tile=index)))
    for prologue, k, n, residual, bias in [("rms_norm", 4096, 6144, True, True), ("silu_and_mul", 12288, 4096, False,
                                                                                   False)]:
        cases.append(Case(f"gemv-bf16-{prologue}-k{k}-n{n}-bias{int(bias)}", "gemv", dict(
            dtype=torch.bfloat16, prologue=prologue, k=k, n=n, residual=residual, bias=bias, tile=-1)))
    for prologue, k in (("rms_norm", 64), ("none", 64), ("silu_and_mul", 128)):
        cases.append(Case(f"gemv-fp32-{prologue}-k{k}", "gemv", dict(
            dtype=torch.float32, prologue=prologue, k=k, n=192, residual=True, bias=True, tile=-1)))
    # Each kernel that takes PDL, launched with it (kernels/pdl.py), at Qwen3-1.7B widths in bf16.
    bf16_1p7b = dict(dtype=torch.bfloat16, head_dim=128, block_size=16, group=2)
    cases += [Case("pdl-decode-split", "attention", dict(bf16_1p7b, q_lens=(1,), context=LONG_CONTEXT, pdl=True)),
              Case("pdl-decode-rope-self-merge", "attention", dict(bf16_1p7b, q_lens=(1,), context=LONG_CONTEXT,
                                                                   pdl=True, self_merge=True, from_projections=True)),
              Case("pdl-extend", "attention", dict(bf16_1p7b, q_lens=(16, 1), context=SHORT_CONTEXT, pdl=True)),
              Case("pdl-rms_norm", "rms_norm", dict(dtype=torch.bfloat16, hidden=2048, residual=True, pdl=True)),
              Case("pdl-qk_norm_rope_store", "qk_norm_rope_store", dict(dtype=torch.bfloat16, heads=(16, 8),
                                                                        head_dim=128, with_norm=True, pdl=True)),
              Case("pdl-silu_and_mul", "silu_and_mul", dict(dtype=torch.bfloat16, intermediate=6144, pdl=True))]
    for prologue, k, n, residual, bias in gemv_shapes:
        cases.append(Case(f"pdl-gemv-{prologue}", "gemv", dict(dtype=torch.bfloat16, prologue=prologue, k=k, n=n,
                                                               residual=residual, bias=bias, tile=0, pdl=True)))
    for batch in (1, 48):
        cases.append(Case(f"detect-b{batch}", "detect", dict(batch=batch)))
    for rows, block_size in ((1, 16), (40, 256)):
        cases.append(Case(f"inject-rows{rows}-bs{block_size}", "inject", dict(rows=rows, block_size=block_size)))
    for rows, want_logprobs in itertools.product((1, 64), (False, True)):
        cases.append(Case(f"sample-r{rows}-v{QWEN3_VOCAB_SIZE}-logprobs{int(want_logprobs)}", "sample",
                          dict(rows=rows, want_logprobs=want_logprobs)))
    return cases


CASES = _cases()


def _launch_store_kv(dtype, head_dim, num_kv_heads, num_q_heads, slot_dtype) -> None:
    # As the model passes them: k contiguous (after k_norm and rope), v a view of the fused qkv projection.
    tokens = 5
    qkv = torch.zeros(tokens, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    value = qkv[:, (num_q_heads + num_kv_heads) * head_dim:].view(tokens, num_kv_heads, head_dim)
    key = torch.zeros(tokens, num_kv_heads, head_dim, dtype=dtype)
    kv_cache = torch.zeros(2, 2, 16, num_kv_heads, head_dim, dtype=dtype)
    store_kv.store_kv(key, value, kv_cache, torch.arange(tokens, dtype=slot_dtype))


def _launch_attention(dtype, head_dim, block_size, group, q_lens, context, num_kv_heads=NUM_KV_HEADS,
                      pdl=False, self_merge=False, from_projections=False, with_norm=True) -> None:
    # num_splits is left to choose_num_splits (with an H100's SM count); max_q_len picks decode or extend.
    max_blocks = math.ceil(context / block_size)
    q = torch.zeros(sum(q_lens), num_kv_heads * group, head_dim, dtype=dtype)
    kv_cache = torch.zeros(2, 2, block_size, num_kv_heads, head_dim, dtype=dtype)
    block_tables = torch.zeros(len(q_lens), max_blocks, dtype=torch.int32)
    seq_lens = torch.full((len(q_lens),), context, dtype=torch.int32)
    cu_seqlens_q = torch.tensor((0, *itertools.accumulate(q_lens)), dtype=torch.int32)
    if not from_projections:
        attention.paged_attention(q, kv_cache, block_tables, seq_lens, cu_seqlens_q, max(q_lens), head_dim ** -0.5,
                                  pdl=pdl)
        return
    split_counters = torch.zeros(len(q_lens) * num_kv_heads, dtype=torch.int32) if self_merge else None
    # As the model passes them: views of the fused qkv projection, int64 positions and slots.
    qkv = torch.zeros(sum(q_lens), (num_kv_heads * group + 2 * num_kv_heads) * head_dim, dtype=dtype)
    q, k, v = (t.view(sum(q_lens), -1, head_dim) for t in qkv.split(
        [num_kv_heads * group * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1))
    norms = (torch.ones(head_dim, dtype=dtype), torch.ones(head_dim, dtype=dtype)) if with_norm else ()
    new_kv = rope.NewKV(k, v, torch.zeros(sum(q_lens), dtype=torch.int64), torch.zeros(64, head_dim),
                                torch.zeros(sum(q_lens), dtype=torch.int64), *norms)
    attention.paged_rope_attention(q, new_kv, kv_cache, block_tables, seq_lens, cu_seqlens_q, max(q_lens),
                                   head_dim ** -0.5, split_counters, pdl=pdl)


def _launch_rms_norm(dtype, hidden, residual, pdl=False) -> None:
    x = torch.zeros(3, hidden, dtype=dtype)
    rms_norm.rms_norm(x, torch.ones(hidden, dtype=dtype), 1e-6, torch.zeros_like(x) if residual else None, pdl=pdl)


def _launch_qk_norm_rope_store(dtype, heads, head_dim, with_norm, pdl=False) -> None:
    # As the model passes them: q, k and v views of the fused qkv projection, int64 slots.
    num_q_heads, num_kv_heads = heads
    qkv = torch.zeros(3, (num_q_heads + 2 * num_kv_heads) * head_dim, dtype=dtype)
    q, k, v = qkv.split([num_q_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1)
    k, v = (t.view(3, num_kv_heads, head_dim) for t in (k, v))
    kv_cache = torch.zeros(2, 2, 16, num_kv_heads, head_dim, dtype=dtype)
    norms = (torch.ones(head_dim, dtype=dtype), torch.ones(head_dim, dtype=dtype), 1e-6) if with_norm else ()
    rope.qk_norm_rope_store(q.view(3, num_q_heads, head_dim), k, v, torch.zeros(3, dtype=torch.int64),
                            torch.zeros(64, head_dim), kv_cache, torch.arange(3), *norms, pdl=pdl)


def _launch_gemv(dtype, prologue, k, n, residual, bias, tile, pdl=False) -> None:
    # The autotuner launches the kernel itself with each config's tile: here one config per case.
    x = torch.zeros(1, 2 * k if prologue == "silu_and_mul" else k, dtype=dtype)
    norm = dict(residual=torch.zeros(1, k, dtype=dtype) if residual else None, norm_weight=torch.zeros(k, dtype=dtype)
                ) if prologue == "rms_norm" else {}
    gemv.gemv(x, torch.zeros(n, k, dtype=dtype), torch.zeros(n, dtype=dtype) if bias else None, prologue, pdl=pdl,
              tile=gemv.GPU_CONFIGS[tile], split_counters=torch.zeros(n, dtype=torch.int32), **norm)


def _launch_silu_and_mul(dtype, intermediate, pdl=False) -> None:
    activation.silu_and_mul(torch.zeros(3, 2 * intermediate, dtype=dtype), pdl=pdl)


def _launch_detect(batch) -> None:
    table = detect.DetectionTable(column_of_token=torch.zeros(64, dtype=torch.int32),
                                  records=torch.zeros(detect.NUM_STATES, 75, detect.RECORD, dtype=torch.int64))
    detect.detect_commands(torch.zeros(batch, dtype=torch.int64), torch.zeros(batch, dtype=torch.int32),
                           torch.zeros(batch, dtype=torch.int64), table)


def _launch_inject(rows, block_size) -> None:
    # As the runner packs them: tokens, row bounds and start positions slices of one int64 buffer.
    lengths = [3] * rows
    cu_rows = [0, *itertools.accumulate(lengths)]
    packed = torch.zeros(cu_rows[-1] + 2 * rows + 1, dtype=torch.int64)
    block_tables = torch.zeros(rows, 4, dtype=torch.int32)
    inject.inject_tokens(packed[:cu_rows[-1]], torch.tensor(cu_rows, dtype=torch.int32),
                         torch.zeros(rows, dtype=torch.int32), block_tables, block_size)


def _launch_sample(rows, want_logprobs) -> None:
    sample.gumbel_sample(torch.zeros(rows, QWEN3_VOCAB_SIZE), torch.ones(rows), torch.zeros(rows, dtype=torch.int64),
                         want_logprobs)


LAUNCHERS = {"store_kv": _launch_store_kv, "attention": _launch_attention, "rms_norm": _launch_rms_norm,
             "qk_norm_rope_store": _launch_qk_norm_rope_store, "silu_and_mul": _launch_silu_and_mul,
             "detect": _launch_detect, "inject": _launch_inject, "sample": _launch_sample, "gemv": _launch_gemv}


def _kernel_modules() -> list:
    return [importlib.import_module(f"relaykern.kernels.{info.name}")
            for info in pkgutil.iter_modules(relaykern.kernels.__path__)]


def _kernels(module) -> dict[str, triton.runtime.jit.KernelInterface]:
    """A module's launchable kernels: its @triton.jit functions named *_kernel (the others are device helpers)."""
    return {name: value for name, value in vars(module).items()
            if isinstance(value, triton.runtime.jit.KernelInterface) and name.endswith("_kernel")}


# ---------------------------------------------------------------- child process: compile, do not launch

class _CudaTargetDriver:
    """The part of a Triton driver JITFunction.run needs for warmup: a current device, stream and sm_90 target."""

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int) -> int:
        return 0

    def get_current_target(self):
        return triton.backends.compiler.GPUTarget(*TARGET)


def _resources(cubin: bytes) -> dict:
    """Registers, and stack + local bytes (ptxas spills) per thread, from cuobjdump; None if it cannot run."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        try:
            usage = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-resource-usage", file.name],
                                   capture_output=True, text=True, check=True).stdout
        except (OSError, RuntimeError, subprocess.CalledProcessError):
            usage = ""
    fields = {name: int(value) for name, value in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage)}
    if len(fields) < 3:
        return {"registers": None, "spill_bytes": None}
    return {"registers": fields["REG"], "spill_bytes": fields["STACK"] + fields["LOCAL"]}


class _CompileOnLaunch:
    """Stands in for a kernel in its module: kernel[grid](*args, **kwargs) compiles it and records the result."""

    def __init__(self, name: str, kernel, launches: list) -> None:
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            start = time.perf_counter()
            compiled = self.kernel.warmup(*args, grid=grid, **kwargs)
            self.launches.append(dict(
                kernel=self.name, seconds=round(time.perf_counter() - start, 2), shared=compiled.metadata.shared,
                constexprs={k: v for k, v in kwargs.items() if k not in ("num_warps", "num_stages")},
                num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
                grid_dependency_wait="griddepcontrol.wait" in compiled.asm["ptx"],
                **_resources(compiled.asm["cubin"])))
        return launch


@triton.jit
def _probe_kernel(x_ptr, n, BLOCK: triton.language.constexpr):
    offsets = triton.language.arange(0, BLOCK)
    triton.language.store(x_ptr + offsets, offsets.to(triton.language.float32), mask=offsets < n)


def _target_sm90() -> str | None:
    """Makes sm_90 the compile target; why this Triton cannot compile for it here, if it cannot."""
    triton.runtime.driver.set_active(_CudaTargetDriver())
    try:
        _probe_kernel.warmup(torch.zeros(16), 16, grid=(1,), BLOCK=16)
    except Exception as error:  # noqa: BLE001 - any failure here is the environment's, reported as the skip reason
        return f"{type(error).__name__}: {error}"
    return None


def _compile_cases(case_ids: list[str]) -> dict:
    """{"unavailable": why} if this Triton cannot compile for sm_90 here, else {"cases": {id: result}}."""
    unavailable = _target_sm90()
    if unavailable:
        return {"unavailable": unavailable}
    launches: list = []
    for module in _kernel_modules():
        for name, kernel in _kernels(module).items():
            setattr(module, name, _CompileOnLaunch(name, kernel, launches))
    attention_common._num_sms = lambda device: H100_SMS
    by_id = {case.id: case for case in CASES}
    results = {}
    for case_id in case_ids:
        launches.clear()
        try:
            LAUNCHERS[by_id[case_id].launcher](**by_id[case_id].params)
            results[case_id] = {"launches": list(launches)}
        except Exception:  # noqa: BLE001 - a kernel that does not compile: the test reports the traceback
            results[case_id] = {"launches": list(launches), "error": traceback.format_exc()}
    return {"cases": results}


def _compile_gemv_tiles_at_once() -> dict:
    """What the runner's tile choice does before it times tiles (engine/gemv_tiles.py ``_compile_at_once``, on
    threads): 1.7B o and down projections' launches (with and without PDL) with the split tiles, each compiled once,
    so that launching them later compiles nothing more (counted in the kernel's in-memory cache)."""
    unavailable = _target_sm90()
    if unavailable:
        return {"unavailable": unavailable}
    from relaykern.engine import gemv_tiles
    x = torch.zeros(1, 2 * 6144, dtype=torch.bfloat16)
    out = torch.empty(1, 2048, dtype=torch.bfloat16)
    counters = torch.zeros(2048, dtype=torch.int32)
    work = [(gemv.launch_arguments(x[:, :k * (1 + (prologue == "silu_and_mul"))], torch.zeros(2048, k, dtype=x.dtype),
                                   None, prologue, None, None, 1e-6, out, x, counters, pdl=pdl), gemv.GPU_CONFIGS[-4:])
            for prologue, k in (("none", 2048), ("silu_and_mul", 6144)) for pdl in (False, True)]
    kernel_cache = gemv._gemv_kernel.device_caches[0][0]
    gemv_tiles._compile_at_once(work)
    compiled = len(kernel_cache)
    for launch, tiles in work:
        for tile in tiles:
            launch.compile(tile)
    return {"expected": sum(len(tiles) for _, tiles in work), "compiled": compiled, "after": len(kernel_cache),
            # (Triton 3.8 keeps a compile that failed in the cache, as the future that raised)
            "not_compiled": [type(kernel).__name__ for kernel in kernel_cache.values()
                             if not isinstance(kernel, triton.compiler.CompiledKernel)]}


# ---------------------------------------------------------------- the tests

@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict:
    """Compiles CASES once per test run, in two child processes (one per core); {case id: {"launches": [...],
    "error"?: str}}. Under pytest-xdist the first worker to need them compiles them and the others read its results
    (each worker sets a module fixture up on its own: the work would be done once per worker)."""
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend: cannot compile for sm_90")
    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base  # the run's folder, all workers'
    with FileLock(str(shared / "sm90_compile.lock")):
        done = shared / "sm90_compile.json"
        if not done.is_file():
            done.write_text(json.dumps(_compile_in_children(tmp_path_factory.mktemp("triton_aot"))))
        results = json.loads(done.read_text())
    if "unavailable" in results:
        pytest.skip(f"cannot compile Triton kernels for sm_90 here: {results['unavailable']}")
    return results["cases"]


def _compile_in_children(tmp: Path) -> dict:
    """{"cases": {...}} or {"unavailable": why}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp / "cache"), TRITON_HOME=str(tmp))
    shards = [[case.id for case in CASES[i::2]] for i in range(2)]
    children = [subprocess.Popen([sys.executable, __file__, str(tmp / f"shard{i}.json"), *shard], env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for i, shard in enumerate(shards)]
    results: dict = {}
    try:
        for i, child in enumerate(children):
            output, _ = child.communicate(timeout=CHILD_TIMEOUT_S)
            assert child.returncode == 0, f"compile child {i} failed:\n{output}"
            shard = json.loads((tmp / f"shard{i}.json").read_text())
            if "unavailable" in shard:
                return {"unavailable": shard["unavailable"]}
            results.update(shard["cases"])
    finally:
        for child in children:
            child.kill()  # no-op for a child that has exited; stops the other one after a failure or timeout
    return {"cases": results}


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_kernel_compiles_for_sm90(case: Case, compiled: dict) -> None:
    result = compiled[case.id]
    assert "error" not in result, f"{case.id} does not compile for sm_90:\n{result['error']}"
    assert result["launches"], f"{case.id} launched no kernel"
    for launch in result["launches"]:
        assert launch["shared"] <= H100_MAX_SHARED, f"{case.id}: {launch['kernel']} needs {launch['shared']} B " \
                                                     f"of shared memory, over the H100's {H100_MAX_SHARED}"


def test_matrix_covers_every_kernel_and_variant(compiled: dict) -> None:
    launches = [launch for result in compiled.values() for launch in result["launches"]]
    kernels = {name for module in _kernel_modules() for name in _kernels(module)}
    assert kernels == {launch["kernel"] for launch in launches}
    takes_pdl = {name for module in _kernel_modules() for name, kernel in _kernels(module).items()
                 if "PDL" in kernel.arg_names}
    assert takes_pdl == {launch["kernel"] for launch in launches if launch["constexprs"].get("PDL")}
    assert all(launch["grid_dependency_wait"] == bool(launch["constexprs"].get("PDL")) for launch in launches)
    tiles = {(launch["constexprs"]["GROUP"], launch["constexprs"]["BLOCK_M"], launch["constexprs"]["BLOCK_Q"])
             for launch in launches if launch["kernel"] == "_extend_kernel"}
    wanted = {(group, *choose_extend_tile(q_len, group, dtype))
              for dtype in DTYPES for group, q_len in _extend_query_lengths(dtype)}
    assert wanted <= tiles
    extend_cases = [case for case in CASES if case.launcher == "attention" and max(case.params["q_lens"]) > 1]
    largest_tile = {case.params["dtype"] for case in extend_cases if case.params["head_dim"] == 128 and
                    _extend_tile(case)[1] == choose_extend_tile(256, 1, case.params["dtype"])[0]}
    assert largest_tile == set(DTYPES), "every dtype needs an extend case with its largest tile at head_dim 128"
    spills = {(case.id, launch["kernel"]): launch["spill_bytes"] for case in CASES
              for launch in compiled[case.id]["launches"] if launch["spill_bytes"]}
    assert not spills, f"register spills (bytes per thread): {spills}"
    print(f"\n{'case':<58} {'kernel':<22} {'warps':>5} {'stages':>6} {'smem B':>7} {'regs':>4} {'spill':>5} "
          f"{'s':>5}")
    for case in CASES:
        for launch in compiled[case.id]["launches"]:
            print(f"{case.id:<58} {launch['kernel']:<22} {launch['num_warps']:>5} {launch['num_stages']:>6} "
                  f"{launch['shared']:>7} {launch['registers']!s:>4} {launch['spill_bytes']!s:>5} "
                  f"{launch['seconds']:>5}")


def test_gemv_tiles_compile_at_once_for_sm90(tmp_path) -> None:
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend: cannot compile for sm_90")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(TRITON_CACHE_DIR=str(tmp_path / "cache"), TRITON_HOME=str(tmp_path))
    child = subprocess.run([sys.executable, __file__, str(tmp_path / "at_once.json"), "--gemv-tiles-at-once"], env=env,
                           capture_output=True, text=True, timeout=CHILD_TIMEOUT_S)
    assert child.returncode == 0, child.stdout + child.stderr
    counts = json.loads((tmp_path / "at_once.json").read_text())
    if "unavailable" in counts:
        pytest.skip(f"cannot compile Triton kernels for sm_90 here: {counts['unavailable']}")
    assert counts["compiled"] == counts["after"] == counts["expected"] and not counts["not_compiled"], counts


if __name__ == "__main__":  # the child: python test_kernels_compile.py OUT.json (CASE_ID... | --gemv-tiles-at-once)
    with open(sys.argv[1], "w") as out:
        json.dump(_compile_gemv_tiles_at_once() if sys.argv[2:] == ["--gemv-tiles-at-once"] else
                  _compile_cases(sys.argv[2:]), out)
