"""Repetition, presence and frequency penalties: the device state against HF's processors and the reference relay,
and counts that survive overlapped steps, preemption and prefix hits."""
import dataclasses

import pytest
import torch
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

from relay_fixtures import *  # noqa: F401,F403
from relaykern import EngineConfig, RelayConfig, RelayEngine, SamplingParams
from relaykern.engine.penalties import penalize_logits
from relaykern.engine.row import FED_ON_DEVICE
from relaykern.reference import reference_generate
from relaykern.reference_hooks import ResponsePenalties

PENALTIES = dict(repetition_penalty=1.5, presence_penalty=0.4, frequency_penalty=0.3)


def penalized(sampling: SamplingParams, **penalties) -> SamplingParams:
    return dataclasses.replace(sampling, **(penalties or PENALTIES))


def test_the_penalties_equal_hf_repetition_penalty_then_vllm_presence_and_frequency():
    generator = torch.Generator().manual_seed(0)
    vocab, prompt_len = 50, 6
    logits = torch.randn(1, vocab, generator=generator) * 3
    input_ids = torch.randint(0, 20, (1, 15), generator=generator)
    params = SamplingParams(**PENALTIES)
    hf = RepetitionPenaltyLogitsProcessor(params.repetition_penalty)(input_ids, logits.clone())
    hf = ResponsePenalties(params, prompt_len)(input_ids, hf)
    prompt_mask = torch.zeros(1, vocab, dtype=torch.bool)
    prompt_mask[0, input_ids[0, :prompt_len]] = True
    counts = torch.bincount(input_ids[0, prompt_len:], minlength=vocab)[None].to(torch.int32)
    ours = penalize_logits(logits, prompt_mask, counts, *torch.tensor([[1.5], [0.4], [0.3]]))
    assert torch.equal(ours, hf)


ON_CPU = dict(device="cpu", attention_backend="torch")
ON_GPU = dict(device="cuda", dtype=torch.float32, attention_backend="triton", max_num_seqs=16, kv_cache_memory_gb=0.25)
"""fp32, CUDA graphs and overlapped steps (each row's token fed on the device) on: tokens compare exactly."""


def run_engine(slm_dir, llm_dir, prompts, samplings, llm_sampling=None, relay=None, device=ON_CPU, **config):
    engine = RelayEngine(slm_dir, llm_dir, relay=relay or RelayConfig(),
                         slm_config=EngineConfig(**device, **config), llm_config=EngineConfig(**device, **config))
    return engine, engine.generate(prompts, samplings, llm_sampling)


def check_counts(runner) -> list[int]:
    """Makes every forward of ``runner`` check, after counting, that each penalized row's slot holds exactly its
    view's prompt tokens and response counts (a fed token read from the device); returns a list that grows by
    one per row checked."""
    penalties, checked, apply = runner.penalties, [], runner.penalties.apply

    def checking(logits, rows, fed_tokens):
        apply(logits, rows, fed_tokens)
        for i, row in enumerate(rows):
            if not (row.samples and row.sampling.has_penalties):
                continue
            view = list(row.context[:row.start]) + [int(fed_tokens[i]) if t == FED_ON_DEVICE else t for t in row.tokens]
            slot, vocab = penalties.slot_of[row.seq_id], penalties.vocab_size
            prompt = torch.zeros(vocab, dtype=torch.bool)
            prompt[view[:row.prompt_len]] = True
            assert torch.equal(penalties.prompt_mask[slot].cpu(), prompt)
            assert torch.equal(penalties.output_counts[slot].cpu(),
                               torch.bincount(torch.tensor(view[row.prompt_len:], dtype=torch.int64),
                                              minlength=vocab).to(torch.int32))
            checked.append(row.seq_id)

    penalties.apply = checking
    return checked


