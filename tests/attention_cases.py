"""Paged-attention test cases shared by the kernel tests: ragged batches over shuffled cache blocks, the naive
dense math they are checked against, and a decode step's raw projections (tests/test_kernels_attention.py,
tests/test_kernels_decode_fused.py)."""
import random
from dataclasses import dataclass

import torch

from relaykern.kernels.rope import NewKV
from relaykern.models.layers import RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOLERANCE = {torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 2e-2}  # atol = rtol


@dataclass
class Case:
    q: torch.Tensor  # [T, Hq, D], a strided view of a fused qkv buffer
    kv_cache: torch.Tensor  # [2, num_blocks, block_size, Hkv, D]
    block_tables: torch.Tensor
    seq_lens: torch.Tensor
    cu_seqlens_q: torch.Tensor
    max_q_len: int
    scale: float

    def args(self):
        return (self.q, self.kv_cache, self.block_tables, self.seq_lens, self.cu_seqlens_q, self.max_q_len,
                self.scale)


def make_case(q_lens, context_lens, num_q_heads, num_kv_heads, head_dim, block_size, dtype=torch.float32,
              device=DEVICE, seed=0) -> Case:
    """Sequences get distinct shuffled blocks; spare blocks and unused block-table entries hold junk that a
    kernel reading out of bounds would pick up."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [ctx + n for ctx, n in zip(context_lens, q_lens)]
    blocks_per_seq = [-(-s // block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + 2
    block_tables = torch.randint(0, num_blocks, (len(q_lens), max(blocks_per_seq) + 1), generator=gen)
    free_blocks = torch.randperm(num_blocks, generator=gen).tolist()
    for seq, count in enumerate(blocks_per_seq):
        block_tables[seq, :count] = torch.tensor(free_blocks[:count], dtype=torch.long)
        free_blocks = free_blocks[count:]
    kv_cache = torch.randn(2, num_blocks, block_size, num_kv_heads, head_dim, generator=gen)
    qkv = torch.randn(sum(q_lens), num_q_heads + 2 * num_kv_heads, head_dim, generator=gen)
    cu_seqlens_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    return Case(qkv[:, :num_q_heads].to(device, dtype), kv_cache.to(device, dtype),
                block_tables.to(device, torch.int32), torch.tensor(seq_lens, dtype=torch.int32, device=device),
                cu_seqlens_q.to(device), max(q_lens), head_dim ** -0.5)


def naive_attention(case: Case) -> torch.Tensor:
    """Dense float64 softmax(q k^T * scale + causal) v, one sequence at a time, K/V looked up key by key."""
    kv, tables = case.kv_cache.double().cpu(), case.block_tables.cpu().long()
    block_size, num_kv_heads = kv.shape[2], kv.shape[3]
    group = case.q.shape[1] // num_kv_heads
    out = torch.zeros(case.q.shape, dtype=torch.float64)
    bounds = case.cu_seqlens_q.tolist()
    for seq, seq_len in enumerate(case.seq_lens.tolist()):
        q = case.q[bounds[seq]:bounds[seq + 1]].double().cpu()
        positions = torch.arange(seq_len)
        blocks, offsets = tables[seq, positions // block_size], positions % block_size
        heads = torch.arange(q.shape[1]) // group
        key, value = kv[0, blocks, offsets][:, heads], kv[1, blocks, offsets][:, heads]  # [seq_len, Hq, D]
        scores = torch.einsum("qhd,khd->hqk", q, key) * case.scale
        query_positions = seq_len - q.shape[0] + torch.arange(q.shape[0])
        scores[:, positions[None, :] > query_positions[:, None]] = float("-inf")
        out[bounds[seq]:bounds[seq + 1]] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), value)
    return out


def assert_close(actual, expected, dtype=torch.float32):
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(actual.cpu().double(), expected.cpu().double(), atol=tol, rtol=tol)


def random_case(seed: int, decode: bool, block_sizes=(16, 32), dtype=torch.float32) -> Case:
    """Ragged batch: GQA 1/2/4/8, head_dim 16/32/64, contexts 0..80 (crossing blocks), q_len 1..20."""
    rng = random.Random(seed)
    group, num_kv_heads = rng.choice([1, 2, 4, 8]), rng.choice([1, 2])
    batch = rng.randint(1, 4)
    q_lens = [1] * batch if decode else [rng.randint(1, 20) for _ in range(batch)]
    context_lens = [rng.choice([0, rng.randint(0, 80)]) for _ in range(batch)]
    if decode:
        context_lens = [ctx + rng.randint(0, 60) for ctx in context_lens]
    return make_case(q_lens, context_lens, group * num_kv_heads, num_kv_heads, rng.choice([16, 32, 64]),
                     rng.choice(block_sizes), dtype, seed=seed)


def counters(case: Case) -> torch.Tensor:
    return torch.zeros(case.q.shape[0] * case.kv_cache.shape[3], dtype=torch.int32, device=case.q.device)


def new_kv_of(case: Case, with_norm: bool, seed: int) -> NewKV:
    """Raw k and v for each sequence's last token, going to the slot of its position (seq_len - 1); a seq_len 0
    row stores nowhere. Random norm weights and Qwen3's RoPE table."""
    gen = torch.Generator().manual_seed(seed)
    num_seqs, (block_size, num_kv_heads, head_dim) = case.q.shape[0], case.kv_cache.shape[2:]
    k, v = (torch.randn(num_seqs, num_kv_heads, head_dim, generator=gen).to(case.q) for _ in range(2))
    last = (case.seq_lens.long() - 1).clamp(min=0)
    blocks = case.block_tables.long().gather(1, (last // block_size)[:, None])[:, 0]
    slots = torch.where(case.seq_lens > 0, blocks * block_size + last % block_size, -1)
    cos_sin = RotaryEmbedding(head_dim, int(case.seq_lens.max()) + 1, 1e6, None).cos_sin_cache.to(case.q.device)
    norms = tuple(torch.randn(head_dim, generator=gen).to(case.q) for _ in range(2)) if with_norm else ()
    return NewKV(k, v, last, cos_sin, slots, *norms)
