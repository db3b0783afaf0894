"""``SamplingParams.min_tokens``: no EOS, stop id or stop string ends a response shorter than it, for either model;
the engine against the reference relay."""
import pytest
import torch

from relay_fixtures import *  # noqa: F401,F403
from relaykern import EngineConfig, RelayConfig, RelayEngine, SamplingParams
from relaykern.reference import reference_generate


def eager_to_end(token: int):
    """A processor that makes ``token`` the most likely one wherever it is possible."""
    def processor(generated, logits):
        logits = logits.clone()
        logits[token] += 100.0
        return logits
    processor.position_only = True
    return processor


@pytest.mark.parametrize("overlap", [False, True], ids=["in_turn", "overlapped"])
def test_min_tokens_hold_back_every_stop_for_both_models(slm_dir, llm_dir, slm_model, llm_model, tokenizer, overlap):
    call = command_tokens(tokenizer, 6)
    stop_id = text_tokens(tokenizer, " apples")[0]
    cases = {
        "eos": SamplingParams(temperature=0, max_tokens=12, min_tokens=5, logits_processors=[eager_to_end(EOS)]),
        "stop_id": SamplingParams(temperature=0, max_tokens=12, min_tokens=4, stop_token_ids=[stop_id],
                                  logits_processors=[eager_to_end(stop_id)]),
        "stop_string": scripted({1: text_tokens(tokenizer, " STOP"), 6: text_tokens(tokenizer, " STOP")},
                                max_tokens=12, min_tokens=5, stop=["STOP"]),
        "ignore_eos": SamplingParams(temperature=0, max_tokens=8, min_tokens=8, ignore_eos=True,
                                     logits_processors=[eager_to_end(EOS)]),
        "llm_eos_in_call": scripted({1: call}, max_tokens=24, min_tokens=12),
        "llm_eos_held_past_call": scripted({1: call}, max_tokens=24, min_tokens=20),
    }
    # The LLM would write EOS at once: held back until the response holds the request's min_tokens (5 tokens: EOS
    # may come sixth).
    llm_samplings = {name: SamplingParams(temperature=0, min_tokens=cases[name].min_tokens,
                                          logits_processors=[eager_to_end(EOS)]) for name in cases}
    prompts = [text_tokens(tokenizer, f"Count the apples, {i}.") for i in range(len(cases))]
    engine = RelayEngine(slm_dir, llm_dir, relay=RelayConfig(overlap_steps=overlap),
                         slm_config=EngineConfig(device="cpu"), llm_config=EngineConfig(device="cpu"))
    seqs = [engine.add_request(p, s, llm_samplings[name]) for p, (name, s) in zip(prompts, cases.items())]
    while engine.scheduler.has_work:
        engine.step()
    ours = {name: engine.output(seq) for name, seq in zip(cases, seqs)}
    for (name, sampling), prompt in zip(cases.items(), prompts):
        want = reference_generate([prompt], slm_model, llm_model, tokenizer, sampling, llm_samplings[name])[0]
        assert comparable(ours[name]) == comparable(want), name
    lengths = {name: (len(out.token_ids), out.finish_reason) for name, out in ours.items()}
    assert lengths == {"eos": (6, "stop"), "stop_id": (5, "stop"), "stop_string": (7, "stop"),
                       "ignore_eos": (8, "length"), "llm_eos_in_call": (13, "stop"),
                       "llm_eos_held_past_call": (24, "length")}
    assert ours["llm_eos_in_call"].token_ids[-1] == EOS and ours["llm_eos_in_call"].spans[-1][0] == "llm"
    assert_no_blocks_held(engine)
