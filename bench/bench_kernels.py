"""GPU micro-benchmarks of the paged-KV kernels (Qwen3-8B attention shapes: 32 q heads, 8 kv heads, head_dim 128).

    python bench/bench_kernels.py --out bench/results/kernels.json

Figures: device-to-device copy bandwidth (the roofline), paged decode attention (bytes of K/V read per second, and
that as a fraction of the copy bandwidth; with a merge kernel, with the splits merging themselves, and that from the
raw projections as the model calls it; batch 1 also with forced split counts), paged extend attention against
dense SDPA on the same shapes (SDPA reads a contiguous K/V with no block-table indirection: a yardstick, not a
like-for-like), store_kv, and the batch-1 projections of Qwen3-1.7B and 8B (the fused GEMV kernel against the
unfused norm/activation kernel + cuBLAS, and cuBLAS alone, and each tile the runner chooses from; weight bytes read per
second as a fraction of the copy bandwidth). Each time is the median of triton.testing.do_bench (CUDA events, after
warm-up). The projections are timed as CUDA-graph replays, as serving runs them: timed launch by launch, a ~10 us
kernel measures the host's launch cost instead (the autotuned GEMV's Python dispatch took ~40 us on an H200).
Prints a table and writes JSON with the device, versions and git commit.
"""
import argparse
import itertools
import json
import subprocess
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention.bias import causal_lower_right

from relaykern.kernels.activation import silu_and_mul
from relaykern.kernels.decode_attention import paged_decode_attention
from relaykern.kernels.extend_attention import paged_extend_attention
from relaykern.engine.cuda_graphs import graph_ms
from relaykern.kernels import gemv as gemv_module
from relaykern.kernels.gemv import gemv, tile_name
from relaykern.kernels.pdl import pdl_supported
from relaykern.kernels.rope import NewKV
from relaykern.kernels.rms_norm import rms_norm
from relaykern.kernels.store_kv import store_kv
from relaykern.models.layers import RotaryEmbedding

NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 32, 8, 128


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("bench/results/kernels.json"), help="JSON output path")
    parser.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    parser.add_argument("--block-sizes", type=int, nargs="+", default=[16, 256], help="KV cache block sizes")
    parser.add_argument("--context", type=int, default=4096, help="context length (tokens already cached)")
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench measuring time per figure (ms)")
    return parser.parse_args()


L2_FLUSH_BYTES = 256 << 20
"""Weight bytes one graph of projections cycles through, so that none is read from the L2 (50 MB on an H100/H200)."""
DECODE_SPLIT_SWEEP = (1, 4, 16)
"""Split counts a batch-1 decode at the long context is also timed with (the launcher splits as finely as one key
tile: 64 splits at 4096 keys, 8 at 512): whether a merge launch costs more than it saves at short contexts."""


def bench_ms(fn: Callable[[], object], rep_ms: int) -> float:
    return triton.testing.do_bench(fn, warmup=50, rep=rep_ms, return_mode="median")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def paged_inputs(q_lens: list[int], context: int, block_size: int, dtype: torch.dtype) -> dict:
    """Shuffled blocks (as a long-running pool has them); each sequence holds context + q_len tokens."""
    seq_lens = [context + n for n in q_lens]
    blocks_per_seq = -(-max(seq_lens) // block_size)
    num_blocks = blocks_per_seq * len(q_lens)
    kv_cache = torch.randn(2, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=dtype)
    block_tables = torch.randperm(num_blocks, device="cuda").view(len(q_lens), blocks_per_seq).int()
    cu_seqlens_q = torch.tensor([0] + q_lens, device="cuda").cumsum(0).int()
    q = torch.randn(sum(q_lens), NUM_Q_HEADS, HEAD_DIM, device="cuda", dtype=dtype)
    return dict(q=q, kv_cache=kv_cache, block_tables=block_tables, cu_seqlens_q=cu_seqlens_q,
                seq_lens=torch.tensor(seq_lens, device="cuda", dtype=torch.int32), max_q_len=max(q_lens))


def bench_copy(rep_ms: int) -> dict:
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src), rep_ms)
    return {"name": "copy 1 GiB", "ms": ms, "GB/s": 2 * src.numel() / ms / 1e6}  # read + write


