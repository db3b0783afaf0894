"""How the relay loop launches its forwards: SLM steps launched before the step before is read (overlapped, fed
on the device), the SLM's steps going on while an LLM forward has not run yet (``RelayConfig.decouple_llm``), no
overlapped row for a token that leaves the SLM's run, and the CUDA-graph path's buffers replayed eagerly.

On a CPU every forward has run when it returns, so the decoupling tests make the LLM's readbacks say they are not
ready (``Readback.ready``), always or at random, as a GPU still running a long LLM forward would.
"""
import random
from unittest import mock

import pytest
import torch

from relay_fixtures import *  # noqa: F401,F403
from relaykern import EngineConfig, RelayConfig, RelayEngine, SamplingParams
from relaykern.engine import cuda_graphs
from relaykern.engine.cuda_graphs import MAX_EXTEND_BATCH, StepGraphs
from relaykern.engine.readback import Readback


def make_engine(slm_dir, llm_dir, **relay) -> RelayEngine:
    return RelayEngine(slm_dir, llm_dir, relay=RelayConfig(**relay),
                       slm_config=EngineConfig(device="cpu", block_size=4), llm_config=EngineConfig(device="cpu"))


def test_requests_that_do_not_call_go_on_while_the_llm_runs(slm_dir, llm_dir, tokenizer):
    """With the LLM's forward never ready, the host reads it only when the SLM has nothing left to do: the request
    that never calls writes all its tokens before the first LLM token of the one that calls is read. Both write
    what the loop that waits for the LLM every step writes."""
    prompts = [text_tokens(tokenizer, "Q: 2 + 2 = ?"), text_tokens(tokenizer, "Q: 3 * 3 = ?")]
    samplings = [scripted({2: command_tokens(tokenizer, 6)}), scripted({}, max_tokens=16)]
    engine = make_engine(slm_dir, llm_dir)
    deltas = []
    with mock.patch.object(Readback, "ready", lambda self: False):
        for index, source, tokens in engine.stream(prompts, samplings):
            deltas.append((index, source))
    first_llm_token = deltas.index((0, "llm"))
    assert max(i for i, (index, _) in enumerate(deltas) if index == 1) < first_llm_token
    lockstep = make_engine(slm_dir, llm_dir, decouple_llm=False).generate(prompts, samplings)
    assert [comparable(o) for o in engine.generate(prompts, samplings)] == [comparable(o) for o in lockstep]
    assert_no_blocks_held(engine)


@pytest.mark.parametrize("overlap", [True, False], ids=["overlapped", "in-turn"])
def test_llm_forwards_read_whenever_ready_change_no_output(slm_dir, llm_dir, tokenizer, overlap):
    """LLM forwards ready at random steps: every scenario writes what the lockstep loop writes, with at most two
    LLM forwards in flight (one without overlapped steps), and every block comes back."""
    samplings = list(scenarios(tokenizer).values()) + [scripted({6: command_tokens(tokenizer, 9)}, max_tokens=40)]
    prompts = [text_tokens(tokenizer, f"Q{i}: {i} * {i + 3} = ?") for i in range(len(samplings))]
    expected = make_engine(slm_dir, llm_dir, decouple_llm=False, overlap_steps=overlap).generate(prompts, samplings)
    engine = make_engine(slm_dir, llm_dir, overlap_steps=overlap)
    rng = random.Random(0)
    deferred = most_in_flight = 0

    def ready(readback) -> bool:
        nonlocal deferred
        deferred += (not_ready := rng.random() < 0.6)
        return not not_ready

    seqs = [engine.add_request(*request) for request in zip(prompts, samplings)]
    with mock.patch.object(Readback, "ready", ready):
        while not all(seq.finished for seq in seqs):
            engine.step()
            most_in_flight = max(most_in_flight, len(engine.llm_in_flight))
    assert [comparable(engine.output(s)) for s in seqs] == [comparable(o) for o in expected]
    assert most_in_flight == (2 if overlap else 1)
    assert deferred >= 5 and (engine.overlapped_steps["llm"] > 0) == overlap
    assert_no_blocks_held(engine)


def test_a_failed_overlapped_llm_launch_waits_for_the_forward_before_it(slm_dir, llm_dir, tokenizer):
    """An overlapped LLM launch that fails (the LLM's logits processor raises on the call's second token) is not
    tried again while the forward before it stays unread: one failed forward, not one a step. Read at last, that
    request's row runs in turn and fails alone."""
    def raising(generated, logits):
        if len(generated) == second_llm_token:
            raise RuntimeError("teacher processor fell over")
        return logits

    raising.position_only = True
    command = command_tokens(tokenizer, 6)
    second_llm_token = 2 + len(command) + 1
    prompts = [text_tokens(tokenizer, "Q: 2 + 2 = ?"), text_tokens(tokenizer, "Q: 3 * 3 = ?")]
    samplings = [scripted({2: command}), scripted({}, max_tokens=20)]
    llm_samplings = [SamplingParams(temperature=0, logits_processors=[raising]), None]
    engine = make_engine(slm_dir, llm_dir)
    forwards = record_calls(engine.llm)
    seqs = [engine.add_request(*request) for request in zip(prompts, samplings, llm_samplings)]
    with mock.patch.object(Readback, "ready", lambda self: False), \
            pytest.warns(UserWarning, match="overlapped LLM step failed"):
        while not all(seq.finished for seq in seqs):
            engine.step()
    assert [engine.output(s).finish_reason for s in seqs] == ["error", "length"]
    assert "teacher processor fell over" in engine.output(seqs[0]).error
    assert len(forwards) == 3  # the catch-up, the failed overlapped forward, the row in turn (failing alone)
    assert_no_blocks_held(engine)


def test_no_slm_row_is_launched_after_a_command_that_calls(slm_dir, llm_dir, tokenizer):
    """An overlapped SLM step leaves out the row of a request whose command has come as far as ``</call``: the
    token that row would be fed most likely completes the call, sending the request to the LLM, and the row would
    be dropped. A request calling twice, every other step overlapped: no row dropped, the same output as in turn."""
    prompt = text_tokens(tokenizer, "Q: 5 * 7 = ?")
    sampling = scripted({3: command_tokens(tokenizer, 4), 14: command_tokens(tokenizer, 2)}, max_tokens=30)
    engine = make_engine(slm_dir, llm_dir)
    out = engine.generate([prompt], sampling)[0]
    assert out.stats.calls == 2 and engine.dropped_rows == 0 and engine.overlapped_steps["slm"] > 10
    in_turn = make_engine(slm_dir, llm_dir, overlap_steps=False).generate([prompt], sampling)[0]
    assert comparable(out) == comparable(in_turn)


def test_overlapped_steps_change_no_output(slm_dir, llm_dir, tokenizer):
    """SLM steps launched before the step before is read back (fed on the device; ``RelayConfig.overlap_steps``)
    write what steps in turn write, greedy and sampled, including rows dropped because their request stopped or
    called at the token they were fed; every block comes back."""
    cases = scenarios(tokenizer)
    cases["sampled"] = scripted({4: command_tokens(tokenizer, 2)}, temperature=1.0, seed=7)
    cases["sampled_logprobs"] = scripted({}, temperature=0.8, top_p=0.9, min_p=0.05, seed=3, logprobs=True)
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
