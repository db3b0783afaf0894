"""``relaykern.generate``: the one-call API over the engine (strings or ids, SLM alone or relayed, engine reuse)."""
import json

import numpy as np
import pytest
import torch

import relaykern
from relay_fixtures import *  # noqa: F401,F403
from relaykern import EngineConfig, RelayConfig, SamplingParams
from relaykern.scripted import force_command


def test_generate_relays_strings_and_ids_and_reuses_the_engine(slm_dir, llm_dir, tokenizer):
    sampling = SamplingParams(temperature=0, max_tokens=16, logits_processors=[force_command(tokenizer, 2, 4)])
    texts = relaykern.generate(["What is 2 + 2?"], slm=slm_dir, llm=llm_dir, sampling=sampling, device="cpu",
                               relay=RelayConfig(max_calls=1))
    ids = relaykern.generate([text_tokens(tokenizer, "What is 2 + 2?")], slm=slm_dir, llm=llm_dir,
                             sampling=sampling, device="cpu", relay=RelayConfig(max_calls=1))
    assert texts[0].token_ids == ids[0].token_ids
    assert [s[0] for s in ids[0].spans] == ["slm", "llm", "slm"] and ids[0].stats.calls == 1
    assert ids[0].stats.call_ratio == pytest.approx(4 / 16)
    from relaykern import api

    engine = api._cached[1]
    relaykern.generate(["again"], slm=slm_dir, llm=llm_dir, sampling=sampling, device="cpu",
                       relay=RelayConfig(max_calls=1))
    assert api._cached[1] is engine


def test_generate_slm_alone_and_bad_input(slm_dir, tmp_path):
    out = relaykern.generate(["Hi"], slm=slm_dir, sampling=SamplingParams(temperature=0, max_tokens=3), device="cpu")
    assert len(out[0].token_ids) == 3 and out[0].stats.llm_tokens == 0
    with pytest.raises(ValueError, match="not one string"):
        relaykern.generate("Hi", slm=slm_dir)
    with pytest.raises(ValueError, match="not found"):
        relaykern.generate(["Hi"], slm=tmp_path / "missing")
    with pytest.raises(ValueError, match="no config.json"):
        relaykern.generate(["Hi"], slm=tmp_path)


@pytest.mark.parametrize("field,value,message", [
    ("temperature", -0.1, "finite and >= 0"), ("temperature", float("nan"), "finite and >= 0"),
    ("temperature", float("inf"), "finite and >= 0"), ("top_p", 0.0, r"in \(0, 1\]"), ("top_k", -1, ">= 0"),
    ("min_p", -0.1, r"in \[0, 1\]"), ("min_p", float("nan"), r"in \[0, 1\]"),
    ("repetition_penalty", 0.0, "finite and > 0"), ("repetition_penalty", float("inf"), "finite and > 0"),
    ("presence_penalty", 2.5, r"in \[-2, 2\]"), ("frequency_penalty", float("nan"), r"in \[-2, 2\]"),
    ("min_tokens", -1, r"in \[0, max_tokens=256\]"), ("min_tokens", 300, r"in \[0, max_tokens=256\]"),
    ("top_k", 2.5, "must be an int"), ("max_tokens", 0, ">= 1"), ("max_tokens", 8.0, "must be an int"),
    ("seed", "7", "must be an int"), ("stop", [""], "non-empty"), ("stop_token_ids", [1.0], "must be ints"),
    ("stop", [151645], "token ids go in stop_token_ids"), ("stop", [b"x"], "non-empty strings"),
    ("stop", 3, "non-empty strings"), ("stop_token_ids", 3, "must be ints"),
    ("temperature", "0.5", "must be a number"), ("top_p", True, "must be a number"),
    ("max_tokens", True, "must be an int"), ("logprobs", 5, "True or False"),
])
def test_sampling_params_name_the_bad_field(field, value, message):
    with pytest.raises(ValueError, match=f"SamplingParams.{field} .*{message}"):
        SamplingParams(**{field: value})


