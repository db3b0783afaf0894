"""The teacher filter: prompts kept iff some of k LLM samples answer them."""
import json

from relay_fixtures import *  # noqa: F401,F403
from relaykern.cli import main as cli_main
from relaykern.train import filter as teacher_filter
from relaykern.train.filter import filter_prompts


def test_filter_keeps_prompts_the_teacher_solves(llm_dir, tmp_path, monkeypatch):
    source = tmp_path / "prompts.jsonl"
    source.write_text("".join(json.dumps({"prompt": f"What is {i} + {i}?", "answer": str(2 * i)}) + "\n"
                              for i in range(3)))
    real = teacher_filter.solved_counts
    seen = {}

    def solved_counts(problems, answers, llm, **kw):
        assert answers == ["0", "2", "4"]
        seen["counts"] = real(problems, answers, llm, **kw)  # the real engine runs; a random teacher solves nothing
        seen["sampling"] = kw["sampling"]
        return [0, 2, 0]

    monkeypatch.setattr(teacher_filter, "solved_counts", solved_counts)
    kept, total = filter_prompts(source, tmp_path / "kept.jsonl", llm_dir, k=2, max_tokens=4)
    assert (kept, total) == (1, 3) and seen["counts"] == [0, 0, 0]
    assert (seen["sampling"].temperature, seen["sampling"].top_p) == (0.7, 0.95)  # the official filter's
    rows = [json.loads(line) for line in (tmp_path / "kept.jsonl").read_text().splitlines()]
    assert rows == [{"prompt": "What is 1 + 1?", "answer": "2", "teacher_solved": 2, "teacher_samples": 2}]


def test_filter_cli_needs_its_arguments(capsys):
    assert cli_main(["train", "filter", "--in", "x.jsonl"]) == 2
    assert "filter needs" in capsys.readouterr().err
