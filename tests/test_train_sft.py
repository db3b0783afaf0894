"""SFT data building (command insertion, loss masks) and the completion-only loss."""
import random

import pytest
import torch

from relaykern.eval.grading import is_correct
from relaykern.tiny import save_tiny_checkpoint
from relaykern.protocol import llm_view
from relaykern.tokenizer import IM_END_ID, encode_bytes, load_qwen3_tokenizer, token_bytes
from relaykern.train.batch import ResponseLogProbs, collate
from relaykern.train.config import apply_overrides
from relaykern.train.data import (CallInsertion, SFTDataConfig, build_sft_records, chat_prompt_ids,
                                  choose_call_positions, command_ids, insert_calls, make_arithmetic_prompts,
                                  reference_answer)
from relaykern.train.grpo_config import GRPOConfig
from relaykern.train.runtime import load_causal_lm, lr_lambda
from relaykern.train.sft import SFTConfig, completion_loss_sum


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("sft") / "slm", seed=0)


def test_arithmetic_prompts_are_deterministic_and_checkable():
    records = make_arithmetic_prompts(5, seed=3, ops=("+", "*"))
    assert records == make_arithmetic_prompts(5, seed=3, ops=("+", "*"))
    for r in records:
        a, op, b = r["prompt"].removeprefix("What is ").removesuffix("?").split()
        assert int(r["answer"]) == (int(a) + int(b) if op == "+" else int(a) * int(b))
        assert is_correct(r["solution"], r["answer"])
    with pytest.raises(ValueError, match="ops"):
        make_arithmetic_prompts(1, 0, ops=("/",))


def test_random_positions_respect_rate_and_cap():
    rng = random.Random(0)
    none = choose_call_positions(50, CallInsertion(call_rate=0.0), rng)
    many = choose_call_positions(50, CallInsertion(call_rate=1.0, max_calls=3), rng)
    assert none == [] and len(many) == 3 and many == sorted(many) and all(0 <= p < 50 for p in many)


def test_count_positions_draw_zero_to_max_calls_uniformly():
    """The official SFT data's distribution: 0-3 commands, each count equally likely, at uniform positions."""
    rng = random.Random(0)
    draws = [choose_call_positions(40, CallInsertion(mode="count", max_calls=3), rng) for _ in range(4000)]
    counts = [sum(len(d) == k for d in draws) for k in range(4)]
    assert all(900 < c < 1100 for c in counts), counts
    assert all(d == sorted(set(d)) and all(0 <= p < 40 for p in d) for d in draws)
    assert choose_call_positions(1, CallInsertion(mode="count", max_calls=3), rng) in ([], [0])


def test_entropy_positions_pick_the_most_uncertain_tokens():
    insertion = CallInsertion(mode="entropy", entropy_threshold=1.0, max_calls=2)
    entropies = [0.1, 3.0, 0.5, 1.5, 2.0, 0.9]
    assert choose_call_positions(6, insertion, random.Random(0), entropies) == [1, 4]
    with pytest.raises(ValueError, match="entropy"):
        choose_call_positions(6, insertion, random.Random(0), None)


def test_insert_calls_builds_masks_and_the_llm_view():
    tokenizer = load_qwen3_tokenizer()
    table = token_bytes(tokenizer)
    seen = []

    def llm_continue(context, n):
        seen.append(list(context))
        return [900 + i for i in range(n)]

    def view_of(response, spans):
        return llm_view(response, spans, table, lambda raw: encode_bytes(tokenizer, raw))

    space = tokenizer.encode(" ")
    record = insert_calls([1, 2], [10, 11, *space, 12, IM_END_ID], [(1, 2), (4, 1)],
                          lambda n: command_ids(tokenizer, n), llm_continue, view_of, eos_ids=[IM_END_ID])
    cmd2, cmd1 = command_ids(tokenizer, 2), command_ids(tokenizer, 1)
    assert tokenizer.decode(cmd2) == "<call>2</call>"
    assert record["response_ids"] == [10, *cmd2, 900, 901, 11, *space, 12, *cmd1, 900, IM_END_ID]
    assert record["loss_mask"] == [1] + [1] * len(cmd2) + [0, 0] + [1, 1, 1] + [1] * len(cmd1) + [0] + [1]
    assert seen == [[1, 2, 10], [1, 2, 10, 900, 901, 11, *space, 12]]  # commands never reach the LLM
    before_space = insert_calls([1], [10, *space, 11], [(2, 1)], lambda n: command_ids(tokenizer, n),
                                llm_continue, view_of)
    assert seen[-1] == [1, 10] and before_space["response_ids"][:2] == [10, *space]  # (as at inference)
    ended = insert_calls([1], [10, 11], [(1, 3)], lambda n: [7], lambda ctx, n: [5, IM_END_ID, 6], view_of,
                         [IM_END_ID])
    assert ended["response_ids"] == [10, 7, 5, IM_END_ID] and ended["loss_mask"] == [1, 1, 0, 0]


