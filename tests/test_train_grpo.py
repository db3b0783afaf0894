"""GRPO: the policy loss and its masks, and training that learns to call (scripted and real relay rollouts)."""
import dataclasses
import math

import pytest
import torch

from relaykern.config import SamplingParams
from relaykern.outputs import RelayOutput, RelayStats
from relaykern.train.data import PromptSource, command_ids
from relaykern.train.grpo import GRPOTrainer
from relaykern.train.grpo_config import GRPOConfig
from relaykern.train.rollout import engine_backend
from relaykern.train.loss import group_advantages, low_var_kl, policy_loss_terms
from relaykern.train.rollout import EngineRollout, ReferenceRollout, slm_mask

CALL_FIRST = 27  # "<": the first token of "<call>N</call>" with the Qwen3 tokenizer
CANDIDATES = range(15, 25)  # the digits "0".."9": the non-calling first token is the one closest to "<" in logit
TINY = "tiny:hidden_size=32,head_dim=8,intermediate_size=64"


def test_policy_loss_clip_values():
    old = torch.zeros(1, 4)
    log_probs = torch.log(torch.tensor([[2.0, 0.5, 5.0, 0.5]]))
    adv = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    terms = [policy_loss_terms(log_probs[:, i : i + 1], old[:, i : i + 1], None, adv[:, i : i + 1],
                               torch.ones(1, 1)) for i in range(4)]
    # A>0 ratio 2 → clipped at 1.3; A>0 ratio 0.5 → unclipped; A<0 ratio 5 → dual clip 3; A<0 ratio 0.5 → 0.8.
    assert [t.pg_loss.item() for t in terms] == pytest.approx([-1.3, -0.5, 3.0, 0.8])
    assert [t.clip_high.item() for t in terms] == [1.0, 0.0, 0.0, 1.0]  # A<0, r=5: the PPO clip does not bind
    assert [t.clip_dual.item() for t in terms] == [0.0, 0.0, 1.0, 0.0]


def test_low_var_kl_and_advantages():
    p = torch.tensor([-1.0, -2.0, -30.0])
    kl = low_var_kl(p, torch.tensor([-1.0, -1.0, -1.0]))
    assert kl[0] == 0 and kl[1] == pytest.approx(math.e - 2) and kl[2] == 10.0  # clamped
    adv = group_advantages(torch.tensor([1.0, 1.0, 0.0, 2.0]), group_size=2)
    assert adv[:2].tolist() == [0.0, 0.0] and adv[2] < 0 < adv[3]
    with pytest.raises(ValueError, match="group_size"):
        group_advantages(torch.ones(3), group_size=2)


@pytest.mark.parametrize("field,value,message", [
    ("group_size", 1, r">= 2 \(advantages are relative\), got 1"), ("mini_batch_size", -1, ">= 0"),
    ("reward_mode", "mean", "must be one of"),
])
def test_grpo_config_names_the_bad_field(field, value, message):
    with pytest.raises(ValueError, match=f"GRPOConfig.{field} .*{message}"):
        GRPOConfig(**{field: value})


