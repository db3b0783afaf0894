"""The relay engine under pressure: pools small enough to preempt, aborted requests, the LLM's read-ahead giving its
blocks back, chunked prefills and catch-ups, and each model's own batch limits: outputs equal those of roomy runs,
and every KV block comes back.
"""
import random

import pytest

from relay_fixtures import *  # noqa: F401,F403
from relaykern import EngineConfig, RelayConfig, RelayEngine
from relaykern.engine.sequence import Phase


def test_500_random_relays_through_a_tight_pool_match_and_leak_nothing(slm_dir, llm_dir, tokenizer):
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 150000) for _ in range(rng.randint(1, 12))] for _ in range(500)]
    samplings = [random_script(rng, tokenizer) for _ in prompts]

    def engine(num_blocks, relay=None):
        config = EngineConfig(device="cpu", block_size=4, num_blocks=num_blocks, max_num_seqs=64)
        return RelayEngine(slm_dir, llm_dir, relay=relay, slm_config=config, llm_config=config)

    expected = [comparable(o) for o in engine(4096, RelayConfig(overlap_steps=False)).generate(prompts, samplings)]
    # Tight pools (steps overlapped), with the LLM running whenever it has work and reading from each command's
    # first tokens, with calls held back to share its forwards, and with the LLM reading ahead (taking free blocks,
    # given back under pressure).
    relays = (RelayConfig(early_catchup_tokens=1), RelayConfig(llm_batch_wait_steps=5, llm_batch_min_rows=6),
              RelayConfig(llm_prefetch_tokens=9))
    for relay in relays:
        tight = engine(30, relay)
        outs = tight.generate(prompts, samplings)
        assert [comparable(o) for o in outs] == expected
        assert sum(o.stats.calls for o in outs) > 100
        assert_no_blocks_held(tight)
    aborted = run_with_random_aborts(engine(30, RelayConfig(llm_prefetch_tokens=9)), prompts, samplings, expected,
                                     rng, rate=0.002)
    assert aborted > 20


def test_aborted_requests_free_their_blocks_and_change_no_other_output(slm_dir, llm_dir, tokenizer):
    """``engine.abort`` ends a request at once, whether the SLM writes it (its next row already launched, overlapped),
    the LLM serves its call, or it still waits for a slot: its blocks in both pools are freed, what it wrote is
    kept, and the other requests write what they write alone. A stream closed early aborts its requests."""
    prompts = [text_tokens(tokenizer, f"Question {i}: what is {i} + {i * 7}?") for i in range(5)]
    samplings = [scripted({}), scripted({}), scripted({2: command_tokens(tokenizer, 8)}), scripted({}), scripted({})]
    engine = RelayEngine(slm_dir, llm_dir, slm_config=EngineConfig(device="cpu", max_num_seqs=3),
                         llm_config=EngineConfig(device="cpu"))
    alone = [engine.generate([prompt], sampling)[0] for prompt, sampling in zip(prompts, samplings)]
    seqs = [engine.add_request(prompt, sampling) for prompt, sampling in zip(prompts, samplings)]
    while seqs[2].phase is not Phase.LLM:  # (the fourth request takes the third's SLM row meanwhile)
        engine.step()
    assert seqs[0].phase is Phase.SLM and engine.next_slm is not None and seqs[0] in engine.next_slm.seqs
    assert seqs[4] in engine.scheduler.waiting
    for seq in (seqs[0], seqs[2], seqs[4]):
        engine.abort(seq)
    while engine.scheduler.has_work:
        engine.step()
    outs = [engine.output(seq) for seq in seqs]
    assert [o.finish_reason for o in outs] == ["abort", "length", "abort", "length", "abort"]
    assert comparable(outs[1]) == comparable(alone[1]) and comparable(outs[3]) == comparable(alone[3])
    for out, full in zip(outs, alone):
        assert out.token_ids == full.token_ids[:len(out.token_ids)]
    assert outs[4].token_ids == [] and outs[2].stats.calls == 1
    assert outs[2].stats.call_records[0].latency_s > 0  # (aborted during its call)
    assert_no_blocks_held(engine)

    queued = engine.add_request(prompts[0], scripted({}))
    with pytest.raises(ValueError, match="not one of this engine's"):
        RelayEngine(slm_dir, slm_config=EngineConfig(device="cpu")).abort(queued)
    engine.abort(queued)
    assert queued.finish_reason == "abort" and not engine.scheduler.has_work
    stream = engine.stream(prompts[:2], scripted({}))
    next(stream)
    stream.close()
    assert not engine.scheduler.has_work
    assert_no_blocks_held(engine)
    assert [comparable(o) for o in engine.generate(prompts, samplings)] == [comparable(o) for o in alone]


