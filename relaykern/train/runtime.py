"""What every trainer needs around the model: processes, seeds, devices, precision, model loading, LR schedule.

Multi-GPU runs go through ``torchrun``: with ``WORLD_SIZE > 1`` the process group is created here (NCCL on GPU,
gloo on CPU) and every rank holds a full replica (DDP). Randomness is never carried from step to step: each step
re-seeds python, numpy and torch from ``derive_seed(seed, step, rank)``, so a resumed run replays exactly.
"""
from __future__ import annotations

import contextlib
import hashlib
import math
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

from relaykern.config import resolve_device
from relaykern.train.config import LR_SCHEDULES

TINY = "tiny"


@dataclass(frozen=True)
class Runtime:
    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Sums a few floats over ranks (fp64, on CPU for gloo or the device for NCCL)."""
        if not self.distributed:
            return list(values)
        device = self.device if dist.get_backend() == "nccl" else torch.device("cpu")
        tensor = torch.tensor(values, dtype=torch.float64, device=device)
        dist.all_reduce(tensor)
        return tensor.tolist()


def init_runtime(device: str | None = None) -> Runtime:
    """Reads torchrun's RANK/WORLD_SIZE/LOCAL_RANK; joins the process group when there is more than one rank."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    resolved = resolve_device(device)
    if resolved.type == "cuda" and resolved.index is None:
        resolved = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(resolved)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if resolved.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return Runtime(rank=rank, world_size=world_size, device=resolved)


def shutdown_runtime(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def derive_seed(*parts: int | str) -> int:
    """A 63-bit seed that depends on every part (e.g. ``(seed, step, rank, "rollout")``), stable across runs."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def maybe_no_sync(module: torch.nn.Module, last: bool) -> contextlib.AbstractContextManager:
    """DDP's ``no_sync`` on all but the last micro-batch of an update (one gradient all-reduce per update)."""
    return module.no_sync() if isinstance(module, DistributedDataParallel) and not last else contextlib.nullcontext()


def autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    """``"bf16"``: bf16 autocast over fp32 master weights; ``"fp32"``: plain fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")


def resolve_model_path(spec: str, workdir: Path, role: str, runtime: Runtime | None = None) -> Path:
    """A model directory, or ``"tiny"`` / ``"tiny:seed=3,hidden_size=128"``: a random tiny Qwen3 written once
    under ``workdir/tiny-<role>`` (by rank 0; the others wait)."""
    if spec != TINY and not spec.startswith(TINY + ":"):
        path = Path(spec)
        if not path.is_dir():
            raise ValueError(f"{role} model {spec!r} is not a directory (give an HF checkpoint dir or 'tiny')")
        return path
    from relaykern.tiny import save_tiny_checkpoint

    kwargs: dict[str, int] = {"seed": {"slm": 0, "llm": 1}.get(role, 0)}
    for item in filter(None, spec.partition(":")[2].split(",")):
        key, _, value = item.partition("=")
        kwargs[key.strip()] = int(value)
    path = workdir / f"tiny-{role}"
    if runtime is None or runtime.is_main:
        if not (path / "config.json").is_file():
            save_tiny_checkpoint(path, **kwargs)
    if runtime is not None:
        runtime.barrier()
    return path


def load_causal_lm(path: str | Path, device: torch.device, trainable: bool = True,
                   dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """The HF model, fp32 by default (a trainer's master weights; bf16 compute comes from autocast). Frozen and in
    eval mode when not trainable (e.g. the LLM, which only generates, in bf16)."""
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).to(device)
    model.train(trainable)
    model.requires_grad_(trainable)
    return model


def frozen_dtype(precision: str) -> torch.dtype:
    """Weights for a model that only generates: bf16 when training in bf16."""
    return torch.bfloat16 if precision == "bf16" else torch.float32


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0
              ) -> Callable[[int], float]:
    """Linear warm-up over ``warmup_steps`` then ``"linear"`` (HF Trainer's default) or ``"cosine"`` decay to
    ``min_lr_ratio``, or ``"constant"``."""
    if schedule not in LR_SCHEDULES:
        raise ValueError(f"lr schedule must be one of {LR_SCHEDULES}, got {schedule!r}")

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 1.0 - progress if schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
        return min_lr_ratio + (1.0 - min_lr_ratio) * decay

    return factor


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, schedule: str, warmup_steps: int,
                   total_steps: int) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                  weight_decay=weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, warmup_steps, total_steps))
    return optimizer, scheduler