@pytest.mark.parametrize("config,field,value,message", [
    (RelayConfig, "max_calls", -1, ">= 0"), (RelayConfig, "max_calls", 2.5, "must be an int"),
    (RelayConfig, "max_call_tokens", 0, ">= 1"), (RelayConfig, "after_max_calls", "stop", "'continue' or 'finish'"),
    (RelayConfig, "llm_prefetch_tokens", -1, ">= 0"), (RelayConfig, "early_catchup_tokens", -1, ">= 0"),
    (RelayConfig, "early_catchup_tokens", None, "no longer accepted"),
    (RelayConfig, "llm_batch_min_rows", 0, ">= 1"), (RelayConfig, "llm_batch_wait_steps", -1, ">= 0"),
    (EngineConfig, "max_num_seqs", 0, ">= 1"), (EngineConfig, "max_num_batched_tokens", 0, ">= 1"),
    (EngineConfig, "block_size", 24, "power of two"), (EngineConfig, "block_size", 16.0, "must be an int"),
    (EngineConfig, "num_blocks", 0, ">= 1"), (EngineConfig, "max_model_len", 1, ">= 2"),
    (EngineConfig, "kv_cache_memory_gb", -1.0, "> 0"), (EngineConfig, "dtype", "float9", "unknown dtype"),
    (EngineConfig, "dtype", torch.int8, "floating-point"), (EngineConfig, "device", "tpu", "is unknown"),
    (EngineConfig, "attention_backend", "cuda", "'triton' or 'torch'"),
])
def test_configs_name_the_bad_field(config, field, value, message):
    with pytest.raises(ValueError, match=f"{field}.*{message}"):
        config(**{field: value})


def test_temperatures_too_small_to_divide_by_are_greedy():
    assert SamplingParams(temperature=1e-39).greedy and SamplingParams(temperature=1e-6).temperature == 0.0
    assert SamplingParams(temperature=1e-5).temperature == 1e-5


def test_integer_fields_take_numpy_integers():
    assert EngineConfig(num_blocks=np.int64(8), device="cpu").num_blocks == 8
    assert type(SamplingParams(max_tokens=np.int32(3)).max_tokens) is int
    assert SamplingParams(stop_token_ids=np.array([5, 7])).stop_token_ids == [5, 7]


def test_cli_generate_prints_json_and_streams_the_same_text(slm_dir, llm_dir, capsys):
    from relaykern.cli import main as cli_main

    common = ["generate", "--slm", str(slm_dir), "--llm", str(llm_dir), "--device", "cpu", "--prompt", "Hi",
              "--max-tokens", "16", "--force-call-at", "2", "--force-call-n", "3"]
    assert cli_main(common + ["--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["calls"] == 1 and [span[0] for span in out["spans"]] == ["slm", "llm", "slm"]
    assert cli_main(common + ["--stream"]) == 0
    streamed = capsys.readouterr().out.strip().splitlines()[-1]
    assert "[llm]" in streamed and streamed.replace("[llm]", "").replace("[/llm]", "") == out["text"]
    assert cli_main(common + ["--json", "--chat", "--no-thinking"]) == 0
    chat = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert chat["prompt"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_cli_generate_samples_as_asked_and_names_a_bad_setting(slm_dir, capsys):
    from relaykern.cli import main as cli_main

    common = ["generate", "--slm", str(slm_dir), "--device", "cpu", "--prompt", "Hi", "--max-tokens", "6",
              "--min-tokens", "6", "--json", "--temperature", "0.9", "--top-k", "20", "--top-p", "0.9", "--seed", "3"]
    texts = []
    for _ in range(2):
        assert cli_main(common + ["--min-p", "0.05", "--repetition-penalty", "1.2", "--presence-penalty", "0.5"]) == 0
        out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        texts.append(out["text"])
    assert texts[0] == texts[1] and out["finish_reason"] == "length"
    assert cli_main(common + ["--min-p", "2"]) == 2
    assert "SamplingParams.min_p must be in [0, 1]" in capsys.readouterr().err