def test_llm_tokens_are_masked_out_of_loss_and_kl():
    torch.manual_seed(0)
    shape = (3, 6)
    log_probs = (-torch.rand(shape)).requires_grad_(True)
    old, ref, adv = -torch.rand(shape), -torch.rand(shape), torch.randn(3, 1)
    mask = torch.tensor([[1, 1, 0, 0, 1, 1], [0, 0, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.float32)
    terms = policy_loss_terms(log_probs, old, ref, adv, mask)
    (terms.pg_loss + 0.01 * terms.kl).backward()
    assert torch.all(log_probs.grad[mask == 0] == 0) and torch.all(log_probs.grad[mask == 1] != 0)
    llm = mask == 0
    perturbed = policy_loss_terms(log_probs.detach() + 3.0 * llm, old - 2.0 * llm, ref + 1.0 * llm, adv, mask)
    assert torch.equal(perturbed.pg_loss, terms.pg_loss.detach()) and torch.equal(perturbed.kl, terms.kl.detach())
    assert terms.tokens == mask.sum()


def first_token_logits(trainer: GRPOTrainer) -> torch.Tensor:
    with torch.no_grad():
        return trainer.lm(input_ids=torch.tensor([trainer.prompt_ids[0]]), logits_to_keep=1).logits[0, -1]


def call_probability(trainer: GRPOTrainer, alternative: int) -> float:
    """P(first token is "<") under the policy restricted to {"<", alternative}: the scripted rollouts' choice."""
    return first_token_logits(trainer)[[CALL_FIRST, alternative]].softmax(-1)[0].item()


def closest_alternative(trainer: GRPOTrainer) -> int:
    logits = first_token_logits(trainer)
    return min(CANDIDATES, key=lambda t: abs(logits[t] - logits[CALL_FIRST]).item())


class ScriptedRollout:
    """Each sample's first token is drawn from the live policy restricted to {"<", alternative}; "<" is followed by
    the rest of ``<call>2</call>``, two LLM tokens and EOS, the alternative by more of itself (the same length) and
    EOS. ``fixed``: alternate instead of sampling."""

    def __init__(self, trainer: GRPOTrainer, fixed: bool = False):
        self.trainer, self.fixed = trainer, fixed
        self.command = command_ids(trainer.tokenizer, 2)
        self.alternative = closest_alternative(trainer)

    def generate(self, prompts, sampling):
        assert all(p == self.trainer.prompt_ids[0] for p in prompts)  # one prompt: one probability
        p = call_probability(self.trainer, self.alternative)
        outputs = []
        for i, prompt in enumerate(prompts):
            calls = i % 2 == 0 if self.fixed else torch.rand(()).item() < p
            eos = self.trainer.tokenizer.eos_token_id
            if calls:
                ids, n = self.command + [100, 101] + [eos], len(self.command)
                spans = [("slm", 0, n), ("llm", n, n + 2), ("slm", n + 2, n + 3)]
                stats = RelayStats(slm_tokens=n + 1, llm_tokens=2, calls=1)
            else:
                ids = [self.alternative] * (len(self.command) + 2) + [eos]  # as long as a calling response
                spans, stats = [("slm", 0, len(ids))], RelayStats(slm_tokens=len(ids))
            text = self.trainer.tokenizer.decode(ids, skip_special_tokens=True)
            outputs.append(RelayOutput(list(prompt), ids, text, spans, "stop", stats))
        return outputs

    def sync_weights(self, named_tensors):
        pass


def tiny_config(tmp_path, **overrides) -> GRPOConfig:
    base = dict(slm=TINY, llm=None, output_dir=str(tmp_path), prompts=PromptSource(num_prompts=1),
                steps=1, prompts_per_step=1, group_size=4, micro_batch_size=4, lr=1e-3, kl_coef=0.0,
                grader="exact", max_tokens=12, rollout_logprobs=False)
    return dataclasses.replace(GRPOConfig(), **{**base, **overrides})


@pytest.mark.parametrize("rollout", ["reference", "engine"])
def test_rollouts_end_at_a_command_past_max_calls(tmp_path, rollout):
    """As the official rollout ends at a command past its turn limit: repeated unserved commands would raise ρ."""
    trainer = GRPOTrainer(tiny_config(tmp_path, llm=TINY, rollout=rollout, max_calls=1, max_call_tokens=2,
                                      max_tokens=24, llm_temperature=0.0))
    command = command_ids(trainer.tokenizer, 2)
    script = command + [0, 0] + command + [9] * 8  # a served call (its 2 LLM tokens stand in the zeros), then one more

    def force(generated, logits):
        forced = torch.full_like(logits, -math.inf)
        forced[script[len(generated)] if len(generated) < len(script) else 9] = 0.0
        return forced

    sampling = dataclasses.replace(trainer.sampling(0), logits_processors=[force])
    [output] = trainer.backend.generate([trainer.prompt_ids[0]], sampling)
    assert output.finish_reason == "max_calls" and output.stats.calls == 1
    assert output.token_ids[-len(command):] == command and len(output.token_ids) == 2 * len(command) + 2


def test_one_step_raises_call_probability_and_zeroes_llm_token_gradients(tmp_path):
    trainer = GRPOTrainer(tiny_config(tmp_path), lambda t: ScriptedRollout(t, fixed=True))
    alternative = trainer.backend.alternative
    before = call_probability(trainer, alternative)

    # The real micro-batch of this step: the loss's gradient is zero on LLM-written tokens, and moving their
    # log-probs changes nothing.
    rollouts = trainer.rollout(0)
    trainer.score(rollouts)
    n = len(trainer.backend.command)  # 7 tokens: < call > 2 </ call >
    assert rollouts.rewards.tolist() == pytest.approx([2 / (n + 3), 0, 2 / (n + 3), 0])  # unsolvable: ρ for calls
    advantages = group_advantages(rollouts.rewards, 4)
    micro = trainer.micro_batches(rollouts, advantages)[0][0]
    assert micro["batch"].mask[0].tolist() == slm_mask(rollouts.outputs[0]) == [1.0] * n + [0.0, 0.0, 1.0]
    assert micro["old"] is None  # one update per step: the update's own log-probs serve as the old ones
    old = trainer.policy(micro["batch"]).detach()
    log_probs = old.clone().requires_grad_(True)
    terms = policy_loss_terms(log_probs, old, None, micro["adv"], micro["batch"].mask)
    terms.pg_loss.backward()
    llm = torch.zeros_like(micro["batch"].mask, dtype=torch.bool)
    llm[0, n : n + 2] = llm[2, n : n + 2] = True
    assert torch.all(log_probs.grad[llm] == 0) and log_probs.grad[0, 0] != 0
    moved = policy_loss_terms(log_probs.detach() + 5.0 * llm, old, None, micro["adv"], micro["batch"].mask)
    assert torch.equal(moved.pg_loss, terms.pg_loss.detach())

    metrics = trainer.train_step(0)
    after = call_probability(trainer, alternative)
    assert after > before + 0.01, (before, after)
    assert metrics["clip_frac"] == 0.0 and metrics["call_ratio"] == pytest.approx(1 / (n + 3))


def test_twenty_scripted_steps_raise_the_call_ratio(tmp_path):
    trainer = GRPOTrainer(tiny_config(tmp_path, steps=20, group_size=8, micro_batch_size=8, lr=3e-4,
                                      kl_coef=0.01),
                          ScriptedRollout)
    before = call_probability(trainer, trainer.backend.alternative)
    history = [trainer.train_step(step) for step in range(20)]
    after = call_probability(trainer, trainer.backend.alternative)
    first, last = ({key: sum(m[key] for m in part) / 5 for key in ("call_ratio", "called_frac")}
                   for part in (history[:5], history[-5:]))
    assert after > before + 0.2, (before, after)
    assert last["called_frac"] > first["called_frac"] + 0.15 and last["call_ratio"] > first["call_ratio"] + 0.03, \
        (first, last)
    assert history[-1]["kl"] > 0  # the policy moved away from the frozen reference


def restrict_to_call_or_alternative(trainer: GRPOTrainer):
    """A processor letting the SLM only start with "<" or the alternative; after "<" it completes
    ``<call>1</call>``, after that (and after the alternative) it writes EOS. The tiny LLM really serves the call."""
    command, alternative, eos = command_ids(trainer.tokenizer, 1), closest_alternative(trainer), \
        trainer.tokenizer.eos_token_id

    def restrict(generated, logits):
        allowed = [CALL_FIRST, alternative] if not generated else \
            [command[len(generated)]] if generated[0] == CALL_FIRST and len(generated) < len(command) \
            else [eos]
        out = torch.full_like(logits, float("-inf"))
        out[allowed] = logits[allowed]
        return out

    return restrict


class RestrictedReference(ReferenceRollout):
    def __init__(self, trainer: GRPOTrainer):
        super().__init__(trainer.lm, trainer.llm, trainer.tokenizer, SamplingParams(temperature=1.0, max_tokens=16))
        self.alternative = closest_alternative(trainer)
        self.restrict = restrict_to_call_or_alternative(trainer)

    def generate(self, prompts, sampling):
        return super().generate(prompts, dataclasses.replace(sampling, logits_processors=[self.restrict]))


class RestrictedEngine(EngineRollout):
    def __init__(self, trainer: GRPOTrainer):
        super().__init__(engine_backend(trainer).engine, SamplingParams(temperature=1.0, max_tokens=16))
        self.alternative = closest_alternative(trainer)
        self.restrict = restrict_to_call_or_alternative(trainer)

    def generate(self, prompts, sampling):
        return super().generate(prompts, dataclasses.replace(sampling, logits_processors=[self.restrict]))


@pytest.mark.parametrize("rollout,backend", [("reference", RestrictedReference), ("engine", RestrictedEngine)])
def test_real_relay_rollouts_learn_to_call(tmp_path, rollout, backend):
    config = tiny_config(tmp_path, llm=TINY, steps=3, group_size=4, micro_batch_size=4, lr=3e-3,
                         rollout_logprobs=True, rollout=rollout)
    trainer = GRPOTrainer(config, backend)
    before = call_probability(trainer, trainer.backend.alternative)
    history = [trainer.train_step(step) for step in range(config.steps)]
    after = call_probability(trainer, trainer.backend.alternative)
    assert after > before + 0.1, (before, after)
    assert history[-1]["called_frac"] > history[0]["called_frac"] and history[-1]["call_ratio"] > 0
    assert history[-1]["calls_per_response"] == history[-1]["called_frac"]  # every command was served
    # The sampler's processors change the distribution, so only SLM tokens it did not constrain would agree; the
    # metric is reported either way.
    assert "logprob_mismatch_mean" in history[0]
