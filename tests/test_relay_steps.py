"""How the relay loop launches its forwards: the SLM's steps going on while an LLM forward has not run yet
(``RelayConfig.decouple_llm``), and no overlapped row for a token that leaves the SLM's run.

On a CPU every forward has run when it returns, so the decoupling tests make the LLM's readbacks say they are not
ready (``Readback.ready``), always or at random, as a GPU still running a long LLM forward would.
"""
import random
from unittest import mock

import pytest

from relay_fixtures import *  # noqa: F401,F403
from relaykern import EngineConfig, RelayConfig, RelayEngine, SamplingParams
from relaykern.engine.readback import Readback
from test_relay import comparable, record_calls, scenarios, scripted


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
