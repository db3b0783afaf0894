"""The relay engine against the reference relay (token for token, greedy), its KV invariant, the LLM's reading
ahead, and its robustness. (Pools, preemption, aborts and batch limits: test_relay_pool.py; how the loop launches
its forwards: test_relay_steps.py.)

The SLM is scripted by logits processors that force commands at chosen response positions; the LLM runs greedy.
"""
import gc
import weakref

import pytest
import torch

from relay_fixtures import *  # noqa: F401,F403
from relaykern import EngineConfig, RelayConfig, RelayEngine, SamplingParams
from relaykern.engine.cuda_graphs import StepGraphs
from relaykern.engine.row import Row
from relaykern.engine.runner import ModelRunner
from relaykern.reference import reference_generate


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
    spaced = text_tokens(tokenizer, "so") + text_tokens(tokenizer, " ")  # ("so" "<" would merge: " <")
    script = {1: text_tokens(tokenizer, "x.<call>4</call>,"), 14: spaced + text_tokens(tokenizer, "<call>3</call>\n\n")}
    seq = engine.add_request(text_tokens(tokenizer, "Compute 2+2."), scripted(script, max_tokens=26))
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
    at_second_call = seq.llm.tokens[:len(seq.llm.tokens) - seq.stats.call_records[1].n_served]
    assert at_second_call[-1:] == spaced[:1]  # nor the whitespace around the command (its last token is ">\n\n")


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
                 scripted({2: command_tokens(tokenizer, 0), 10: text_tokens(tokenizer, "\n\n"),
                           11: text_tokens(tokenizer, " ") + command_tokens(tokenizer, 2)}),
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


def test_a_dropped_engine_frees_its_memory_at_once(slm_dir, llm_dir, tokenizer):
    """No reference cycle holds an engine: dropped, its models, KV pools and graph buffers go at once (on a GPU,
    most of its memory), not whenever Python's cycle collector next runs; also after calls and reading ahead."""
    config = EngineConfig(device="cpu", max_num_seqs=4, max_num_batched_tokens=32)
    engine = RelayEngine(slm_dir, llm_dir, relay=RelayConfig(llm_prefetch_tokens=4, early_catchup_tokens=1),
                         slm_config=config, llm_config=config)
    engine.slm.graphs, engine.llm.graphs = StepGraphs(engine.slm, capture=False), StepGraphs(engine.llm, capture=False)
    calling = scripted({2: command_tokens(tokenizer, 3)})
    outs = engine.generate([text_tokens(tokenizer, "Hello there"), [101, 102]], calling)
    assert all(out.stats.calls == 1 for out in outs)
    alive = [weakref.ref(obj) for obj in (engine, engine.slm, engine.llm, engine.slm.kv_pool, engine.llm.graphs)]
    gc.disable()
    try:
        del engine
        assert [ref() for ref in alive] == [None] * len(alive)
    finally:
        gc.enable()
