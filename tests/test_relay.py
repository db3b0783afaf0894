"""The relay engine against the reference relay (token for token, greedy), its KV invariant, and its robustness.

The SLM is scripted by logits processors that force commands at chosen response positions; the LLM runs greedy.
"""
import random

import pytest
import torch

from relay_fixtures import *  # noqa: F401,F403
from relaykern import EngineConfig, RelayConfig, RelayEngine, SamplingParams
from relaykern.engine import cuda_graphs
from relaykern.engine.cuda_graphs import MAX_EXTEND_BATCH, StepGraphs
from relaykern.engine.row import Row
from relaykern.engine.runner import ModelRunner
from relaykern.engine.sequence import Phase
from relaykern.reference import reference_generate

EOS = 151645
MAX_TOKENS = 24


def scripted(schedule: dict[int, list[int]], max_tokens: int = MAX_TOKENS, **kw) -> SamplingParams:
    kw.setdefault("temperature", 0)
    return SamplingParams(max_tokens=max_tokens, logits_processors=[force_tokens(schedule)], **kw)


def scenarios(tok) -> dict[str, SamplingParams]:
    call = lambda n: command_tokens(tok, n)  # noqa: E731
    return {
        "call": scripted({3: call(5)}),
        "two_calls": scripted({1: call(3), 14: call(2)}),
        "n_zero": scripted({2: call(0)}),
        "huge_n": scripted({1: call(99999999999)}),
        "malformed": scripted({2: text_tokens(tok, "<call>abc")}),
        "unterminated_at_max_tokens": scripted({MAX_TOKENS - 4: text_tokens(tok, "<call>12")}),
        "straddling": scripted({2: text_tokens(tok, "x.<call>7</call>,")}),
        "glued_zero_then_call": scripted({1: text_tokens(tok, ".<call>0</call>,") + call(4)}),
        "call_at_last_token": scripted({MAX_TOKENS - len(call(3)): call(3)}),
        "stop_string": scripted({5: text_tokens(tok, " STOP")}, stop=["STOP"]),
        "no_call": scripted({}),
    }


def comparable(out):
    s = out.stats
    records = [(r.n_asked, r.n_served, r.slm_catchup) for r in s.call_records]
    return (out.token_ids, out.spans, out.finish_reason, s.slm_tokens, s.llm_tokens, s.calls, s.unserved_calls,
            s.slm_catchup_tokens, records, out.text)


def run_both(slm_dir, llm_dir, slm_model, llm_model, tokenizer, prompts, samplings, relay, backend="torch",
             llm_sampling=None):
    engine = RelayEngine(slm_dir, llm_dir, relay=relay,
                         slm_config=EngineConfig(device="cpu", attention_backend=backend),
                         llm_config=EngineConfig(device="cpu", attention_backend=backend))
    ours = engine.generate(prompts, samplings, llm_sampling)
    theirs = [reference_generate([p], slm_model, llm_model, tokenizer, s, llm_sampling, relay)[0]
              for p, s in zip(prompts, samplings)]
    return engine, ours, theirs


@pytest.mark.parametrize("relay", [RelayConfig(max_call_tokens=6), RelayConfig(max_calls=1),
                                   RelayConfig(max_calls=1, after_max_calls="finish"),
                                   RelayConfig(llm_prefetch_tokens=7), RelayConfig(early_catchup_tokens=1)],
                         ids=["capped", "max_calls_continue", "max_calls_finish", "prefetch", "early_catchup"])
def test_engine_equals_reference_on_a_mixed_batch(slm_dir, llm_dir, slm_model, llm_model, tokenizer, relay):
    cases = scenarios(tokenizer)
    prompts = [text_tokens(tokenizer, f"Question {i}: what is {i} + {i * 7}?") for i in range(len(cases))]
    engine, ours, theirs = run_both(slm_dir, llm_dir, slm_model, llm_model, tokenizer, prompts,
                                    list(cases.values()), relay)
    for name, a, b in zip(cases, ours, theirs):
        assert comparable(a) == comparable(b), name
        # Catch-up, not re-prefill. (Prefetching, the LLM also reads what no call needs; reading from a command's
        # first tokens, it reads for nothing when the command is no call: N = 0, malformed, cut by max_tokens.)
        if not relay.llm_prefetch_tokens and a.stats.calls:
            assert a.stats.llm_prefill_tokens <= b.stats.llm_prefill_tokens, name
    by_name = dict(zip(cases, ours))
    assert by_name["malformed"].finish_reason == "malformed_call"
    assert by_name["n_zero"].stats.calls == 0
    assert by_name["unterminated_at_max_tokens"].finish_reason == "length"
    assert by_name["stop_string"].finish_reason == "stop"
    if relay.max_calls == 5:
        assert by_name["two_calls"].stats.calls == 2
        assert by_name["huge_n"].stats.call_records[0].n_served == 6
    assert_no_blocks_held(engine)