@pytest.mark.parametrize("device", [ON_CPU, pytest.param(ON_GPU, marks=pytest.mark.gpu)], ids=["cpu", "gpu"])
def test_penalized_relay_equals_the_reference(slm_dir, llm_dir, slm_model, llm_model, tokenizer, device):
    """Both models penalized, each over its own view (the SLM's with the commands and the LLM's tokens, the
    LLM's tag-free), through calls, commands split across tokens and a stop string. (The penalties are torch ops,
    the same for either attention backend.)"""
    names = ["call", "two_calls", "straddling", "glued_zero_then_call", "stop_string", "no_call"]
    cases = scenarios(tokenizer)
    samplings = [penalized(cases[name]) for name in names]
    llm_sampling = SamplingParams(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5)
    prompts = [text_tokens(tokenizer, f"Question {i}: what is {i} + {i} + {i}?") for i in range(len(names))]
    engine = RelayEngine(slm_dir, llm_dir, slm_config=EngineConfig(**device), llm_config=EngineConfig(**device))
    checked = [check_counts(engine.slm), check_counts(engine.llm)]
    ours = engine.generate(prompts, samplings, llm_sampling)
    assert all(checked)
    theirs = [reference_generate([p], slm_model, llm_model, tokenizer, s, llm_sampling, RelayConfig())[0]
              for p, s in zip(prompts, samplings)]
    for name, a, b in zip(names, ours, theirs):
        assert comparable(a) == comparable(b), name
    assert_no_blocks_held(engine)
    if device is ON_CPU:  # (one engine start less on a GPU)
        _, plain = run_engine(slm_dir, llm_dir, prompts, [cases[name] for name in names])
        assert any(a.token_ids != b.token_ids for a, b in zip(ours, plain))  # a random model repeats itself rarely


def test_penalties_count_the_same_through_overlapped_steps_preemption_chunks_and_prefix_hits(slm_dir, llm_dir,
                                                                                          tokenizer):
    """Eight samples of one prompt (prefix hits), penalized or not, each calling twice, through a pool small enough
    to preempt, with and without overlapped steps, and with prompts and catch-ups split into chunks (only the last
    samples): the same tokens as one at a time; the slots of finished requests are reused."""
    prompt = text_tokens(tokenizer, "Count the apples: one apple, two apples, three apples.")
    samplings = [scripted({1 + i % 3: command_tokens(tokenizer, 3), 22 + i % 3: command_tokens(tokenizer, 2)},
                          max_tokens=36) for i in range(8)]
    samplings = [penalized(s) if i % 4 != 3 else s for i, s in enumerate(samplings)]
    samplings[1] = penalized(samplings[1], presence_penalty=-0.5, repetition_penalty=0.8)
    llm_sampling = SamplingParams(temperature=0, presence_penalty=1.0)
    alone = [run_engine(slm_dir, llm_dir, [prompt], [s], llm_sampling, relay=RelayConfig(overlap_steps=False))[1][0]
             for s in samplings]
    assert all(out.stats.calls == 2 for out in alone)
    for overlap, budget in ((False, 8192), (True, 8192), (True, 8)):
        config = EngineConfig(**ON_CPU, block_size=4, num_blocks=24, max_num_batched_tokens=budget)
        engine = RelayEngine(slm_dir, llm_dir, relay=RelayConfig(overlap_steps=overlap), slm_config=config,
                             llm_config=config)
        preempted = record_calls(engine.scheduler, "preempt")
        checked = [check_counts(engine.slm), check_counts(engine.llm)]
        outs = engine.generate([prompt] * 8, samplings, llm_sampling)
        assert all(checked)
        assert [comparable(o) for o in outs] == [comparable(o) for o in alone], (overlap, budget)
        assert preempted and engine.slm.prefix_hit_tokens and (engine.overlapped_steps["slm"] > 0 or not overlap)
        assert_no_blocks_held(engine)
        for runner in (engine.slm, engine.llm):
            assert runner.penalties.output_counts.shape[0] <= 8
        engine.generate([prompt], [samplings[0]], llm_sampling)
        assert len(engine.slm.penalties.slot_of) == 1  # the finished requests' slots were handed back


def test_the_pool_grows_while_its_slots_hold_counts(slm_dir, llm_dir, tokenizer):
    """Eight penalized requests decoding, then four more: the pool doubles while the first eight's slots hold
    counts, which it keeps."""
    engine = RelayEngine(slm_dir, llm_dir, slm_config=EngineConfig(**ON_CPU), llm_config=EngineConfig(**ON_CPU))
    checked = check_counts(engine.slm)
    sampling = penalized(scripted({}, max_tokens=12))
    for i in range(12):
        engine.add_request(text_tokens(tokenizer, f"Request {i} again and again."), sampling)
        if i == 7:
            for _ in range(4):
                engine.step()
            assert engine.slm.penalties.output_counts.shape[0] == 8
    while engine.scheduler.has_work:
        engine.step()
    assert engine.slm.penalties.output_counts.shape[0] == 16 and len(set(checked)) == 12
