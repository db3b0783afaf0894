"""The eval harness end to end on a tiny pair: prompts, grading, token-weighted call ratio, output files."""
import json

import pytest

from relay_fixtures import *  # noqa: F401,F403
from relaykern.cli import main as cli_main
from relaykern.config import SamplingParams
from relaykern.eval.harness import evaluate


def test_eval_scores_and_writes_results(slm_dir, llm_dir, tmp_path):
    data = tmp_path / "set.jsonl"
    data.write_text('{"problem": "What is 2 + 3?", "answer": "5"}\n{"question": "What is 4 * 4?", "answer": "16"}\n')
    summary = evaluate(data, slm_dir, llm_dir, sampling=SamplingParams(temperature=0, max_tokens=6), samples=2,
                       out=tmp_path / "res")
    assert summary.problems == 2 and summary.samples == 4
    assert summary.accuracy == 0.0  # a random model does not box the answer
    assert 0.0 <= summary.call_ratio <= 1.0 and summary.finish_reasons
    lines = (tmp_path / "res.jsonl").read_text().splitlines()
    assert len(lines) == 4 and json.loads(lines[0])["answer"] == "5"
    assert json.loads((tmp_path / "res.json").read_text())["samples"] == 4


def test_eval_cli_rejects_records_without_answers(slm_dir, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    data.write_text('{"problem": "What is 2 + 3?"}\n')
    assert cli_main(["eval", str(data), "--slm", str(slm_dir), "--max-tokens", "4"]) == 2
    assert "no 'answer'" in capsys.readouterr().err


def test_eval_cli_runs_a_set_on_the_given_device(slm_dir, llm_dir, tmp_path, capsys):
    data = tmp_path / "set.jsonl"
    data.write_text('{"problem": "What is 2 + 3?", "answer": "5"}\n')
    argv = ["eval", str(data), "--slm", str(slm_dir), "--llm", str(llm_dir), "--max-tokens", "4",
            "--max-calls", "4", "--after-max-calls", "finish", "--max-call-tokens", "3", "--no-thinking",
            "--device", "cpu"]
    assert cli_main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["problems"] == 1 and summary["mean_response_tokens"] == 4
    assert cli_main(argv[:-1] + ["tpu"]) == 2 and "is unknown" in capsys.readouterr().err


def test_eval_gives_every_problem_and_sample_a_seed_of_its_own(slm_dir, tmp_path, monkeypatch):
    """Sampling noise depends on the seed and position only: shared seeds would correlate the problems' samples.
    Prompts think unless told not to (the official eval thinks; its training prompts do not)."""
    from relaykern.engine.relay import RelayEngine

    data = tmp_path / "set.jsonl"
    data.write_text('{"problem": "What is 2 + 3?", "answer": "5"}\n{"problem": "What is 4 * 4?", "answer": ["16"]}\n')
    seeds, prompts = [], []
    generate = RelayEngine.generate

    def recording_generate(self, batch, sampling, llm_sampling=None):
        seeds.extend(s.seed for s in sampling)
        prompts.extend(self.tokenizer.decode(p) for p in batch)
        return generate(self, batch, sampling, llm_sampling)

    monkeypatch.setattr(RelayEngine, "generate", recording_generate)
    evaluate(data, slm_dir, None, sampling=SamplingParams(temperature=1.0, max_tokens=2, seed=5), samples=3)
    assert seeds == [5, 6, 7, 8, 9, 10]
    assert prompts[0].endswith("<|im_start|>assistant\n")
    evaluate(data, slm_dir, None, sampling=SamplingParams(max_tokens=2), enable_thinking=False)
    assert prompts[-1].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_eval_without_math_verify_warns_and_says_how_it_graded(slm_dir, tmp_path, monkeypatch):
    from relaykern.eval import grading

    data = tmp_path / "set.jsonl"
    data.write_text('{"problem": "What is 2 + 3?", "answer": "5"}\n')
    monkeypatch.setattr(grading, "math_verify", None)
    with pytest.warns(UserWarning, match="math-verify is not installed"):
        summary = evaluate(data, slm_dir, None, sampling=SamplingParams(max_tokens=2))
    assert summary.grader == "exact match (math-verify not installed)"