def record_calls(obj, method: str = "execute") -> list[tuple]:
    """The positional arguments of every call of ``obj.<method>`` from now on (a runner's: ``(rows,)`` per
    forward)."""
    calls, original = [], getattr(obj, method)

    def recorded(*args, **kwargs):
        calls.append(args)
        return original(*args, **kwargs)

    setattr(obj, method, recorded)
    return calls


def test_batched_llm_calls_write_the_same_tokens_with_fewer_llm_forwards(slm_dir, llm_dir, tokenizer):
    prompts = [text_tokens(tokenizer, f"Request {i}.") for i in range(8)]
    samplings = [scripted({1 + 3 * i: command_tokens(tokenizer, 4)}, max_tokens=40) for i in range(8)]

    def run(relay: RelayConfig):
        cpu = EngineConfig(device="cpu")
        engine = RelayEngine(slm_dir, llm_dir, relay=relay, slm_config=cpu, llm_config=cpu)
        forwards = record_calls(engine.llm)
        return [comparable(o) for o in engine.generate(prompts, samplings)], len(forwards)

    eager, eager_forwards = run(RelayConfig())
    batched, batched_forwards = run(RelayConfig(llm_batch_wait_steps=12, llm_batch_min_rows=8))
    assert batched == eager and all(out[5] == 1 for out in eager)  # each request made its one call
    assert eager_forwards >= 20 and batched_forwards <= 8  # 8 staggered calls of 4 tokens
    # The LLM never starts early here, yet nothing hangs: it runs once the SLM has nothing to do, for all 8 at once.
    alone, alone_forwards = run(RelayConfig(llm_batch_wait_steps=10**9))
    assert alone == eager and alone_forwards == 4


def test_llm_eos_ends_the_request_and_triton_backend_agrees(slm_dir, llm_dir, slm_model, llm_model, tokenizer):
    eos_at_11 = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logits_processors=[force_tokens({11: [EOS]})])
    prompts = [text_tokens(tokenizer, "Hello"), text_tokens(tokenizer, "A longer prompt, with more tokens.")]
    samplings = [scripted({2: command_tokens(tokenizer, 9)}, max_tokens=12),
                 scripted({1: command_tokens(tokenizer, 2)}, max_tokens=12)]
    _, ours, theirs = run_both(slm_dir, llm_dir, slm_model, llm_model, tokenizer, prompts, samplings,
                               RelayConfig(), backend="triton", llm_sampling=eos_at_11)
    assert [comparable(o) for o in ours] == [comparable(o) for o in theirs]
    assert ours[0].finish_reason == "stop" and ours[0].token_ids[-1] == EOS and ours[0].spans[-1][0] == "llm"


def test_a_stop_string_the_llm_writes_ends_the_request(slm_dir, llm_dir, slm_model, llm_model, tokenizer):
    """The default LLM sampling keeps the request's stop rules: a stop string completed by the LLM's third token
    ends the request there, as in the reference relay."""
    prompt = [text_tokens(tokenizer, "Hello")]
    call = scripted({1: command_tokens(tokenizer, 8)}, max_tokens=20)
    first = RelayEngine(slm_dir, llm_dir, slm_config=EngineConfig(device="cpu"),
                        llm_config=EngineConfig(device="cpu")).generate(prompt, call)[0]
    start = next(start for source, start, _ in first.spans if source == "llm")
    stop = tokenizer.decode(first.token_ids[start + 2:start + 3])
    assert stop.strip() and stop not in tokenizer.decode(first.token_ids[:start + 2])
    stopping = scripted({1: command_tokens(tokenizer, 8)}, max_tokens=20, stop=[stop])
    _, ours, theirs = run_both(slm_dir, llm_dir, slm_model, llm_model, tokenizer, prompt, [stopping], RelayConfig())
    assert comparable(ours[0]) == comparable(theirs[0])
    assert ours[0].finish_reason == "stop" and ours[0].token_ids == first.token_ids[:start + 3]