def bench_decode(batch: int, context: int, block_size: int, dtype: torch.dtype, copy_gbs: float, rep_ms: int,
                 num_splits: int | None = None, self_merge: bool = False, from_projections: bool = False,
                 pdl: bool = False) -> dict:
    """Replayed from a CUDA graph (launched one by one, a small batch times its launches) over copies of the cache
    larger than the L2 together. ``num_splits``: forced instead of the launcher's choice (the split sweep).
    ``self_merge``: the splits merge themselves, else a merge kernel follows. ``from_projections``: q/k norm, RoPE
    and the new token's K/V store done in the kernel (with ``self_merge``: the runner's fused decode step). ``pdl``:
    launched with PDL, each launch reading its first keys while the one before ends (as the fused step does)."""
    kv_bytes = 2 * batch * context * NUM_KV_HEADS * HEAD_DIM * dtype.itemsize
    copies = [paged_inputs([1] * batch, context - 1, block_size, dtype) for _ in range(-(-L2_FLUSH_BYTES // kv_bytes))]
    scale = HEAD_DIM ** -0.5
    counters = torch.zeros(batch * NUM_KV_HEADS, dtype=torch.int32, device="cuda") if self_merge else None
    new_kv = [new_token_kv(copy, block_size) if from_projections else None for copy in copies]
    ms = graph_ms(lambda i: paged_decode_attention(copies[i]["q"], copies[i]["kv_cache"], copies[i]["block_tables"],
                                                   copies[i]["seq_lens"], scale, num_splits, counters, new_kv[i],
                                                   read_ahead=pdl, pdl=pdl),
                  len(copies), rep_ms)
    gbs = kv_bytes / ms / 1e6
    forced = "" if num_splits is None else f" splits{num_splits}"
    variant = " self-merge" * self_merge + " from projections" * from_projections + " pdl" * pdl
    return {"name": f"decode bs{batch} ctx{context} block{block_size}{forced}{variant}", "ms": ms, "GB/s": gbs,
            "fraction_of_copy": gbs / copy_gbs}


def new_token_kv(inputs: dict, block_size: int) -> NewKV:
    """Raw k and v of each sequence's last token, its slot, Qwen3's per-head norms and RoPE table."""
    num_seqs = inputs["q"].shape[0]
    last = inputs["seq_lens"].long() - 1
    blocks = inputs["block_tables"].long().gather(1, (last // block_size)[:, None])[:, 0]
    slots = blocks * block_size + last % block_size
    k, v = (torch.randn(num_seqs, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=inputs["q"].dtype) for _ in range(2))
    norms = (torch.ones(HEAD_DIM, device="cuda", dtype=k.dtype) for _ in range(2))
    return NewKV(k, v, last, RotaryEmbedding(HEAD_DIM, int(last.max()) + 1, 1e6, None).cos_sin_cache.cuda(), slots,
                 *norms)


def sdpa_extend(batch: int, q_len: int, context: int, dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    """Dense SDPA on the same shapes: batch x q_len rows over context + q_len contiguous keys (GQA, bottom-right
    causal)."""
    q = torch.randn(batch, NUM_Q_HEADS, q_len, HEAD_DIM, device="cuda", dtype=dtype)
    k, v = (torch.randn(batch, NUM_KV_HEADS, context + q_len, HEAD_DIM, device="cuda", dtype=dtype) for _ in range(2))
    mask = causal_lower_right(q_len, context + q_len)
    return lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)


def bench_extend(batch: int, q_len: int, context: int, block_size: int, dtype: torch.dtype, rep_ms: int) -> dict:
    inputs = paged_inputs([q_len] * batch, context, block_size, dtype)
    scale = HEAD_DIM ** -0.5
    ms = bench_ms(lambda: paged_extend_attention(inputs["q"], inputs["kv_cache"], inputs["block_tables"],
                                                 inputs["seq_lens"], inputs["cu_seqlens_q"], q_len, scale), rep_ms)
    sdpa_ms = bench_ms(sdpa_extend(batch, q_len, context, dtype), rep_ms)
    visible_keys = batch * (q_len * context + q_len * (q_len + 1) // 2)
    flops = 4 * NUM_Q_HEADS * HEAD_DIM * visible_keys
    return {"name": f"extend bs{batch} q{q_len} ctx{context} block{block_size}", "ms": ms,
            "TFLOP/s": flops / ms / 1e9, "sdpa_ms": sdpa_ms, "sdpa_over_ours": sdpa_ms / ms}


def bench_store(num_tokens: int, block_size: int, dtype: torch.dtype, rep_ms: int) -> dict:
    num_blocks = -(-num_tokens // block_size) * 4
    kv_cache = torch.zeros(2, num_blocks, block_size, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=dtype)
    key, value = (torch.randn(num_tokens, NUM_KV_HEADS, HEAD_DIM, device="cuda", dtype=dtype) for _ in range(2))
    slots = torch.randperm(num_blocks * block_size, device="cuda")[:num_tokens]
    ms = bench_ms(lambda: store_kv(key, value, kv_cache, slots), rep_ms)
    moved = 2 * 2 * key.numel() * key.element_size()  # K and V, read + write
    return {"name": f"store_kv T{num_tokens} block{block_size}", "ms": ms, "GB/s": moved / ms / 1e6}


GEMV_SHAPES = [  # (model, projection, prologue, K, N)
    ("1.7b", "qkv", "rms_norm", 2048, 4096), ("1.7b", "o", "none", 2048, 2048),
    ("1.7b", "gate_up", "rms_norm", 2048, 12288), ("1.7b", "down", "silu_and_mul", 6144, 2048),
    ("8b", "qkv", "rms_norm", 4096, 6144), ("8b", "o", "none", 4096, 4096),
    ("8b", "gate_up", "rms_norm", 4096, 24576), ("8b", "down", "silu_and_mul", 12288, 4096),
    ("1.7b", "logits", "none", 2048, 151936), ("8b", "logits", "none", 4096, 151936),
]


def bench_gemv(model: str, projection: str, prologue: str, k: int, n: int, dtype: torch.dtype, copy_gb_per_s: float,
               rep_ms: int) -> dict:
    x = torch.randn(1, 2 * k if prologue == "silu_and_mul" else k, device="cuda", dtype=dtype)
    weight_bytes = n * k * dtype.itemsize
    weights = [torch.randn(n, k, device="cuda", dtype=dtype) / k ** 0.5
               for _ in range(max(2, -(-L2_FLUSH_BYTES // weight_bytes)))]
    norm = dict(residual=torch.randn_like(x), norm_weight=torch.ones(k, device="cuda", dtype=dtype)) \
        if prologue == "rms_norm" else {}
    counters = torch.zeros(n, device="cuda", dtype=torch.int32)  # split tiles may serve, as in a model
    fused = graph_ms(lambda i: gemv(x, weights[i], prologue=prologue, split_counters=counters, **norm), len(weights),
                     rep_ms)
    tile = gemv_module.AUTOTUNED[True].best_config  # the autotuner's pick for this shape, which the graph replayed
    unfused = graph_ms(lambda i: gemv_reference_triton(x, weights[i], prologue, norm), len(weights), rep_ms)
    cublas = graph_ms(lambda i: F.linear(x[:, :k], weights[i]), len(weights), rep_ms)
    row = {"name": f"gemv {model} {projection} K{k} N{n}", "ms": fused, "unfused_ms": unfused, "cublas_ms": cublas,
           "tile": tile_name(tile),
           "fraction_of_copy": weight_bytes / fused / 1e6 / copy_gb_per_s,
           "cublas_fraction_of_copy": weight_bytes / cublas / 1e6 / copy_gb_per_s}
    if pdl_supported(x.device):  # each launch may start while the one before drains (kernels/pdl.py)
        pdl = graph_ms(lambda i: gemv(x, weights[i], prologue=prologue, pdl=True, split_counters=counters, **norm),
                       len(weights), rep_ms)
        row.update(pdl_ms=pdl, pdl_fraction_of_copy=weight_bytes / pdl / 1e6 / copy_gb_per_s)
    # Every tile the autotuner chooses from, replayed the same way: whether its pick (timed launch by launch) is the
    # fastest in a graph.
    row["tile_ms"] = {tile_name(tile): graph_ms(lambda i: gemv(x, weights[i], prologue=prologue, tile=tile,
                                                               split_counters=counters, **norm),
                                                len(weights), max(1, rep_ms // 4))
                      for tile in gemv_module.GPU_CONFIGS}
    return row


def gemv_reference_triton(x: torch.Tensor, weight: torch.Tensor, prologue: str, norm: dict) -> torch.Tensor:
    """What the model runs without the fused kernel: the prologue's Triton kernel, then cuBLAS."""
    if prologue == "rms_norm":
        x = rms_norm(x, norm["norm_weight"], 1e-6, norm["residual"])[0]
    elif prologue == "silu_and_mul":
        x = silu_and_mul(x)
    return F.linear(x, weight)


def print_table(rows: list[dict]) -> None:
    for row in rows:
        figures = "  ".join(f"{key}={value:.4g}" if isinstance(value, float) else f"{key}={value}"
                            for key, value in row.items() if key != "name")
        print(f"{row['name']:<40} {figures}")


def main() -> None:
    args = parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_kernels.py needs a CUDA GPU")
    dtype = getattr(torch, args.dtype)
    copy = bench_copy(args.rep_ms)
    rows = [copy]
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
              "git_commit": git_commit(), "dtype": args.dtype, "heads": [NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM],
              "results": rows, "errors": []}

    def measure(name: str, bench: Callable[[], dict]) -> None:
        """Runs one row and saves the JSON at once: a failing row, or the step's timeout, loses no other row."""
        try:
            rows.append(bench())
        except Exception as err:  # noqa: BLE001 - recorded; the next rows still run
            report["errors"].append({"row": name, "error": f"{type(err).__name__}: {err}"})
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    for block_size in args.block_sizes:
        # The runner's fused variants at the engine's block size (the first) only: the step's time is short.
        fusions = (False, True) if block_size == args.block_sizes[0] else (False,)
        for (batch, context), fused in itertools.product(((32, args.context), (1, args.context), (1, 512)), fusions):
            measure(f"decode b{batch} ctx{context} bs{block_size}" + " self-merge" * fused,
                    lambda: bench_decode(batch, context, block_size, dtype, copy["GB/s"], args.rep_ms,
                                         self_merge=fused))
            if not fused:
                continue
            for pdl in (False, True) if pdl_supported(torch.device("cuda")) else (False,):
                measure(f"decode b{batch} ctx{context} bs{block_size} self-merge from projections" + " pdl" * pdl,
                        lambda: bench_decode(batch, context, block_size, dtype, copy["GB/s"], args.rep_ms,
                                             self_merge=True, from_projections=True, pdl=pdl))
        for context, sweep in ((args.context, DECODE_SPLIT_SWEEP), (512, (1, 2, 4))):  # vs the launcher's choice
            for splits in sweep:
                measure(f"decode b1 ctx{context} bs{block_size} splits{splits}",
                        lambda: bench_decode(1, context, block_size, dtype, copy["GB/s"], args.rep_ms, splits))
        for batch, q_len in ((1, 16), (32, 16), (1, 512), (1, 2048)):
            measure(f"extend b{batch} q{q_len} bs{block_size}",
                    lambda: bench_extend(batch, q_len, args.context, block_size, dtype, args.rep_ms))
        for num_tokens in (32, 2048):
            measure(f"store {num_tokens} bs{block_size}",
                    lambda: bench_store(num_tokens, block_size, dtype, args.rep_ms))
        torch.cuda.empty_cache()
    for shape in GEMV_SHAPES:
        measure(f"gemv {shape}", lambda: bench_gemv(*shape, dtype, copy["GB/s"], args.rep_ms))
    print_table(rows)
    print(f"wrote {args.out}" + (f" ({len(report['errors'])} rows failed)" if report["errors"] else ""))


if __name__ == "__main__":
    main()
