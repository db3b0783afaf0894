"""Random relay workloads and engine settings, as plain JSON data (so a failure is saved and replayed as a file).

A *case* is what users ask: prompts (some sharing prefixes), sampling, scripted SLM commands (well-formed, N=0,
huge N, malformed, split, near ``max_tokens``, back to back), LLM EOS inside a call, stop strings, processors that
read the history, raise or return logits with nothing to sample, the relay semantics (``max_calls``,
``after_max_calls``, ``max_call_tokens``), and whether an LLM is configured at all. A *variant* is how the engine
serves it: block sizes, pool sizes down to one request's worth (preemption), batch limits down to 3 tokens (chunked
prefill and catch-up), prefix caching, overlapped steps, early catch-up, prefetch, LLM batching waits, the
re-prefill LLM cache, requests arriving over time, random aborts, the requests served again by the same engine (its
prefix caches warm, or the SLM's dropped by a weight sync of the same weights), the attention backend. Outputs must
not depend on the variant.
"""
from __future__ import annotations

import functools
import math
import random

import torch

from relaykern.config import SamplingParams
from relaykern.scripted import force_tokens
from relaykern.tokenizer import IM_END_ID, load_qwen3_tokenizer

NOTHING_TO_SAMPLE = {"nan": math.nan, "-inf": -math.inf, "inf": math.inf}


@functools.cache
def tokenizer():
    return load_qwen3_tokenizer()


def encode(text: str) -> list[int]:
    return tokenizer().encode(text, add_special_tokens=False)


def command(n: int | str) -> list[int]:
    return encode(f"<call>{n}</call>")


# ------------------------------------------------------------------ logits processors, built from their specs
def history_processor():
    """Reads the tokens (not position-only, so its request's steps wait for the host): after an even token at
    every third position, forces a token chosen by it."""
    def processor(generated, logits):
        if generated and generated[-1] % 2 == 0 and len(generated) % 3 == 0:
            forced = torch.full_like(logits, -math.inf)
            forced[300 + generated[-1] % 500] = 0.0
            return forced
        return logits
    return processor


def raising_processor(at: int, position_only: bool):
    def processor(generated, logits):
        if len(generated) == at:
            raise RuntimeError(f"processor raised at response position {at}")
        return logits
    processor.position_only = position_only
    return processor


def nothing_to_sample_processor(at: int, value: str):
    def processor(generated, logits):
        return torch.full_like(logits, NOTHING_TO_SAMPLE[value]) if len(generated) == at else logits
    processor.position_only = True
    return processor


def build_processors(schedule: dict[str, list[int]] | None, specs: list[list]) -> list:
    processors = [force_tokens({int(p): tokens for p, tokens in schedule.items()})] if schedule else []
    for kind, *args in specs:
        builder = {"history": history_processor, "raise": raising_processor,
                   "nothing": nothing_to_sample_processor}[kind]
        processors.append(builder(*args))
    return processors


def slm_sampling(request: dict) -> SamplingParams:
    return SamplingParams(temperature=request["temperature"], top_p=request["top_p"], top_k=request["top_k"],
                          min_p=request.get("min_p", 0.0), **request.get("penalties", {}),
                          max_tokens=request["max_tokens"], min_tokens=request.get("min_tokens", 0),
                          seed=request["seed"], stop=request["stop"],
                          stop_token_ids=request["stop_token_ids"], ignore_eos=request["ignore_eos"],
                          logprobs=request["logprobs"],
                          logits_processors=build_processors(request["schedule"], request["processors"]))


def llm_sampling(request: dict) -> SamplingParams | None:
    llm = request["llm"]
    if llm is None:
        return None
    return SamplingParams(temperature=llm["temperature"], top_p=llm["top_p"], top_k=llm["top_k"],
                          min_p=llm.get("min_p", 0.0), **llm.get("penalties", {}), min_tokens=llm.get("min_tokens", 0),
                          seed=llm["seed"],
                          ignore_eos=llm["ignore_eos"],
                          logits_processors=build_processors(llm["schedule"], llm["processors"]))