def test_the_llm_draws_with_its_own_seed_when_given(slm_dir, llm_dir, tokenizer):
    cpu = EngineConfig(device="cpu")
    engine = RelayEngine(slm_dir, llm_dir, slm_config=cpu, llm_config=cpu)
    sampling = scripted({1: command_tokens(tokenizer, 12)}, max_tokens=20, seed=5)

    def llm_tokens(llm_seed):
        out = engine.generate([text_tokens(tokenizer, "Hello")], sampling, SamplingParams(temperature=1.0,
                                                                                           seed=llm_seed))[0]
        return [out.token_ids[start:end] for source, start, end in out.spans if source == "llm"]

    assert llm_tokens(111) == llm_tokens(111) != llm_tokens(222)
    assert llm_tokens(None) == llm_tokens(None)  # derived from the request's seed


def gather_kv(runner: ModelRunner, seq_id: int, length: int) -> torch.Tensor:
    slots = torch.tensor(runner.blocks.slot_mapping(seq_id, 0, length))
    cache = runner.kv_pool.cache  # [L, 2, NB, BS, H, D]
    flat = cache.reshape(cache.shape[0], 2, -1, *cache.shape[4:])
    return flat[:, :, slots]


def fresh_prefill_kv(path, tokens: list[int]) -> torch.Tensor:
    runner = ModelRunner(path, EngineConfig(device="cpu", num_blocks=64))
    runner.blocks.allocate(0, tokens)
    runner.execute([Row(0, tokens, 0, True, SamplingParams(temperature=0), 0, 0, [], False)])
    return gather_kv(runner, 0, len(tokens))


@pytest.mark.parametrize("budget,prefetch", [(8192, 0), (3, 0), (8192, 2)],
                         ids=["whole_rows", "chunks_of_3", "prefetch_2"])
def test_each_cache_equals_a_fresh_prefill_of_its_view(slm_dir, llm_dir, tokenizer, budget, prefetch):
    config = EngineConfig(device="cpu", max_num_batched_tokens=budget)
    engine = RelayEngine(slm_dir, llm_dir, relay=RelayConfig(llm_prefetch_tokens=prefetch), slm_config=config,
                         llm_config=config)
    script = {1: text_tokens(tokenizer, "x.<call>4</call>,"), 14: command_tokens(tokenizer, 3)}
    seq = engine.add_request(text_tokens(tokenizer, "Compute 2+2."), scripted(script, max_tokens=22))
    checked_llm = checked_slm_after_call = 0
    while not seq.finished:
        engine.step()
        if seq.finished:
            break
        for runner, view, path in ((engine.slm, seq.slm, slm_dir), (engine.llm, seq.llm, llm_dir)):
            if view.allocated and view.num_cached:
                ours = gather_kv(runner, seq.request_id, view.num_cached)
                assert torch.allclose(ours, fresh_prefill_kv(path, view.tokens[:view.num_cached]), atol=1e-5)
                checked_llm += runner is engine.llm
                checked_slm_after_call += runner is engine.slm and seq.stats.calls > 0
    assert seq.stats.calls == 2 and checked_llm >= 2 and checked_slm_after_call >= 2
    command_free = tokenizer.decode(seq.llm.tokens[len(seq.prompt_ids):])
    assert "<call>" not in command_free and "call>" not in command_free and ".," in command_free


def random_script(rng: random.Random, tok) -> SamplingParams:
    schedule, position = {}, rng.randint(0, 3)
    for _ in range(rng.randint(0, 2)):
        command = command_tokens(tok, rng.randint(0, 6))
        schedule[position] = command
        position += len(command) + 7 + rng.randint(0, 4)
    return scripted(schedule, max_tokens=rng.randint(4, 28))


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


