"""GRPO for the relay: G sampled relay responses per prompt, difficulty-aware rewards, group-normalised
advantages, dual-clip PPO loss with a k3 KL to the frozen initial SLM, and LLM-written tokens masked out of both
(the teacher's tokens are not the policy's actions; the official RL code keeps them in: its masking line is
commented out). The SLM's text before a served call stays in the response, as in the paper and the official eval
(the official RL rollout drops the calling SLM turn, its command included, before appending the LLM's text).

One step: rollout (through a ``RolloutBackend``) → rewards → advantages → old and reference log-probs recomputed
by the trainer in the training precision → one or more optimizer updates over mini-batches → weight sync. The
loss is a token mean over each mini-batch's SLM-written tokens, summed over micro-batches and ranks (DDP over
``torchrun``; each rank takes whole prompt groups). Every random draw of step ``s`` comes from
``derive_seed(seed, s, rank)``, so a run resumed from a checkpoint replays the uninterrupted run (on a GPU, up to
the rounding of rollout rows batched by timing: ``RelayConfig.decouple_llm``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from relaykern.config import SamplingParams
from relaykern.eval.grading import is_correct
from relaykern.outputs import RelayOutput
from relaykern.train.batch import ResponseLogProbs, collate
from relaykern.train.checkpoint import latest_checkpoint, load_trainer_state, save_checkpoint
from relaykern.train.data import chat_prompt_ids, reference_answer
from relaykern.train.grpo_config import GRPOConfig
from relaykern.train.logger import MetricsLogger
from relaykern.train.loss import group_advantages, policy_loss_terms
from relaykern.train.reward import Sample, call_ratio, case_of, command_summary, group_case, sample_reward
from relaykern.train.rollout import RolloutBackend, engine_backend, reference_backend, slm_mask
from relaykern.train.runtime import (autocast, derive_seed, frozen_dtype, init_runtime, load_causal_lm,
                                     make_optimizer, maybe_no_sync, resolve_model_path, seed_everything,
                                     shutdown_runtime)


@dataclass
class Rollouts:
    """One step's samples on this rank, prompt groups consecutive (``group_size`` each)."""

    prompts: list[list[int]]
    answers: list[str]
    outputs: list[RelayOutput]
    samples: list[Sample] = field(default_factory=list)
    rewards: torch.Tensor | None = None


