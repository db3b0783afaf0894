"""A GRPO run killed with SIGKILL after a checkpoint and resumed ends with the uninterrupted run's weights."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from relaykern.train.grpo import GRPOTrainer
from relaykern.train.grpo_config import GRPOConfig

ROOT = Path(__file__).resolve().parents[1]
# Real relay rollouts (ReferenceRollout, tiny SLM + LLM), two optimizer updates a step (the mini-batch path), KL on.
OVERRIDES = ["steps=4", "save_every=1", "prompts_per_step=1", "group_size=4", "mini_batch_size=2",
             "micro_batch_size=2", "max_tokens=6", "lr=1.0e-3", "grader=exact",
             "slm=tiny:hidden_size=32,head_dim=8,intermediate_size=64",
             "llm=tiny:hidden_size=32,head_dim=8,intermediate_size=64"]


def run_cli(out_dir: Path) -> subprocess.Popen:
    args = ["grpo", "--config", str(ROOT / "examples" / "grpo.yaml"), "--set", f"output_dir={out_dir}"]
    for item in OVERRIDES:
        args += ["--set", item]
    return subprocess.Popen([sys.executable, "-m", "relaykern.train", *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def weights(checkpoint: Path) -> dict[str, torch.Tensor]:
    return load_file(checkpoint / "model.safetensors")


def metrics(out_dir: Path) -> list[dict]:
    timing = ("rollout_s", "update_s", "rollout_tokens_per_s")
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in row.items() if k not in timing} for row in rows]


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    killed = tmp_path / "killed"
    proc = run_cli(killed)
    deadline = time.time() + 240
    while not (killed / "checkpoints" / "latest").is_file():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint within 240 s"
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed_from = (killed / "checkpoints" / "latest").read_text().strip()
    assert resumed_from != "step_00000004"

    resumed = run_cli(killed)
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err[-3000:]

    config = GRPOConfig.from_file(ROOT / "examples" / "grpo.yaml", [f"output_dir={tmp_path / 'straight'}", *OVERRIDES])
    straight = GRPOTrainer(config).train()
    final = killed / "checkpoints" / "step_00000004"
    a, b = weights(final), weights(straight)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)
    assert not torch.equal(a["model.embed_tokens.weight"], weights(tmp_path / "straight" / "tiny-slm")[
        "model.embed_tokens.weight"])  # training did change the weights
    assert metrics(killed) == metrics(tmp_path / "straight")
    assert [row["step"] for row in metrics(killed)] == [1, 2, 3, 4]