def run_with_random_aborts(engine: RelayEngine, prompts, samplings, expected, rng: random.Random, rate: float) -> int:
    """Runs the requests, aborting each running or waiting one with probability ``rate`` after every step: the
    others must write ``expected`` (``comparable`` outputs of a run without aborts), the aborted ones a prefix of
    theirs, and no block may stay held. The number aborted."""
    seqs = [engine.add_request(prompt, sampling) for prompt, sampling in zip(prompts, samplings)]
    while engine.scheduler.has_work:
        engine.step()
        for seq in engine.scheduler.sequences():
            if rng.random() < rate:
                engine.abort(seq)
    outs = [comparable(engine.output(seq)) for seq in seqs]
    aborted = [i for i, seq in enumerate(seqs) if seq.finish_reason == "abort"]
    assert all(out == want if i not in aborted else out[0] == want[0][:len(out[0])]
               for i, (out, want) in enumerate(zip(outs, expected)))
    assert_no_blocks_held(engine)
    return len(aborted)


def test_llm_prefetch_reads_ahead_and_changes_no_output(slm_dir, llm_dir, tokenizer):
    """RelayConfig.llm_prefetch_tokens: while the LLM serves no call it reads ahead (5 tokens a forward here,
    sampling nothing) the prompts and then the SLM's text up to each safe point, so a late call's catch-up is one
    token (a view's last token is always left for it); the outputs are the lazy LLM's, also when the command
    shares tokens with the text around it."""
    prompts = [text_tokens(tokenizer, f"Question {i}: what is {i} + {i * 7}? Think it through.") for i in range(3)]
    samplings = [scripted({12: command_tokens(tokenizer, 3)}), scripted({}),
                 scripted({4: text_tokens(tokenizer, "x.<call>2</call>,")})]

    def run(relay: RelayConfig):
        engine = RelayEngine(slm_dir, llm_dir, relay=relay, slm_config=EngineConfig(device="cpu"),
                             llm_config=EngineConfig(device="cpu"))
        forwards = record_calls(engine.llm)
        seqs = [engine.add_request(prompt, sampling) for prompt, sampling in zip(prompts, samplings)]
        while not all(seq.finished for seq in seqs):
            engine.step()
        assert_no_blocks_held(engine)
        return [engine.output(seq) for seq in seqs], [seq.llm.tokens for seq in seqs], [rows for (rows,) in forwards]

    lazy, lazy_views, _ = run(RelayConfig(early_catchup_tokens=0))
    eager, eager_views, forwards = run(RelayConfig(llm_prefetch_tokens=5, early_catchup_tokens=0))
    assert [comparable(o) for o in eager] == [comparable(o) for o in lazy]
    # What the LLM read by its last call, ahead and at the calls, is the lazy LLM's view token for token (reading
    # ahead, it may have read more since).
    assert all(eager_view[:len(lazy_view)] == lazy_view for eager_view, lazy_view in zip(eager_views, lazy_views))
    prefetches = [rows for rows in forwards if not any(row.samples for row in rows)]
    assert prefetches and max(sum(len(row.tokens) for row in rows) for rows in prefetches) <= 5
    late, never, straddling = (o.stats for o in eager)
    assert late.call_records[0].llm_catchup == 1 < lazy[0].stats.call_records[0].llm_catchup
    assert never.calls == 0 and never.llm_prefill_tokens >= len(prompts[1]) - 1
    assert lazy[1].stats.llm_prefill_tokens == 0 and straddling.calls == 1