# ------------------------------------------------------------------ random cases
PIECES = [  # (weight, piece): what a scripted SLM writes at a chosen position
    (20, lambda rng: command(rng.choice([0, 1, 2, 3, 4, 5, 7, 9, 12]))),
    (8, lambda rng: command(rng.choice([0, 1, 2, 3]))),
    (2, lambda rng: command(99999999999)),
    (1, lambda rng: command("0" * rng.randint(1, 3) + str(rng.randint(1, 5)))),
    (2, lambda rng: encode(f"<call> {rng.randint(1, 6)}\n</call>")),
    (1.2, lambda rng: encode(rng.choice(["<call>x", "<call>abc", "<call></call>", "<call>5</x", "<call>3<call>",
                                         "<call>-1</call>"]))),
    (1, lambda rng: encode(rng.choice(["<cal foo", "<ca", "</call>", "call>", "<call"]))),
    (3, lambda rng: encode(rng.choice(["x.", "y "]) + f"<call>{rng.randint(0, 6)}</call>"
                           + rng.choice([",", ".", " z", ">"]))),
    (2, lambda rng: encode(".<call>0</call>,") + command(rng.randint(1, 5))),
    (3, lambda rng: encode(rng.choice(["x =", "Thus,", "a"])) + encode(rng.choice([" ", "\n\n", " \n", "\t"]))
     + command(rng.randint(0, 6))),  # whitespace tokens the LLM's view leaves out with the command
    (3, lambda rng: command(rng.randint(1, 3)) + command(rng.randint(0, 3))),
    (0.7, lambda rng: [IM_END_ID]),
    (0.7, lambda rng: encode(" STOP")),
]


def random_schedule(rng: random.Random, max_tokens: int) -> dict[str, list[int]]:
    schedule, position = {}, rng.randint(0, 4)
    for _ in range(rng.choice([0, 1, 2, 2, 3, 3, 4])):
        piece = rng.choices([p for _, p in PIECES], [w for w, _ in PIECES])[0](rng)
        if rng.random() < 0.15:  # a command that ends at, or runs past, max_tokens
            position = max(position, max_tokens - len(piece) + rng.randint(-1, 2))
        schedule[str(position)] = piece
        position += len(piece) + rng.choice([0, 0, 1, 2, 3, 5, 8])
    return schedule


def random_prompts(rng: random.Random) -> list[list[int]]:
    prompts: list[list[int]] = []
    for _ in range(rng.choice([1, 2, 3, 4, 5, 6, 8, 10, 12])):
        def noise(low, high):
            return [rng.randrange(100, 150000) for _ in range(rng.randint(low, high))]
        if prompts and rng.random() < 0.25:  # shares a prefix with an earlier prompt, or repeats it
            earlier = rng.choice(prompts)
            prompts.append(rng.choice([list(earlier), earlier[:rng.randint(1, len(earlier))] + noise(0, 10),
                                       earlier + noise(1, 10)])[:40])
        else:
            prompts.append(noise(1, 40))
    return prompts


def random_processors(rng: random.Random, first: int, max_tokens: int, shares: tuple[float, float, float]) -> list:
    draw = rng.random()
    if draw < shares[0]:
        return [["history"]]
    if draw < shares[0] + shares[1]:
        return [["raise", rng.randint(first, max_tokens), rng.random() < 0.5]]
    if draw < sum(shares):
        return [["nothing", rng.randint(first, max_tokens), rng.choice(list(NOTHING_TO_SAMPLE))]]
    return []


def random_penalties(rng: random.Random) -> dict:
    if rng.random() < 0.8:
        return {}
    return dict(repetition_penalty=rng.choice([1.0, 1.3, 0.8]), presence_penalty=rng.choice([0.0, 0.5, -0.5]),
                frequency_penalty=rng.choice([0.0, 0.3]))


def random_llm(rng: random.Random, max_tokens: int) -> dict | None:
    if rng.random() < 0.45:
        return None  # the request keeps the engine's default LLM sampling
    sampled = rng.random() < 0.4
    return dict(temperature=rng.choice([0.7, 1.0]) if sampled else 0.0,
                top_p=rng.choice([1.0, 0.8]) if sampled else 1.0, top_k=rng.choice([0, 10]) if sampled else 0,
                min_p=rng.choice([0.0, 0.0, 0.1]) if sampled else 0.0, penalties=random_penalties(rng),
                min_tokens=rng.choice([0, 0, 0, rng.randint(0, max_tokens)]),
                seed=rng.randrange(1 << 30) if rng.random() < 0.5 else None, ignore_eos=rng.random() < 0.3,
                schedule={str(rng.randint(1, max_tokens)): [IM_END_ID]} if rng.random() < 0.4 else {},
                processors=random_processors(rng, 1, max_tokens, (0.08, 0.06, 0.04)))