class GRPOTrainer:
    """``backend_factory(trainer)`` builds the rollout backend (default: ``config.rollout``'s, from rollout.py)."""

    def __init__(self, config: GRPOConfig, backend_factory: Callable[["GRPOTrainer"], RolloutBackend] | None = None):
        from relaykern.tokenizer import load_qwen3_tokenizer

        self.config = config
        self.runtime = runtime = init_runtime(config.device)
        if config.prompts_per_step % runtime.world_size:
            raise ValueError(f"prompts_per_step {config.prompts_per_step} must be a multiple of the world size "
                             f"{runtime.world_size}")
        if config.mini_batch_size % runtime.world_size:
            raise ValueError(f"mini_batch_size {config.mini_batch_size} must be a multiple of the world size "
                             f"{runtime.world_size}")
        self.out_dir = Path(config.output_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.tokenizer = load_qwen3_tokenizer()
        self.records = config.prompts.load()
        self.answers = [reference_answer(r, i) for i, r in enumerate(self.records)]
        self.prompt_ids = [chat_prompt_ids(self.tokenizer, r["prompt"], enable_thinking=config.enable_thinking)
                           for r in self.records]
        self.ckpt_root = self.out_dir / "checkpoints"
        resume_from = latest_checkpoint(self.ckpt_root) if config.resume else None
        slm_path = resolve_model_path(config.slm, self.out_dir, "slm", runtime)
        self.lm = load_causal_lm(resume_from or slm_path, runtime.device)
        if config.gradient_checkpointing:
            self.lm.gradient_checkpointing_enable()
        self.policy = ResponseLogProbs(self.lm)
        ref_path = resolve_model_path(config.ref, self.out_dir, "ref", runtime) if config.ref else slm_path
        self.ref = ResponseLogProbs(load_causal_lm(ref_path, runtime.device, trainable=False)) \
            if config.kl_coef > 0 else None
        self.slm_path = slm_path
        self.llm_path = resolve_model_path(config.llm, self.out_dir, "llm", runtime) if config.llm else None
        self.llm = None  # the HF teacher, for the reference rollout only (the engine loads its own)
        if self.llm_path is not None and config.rollout == "reference":
            self.llm = load_causal_lm(self.llm_path, runtime.device, trainable=False,
                                      dtype=frozen_dtype(config.precision))
        updates_per_step = -(-config.prompts_per_step * config.group_size //
                             (config.mini_batch_size or config.prompts_per_step * config.group_size))
        self.optimizer, self.scheduler = make_optimizer(self.lm, config.lr, config.weight_decay, config.lr_schedule,
                                                        config.warmup_steps, config.steps * updates_per_step)
        self.start_step = 0
        if resume_from is not None:
            state = load_trainer_state(resume_from, runtime)
            self.optimizer.load_state_dict(state["optimizer"])
            self.scheduler.load_state_dict(state["scheduler"])
            self.start_step = state["step"]
        self.trained = DistributedDataParallel(self.policy) if runtime.distributed else self.policy
        default_backend = engine_backend if config.rollout == "engine" else reference_backend
        self.backend = (backend_factory or default_backend)(self)
        self.backend.sync_weights(self.lm.named_parameters())
        self.logger = MetricsLogger(self.out_dir, runtime.is_main, self.start_step if resume_from else None)

    def sampling(self, step: int) -> SamplingParams:
        c = self.config
        return SamplingParams(temperature=c.temperature, top_p=c.top_p, max_tokens=c.max_tokens,
                              seed=derive_seed(c.seed, step, self.runtime.rank, "rollout"),
                              logprobs=c.rollout_logprobs)

    def step_prompts(self, step: int) -> list[int]:
        """This rank's prompt indices for ``step``: position ``i`` of an endless stream of seeded shuffles."""
        c, n = self.config, len(self.records)
        per_rank = c.prompts_per_step // self.runtime.world_size
        first = step * c.prompts_per_step + self.runtime.rank * per_rank
        orders: dict[int, list[int]] = {}
        indices = []
        for position in range(first, first + per_rank):
            epoch = position // n
            if epoch not in orders:
                generator = torch.Generator().manual_seed(derive_seed(c.seed, epoch, "order"))
                orders[epoch] = torch.randperm(n, generator=generator).tolist()
            indices.append(orders[epoch][position % n])
        return indices

    def rollout(self, step: int) -> Rollouts:
        indices = [i for i in self.step_prompts(step) for _ in range(self.config.group_size)]
        prompts = [self.prompt_ids[i] for i in indices]
        outputs = self.backend.generate(prompts, self.sampling(step))
        return Rollouts(prompts, [self.answers[i] for i in indices], outputs)

    def score(self, rollouts: Rollouts) -> None:
        """Fills ``samples`` and ``rewards`` (the batch-mode case is decided over all ranks)."""
        c = self.config
        for output, answer in zip(rollouts.outputs, rollouts.answers):
            called, sum_n = command_summary(output.text, c.max_call_tokens, c.called_if)
            rho = call_ratio(sum_n, len(output.token_ids))
            rollouts.samples.append(Sample(is_correct(output.text, answer, c.grader == "math"), called, rho))
        groups = [rollouts.samples[i : i + c.group_size] for i in range(0, len(rollouts.samples), c.group_size)]
        if c.reward_mode == "group":
            cases = [group_case(g) for g in groups]
        else:
            flags = self.runtime.all_reduce_sum([float(any(s.correct and not s.called for s in rollouts.samples)),
                                                 float(any(s.correct for s in rollouts.samples))])
            cases = [case_of(flags[0] > 0, flags[1] > 0)] * len(groups)
        rollouts.rewards = torch.tensor([sample_reward(s, case) for g, case in zip(groups, cases) for s in g])

    def micro_batches(self, rollouts: Rollouts, advantages: torch.Tensor) -> list[list[dict[str, Any]]]:
        """Mini-batches of micro-batches, each with its tensors and the trainer's old and reference log-probs.

        With a single update per step the old log-probs are the update's own (detached): the same weights, inputs
        and precision give the same numbers, so the separate pass is skipped (``old`` is filled in by ``update``).
        """
        c, device = self.config, self.runtime.device
        count, mini = len(rollouts.outputs), c.mini_batch_size // self.runtime.world_size  # this rank's share
        several = 0 < mini < count
        order = torch.randperm(count).tolist() if several else list(range(count))
        mini = mini if several else count
        result = []
        for lo in range(0, count, mini):
            micros = []
            for start in range(lo, min(lo + mini, count), c.micro_batch_size):
                rows = order[start : min(start + c.micro_batch_size, lo + mini, count)]
                batch = collate([rollouts.prompts[i] for i in rows], [rollouts.outputs[i].token_ids for i in rows],
                                [slm_mask(rollouts.outputs[i]) for i in rows], self.tokenizer.pad_token_id).to(device)
                with torch.no_grad(), autocast(c.precision, device):
                    old = self.policy(batch, c.temperature) if several else None
                    ref = self.ref(batch, c.temperature) if self.ref is not None else None
                micros.append({"rows": rows, "batch": batch, "old": old, "ref": ref,
                               "adv": advantages[rows].to(device).unsqueeze(1)})
            result.append(micros)
        return result

    def logprob_mismatch(self, rollouts: Rollouts, minis: list[list[dict[str, Any]]]) -> dict[str, float]:
        """|engine − trainer| log-prob over SLM tokens, where the rollout returned log-probs."""
        total, worst, tokens = 0.0, 0.0, 0.0
        for micro in (m for mini in minis for m in mini):
            for b, i in enumerate(micro["rows"]):
                given = rollouts.outputs[i].logprobs
                if given is None or len(given) != len(rollouts.outputs[i].token_ids):
                    continue
                n = len(given)
                mask = micro["batch"].mask[b, :n]
                diff = (micro["old"][b, :n] - torch.tensor(given, device=mask.device)).abs() * mask
                total, tokens = total + diff.sum().item(), tokens + mask.sum().item()
                worst = max(worst, diff.max().item())
        total, tokens = self.runtime.all_reduce_sum([total, tokens])
        return {"logprob_mismatch_mean": total / tokens, "logprob_mismatch_max": worst} if tokens else {}

    def update(self, minis: list[list[dict[str, Any]]]) -> dict[str, float]:
        c, world = self.config, self.runtime.world_size
        sums = dict.fromkeys(("pg_loss", "kl", "clip_frac", "dual_clip_frac", "tokens", "grad_norm"), 0.0)
        for micros in minis:
            tokens = self.runtime.all_reduce_sum([sum(m["batch"].mask.sum().item() for m in micros)])[0]
            for index, m in enumerate(micros):
                with maybe_no_sync(self.trained, index == len(micros) - 1):
                    with autocast(c.precision, self.runtime.device):
                        log_probs = self.trained(m["batch"], c.temperature)
                    if m["old"] is None:
                        m["old"] = log_probs.detach()
                    terms = policy_loss_terms(log_probs, m["old"], m["ref"], m["adv"], m["batch"].mask,
                                              c.clip_low, c.clip_high, c.dual_clip)
                    ((terms.pg_loss + c.kl_coef * terms.kl) * world / max(tokens, 1.0)).backward()
                for key, value in (("pg_loss", terms.pg_loss), ("kl", terms.kl), ("clip_frac", terms.clip_high),
                                   ("dual_clip_frac", terms.clip_dual), ("tokens", terms.tokens)):
                    sums[key] += value.item()
            sums["grad_norm"] += torch.nn.utils.clip_grad_norm_(self.lm.parameters(), c.max_grad_norm).item()
            self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        grad_norm = sums.pop("grad_norm") / len(minis)
        totals = dict(zip(sums, self.runtime.all_reduce_sum(list(sums.values()))))
        tokens = max(totals.pop("tokens"), 1.0)
        return {**{k: v / tokens for k, v in totals.items()}, "grad_norm": grad_norm,
                "lr": self.scheduler.get_last_lr()[0], "updates": len(minis)}

    def train_step(self, step: int) -> dict[str, float]:
        """Runs step ``step`` (0-based) and returns its metrics, summed over ranks."""
        seed_everything(derive_seed(self.config.seed, step, self.runtime.rank))
        t0 = time.perf_counter()
        rollouts = self.rollout(step)
        t1 = time.perf_counter()
        self.score(rollouts)
        advantages = group_advantages(rollouts.rewards, self.config.group_size, self.config.adv_eps)
        minis = self.micro_batches(rollouts, advantages)
        metrics = self.update(minis)
        metrics.update(self.logprob_mismatch(rollouts, minis))  # old log-probs: the policy before the update
        self.backend.sync_weights(self.lm.named_parameters())
        t2 = time.perf_counter()
        outs, samples = rollouts.outputs, rollouts.samples
        n, slm_tokens, llm_tokens, calls, correct, called, reward = self.runtime.all_reduce_sum([
            len(outs), sum(o.stats.slm_tokens for o in outs), sum(o.stats.llm_tokens for o in outs),
            sum(o.stats.calls for o in outs), sum(s.correct for s in samples), sum(s.called for s in samples),
            rollouts.rewards.sum().item()])
        response_tokens = sum(len(o.token_ids) for o in outs)
        metrics.update({
            "reward": reward / n, "accuracy": correct / n, "called_frac": called / n, "calls_per_response": calls / n,
            "call_ratio": llm_tokens / max(slm_tokens + llm_tokens, 1), "response_len": (slm_tokens + llm_tokens) / n,
            "rollout_s": t1 - t0, "update_s": t2 - t1, "rollout_tokens_per_s": response_tokens / max(t1 - t0, 1e-9),
        })
        return metrics

    def save(self, step: int) -> Path:
        state = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                 "data_position": step * self.config.prompts_per_step, "config": self.config.to_dict()}
        return save_checkpoint(self.ckpt_root, step, self.lm, self.tokenizer, state, self.runtime,
                               self.config.keep_last)

    def train(self) -> Path:
        """Runs the remaining steps; returns the last checkpoint (an HF model dir)."""
        c = self.config
        bar = tqdm(range(self.start_step, c.steps), initial=self.start_step, total=c.steps,
                   disable=not self.runtime.is_main)
        for step in bar:
            metrics = self.train_step(step)
            self.logger.log(step + 1, metrics)
            bar.set_postfix(reward=f"{metrics['reward']:.3f}", call_ratio=f"{metrics['call_ratio']:.3f}")
            if step + 1 == c.steps or (c.save_every and (step + 1) % c.save_every == 0):
                self.save(step + 1)
        self.logger.close()
        shutdown_runtime(self.runtime)
        return latest_checkpoint(self.ckpt_root)


def train_grpo(config: GRPOConfig) -> Path:
    return GRPOTrainer(config).train()