def test_early_catchup_reads_up_to_a_command_while_the_slm_writes_it(slm_dir, llm_dir, tokenizer):
    """RelayConfig.early_catchup_tokens (1 here, any unread token): once the SLM has written ``<call``, the idle LLM
    reads the request up to the command in a forward of its own (sampling nothing) while the SLM writes the rest,
    so the call's catch-up is one token; outputs are those of an LLM reading at the call only, also for N = 0 (what
    was read serves the next call) and for a command sharing a token with the text before it."""
    prompts = [text_tokens(tokenizer, f"Question {i}: what is {i} + {i * 7}? Think it through.") for i in range(3)]
    samplings = [scripted({12: command_tokens(tokenizer, 3)}),
                 scripted({2: command_tokens(tokenizer, 0), 12: command_tokens(tokenizer, 2)}),
                 scripted({4: text_tokens(tokenizer, "x.<call>2</call>,")})]

    def run(relay: RelayConfig):
        engine = RelayEngine(slm_dir, llm_dir, relay=relay, slm_config=EngineConfig(device="cpu"),
                             llm_config=EngineConfig(device="cpu"))
        forwards = record_calls(engine.llm)
        outs = engine.generate(prompts, samplings)
        assert_no_blocks_held(engine)
        return outs, [rows for (rows,) in forwards]

    at_call, _ = run(RelayConfig(early_catchup_tokens=0))
    early, forwards = run(RelayConfig(early_catchup_tokens=1))
    assert [comparable(o) for o in early] == [comparable(o) for o in at_call]
    assert any(not any(row.samples for row in rows) for rows in forwards)
    catchups = [[r.llm_catchup for r in o.stats.call_records] for o in early]
    assert catchups[0] == [1] < [r.llm_catchup for r in at_call[0].stats.call_records]
    assert catchups[1] == [1] and early[1].stats.calls == 1
    assert catchups[2][0] < at_call[2].stats.call_records[0].llm_catchup
    # Read ahead or at the call, the LLM reads the same tokens, once.
    assert [o.stats.llm_prefill_tokens for o in early] == [o.stats.llm_prefill_tokens for o in at_call]


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


def test_overlapped_steps_feed_the_next_chunk_at_once(slm_dir, llm_dir, tokenizer):
    """A long prompt arriving while another request decodes: with overlapped steps, each of its chunks rides in the
    step right after the one before (the host knows its tokens), not a step later."""
    config = EngineConfig(device="cpu", block_size=4, max_num_batched_tokens=8)
    engine = RelayEngine(slm_dir, llm_dir, slm_config=config, llm_config=config)
    decoding = engine.add_request([101, 102, 103], scripted({}, max_tokens=20))
    engine.step()
    forwards = record_calls(engine.slm)
    long = engine.add_request(list(range(1000, 1030)), scripted({}, max_tokens=3))
    while not (decoding.finished and long.finished):
        engine.step()
    with_long = [i for i, (rows,) in enumerate(forwards) if any(row.seq_id == long.request_id for row in rows)]
    chunks = [row for (rows,) in forwards for row in rows if row.seq_id == long.request_id and not row.samples]
    assert len(chunks) >= 4 and with_long[:len(chunks) + 1] == list(range(with_long[0], with_long[0] + len(chunks) + 1))
    assert [row.start for row in chunks] == [sum(len(row.tokens) for row in chunks[:i]) for i in range(len(chunks))]
    assert engine.overlapped_steps["slm"] >= len(chunks)
    assert_no_blocks_held(engine)

    # An overlapped step carrying a chunk fails (another request's processor raises in it): that request fails
    # alone; the chunked prompt, its blocks given back, is recomputed and writes what it writes alone.
    def raising(generated, logits):
        if len(generated) == 2:
            raise RuntimeError("processor fell over")
        return logits

    raising.position_only = True
    prompt = list(range(2000, 2027))
    broken = engine.add_request([101, 102, 103, 104, 105], SamplingParams(
        temperature=0, max_tokens=4, ignore_eos=True, logits_processors=[raising]))
    long = engine.add_request(prompt, scripted({}, max_tokens=2))
    with pytest.warns(UserWarning, match="overlapped SLM step failed"):
        while not (broken.finished and long.finished):
            engine.step()
    assert broken.finish_reason == "error" and "fell over" in broken.error
    assert engine.output(long).token_ids == engine.generate([prompt], scripted({}, max_tokens=2))[0].token_ids
    assert max(sum(len(row.tokens) for row in rows) for (rows,) in forwards) <= 8  # the recompute too
    assert_no_blocks_held(engine)


