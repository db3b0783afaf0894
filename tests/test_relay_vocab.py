"""Pairs whose checkpoints' embedding rows differ from each other or from the tokenizer's ids: every id one model
writes, the other reads (Qwen2.5-1.5B pads its vocabulary to 151,936 rows, Qwen2.5-7B to 152,064; the tiny bench
models have 16,384 rows for the tokenizer's 151,669 ids)."""
import pytest

from relay_fixtures import *  # noqa: F401,F403
from relay_fixtures import LLM_SHAPE, SLM_SHAPE, hf_model, tiny_checkpoint
from relaykern import EngineConfig, RelayConfig, RelayEngine, SamplingParams
from relaykern.reference import reference_generate

PADDED_LLM_ROWS = 152064
PADDING_ID = 152000  # a row the LLM has and the SLM (151,936 rows) lacks


def toward_padding(generated: list[int], logits):
    """An LLM processor that all but forces ``PADDING_ID``."""
    logits = logits.clone()
    logits[PADDING_ID] = 1e4
    return logits


def test_a_pair_padded_to_different_sizes_samples_only_ids_both_embed(slm_dir, slm_model, tokenizer, tmp_path):
    """The LLM never writes an id past the SLM's rows (which the SLM would then read out of its embedding), even
    pushed toward one; the same tokens as the reference relay."""
    llm_dir = tiny_checkpoint(tmp_path, "padded-llm", dict(LLM_SHAPE, vocab_size=PADDED_LLM_ROWS))
    prompts = [text_tokens(tokenizer, "What is 3 + 4?"), text_tokens(tokenizer, "And 5 + 6?")]
    samplings = [scripted({2: command_tokens(tokenizer, 4)}), scripted({})]
    llm_sampling = SamplingParams(temperature=0, logits_processors=[toward_padding])
    engine = RelayEngine(slm_dir, llm_dir, slm_config=EngineConfig(device="cpu"), llm_config=EngineConfig(device="cpu"))
    ours = engine.generate(prompts, samplings, llm_sampling)
    theirs = [reference_generate([p], slm_model, hf_model(llm_dir), tokenizer, s, llm_sampling, RelayConfig())[0]
              for p, s in zip(prompts, samplings)]
    assert [comparable(o) for o in ours] == [comparable(o) for o in theirs]
    assert ours[0].stats.llm_tokens == 4 and ours[0].finish_reason == "length"
    assert max(max(o.token_ids) for o in ours) < engine.slm.model_config.vocab_size
    assert_no_blocks_held(engine)


def test_a_view_the_llm_cannot_embed_fails_its_request_alone(tokenizer, tmp_path):
    """Text around a command, encoded again for the LLM's view, may give an id past a small checkpoint's rows
    (" });\\n" then a command: " });" is 18113): that request ends with an error naming it, the others go on; a
    prompt that encodes past them is refused at submission."""
    rows = dict(vocab_size=16384)
    engine = RelayEngine(tiny_checkpoint(tmp_path, "slm-16k", dict(SLM_SHAPE, **rows)),
                         tiny_checkpoint(tmp_path, "llm-16k", dict(LLM_SHAPE, **rows)),
                         slm_config=EngineConfig(device="cpu"), llm_config=EngineConfig(device="cpu"))
    outs = engine.generate([[100, 200], [300, 400]], [scripted({2: [1625] + command_tokens(tokenizer, 3)}),
                                                      scripted({})])
    assert outs[0].finish_reason == "error" and "token id 18113" in outs[0].error and "16384" in outs[0].error
    assert outs[1].finish_reason == "length" and outs[1].error is None
    assert_no_blocks_held(engine)
    with pytest.raises(ValueError, match=r"out of range \[0, 16384\): \[18113\]"):
        engine.add_request(" });")
