"""Warm-up SFT: completion-only loss on SLM-written tokens (``loss_mask``), AdamW, linear decay after a warm-up.

Records are ``{"prompt_ids", "response_ids", "loss_mask"}`` (see data.py). The loss is one token mean over the
whole global batch: every micro-batch's masked sum is divided by the batch's total target tokens (summed over
ranks, times the world size since DDP averages gradients), so accumulation and DDP give the single-process
gradient. LLM-written tokens are inputs only: their mask is 0, so their targets never enter the loss.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from relaykern.train.batch import ResponseBatch, ResponseLogProbs, collate
from relaykern.train.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from relaykern.train.config import TrainingRun
from relaykern.train.data import SFTDataConfig, build_sft_records, read_jsonl, write_jsonl
from relaykern.train.logger import MetricsLogger
from relaykern.train.runtime import (Runtime, autocast, derive_seed, frozen_dtype, init_runtime, load_causal_lm,
                                     make_optimizer, maybe_no_sync, resolve_model_path, seed_everything,
                                     shutdown_runtime)


@dataclass
class SFTConfig(TrainingRun):
    """``model``: HF dir or ``"tiny"``. Data: ``train_file`` (SFT JSONL), or built from ``data`` with ``llm`` into
    ``output_dir/sft_data.jsonl``. ``batch_size`` is records per optimizer step over all ranks. Defaults are the
    official SFT script's (32 records a step: 2 per device x 16 accumulated; lr 2e-5, 3 % warm-up then HF
    Trainer's linear decay, no weight decay, 1 epoch, 4096 tokens). The optimiser, precision and checkpoint fields:
    ``TrainingRun``."""

    model: str = "tiny"
    output_dir: str = "runs/sft"
    train_file: str | None = None
    llm: str | None = None
    data: SFTDataConfig = field(default_factory=SFTDataConfig)
    epochs: int = 1
    max_steps: int = 0
    batch_size: int = 32
    lr: float = 2e-5
    warmup_ratio: float = 0.03
    lr_schedule: str = "linear"
    max_length: int = 4096


def completion_loss_sum(policy: torch.nn.Module, batch: ResponseBatch) -> torch.Tensor:
    """Σ −log p(target) over tokens with mask 1 (a tensor; divide by the token count for the mean)."""
    return -(policy(batch) * batch.mask).sum()


def _truncate(record: dict[str, Any], max_length: int) -> tuple[list[int], list[int], list[int]]:
    prompt, response, mask = record["prompt_ids"], record["response_ids"], record["loss_mask"]
    keep = max(0, max_length - len(prompt))
    return prompt, response[:keep], mask[:keep]


def _load_records(config: SFTConfig, out_dir: Path, runtime: Runtime, tokenizer: Any) -> list[dict[str, Any]]:
    if config.train_file is not None:
        return read_jsonl(config.train_file)
    path = out_dir / "sft_data.jsonl"
    if config.llm is None and not path.is_file():
        raise ValueError("SFTConfig: give train_file, or llm (+ data) to build SFT data")
    if runtime.is_main and not path.is_file():
        llm = load_causal_lm(resolve_model_path(config.llm, out_dir, "llm"), runtime.device, trainable=False,
                             dtype=frozen_dtype(config.precision))
        slm = None
        if config.data.solutions == "slm" or config.data.insertion.mode == "entropy":
            slm = load_causal_lm(resolve_model_path(config.model, out_dir, "slm"), runtime.device, trainable=False)
        write_jsonl(path, build_sft_records(config.data.prompts.load(), tokenizer, slm, llm, config.data))
    runtime.barrier()
    return read_jsonl(path)


def train_sft(config: SFTConfig) -> Path:
    """Runs SFT; returns the final checkpoint directory (an HF model dir)."""
    from relaykern.tokenizer import load_qwen3_tokenizer

    runtime = init_runtime(config.device)
    out_dir = Path(config.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if config.batch_size % (runtime.world_size * config.micro_batch_size):
        raise ValueError(f"SFT batch_size {config.batch_size} must be a multiple of world_size "
                         f"({runtime.world_size}) × micro_batch_size ({config.micro_batch_size})")
    tokenizer = load_qwen3_tokenizer()
    records = _load_records(config, out_dir, runtime, tokenizer)
    steps_per_epoch = len(records) // config.batch_size
    if steps_per_epoch == 0:
        raise ValueError(f"{len(records)} SFT records are fewer than one batch of {config.batch_size}")
    total_steps = config.max_steps or steps_per_epoch * config.epochs

    ckpt_root = out_dir / "checkpoints"
    resume_from = latest_checkpoint(ckpt_root) if config.resume else None
    model_path = resume_from or resolve_model_path(config.model, out_dir, "slm", runtime)
    lm = load_causal_lm(model_path, runtime.device)
    if config.gradient_checkpointing:
        lm.gradient_checkpointing_enable()
    policy = ResponseLogProbs(lm)
    optimizer, scheduler = make_optimizer(lm, config.lr, config.weight_decay, config.lr_schedule,
                                          int(config.warmup_ratio * total_steps), total_steps)
    start = 0
    if resume_from is not None:
        state = load_trainer_state(resume_from, runtime)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
    trained = DistributedDataParallel(policy) if runtime.distributed else policy
    logger = MetricsLogger(out_dir, runtime.is_main, resume_step=start if resume_from else None)

    def order(epoch: int) -> list[int]:
        generator = torch.Generator().manual_seed(derive_seed(config.seed, epoch, "order"))
        return torch.randperm(len(records), generator=generator).tolist()

    per_rank = config.batch_size // runtime.world_size
    for step in tqdm(range(start, total_steps), initial=start, total=total_steps, disable=not runtime.is_main):
        seed_everything(derive_seed(config.seed, step, runtime.rank))
        t0 = time.perf_counter()
        epoch, within = divmod(step, steps_per_epoch)
        indices = order(epoch)[within * config.batch_size : (within + 1) * config.batch_size]
        mine = [_truncate(records[i], config.max_length) for i in indices[runtime.rank * per_rank:][:per_rank]]
        local_tokens = float(sum(sum(m) for _, _, m in mine))
        total_tokens = runtime.all_reduce_sum([local_tokens])[0]
        loss_sum = 0.0
        for first in range(0, len(mine), config.micro_batch_size):
            rows = mine[first : first + config.micro_batch_size]
            batch = collate(*zip(*rows), pad_id=tokenizer.pad_token_id).to(runtime.device)
            with maybe_no_sync(trained, first + config.micro_batch_size >= len(mine)):
                with autocast(config.precision, runtime.device):
                    loss = completion_loss_sum(trained, batch)
                (loss * runtime.world_size / max(total_tokens, 1.0)).backward()
            loss_sum += loss.item()
        grad_norm = torch.nn.utils.clip_grad_norm_(lm.parameters(), config.max_grad_norm).item()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_total, = runtime.all_reduce_sum([loss_sum])
        elapsed = time.perf_counter() - t0
        logger.log(step + 1, {"loss": loss_total / max(total_tokens, 1.0), "grad_norm": grad_norm,
                              "lr": scheduler.get_last_lr()[0], "target_tokens": total_tokens,
                              "tokens_per_s": total_tokens / elapsed})
        last = step + 1 == total_steps
        if last or (config.save_every and (step + 1) % config.save_every == 0):
            save_checkpoint(ckpt_root, step + 1, lm, tokenizer, {
                "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "data_position": (step + 1) * config.batch_size, "config": config.to_dict()},
                runtime, config.keep_last)
    logger.close()
    shutdown_runtime(runtime)
    return latest_checkpoint(ckpt_root)
