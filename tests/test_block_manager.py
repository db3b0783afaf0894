"""relaykern._C: BlockManager bookkeeping and prefix sharing, KVPool shapes and budget math."""
import random

import pytest
import torch

from relaykern._C import BlockManager, KVPool, OutOfBlocks


def used_blocks(bm: BlockManager, seq_ids) -> dict[int, int]:
    """Expected ref counts: how often each block appears in the live tables."""
    refs: dict[int, int] = {}
    for s in seq_ids:
        for b in bm.block_table(s):
            refs[b] = refs.get(b, 0) + 1
    return refs


def test_allocate_append_across_blocks():
    bm = BlockManager(8, 4)
    assert bm.allocate(1, list(range(5))) == 0
    assert len(bm.block_table(1)) == 2 and bm.seq_len(1) == 5
    assert bm.can_append(1, 3)
    bm.append(1, [5, 6, 7, 8])
    table = bm.block_table(1)
    assert len(table) == 3 and bm.seq_len(1) == 9
    assert bm.slot_mapping(1, 3, 9) == [table[p // 4] * 4 + p % 4 for p in range(3, 9)]
    assert (bm.num_seqs, bm.num_used_blocks, bm.num_free_blocks) == (1, 3, 5)
    bm.free(1)
    assert bm.num_free_blocks == bm.num_blocks == 8 and not bm.has_seq(1)


def test_reserved_positions_are_covered_before_their_tokens_and_filled_later():
    """An overlapped step writes K/V at a position before the host knows its token (the relay's overlap_steps)."""
    bm = BlockManager(4, 4)
    bm.allocate(1, [1, 2, 3, 4])
    assert bm.reserve_positions(1, 5) and len(bm.block_table(1)) == 2 and bm.seq_len(1) == 4
    assert not bm.reserve_positions(1, 17) and len(bm.block_table(1)) == 2  # short of blocks: nothing taken
    reserved = bm.block_table(1)[1]
    bm.append(1, [5, 6, 7, 8])
    assert bm.block_table(1) == [bm.block_table(1)[0], reserved] and bm.num_free_blocks == 2
    assert bm.allocate(2, [1, 2, 3, 4, 5, 6, 7, 8, 9]) == 8  # the filled block was registered for sharing
    bm.free(1)
    bm.free(2)
    assert bm.num_free_blocks == 4


def test_invalid_arguments_raise_value_error():
    bm = BlockManager(4, 4)
    bm.allocate(1, [1, 2])
    with pytest.raises(ValueError):
        bm.allocate(1, [3])
    with pytest.raises(ValueError):
        bm.allocate(2, [])
    with pytest.raises(ValueError):
        bm.free(7)
    with pytest.raises(ValueError):
        bm.slot_mapping(1, 1, 3)
    with pytest.raises(ValueError):
        bm.fork(1, 1)
    with pytest.raises(ValueError):
        BlockManager(0, 4)


def test_prefix_sharing_and_cached_count():
    bm = BlockManager(16, 4)
    prefix = list(range(10))  # 2.5 blocks
    assert bm.allocate(1, prefix + [100]) == 0
    assert bm.allocate(2, prefix + [200, 201]) == 8
    assert bm.num_cached_tokens(2) == 8
    t1, t2 = bm.block_table(1), bm.block_table(2)
    assert t1[:2] == t2[:2] and t1[2] != t2[2]
    assert [bm.ref_count(b) for b in t1] == [2, 2, 1]
    assert bm.num_used_blocks == 4
    bm.free(1)
    bm.free(2)
    assert bm.num_free_blocks == 16
    # Freed blocks keep their hash: a later identical prompt revives them.
    assert bm.allocate(3, prefix + [300]) == 8
    # A block-aligned prompt never reuses its last block: the last token is recomputed for logits.
    assert bm.allocate(4, list(range(8))) == 4


def test_blocks_filled_by_append_are_shared():
    bm = BlockManager(8, 4)
    bm.allocate(1, [1, 2, 3])
    bm.append(1, [4, 5, 6, 7, 8, 9])
    assert bm.allocate(2, [1, 2, 3, 4, 5, 6, 7, 8, 0]) == 8


def test_free_without_keeping_the_cache_forgets_prefix_hashes():
    bm = BlockManager(8, 4)
    tokens = list(range(10))
    bm.allocate(1, tokens)
    bm.free(1, keep_cached=False)  # as after a failed forward: the KV was never written
    assert bm.allocate(2, tokens) == 0
    bm.free(2)
    assert bm.allocate(3, tokens) == 8  # a normal free keeps the computed blocks shareable
    bm.free(3)
    assert bm.num_free_blocks == 8


def test_prefix_caching_off():
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    assert not bm.prefix_caching
    assert bm.allocate(1, list(range(9))) == 0
    assert bm.allocate(2, list(range(9))) == 0
    assert bm.num_used_blocks == 6


def test_fork_and_copy_pair():
    bm = BlockManager(16, 4)
    bm.allocate(0, list(range(6)))
    pairs = [bm.fork(0, i) for i in range(1, 8)]  # GRPO: 8 samples of one prompt
    src_last = bm.block_table(0)[1]
    assert all(p[0] == src_last for p in pairs)
    assert len({p[1] for p in pairs}) == 7
    assert bm.ref_count(bm.block_table(0)[0]) == 8
    assert all(bm.num_cached_tokens(i) == 6 and bm.seq_len(i) == 6 for i in range(1, 8))
    bm.append(3, [9, 9])
    assert bm.seq_len(3) == 8 and bm.seq_len(0) == 6
    bm.allocate(20, list(range(8)))
    assert bm.fork(20, 21) is None
    for s in [0, *range(1, 8), 20, 21]:
        bm.free(s)
    assert bm.num_free_blocks == 16


def test_out_of_blocks_leaves_state_unchanged():
    bm = BlockManager(3, 4)
    bm.allocate(1, list(range(9)))
    before = (bm.block_table(1), bm.seq_len(1), bm.num_free_blocks, bm.num_seqs)
    assert issubclass(OutOfBlocks, RuntimeError)
    assert not bm.can_allocate([50, 51, 52, 53, 54])
    with pytest.raises(OutOfBlocks):
        bm.allocate(2, [50, 51, 52, 53, 54])
    assert not bm.can_append(1, 4)
    with pytest.raises(OutOfBlocks):
        bm.append(1, [1, 2, 3, 4])
    with pytest.raises(OutOfBlocks):
        bm.fork(1, 3)
    assert (bm.block_table(1), bm.seq_len(1), bm.num_free_blocks, bm.num_seqs) == before
    assert not bm.has_seq(2) and not bm.has_seq(3)
    bm.free(1)
    assert bm.num_free_blocks == 3


def test_block_tables_tensor():
    bm = BlockManager(8, 2)
    bm.allocate(1, list(range(5)))
    bm.allocate(2, [7])
    out = bm.block_tables([2, 1], 4)
    assert out.dtype == torch.int32 and out.shape == (2, 4)
    assert out.tolist() == [bm.block_table(2) + [-1] * 3, bm.block_table(1) + [-1]]
    assert bm.block_tables([], 3).shape == (0, 3)
    with pytest.raises(ValueError):
        bm.block_tables([1], 2)


def test_random_ops_against_a_model():
    """Random allocate/append/fork/free and, rarely, a prefix-cache reset (new weights) on a small pool with a
    2-token vocabulary (so prefixes collide often).

    A simulated KV cache stores, at each written slot, the token prefix that produced it and the weights' epoch;
    every live sequence must read back its own prefixes at every position, none written under weights older than
    the sequence: that checks sharing, forks, reuse and resets end to end.
    """
    rng = random.Random(0)
    bs, nb = 4, 24
    bm = BlockManager(nb, bs)
    kv: dict[int, tuple] = {}
    tokens: dict[int, list[int]] = {}
    born: dict[int, int] = {}
    next_id = epoch = 0

    def write(s: int, start: int) -> None:
        for p, slot in enumerate(bm.slot_mapping(s, start, len(tokens[s])), start):
            kv[slot] = (epoch, tuple(tokens[s][: p + 1]))

    for _ in range(3000):
        op = rng.choices(range(5), weights=(1, 1, 1, 1, 0.05))[0]
        if op == 4:
            bm.reset_prefix_cache()
            epoch += 1
        elif op == 0 or not tokens:
            prompt = [rng.randrange(2) for _ in range(rng.randint(1, 14))]
            if bm.can_allocate(prompt):
                cached = bm.allocate(next_id, prompt)
                assert cached % bs == 0 and cached < len(prompt)
                tokens[next_id], born[next_id] = prompt, epoch
                write(next_id, cached)
            else:
                free_before = bm.num_free_blocks
                with pytest.raises(OutOfBlocks):
                    bm.allocate(next_id, prompt)
                assert bm.num_free_blocks == free_before
            next_id += 1
        elif op == 1:
            s = rng.choice(list(tokens))
            new = [rng.randrange(2) for _ in range(rng.randint(1, 6))]
            if bm.can_append(s, len(new)):
                start = len(tokens[s])
                bm.append(s, new)
                tokens[s] += new
                write(s, start)
            else:
                with pytest.raises(OutOfBlocks):
                    bm.append(s, new)
        elif op == 2:
            s = rng.choice(list(tokens))
            bm.free(s)
            del tokens[s], born[s]
        else:
            s = rng.choice(list(tokens))
            try:
                pair = bm.fork(s, next_id)
            except OutOfBlocks:
                assert bm.num_free_blocks == 0
            else:
                tokens[next_id], born[next_id] = list(tokens[s]), born[s]
                if pair is not None:
                    for o in range(bs):
                        if pair[0] * bs + o in kv:
                            kv[pair[1] * bs + o] = kv[pair[0] * bs + o]
            next_id += 1

        refs = used_blocks(bm, tokens)
        assert all(bm.ref_count(b) == refs.get(b, 0) for b in range(nb))
        assert bm.num_used_blocks == len(refs) and bm.num_seqs == len(tokens)
        for s, toks in tokens.items():
            assert bm.seq_len(s) == len(toks) and len(bm.block_table(s)) == -(-len(toks) // bs)
            if len(toks) % bs:
                assert bm.ref_count(bm.block_table(s)[-1]) == 1  # partial blocks are never shared
            read = [kv[slot] for slot in bm.slot_mapping(s, 0, len(toks))]
            assert [prefix for _, prefix in read] == [tuple(toks[: p + 1]) for p in range(len(toks))]
            assert all(written >= born[s] for written, _ in read)
    for s in list(tokens):
        bm.free(s)
    assert bm.num_free_blocks == nb and bm.num_used_blocks == 0 and epoch > 0


def test_kv_pool_shapes_and_views():
    pool = KVPool(3, 5, 4, 2, 8)
    assert pool.cache.shape == (3, 2, 5, 4, 2, 8) and pool.dtype == torch.bfloat16
    assert pool.device == torch.device("cpu") and not pool.cache.any()
    layer = pool.layer(1)
    assert layer.shape == (2, 5, 4, 2, 8)
    layer.fill_(1)
    assert pool.cache[1].all() and not pool.cache[0].any()
    with pytest.raises(ValueError):
        pool.layer(3)
    pool32 = KVPool(1, 2, 4, 1, 8, dtype=torch.float32, device=torch.device("cpu"))
    assert pool32.cache.dtype == torch.float32 and pool32.nbytes == pool32.cache.numel() * 4


def test_kv_pool_budget_math():
    per_block = KVPool.bytes_per_block(3, 4, 2, 8, torch.bfloat16)
    assert per_block == 3 * 2 * 4 * 2 * 8 * 2
    assert KVPool.blocks_for_budget(7 * per_block + 5, 3, 4, 2, 8, torch.bfloat16) == 7
    assert KVPool(3, 7, 4, 2, 8).nbytes == 7 * per_block
    with pytest.raises(ValueError):
        KVPool.blocks_for_budget(per_block - 1, 3, 4, 2, 8, torch.bfloat16)
    for bad in [(0, 5, 4, 2, 8), (3, 0, 4, 2, 8), (3, 5, 4, 2, -8)]:
        with pytest.raises(ValueError):
            KVPool(*bad)
