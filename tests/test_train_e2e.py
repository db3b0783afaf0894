"""The bundled example configs end to end (SFT → GRPO from its checkpoint), and DDP over two gloo processes."""
import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import relaykern
from relaykern.config import SamplingParams
from relaykern.train import main
from relaykern.train.sft import SFTConfig, train_sft

ROOT = Path(__file__).resolve().parents[1]
SMALL = "tiny:hidden_size=32,head_dim=8,intermediate_size=64"


def check_run(out_dir: Path, checkpoint: Path, steps: int, keys: set[str]) -> None:
    assert list((out_dir / "tb").glob("events.out.tfevents.*")), "no TensorBoard event file"
    rows = [json.loads(line) for line in (out_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, steps + 1)) and keys <= set(rows[0])
    model = AutoModelForCausalLM.from_pretrained(checkpoint)  # plain transformers loads our checkpoints
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert model.config.model_type == "qwen3" and tokenizer.eos_token == "<|im_end|>"
    assert (checkpoint / "model.safetensors").is_file()
    out = relaykern.generate([[1, 2, 3]], slm=checkpoint, sampling=SamplingParams(max_tokens=2), device="cpu")
    assert len(out[0].token_ids) == 2  # and relaykern serves them


def test_examples_sft_then_grpo(tmp_path, capsys):
    sft_dir, grpo_dir = tmp_path / "sft", tmp_path / "grpo"
    assert main(["sft", "--config", str(ROOT / "examples" / "sft.yaml"), "--set", f"output_dir={sft_dir}",
                 "--set", "max_steps=2", "--set", "data.prompts.num_prompts=8"]) == 0
    sft_ckpt = sft_dir / "checkpoints" / "step_00000002"
    check_run(sft_dir, sft_ckpt, 2, {"loss", "grad_norm", "lr", "tokens_per_s"})
    records = [json.loads(line) for line in (sft_dir / "sft_data.jsonl").read_text().splitlines()]
    assert any(0 in r["loss_mask"] for r in records)  # some LLM-written tokens were inserted

    assert main(["grpo", "--config", str(ROOT / "examples" / "grpo.yaml"), "--set", f"output_dir={grpo_dir}",
                 "--set", f"slm={sft_ckpt}", "--set", "steps=1", "--set", "max_tokens=8"]) == 0
    check_run(grpo_dir, grpo_dir / "checkpoints" / "step_00000001", 1,
              {"reward", "accuracy", "call_ratio", "calls_per_response", "kl", "clip_frac", "rollout_tokens_per_s",
               "rollout_s", "update_s", "logprob_mismatch_mean"})
    assert str(grpo_dir / "checkpoints" / "step_00000001") in capsys.readouterr().out


def torchrun(stage: str, overrides: list[str]) -> None:
    args = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
            "-m", "relaykern.train", stage, "--config", str(ROOT / "examples" / f"{stage}.yaml")]
    for item in overrides:
        args += ["--set", item]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]


def test_ddp_two_gloo_processes(tmp_path):
    """SFT on 2 ranks gives the single-process weights (one global token mean); GRPO runs with batch-mode reward and
    mini-batches counted over both ranks."""
    data = tmp_path / "data.jsonl"
    prompts = [{"prompt_ids": [1, 2, 3], "response_ids": [10 + i, 11, 12, 13], "loss_mask": [1, 0, 1, i % 2]}
               for i in range(8)]  # uneven target counts per rank: the global mean must still be exact
    data.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    common = [f"train_file={data}", f"model={SMALL}", "max_steps=2", "batch_size=4", "micro_batch_size=1",
              "save_every=0"]
    torchrun("sft", [f"output_dir={tmp_path / 'ddp'}", *common])
    config = SFTConfig.from_file(ROOT / "examples" / "sft.yaml", [f"output_dir={tmp_path / 'single'}", *common])
    single = load_file(train_sft(config) / "model.safetensors")
    ddp = load_file(tmp_path / "ddp" / "checkpoints" / "step_00000002" / "model.safetensors")
    for name in single:
        torch.testing.assert_close(ddp[name], single[name], rtol=1e-5, atol=1e-6, msg=name)

    torchrun("grpo", [f"output_dir={tmp_path / 'grpo'}", f"slm={SMALL}", f"llm={SMALL}", "steps=1",
                      "prompts_per_step=2", "group_size=2", "mini_batch_size=2", "max_tokens=4", "reward_mode=batch"])
    rows = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["updates"] == 2  # 4 samples over both ranks in mini-batches of 2 (one sample per rank each)
    assert len(rows) == 1 and (tmp_path / "grpo" / "checkpoints" / "step_00000001" / "model.safetensors").is_file()