def test_robustness(slm_dir, llm_dir, tokenizer, tmp_path):
    # A command with no LLM configured stays text and is counted as unserved.
    alone = RelayEngine(slm_dir, slm_config=EngineConfig(device="cpu"))
    out = alone.generate([text_tokens(tokenizer, "Hi")], scripted({1: command_tokens(tokenizer, 3)}, max_tokens=10))[0]
    assert out.stats.unserved_calls == 1 and out.stats.calls == 0 and "<call>3</call>" in out.text
    # An LLM failing mid-request fails that request alone.
    engine = RelayEngine(slm_dir, llm_dir, slm_config=EngineConfig(device="cpu"), llm_config=EngineConfig(device="cpu"))

    def broken(generated, logits):
        raise RuntimeError("teacher fell over")

    prompts = [text_tokens(tokenizer, "One"), text_tokens(tokenizer, "Two")]
    calling = scripted({1: command_tokens(tokenizer, 3)}, max_tokens=12)
    outs = [engine.generate([prompts[0]], calling, SamplingParams(temperature=0, logits_processors=[broken]))[0]]
    outs += engine.generate([prompts[1]], calling)
    assert outs[0].finish_reason == "error" and "teacher fell over" in outs[0].error
    assert outs[1].finish_reason == "length" and outs[1].stats.calls == 1
    # SLM and LLM with different vocabularies are refused before any work.
    other = tmp_path / "other"
    other.mkdir()
    for f in llm_dir.iterdir():
        (other / f.name).write_bytes(f.read_bytes())
    tok = tokenizer.__class__.from_pretrained(llm_dir)
    tok.add_tokens(["<extra-token>"])
    tok.save_pretrained(other)
    with pytest.raises(ValueError, match="different vocabularies"):
        RelayEngine(slm_dir, other)
    # A pool too small for one request is refused at submission.
    small = RelayEngine(slm_dir, llm_dir, slm_config=EngineConfig(device="cpu", num_blocks=4),
                        llm_config=EngineConfig(device="cpu", num_blocks=4))
    with pytest.raises(ValueError, match="KV blocks"):
        small.add_request(prompts[0], SamplingParams(max_tokens=200))


def test_official_style_reprefill_mode_gives_the_same_relay(slm_dir, llm_dir, tokenizer):
    prompts = [text_tokens(tokenizer, "Re-prefill check")] * 2
    samplings = [scripted({1: command_tokens(tokenizer, 2), 12: command_tokens(tokenizer, 3)}),
                 scripted({2: command_tokens(tokenizer, 4)})]
    outs = {}
    for mode in ("persistent", "reprefill"):
        engine = RelayEngine(slm_dir, llm_dir, slm_config=EngineConfig(device="cpu"),
                             llm_config=EngineConfig(device="cpu"), llm_cache=mode)
        outs[mode] = engine.generate(prompts, samplings)
        assert engine.llm.blocks.num_free_blocks == engine.llm.num_blocks
    assert [comparable(o) for o in outs["persistent"]] == [comparable(o) for o in outs["reprefill"]]
    persistent, reprefill = outs["persistent"][0].stats, outs["reprefill"][0].stats
    assert persistent.calls == 2
    # The second call re-reads the prompt and everything before it instead of only what is new.
    assert reprefill.llm_prefill_tokens > persistent.llm_prefill_tokens


@pytest.mark.parametrize("backend,requests,max_tokens,extend_batch", [
    ("torch", 16, 64, MAX_EXTEND_BATCH), ("triton", 5, 16, MAX_EXTEND_BATCH), ("torch", 12, 64, 1)],
    ids=["torch", "triton", "split"])
