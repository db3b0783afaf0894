"""The reference relay over tiny random Qwen3 models, with a scripted SLM (forced command tokens)."""
import pytest
import torch

from relay_fixtures import *  # noqa: F401,F403  (fixtures and helpers)
from relay_fixtures import command_tokens, force_tokens, greedy_tokens, text_tokens
from relaykern import protocol
from relaykern.config import RelayConfig, SamplingParams
from relaykern.reference import eos_token_ids, load_reference_models, reference_generate


@pytest.fixture(scope="module")
def prompt(tokenizer):
    return text_tokens(tokenizer, "Question: what is 2+2? Answer:")


def greedy(max_tokens=20, schedule=None, **kwargs):
    processors = [force_tokens(schedule)] if schedule else []
    return SamplingParams(temperature=0, max_tokens=max_tokens, logits_processors=processors, **kwargs)


def run_one(prompt, slm, llm, tokenizer, sampling, **kwargs):
    return reference_generate([prompt], slm, llm, tokenizer, sampling, **kwargs)[0]


def test_call_served_with_tag_free_context(prompt, slm_model, llm_model, tokenizer):
    cmd = command_tokens(tokenizer, 5)
    out = run_one(prompt, slm_model, llm_model, tokenizer, greedy(20, {3: cmd}))
    ids = out.token_ids
    end = 3 + len(cmd)
    assert ids[3:end] == cmd
    assert out.spans == [("slm", 0, end), ("llm", end, end + 5), ("slm", end + 5, 20)]
    # The LLM saw the prompt and the three SLM tokens, the whole-token command removed.
    assert ids[end : end + 5] == greedy_tokens(llm_model, prompt + ids[:3], 5)
    # The SLM saw everything, its command included.
    assert ids[end + 5] == greedy_tokens(slm_model, prompt + ids[: end + 5], 1)[0]
    assert out.finish_reason == "length"
    stats = out.stats
    assert (stats.slm_tokens, stats.llm_tokens, stats.calls, stats.unserved_calls) == (15, 5, 1, 0)
    assert (stats.llm_prefill_tokens, stats.slm_catchup_tokens) == (len(prompt) + 3, 5)
    record = stats.call_records[0]
    assert (record.n_asked, record.n_served, record.llm_catchup, record.slm_catchup) == (5, 5, len(prompt) + 3, 5)
    assert out.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_command_straddling_tokens(prompt, slm_model, llm_model, tokenizer):
    """``.<`` ... ``>,``: the SLM stops right after ``>,``; the LLM keeps the outside bytes ``.,`` re-encoded."""
    straddle = text_tokens(tokenizer, ".<call>7</call>,")
    assert tokenizer.convert_ids_to_tokens([straddle[0], straddle[-1]]) == [".<", ">,"]
    out = run_one(prompt, slm_model, llm_model, tokenizer, greedy(20, {2: straddle}))
    end = 2 + len(straddle)
    assert out.token_ids[2:end] == straddle
    assert out.spans[:2] == [("slm", 0, end), ("llm", end, end + 7)]
    view = out.token_ids[:2] + text_tokens(tokenizer, ".,")
    assert out.token_ids[end : end + 7] == greedy_tokens(llm_model, prompt + view, 7)
    assert out.stats.llm_prefill_tokens == len(prompt) + len(view)


def test_every_command_is_stripped_from_the_llm_view(prompt, slm_model, llm_model, tokenizer):
    """An N=0 command stays in the text but not in the LLM's view; the served one neither."""
    zero, five = command_tokens(tokenizer, 0), command_tokens(tokenizer, 5)
    schedule = {1: zero, 1 + len(zero) + 2: five}
    out = run_one(prompt, slm_model, llm_model, tokenizer, greedy(30, schedule))
    ids = out.token_ids
    call_end = 1 + len(zero) + 2 + len(five)
    assert out.stats.calls == 1 and out.stats.unserved_calls == 0
    view = ids[:1] + ids[1 + len(zero) : 1 + len(zero) + 2]
    assert ids[call_end : call_end + 5] == greedy_tokens(llm_model, prompt + view, 5)


def test_zero_tokens_is_no_call(prompt, slm_model, llm_model, tokenizer):
    cmd = command_tokens(tokenizer, 0)
    out = run_one(prompt, slm_model, llm_model, tokenizer, greedy(15, {2: cmd}))
    assert out.token_ids[2 : 2 + len(cmd)] == cmd
    assert out.spans == [("slm", 0, 15)] and out.finish_reason == "length"
    assert out.stats.calls == 0 and out.stats.unserved_calls == 0
    assert "<call>0</call>" in out.text


def test_without_llm_commands_stay_text(prompt, slm_model, tokenizer):
    cmd = command_tokens(tokenizer, 4)
    out = run_one(prompt, slm_model, None, tokenizer, greedy(15, {2: cmd}))
    assert out.spans == [("slm", 0, 15)] and out.finish_reason == "length"
    assert out.stats.calls == 0 and out.stats.unserved_calls == 1
    assert "<call>4</call>" in out.text


