"""The official evaluation loop's rounds over our engine (``relaykern.bench.official_loop``) write what our relay
writes: same commands, N, LLM views and finish reasons, only the schedule of the work differs."""
import pytest

from relay_fixtures import *  # noqa: F401,F403

from relaykern.bench.official_loop import official_loop
from relaykern.bench.workloads import make_workload
from relaykern.config import EngineConfig, RelayConfig, SamplingParams
from relaykern.engine.relay import RelayEngine


def summary(out):
    s = out.stats
    return (out.token_ids, out.spans, out.finish_reason, s.slm_tokens, s.llm_tokens, s.calls, s.unserved_calls,
            [(r.n_asked, r.n_served) for r in s.call_records])


def run_both(slm_dir, llm_dir, prompts, samplings, schedules, relay=None):
    cpu = EngineConfig(device="cpu")
    ours = RelayEngine(slm_dir, llm_dir, relay=relay, slm_config=cpu, llm_config=cpu).generate(prompts, samplings)
    slm, llm = RelayEngine(slm_dir, slm_config=cpu), RelayEngine(llm_dir, slm_config=cpu)
    official, rounds = official_loop(slm, llm, prompts, samplings, schedules, relay)
    assert [summary(o) for o in official] == [summary(o) for o in ours]
    for engine in (slm, llm):
        assert_no_blocks_held(engine)
    return official, rounds, llm


def test_rounds_write_what_our_relay_writes(slm_dir, llm_dir, tokenizer):
    workload = make_workload(tokenizer, name="rounds", batch=5, prompt_length=20, max_tokens=90, ratio=0.1,
                             vocab_size=5000, staggered=True)
    official, rounds, llm = run_both(slm_dir, llm_dir, workload.prompts, workload.samplings, workload.schedules)
    calls = len(workload.calls[0])
    assert all(o.stats.calls == calls for o in official) and calls > 1
    assert rounds == calls + 1
    # Each call submits the whole context; the LLM's prefix cache serves what it computed at the last one.
    submitted = sum(o.stats.llm_prefill_tokens for o in official)
    assert 0 < llm.slm.prefix_hit_tokens < submitted


def flatten(schedule: dict[int, list[int]]) -> dict[int, int]:
    return {start + i: token for start, tokens in schedule.items() for i, token in enumerate(tokens)}


@pytest.mark.parametrize("after_max_calls", ["continue", "finish"])
def test_protocol_cases_follow_our_relay(slm_dir, llm_dir, tokenizer, after_max_calls):
    call = lambda n: command_tokens(tokenizer, n)  # noqa: E731
    stray = text_tokens(tokenizer, "a</call>b")
    cases = {
        "n=0, then a call": {2: call(0), 12: call(3)},
        "huge n, capped by the budget": {1: call(10**6)},
        "past max_calls": {1: call(2), 12: call(2), 24: call(2)},
        "a command at the last token": {40 - len(call(4)): call(4)},
        "malformed": {3: text_tokens(tokenizer, "<call>x</call>")},
        "stray close tag": {3: stray, 10: call(2)},
    }
    schedules = [flatten(s) for s in cases.values()]
    samplings = [SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logits_processors=[force_tokens(s)])
                 for s in cases.values()]
    prompts = [text_tokens(tokenizer, f"case {name}") for name in cases]
    relay = RelayConfig(max_calls=2, after_max_calls=after_max_calls)
    official, _, _ = run_both(slm_dir, llm_dir, prompts, samplings, schedules, relay)
    outcome = dict(zip(cases, official))
    assert outcome["n=0, then a call"].stats.calls == 1
    assert outcome["huge n, capped by the budget"].stats.llm_tokens == 40 - 1 - len(call(10**6))
    assert outcome["past max_calls"].stats.calls == 2
    assert outcome["past max_calls"].finish_reason == ("length" if after_max_calls == "continue" else "max_calls")
    assert outcome["malformed"].finish_reason == "malformed_call"
    assert outcome["stray close tag"].stats.calls == 1