def test_step_graph_buffers_give_the_same_tokens(slm_dir, llm_dir, tokenizer, monkeypatch, backend, requests,
                                                 max_tokens, extend_batch):
    """The CUDA-graph path's buffer handling (padding rows and tokens, one input buffer per shape, block tables of
    growing width), replayed eagerly on the CPU: the same outputs as the plain path, through a pool that preempts.
    Decode steps and extend steps (prompts, catch-ups, both mixed with decode rows) both go through the graphs
    (``max_tokens`` per forward: longer prompts are chunked; under the interpreter, fewer graph shapes). "split":
    extend graphs of one row only, so that mixed steps replay the decode graph for their one-token rows and an extend
    graph for the others (``ModelRunner._split_logits``), in whatever order the rows come."""
    monkeypatch.setattr(cuda_graphs, "MAX_EXTEND_BATCH", extend_batch)
    rng = random.Random(1)
    prompts = [[rng.randrange(100, 150000) for _ in range(rng.randint(1, 30))] for _ in range(requests)]
    samplings = [random_script(rng, tokenizer) for _ in prompts]

    def run(graphs: bool):
        config = EngineConfig(device="cpu", block_size=4, num_blocks=40, max_num_seqs=6, attention_backend=backend,
                              max_num_batched_tokens=max_tokens)
        engine = RelayEngine(slm_dir, llm_dir, slm_config=config, llm_config=config)
        replays, splits = [], []
        if graphs:
            for runner in (engine.slm, engine.llm):
                runner.graphs = StepGraphs(runner, capture=False)
                replays.append(record_calls(runner.graphs, "run"))
                split = runner._split_logits
                runner._split_logits = lambda rows, fed, split=split: splits.append(split(rows, fed)) or splits[-1]
        return [comparable(o) for o in engine.generate(prompts, samplings)], replays, splits

    plain, _, _ = run(graphs=False)
    replayed, replays, splits = run(graphs=True)
    assert replayed == plain
    shapes = [[call[0] for call in calls] for calls in replays]
    assert all(sum(s.decode for s in model) >= 2 for model in shapes)  # both models decoded through the graphs
    assert all(sum(not s.decode for s in model) >= 1 for model in shapes)  # and caught up / prefilled
    if extend_batch > 1:
        assert any(not s.decode and s.batch > 1 for model in shapes for s in model)  # a mixed or batched extend
    else:
        assert sum(logits is not None for logits in splits) >= 2


def test_overlapped_steps_change_no_output(slm_dir, llm_dir, tokenizer):
    """SLM steps launched before the step before is read back (fed on the device; ``RelayConfig.overlap_steps``)
    write what steps in turn write, greedy and sampled, including rows dropped because their request stopped or
    called at the token they were fed; every block comes back."""
    cases = scenarios(tokenizer)
    cases["sampled"] = scripted({4: command_tokens(tokenizer, 2)}, temperature=1.0, seed=7)
    cases["sampled_logprobs"] = scripted({}, temperature=0.8, top_p=0.9, seed=3, logprobs=True)
    # All calling at once (the SLM idle), one of them stopped by the LLM's EOS in the middle of its call.
    aligned = [scripted({2: command_tokens(tokenizer, n)}, max_tokens) for n, max_tokens in ((9, 24), (6, 24), (9, 14))]
    llm_eos = [SamplingParams(temperature=0, logits_processors=[force_tokens({12: [EOS]})]), None, None]
    for samplings, llm_samplings in ((list(cases.values()), [None] * len(cases)), (aligned, llm_eos)):
        prompts = [text_tokens(tokenizer, f"Q{i}: {i} * {i + 2} = ?") for i in range(len(samplings))]
        outputs, engines = {}, {}
        for overlap in (False, True):
            engine = RelayEngine(slm_dir, llm_dir, relay=RelayConfig(overlap_steps=overlap),
                                 slm_config=EngineConfig(device="cpu", block_size=4, num_blocks=64),
                                 llm_config=EngineConfig(device="cpu", block_size=4))
            seqs = [engine.add_request(*request) for request in zip(prompts, samplings, llm_samplings)]
            while not all(seq.finished for seq in seqs):
                engine.step()
            outputs[overlap] = [engine.output(seq) for seq in seqs]
            engines[overlap] = engine
            assert_no_blocks_held(engine)
        for a, b in zip(outputs[False], outputs[True]):
            assert comparable(a) == comparable(b)
            if a.logprobs is not None:  # (rows batched otherwise: products summed in another order)
                torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=1e-5)
        assert engines[False].overlapped_steps == {"slm": 0, "llm": 0} and engines[True].steps == engines[False].steps
        overlapped = engines[True].overlapped_steps
        if samplings is aligned:  # the LLM's decode steps while the SLM, every request calling, waits
            assert overlapped["llm"] >= 3 and outputs[True][0].finish_reason == "stop"
        else:  # (a step in which a call ends runs in turn; the malformed and stop requests end at once)
            assert overlapped["slm"] >= engines[True].steps // 2 and engines[True].dropped_rows > 0