def test_read_ahead_gives_its_blocks_back_to_calls(slm_dir, llm_dir, tokenizer):
    """An LLM pool of 16 blocks of 4 tokens, filled by reading ahead: a call short of blocks takes back the views
    read ahead for sequences the SLM is serving (never preempting them). Outputs equal the lazy LLM's with ample
    pools; nothing leaks."""
    rng = random.Random(3)
    prompts = [[rng.randrange(100, 150000) for _ in range(rng.randint(14, 20))] for _ in range(8)]
    samplings = [scripted({rng.randint(6, 14): command_tokens(tokenizer, 3)} if i % 4 else {}, max_tokens=24)
                 for i in range(8)]

    def run(relay: RelayConfig, llm_blocks: int):
        engine = RelayEngine(slm_dir, llm_dir, relay=relay, slm_config=EngineConfig(device="cpu", block_size=4),
                             llm_config=EngineConfig(device="cpu", block_size=4, num_blocks=llm_blocks))
        forwards, room_made = record_calls(engine.llm), record_calls(engine.scheduler, "_make_room")
        outs = [comparable(o) for o in engine.generate(prompts, samplings)]
        assert_no_blocks_held(engine)
        read_ahead = sum(not any(row.samples for row in rows) for (rows,) in forwards)
        return outs, read_ahead, [args[0] is engine.llm for args in room_made]

    expected, _, _ = run(RelayConfig(), 400)
    outs, read_ahead, room_made = run(RelayConfig(llm_prefetch_tokens=8), 16)
    assert outs == expected and read_ahead > 0 and any(room_made)


def test_chunked_prefills_and_catch_ups_give_the_same_outputs(slm_dir, llm_dir, tokenizer):
    """A budget of 8 tokens per forward splits prompts and catch-ups into chunks, only the last of which samples
    (and a tight pool preempts between chunks): the same outputs as one row per view, no forward over budget."""
    rng = random.Random(2)
    prompts = [[rng.randrange(100, 150000) for _ in range(rng.randint(9, 30))] for _ in range(24)]
    samplings = [random_script(rng, tokenizer) for _ in prompts]

    def run(budget: int, num_blocks: int):
        config = EngineConfig(device="cpu", block_size=4, num_blocks=num_blocks, max_num_seqs=16,
                              max_num_batched_tokens=budget)
        engine = RelayEngine(slm_dir, llm_dir, slm_config=config, llm_config=config)
        forwards = [record_calls(engine.slm), record_calls(engine.llm)]
        outs = engine.generate(prompts, samplings)
        assert_no_blocks_held(engine)
        largest = max(sum(len(row.tokens) for row in rows) for calls in forwards for (rows,) in calls)
        return [comparable(o) for o in outs], [o.stats.llm_prefill_tokens for o in outs], largest

    expected, prefill, largest = run(8192, 4096)
    assert largest > 8 and sum(out[5] for out in expected) > 10  # prompts longer than 8, calls made
    chunked, chunked_prefill, largest = run(8, 4096)
    assert chunked == expected and chunked_prefill == prefill and largest <= 8
    tight, _, largest = run(8, 24)
    assert tight == expected and largest <= 8


def test_each_model_keeps_to_its_own_batch_limits(slm_dir, llm_dir, tokenizer):
    """``max_num_seqs`` and ``max_num_batched_tokens`` of each model's EngineConfig bound that model's forwards
    (here the LLM's far below the SLM's: calls wait for rows, catch-ups come in chunks), also when the LLM reads
    ahead; the outputs are unchanged."""
    prompts = [text_tokens(tokenizer, f"Q{i}: what is {i} * {i + 3}?") for i in range(8)]
    samplings = [scripted({2 + i % 3: command_tokens(tokenizer, 4)}, max_tokens=16) for i in range(8)]
    expected = [comparable(o) for o in RelayEngine(slm_dir, llm_dir, slm_config=EngineConfig(device="cpu"),
                                                  llm_config=EngineConfig(device="cpu")).generate(prompts, samplings)]
    for relay in (RelayConfig(), RelayConfig(llm_prefetch_tokens=4)):
        engine = RelayEngine(slm_dir, llm_dir, relay=relay,
                             slm_config=EngineConfig(device="cpu", block_size=4, max_num_seqs=16,
                                                     max_num_batched_tokens=64),
                             llm_config=EngineConfig(device="cpu", block_size=4, max_num_seqs=2,
                                                     max_num_batched_tokens=5))
        forwards = {"slm": record_calls(engine.slm), "llm": record_calls(engine.llm)}
        assert [comparable(o) for o in engine.generate(prompts, samplings)] == expected
        sizes = {name: [(len(rows), sum(len(row.tokens) for row in rows)) for (rows,) in calls]
                 for name, calls in forwards.items()}
        assert max(rows for rows, _ in sizes["llm"]) == 2 and max(tokens for _, tokens in sizes["llm"]) <= 5
        assert max(rows for rows, _ in sizes["slm"]) == 8 and max(tokens for _, tokens in sizes["slm"]) <= 64
        assert_no_blocks_held(engine)