def random_request(rng: random.Random, prompt: list[int]) -> dict:
    max_tokens = rng.choice([1, 3, 8, 12, 16, 20, 24, 28, 32, 36, 40, 40])
    sampled = rng.random() < 0.35
    return dict(prompt=prompt, max_tokens=max_tokens, min_tokens=rng.choice([0, 0, 0, rng.randint(0, max_tokens)]),
                temperature=rng.choice([0.5, 0.8, 1.0, 1.3]) if sampled else 0.0,
                top_p=rng.choice([1.0, 1.0, 0.9, 0.5]) if sampled else 1.0,
                top_k=rng.choice([0, 0, 5, 50]) if sampled else 0,
                min_p=rng.choice([0.0, 0.0, 0.05]) if sampled else 0.0, penalties=random_penalties(rng),
                seed=rng.randrange(1 << 30),
                ignore_eos=rng.random() < 0.5, logprobs=rng.random() < 0.3,
                stop=["STOP"] if rng.random() < 0.1 else None,
                stop_token_ids=[rng.randrange(100, 150000)] if rng.random() < 0.05 else None,
                schedule=random_schedule(rng, max_tokens),
                processors=random_processors(rng, 0, max_tokens, (0.08, 0.04, 0.03)),
                arrives_at_step=rng.choice([0, 0, 0, 1, 2, 5, 10, 20]), llm=random_llm(rng, max_tokens))


def random_case(rng: random.Random) -> dict:
    """``with_llm`` False: the SLM is served alone (commands stay text, counted as unserved)."""
    return dict(relay=dict(max_calls=rng.choice([5, 5, 5, 0, 1, 2]),
                           after_max_calls=rng.choice(["continue", "finish"]),
                           max_call_tokens=rng.choice([4096, 4096, 1, 2, 3, 6])),
                requests=[random_request(rng, prompt) for prompt in random_prompts(rng)],
                with_llm=rng.random() < 0.9)


def shrink(case: dict, requests: int, prompt_tokens: int, max_tokens: int) -> dict:
    """A smaller case, for the Triton interpreter (its forwards are ~100x slower)."""
    smaller = [dict(r, prompt=r["prompt"][:prompt_tokens], max_tokens=min(r["max_tokens"], max_tokens),
                    min_tokens=min(r.get("min_tokens", 0), max_tokens))
               for r in case["requests"][:requests]]
    return dict(case, requests=smaller)


# ------------------------------------------------------------------ random engine settings
def blocks_for_one_request(case: dict, block_size: int) -> int:
    return max(-(-(len(r["prompt"]) + r["max_tokens"]) // block_size) for r in case["requests"])


def random_model_config(rng: random.Random, case: dict) -> dict:
    block_size = rng.choice([1, 2, 4, 16])
    need = blocks_for_one_request(case, block_size)
    spare = rng.randint(0, max(1, need // 2)) if rng.random() < 0.6 else 4 * need * len(case["requests"])
    return dict(block_size=block_size, num_blocks=need + spare, max_num_seqs=rng.choice([1, 2, 3, 64]),
                max_num_batched_tokens=rng.choice([3, 4, 5, 8, 13, 16, 32, 64, 8192]),
                enable_prefix_caching=rng.random() < 0.6)


def random_variant(rng: random.Random, case: dict, backend: str = "torch") -> dict:
    slm = random_model_config(rng, case)
    if rng.random() < 0.55:
        llm = random_model_config(rng, case)
    else:  # the SLM's settings, a pool of the same token capacity
        llm = dict(slm, num_blocks=max(blocks_for_one_request(case, slm["block_size"]), slm["num_blocks"]))
    return dict(slm=slm, llm=llm,
                relay=dict(overlap_steps=rng.random() < 0.7, early_catchup_tokens=rng.choice([0, 1, 5]),
                           llm_prefetch_tokens=rng.choice([0, 0, 3, 9]), llm_batch_wait_steps=rng.choice([0, 0, 3]),
                           llm_batch_min_rows=rng.choice([1, 2, 6, 16]), decouple_llm=rng.random() < 0.8),
                llm_lag=rng.choice([0, 0, 0.5, 0.9]), lag_seed=rng.randrange(1 << 30),
                llm_cache="reprefill" if rng.random() < 0.12 else "persistent", staggered=rng.random() < 0.35,
                abort_rate=rng.choice([0, 0, 0, 0.01, 0.05]), abort_seed=rng.randrange(1 << 30),
                repeats=rng.choice([0, 0, 0, 1]), resync=rng.random() < 0.5, backend=backend,
                graph_extend_batch=rng.choice([0, 0, 1, 2, 64]))


def baseline_variant(backend: str = "torch") -> dict:
    """Big pools, no prefix cache, no chunking, every request at once, steps in turn: the plainest service."""
    model = dict(block_size=16, num_blocks=2048, max_num_seqs=256, max_num_batched_tokens=8192,
                 enable_prefix_caching=False)
    return dict(slm=model, llm=dict(model),
                relay=dict(overlap_steps=False, early_catchup_tokens=0, llm_prefetch_tokens=0,
                           llm_batch_wait_steps=0, llm_batch_min_rows=16, decouple_llm=False),
                llm_cache="persistent", staggered=False, abort_rate=0, abort_seed=0, repeats=0, resync=False,
                backend=backend)