def test_build_sft_records_with_tiny_models(tiny_dir):
    tokenizer = load_qwen3_tokenizer()
    model = load_causal_lm(tiny_dir, torch.device("cpu"), trainable=False)
    config = SFTDataConfig(solutions="record", insertion=CallInsertion(call_rate=1.0, n_range=(2, 2), max_calls=1))
    records = build_sft_records(make_arithmetic_prompts(2, seed=0), tokenizer, None, model, config)
    for r in records:
        assert tokenizer.decode(r["prompt_ids"]).endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        text = tokenizer.decode(r["response_ids"])
        assert text.count("<call>2</call>") == 1
        assert len(r["loss_mask"]) == len(r["response_ids"]) and r["loss_mask"].count(0) <= 2
    entropy = SFTDataConfig(solutions="record", insertion=CallInsertion(mode="entropy", entropy_threshold=0.0,
                                                                        n_range=(1, 1), max_calls=2))
    records = build_sft_records(make_arithmetic_prompts(1, seed=0), tokenizer, model, model, entropy)
    assert tokenizer.decode(records[0]["response_ids"]).count("<call>1</call>") == 2


def test_prompts_think_only_where_the_official_code_does():
    """The official SFT, filter and RL prompts pre-fill Qwen3's empty think block; its eval lets the model think."""
    tokenizer = load_qwen3_tokenizer()
    thinking = tokenizer.decode(chat_prompt_ids(tokenizer, "What is 2 + 3?", enable_thinking=True))
    assert thinking == ("<|im_start|>user\nWhat is 2 + 3?\nPlease reason step by step, and put your final answer "
                        "within \\boxed{}.<|im_end|>\n<|im_start|>assistant\n")
    plain = tokenizer.decode(chat_prompt_ids(tokenizer, "What is 2 + 3?", enable_thinking=False))
    assert plain == thinking + "<think>\n\n</think>\n\n"
    assert not SFTDataConfig().enable_thinking and not GRPOConfig().enable_thinking


def test_reference_answers():
    assert reference_answer({"answer": 12}, 0) == "12"
    assert reference_answer({"answer": ["$\\frac{1}{2}$"]}, 0) == "$\\frac{1}{2}$"  # OlympiadBench's final_answer
    with pytest.raises(ValueError, match="record 3: 'answer' is a list of 2"):
        reference_answer({"answer": ["1", "2"]}, 3)
    with pytest.raises(ValueError, match="record 1 has no 'answer'"):
        reference_answer({"problem": "x"}, 1)


def test_lr_schedules():
    linear = lr_lambda("linear", 2, 12)
    assert [linear(s) for s in (0, 1, 2, 7, 12)] == [0.5, 1.0, 1.0, 0.5, 0.0]  # HF Trainer's default
    assert lr_lambda("cosine", 0, 10)(5) == pytest.approx(0.5) and lr_lambda("constant", 0, 10)(9) == 1.0
    assert (SFTConfig().lr_schedule, SFTConfig().batch_size) == ("linear", 32)  # the official SFT script's
    with pytest.raises(ValueError, match="lr_schedule"):
        SFTConfig(lr_schedule="step")


def test_loss_ignores_llm_token_targets(tiny_dir):
    policy = ResponseLogProbs(load_causal_lm(tiny_dir, torch.device("cpu")))
    prompts, responses = [[1, 2, 3], [4, 5]], [[10, 11, 12, 13, 14], [20, 21, 22]]
    masks = [[1, 1, 0, 0, 1], [0, 1, 1]]
    batch = collate(prompts, responses, masks, pad_id=0)
    loss = completion_loss_sum(policy, batch)
    changed = collate(prompts, responses, masks, pad_id=0)
    changed.targets[0, 2:4] = torch.tensor([77, 78])  # the LLM-written tokens' targets
    changed.targets[1, 0] = 79
    assert torch.equal(completion_loss_sum(policy, changed), loss)
    changed.targets[0, 0] = 80  # an SLM token's target does count
    assert not torch.equal(completion_loss_sum(policy, changed), loss)
    log_probs = policy(batch).detach().requires_grad_(True)
    (-(log_probs * batch.mask).sum()).backward()
    assert torch.all(log_probs.grad[batch.mask == 0] == 0)


def test_config_from_yaml_toml_and_overrides(tmp_path):
    (tmp_path / "c.yaml").write_text("model: tiny\nlr: 1.0e-4\ndata:\n  insertion: {n_range: [1, 3]}\n")
    config = SFTConfig.from_file(tmp_path / "c.yaml", ["data.prompts.num_prompts=5", "batch_size=2"])
    assert config.lr == 1e-4 and config.batch_size == 2 and config.data.prompts.num_prompts == 5
    assert config.data.insertion.n_range == (1, 3)
    (tmp_path / "c.toml").write_text('model = "tiny"\n[data.insertion]\nmode = "entropy"\n')
    assert SFTConfig.from_file(tmp_path / "c.toml").data.insertion.mode == "entropy"
    with pytest.raises(ValueError, match="unknown keys"):
        SFTConfig.from_file(tmp_path / "c.yaml", ["lrr=1"])
    with pytest.raises(ValueError, match="key=value"):
        apply_overrides({}, ["novalue"])


def test_sft_data_cli_writes_records(tmp_path):
    from pathlib import Path

    from relaykern.train import main
    from relaykern.train.data import read_jsonl

    example = Path(__file__).resolve().parents[1] / "examples" / "sft.yaml"
    out = tmp_path / "records.jsonl"
    assert main(["sft-data", "--config", str(example), "--set", f"output_dir={tmp_path}", "--set",
                 "data.prompts.num_prompts=2", "--out", str(out)]) == 0
    records = read_jsonl(out)
    assert len(records) == 2 and {"prompt_ids", "response_ids", "loss_mask", "answer"} <= set(records[0])
