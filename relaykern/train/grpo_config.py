"""GRPO's settings (relaykern/train/grpo.py runs them): a dataclass filled from a YAML or TOML file."""
from __future__ import annotations

from dataclasses import dataclass, field

from relaykern.config import require_at_least
from relaykern.train.config import TrainingRun
from relaykern.train.data import PromptSource
from relaykern.train.reward import CALLED_IF


@dataclass
class GRPOConfig(TrainingRun):
    """Defaults are the paper's (lr 1e-6, G 8, 128 prompts, clip 0.2/0.3, dual clip 3, KL 0.01, T 1.0) and the
    official config's mini-batches (32 prompts x 8 samples: four updates a step).

    ``slm``/``llm``/``ref``: HF dirs or ``"tiny"``; ``ref`` defaults to the initial SLM; ``llm: null`` serves no
    calls. ``mini_batch_size``: samples per optimizer update over all ranks (0: the whole step's samples in one
    update, where the policy ratio is 1 and the clips never act). ``called_if``: what counts as calling the teacher
    for the reward, ``"call"`` (a command with N >= 1) or ``"tag"`` (any ``<call>`` text, the official reward
    function's rule; see ``reward.command_summary``). ``max_calls`` / ``after_max_calls``: calls served per response
    (the paper's 3; the official rollout's 3 SLM turns serve at most 2), and what a later command does
    (RelayConfig's): ``"finish"`` ends the response there, as the official rollout
    ends at a command past its turn limit, so that a response holds at most one unserved command (whose N counts
    in ρ all the same: with ``"continue"``, repeating unserved commands would buy the exploration reward ρ).
    ``grader``: ``"math"`` (symbolic, eval/grading.py) or ``"exact"`` (boxed string equality).
    ``enable_thinking``: prompts in Qwen3's thinking mode; off, as in the official RL data (an empty think block
    pre-filled).
    ``rollout``: ``"engine"`` (relaykern's relay engine, weights synced in process) or ``"reference"`` (the HF
    reference relay on the live policy: slow, exact, for checks). ``rollout_kv_cache_gb``: the engine's KV budget
    on a GPU shared with training (default: 30 % of the free memory). ``llm_batch_wait_steps`` /
    ``llm_batch_min_rows``: RelayConfig's throughput mode for the engine's rollouts (0: off). The optimiser,
    precision and checkpoint fields: ``TrainingRun``.
    """

    slm: str = "tiny"
    llm: str | None = "tiny"
    ref: str | None = None
    output_dir: str = "runs/grpo"
    prompts: PromptSource = field(default_factory=PromptSource)
    grader: str = "math"
    reward_mode: str = "group"
    called_if: str = "call"
    steps: int = 100
    prompts_per_step: int = 128
    group_size: int = 8
    mini_batch_size: int = 256
    micro_batch_size: int = 4
    weight_decay: float = 0.01
    warmup_steps: int = 0
    clip_low: float = 0.2
    clip_high: float = 0.3
    dual_clip: float = 3.0
    kl_coef: float = 0.01
    adv_eps: float = 1e-6
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 8192
    enable_thinking: bool = False
    llm_temperature: float = 0.7
    llm_top_p: float = 1.0
    max_calls: int = 3
    after_max_calls: str = "finish"
    max_call_tokens: int = 4096
    llm_batch_wait_steps: int = 0
    llm_batch_min_rows: int = 16
    rollout_logprobs: bool = True
    rollout: str = "engine"
    rollout_kv_cache_gb: float | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        choices = {"grader": ("math", "exact"), "reward_mode": ("group", "batch"), "called_if": CALLED_IF,
                   "rollout": ("engine", "reference"),
                   "after_max_calls": ("continue", "finish")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"GRPOConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        require_at_least(self, 0, "mini_batch_size", why=" (0: one update a step)")
        require_at_least(self, 2, "group_size", why=" (advantages are relative)")