@pytest.mark.parametrize("after", ["continue", "finish"])
def test_max_calls(prompt, slm_model, llm_model, tokenizer, after):
    cmd = command_tokens(tokenizer, 3)
    second = len(cmd) + 3 + 2  # after the first command, the LLM's 3 tokens and 2 SLM tokens
    sampling = greedy(30, {0: cmd, second: cmd})
    relay = RelayConfig(max_calls=1, after_max_calls=after)
    out = run_one(prompt, slm_model, llm_model, tokenizer, sampling, relay=relay)
    assert out.stats.calls == 1
    assert out.token_ids[second : second + len(cmd)] == cmd
    if after == "continue":
        assert out.finish_reason == "length" and len(out.token_ids) == 30
        assert out.stats.unserved_calls == 1
    else:
        assert out.finish_reason == "max_calls" and len(out.token_ids) == second + len(cmd)
        assert out.stats.unserved_calls == 0


def test_malformed_command_ends_the_request(prompt, slm_model, llm_model, tokenizer):
    bad = text_tokens(tokenizer, "<call>abc")
    out = run_one(prompt, slm_model, llm_model, tokenizer, greedy(20, {2: bad}))
    assert out.finish_reason == "malformed_call"
    assert out.token_ids[2:] == bad[:4]  # ``<``, ``call``, ``>``, then the offending ``abc``
    assert out.text.endswith("<call>abc") and out.stats.calls == 0


def test_huge_n_is_capped(prompt, slm_model, llm_model, tokenizer):
    cmd = command_tokens(tokenizer, "99999999999")
    out = run_one(prompt, slm_model, llm_model, tokenizer, greedy(40, {0: cmd}), relay=RelayConfig(max_call_tokens=4))
    record = out.stats.call_records[0]
    assert (record.n_asked, record.n_served) == (protocol.N_CLAMP, 4)
    assert out.spans[1] == ("llm", len(cmd), len(cmd) + 4)
    # Capped by the tokens left: the request ends inside the call, and the SLM never catches up.
    out = run_one(prompt, slm_model, llm_model, tokenizer, greedy(len(cmd) + 3, {0: cmd}))
    assert out.spans == [("slm", 0, len(cmd)), ("llm", len(cmd), len(cmd) + 3)]
    assert out.finish_reason == "length" and out.stats.call_records[0].n_served == 3
    assert out.stats.slm_catchup_tokens == 0 and out.stats.call_records[0].slm_catchup == 0


def test_llm_eos_ends_the_request(prompt, slm_model, llm_model, tokenizer):
    cmd = command_tokens(tokenizer, 6)
    eos = min(eos_token_ids(llm_model, tokenizer))
    llm_sampling = greedy(1, {len(cmd) + 1: [eos]})
    out = run_one(prompt, slm_model, llm_model, tokenizer, greedy(30, {0: cmd}), llm_sampling=llm_sampling)
    assert out.finish_reason == "stop"
    assert out.token_ids[-1] == eos and out.spans[-1] == ("llm", len(cmd), len(cmd) + 2)
    assert out.stats.llm_tokens == 2 and out.stats.slm_catchup_tokens == 0


def test_slm_stops(prompt, slm_model, tokenizer):
    hello = text_tokens(tokenizer, " Hello world")
    out = run_one(prompt, slm_model, None, tokenizer, greedy(20, {1: hello}, stop=[" wor"]))
    assert out.finish_reason == "stop" and out.token_ids[1:] == hello
    out = run_one(prompt, slm_model, None, tokenizer, greedy(20, {1: hello}, stop_token_ids=[hello[0]]))
    assert out.finish_reason == "stop" and out.token_ids[1:] == hello[:1]
    eos = min(eos_token_ids(slm_model, tokenizer))
    out = run_one(prompt, slm_model, None, tokenizer, greedy(20, {3: [eos]}))
    assert out.finish_reason == "stop" and len(out.token_ids) == 4 and out.token_ids[-1] == eos
    assert out.text == tokenizer.decode(out.token_ids[:3], skip_special_tokens=True)
    out = run_one(prompt, slm_model, None, tokenizer, greedy(8, {3: [eos]}, ignore_eos=True))
    assert out.finish_reason == "length" and len(out.token_ids) == 8


def test_logprobs_from_the_processed_distribution(prompt, slm_model, llm_model, tokenizer):
    cmd = command_tokens(tokenizer, 2)
    out = run_one(prompt, slm_model, llm_model, tokenizer, greedy(12, {1: cmd}, logprobs=True))
    assert len(out.logprobs) == len(out.token_ids) == 12
    assert out.logprobs[1 : 1 + len(cmd)] == [0.0] * len(cmd)  # forced: every other token is -inf
    with torch.inference_mode():
        logits = slm_model(torch.tensor([prompt])).logits[0, -1]
    assert out.logprobs[0] == pytest.approx(torch.log_softmax(logits, -1)[out.token_ids[0]].item(), abs=1e-5)


def test_seeded_sampling_is_reproducible(prompt, slm_model, llm_model, tokenizer):
    cmd = command_tokens(tokenizer, 2)
    sampling = SamplingParams(temperature=0.8, top_p=0.9, top_k=50, min_p=0.02, max_tokens=len(cmd) + 4, seed=7,
                              logits_processors=[force_tokens({1: cmd})])
    first, second = (run_one(prompt, slm_model, llm_model, tokenizer, sampling) for _ in range(2))
    assert first.token_ids == second.token_ids
    assert first.token_ids[1 : 1 + len(cmd)] == cmd and first.stats.calls == 1


def test_load_reference_models(slm_dir, llm_dir, tokenizer):
    slm, llm, tok = load_reference_models(slm_dir, llm_dir, "cpu", "float32")
    assert slm.config.hidden_size == 64 and llm.config.hidden_size == 128
    assert tok.encode("<call>5</call>", add_special_tokens=False) == command_tokens(tokenizer, 5)
