"""Runs a case under a variant and checks it: against the baseline variant's outputs, the relay's invariants, each
model's batch limits, leaked KV blocks, hangs, and (greedy requests) the reference relay.

What is compared: tokens, spans, finish reasons, texts, errors, log-probs and the call statistics. An aborted
request must hold a prefix of its baseline tokens. LLM prefill counts are compared only where nothing may change
them (no read-ahead, preemption, prefix hits, aborts, and the persistent LLM cache).
"""
from __future__ import annotations

import contextlib
import math
import random
import traceback
from unittest import mock
from dataclasses import dataclass, field
from pathlib import Path

from safetensors.torch import load_file

from relaykern import EngineConfig, RelayConfig, RelayEngine
from relaykern.engine import cuda_graphs
from relaykern.engine.cuda_graphs import StepGraphs
from relaykern.engine.readback import Readback
from relaykern.outputs import RelayOutput
from relaykern.reference import reference_generate

from relay_fuzz.cases import baseline_variant, llm_sampling, slm_sampling, tokenizer

MAX_STEPS = 20000
LOGPROB_TOLERANCE = 1e-4


class Failure(Exception):
    """The engine hung, left a request unfinished or leaked blocks."""


@dataclass
class Outcome:
    outputs: list[dict]
    logprobs: list[list[float] | None]
    llm_reads: list[tuple[int, list[int]]]
    """Per request: LLM prefill tokens and each call's catch-up."""
    aborted: set[int]
    over_limits: list[tuple[str, int, int]] = field(default_factory=list)
    """Forwards over their model's ``max_num_seqs`` / ``max_num_batched_tokens``: (model, rows, tokens)."""
    preemptions: int = 0
    llm_views_released: int = 0
    llm_prefix_hits: int = 0


def comparable(output: RelayOutput) -> dict:
    stats = output.stats
    return dict(token_ids=output.token_ids, spans=output.spans, finish=output.finish_reason, text=output.text,
                error=output.error, slm_tokens=stats.slm_tokens, llm_tokens=stats.llm_tokens, calls=stats.calls,
                unserved=stats.unserved_calls, slm_catchup=stats.slm_catchup_tokens,
                records=[(r.n_asked, r.n_served, r.slm_catchup) for r in stats.call_records])


def make_engine(case: dict, variant: dict, checkpoints: tuple[Path, Path]) -> RelayEngine:
    """The variant's engine; with ``graph_extend_batch``, each runner steps through CUDA-graph buffers replayed
    eagerly (``StepGraphs(capture=False)``) whose extend shapes take at most that many rows, so that larger mixed
    steps are split (``ModelRunner._split_logits``)."""
    def config(model: str) -> EngineConfig:
        return EngineConfig(device="cpu", attention_backend=variant["backend"], **variant[model])
    slm, llm = checkpoints
    engine = RelayEngine(slm, llm if case["with_llm"] else None, relay=RelayConfig(**case["relay"], **variant["relay"]),
                         slm_config=config("slm"), llm_config=config("llm"), llm_cache=variant["llm_cache"])
    if variant.get("graph_extend_batch"):  # (absent from variants saved before it)
        with mock.patch.object(cuda_graphs, "MAX_EXTEND_BATCH", variant["graph_extend_batch"]):
            for _, runner in runners(engine):
                runner.graphs = StepGraphs(runner, capture=False)
    return engine


def runners(engine: RelayEngine) -> list[tuple[str, object]]:
    return [(name, runner) for name, runner in (("slm", engine.slm), ("llm", engine.llm)) if runner is not None]


def watch(engine: RelayEngine, variant: dict, outcome: Outcome) -> None:
    """Wraps the engine's forwards and releases to record limits broken, preemptions and LLM views released."""
    for name, runner in runners(engine):
        limits, execute = variant[name], runner.execute

        def checked_execute(rows, *args, name=name, limits=limits, execute=execute, **kwargs):
            tokens = sum(len(row.tokens) for row in rows)
            if len(rows) > limits["max_num_seqs"] or tokens > limits["max_num_batched_tokens"]:
                outcome.over_limits.append((name, len(rows), tokens))
            return execute(rows, *args, **kwargs)
        runner.execute = checked_execute
    scheduler = engine.scheduler
    preempt, release_view = scheduler.preempt, scheduler.release_view

    def counted_preempt(seq):
        outcome.preemptions += 1
        return preempt(seq)

    def counted_release_view(runner, seq, view, keep_cached=True):
        if runner is engine.llm and view is not None and view.allocated:
            outcome.llm_views_released += 1
        return release_view(runner, seq, view, keep_cached)
    scheduler.preempt, scheduler.release_view = counted_preempt, counted_release_view


def serve(engine: RelayEngine, case: dict, variant: dict, aborts: random.Random) -> list[RelayOutput]:
    """Serves every request of the case once, arriving over steps when ``staggered``; checks the pools after."""
    requests, scheduler = case["requests"], engine.scheduler
    order = sorted(range(len(requests)),
                   key=lambda i: (requests[i]["arrives_at_step"] if variant["staggered"] else 0, i))
    seqs = [None] * len(requests)
    added = steps = 0
    while True:
        while added < len(order) and (not variant["staggered"] or not scheduler.has_work
                                      or requests[order[added]]["arrives_at_step"] <= steps):
            index = order[added]
            seqs[index] = engine.add_request(requests[index]["prompt"], slm_sampling(requests[index]),
                                             llm_sampling(requests[index]))
            added += 1
        if added == len(order) and not scheduler.has_work:
            break
        engine.step()
        steps += 1
        for seq in scheduler.sequences():
            if aborts.random() < variant["abort_rate"]:
                engine.abort(seq)
        if steps > MAX_STEPS:
            phases = [(s.request_id, s.phase.value, len(s.response)) for s in scheduler.sequences()][:8]
            raise Failure(f"hang: {steps} steps; running {len(scheduler.running)}, waiting "
                          f"{len(scheduler.waiting)}, phases {phases}")
    unfinished = [i for i, seq in enumerate(seqs) if not seq.finished]
    if unfinished:
        raise Failure(f"requests {unfinished} never finished")
    for name, runner in runners(engine):
        if runner.blocks.num_seqs or runner.blocks.num_free_blocks != runner.num_blocks:
            raise Failure(f"{name} pool leaked: {runner.blocks.num_seqs} sequences, "
                          f"{runner.blocks.num_free_blocks}/{runner.num_blocks} blocks free")
    return [engine.output(seq) for seq in seqs]


def lagging_llm(rate: float, seed: int) -> contextlib.AbstractContextManager:
    """A GPU still running the LLM's forward when the relay loop polls it (``RelayConfig.decouple_llm``), at random
    with probability ``rate``: on a CPU every forward has run when it returns."""
    if not rate:
        return contextlib.nullcontext()
    rng = random.Random(seed)
    return mock.patch.object(Readback, "ready", lambda readback: rng.random() >= rate)


def run(case: dict, variant: dict, checkpoints: tuple[Path, Path]) -> Outcome:
    """Serves the case ``1 + variant["repeats"]`` times on one engine (later passes hit the prefix caches the
    earlier ones left, or, with ``resync``, find the SLM's dropped by a weight sync of its own weights); the outputs
    of all passes, one after another."""
    engine = make_engine(case, variant, checkpoints)
    outcome = Outcome([], [], [], set())
    watch(engine, variant, outcome)
    aborts = random.Random(variant["abort_seed"])
    with lagging_llm(variant.get("llm_lag", 0), variant.get("lag_seed", 0)):  # (absent from variants saved before)
        outputs = serve(engine, case, variant, aborts)
        for _ in range(variant["repeats"]):
            if variant["resync"]:
                engine.load_slm_weights(load_file(Path(checkpoints[0]) / "model.safetensors").items())
            outputs += serve(engine, case, variant, aborts)
    outcome.outputs = [comparable(o) for o in outputs]
    outcome.logprobs = [o.logprobs for o in outputs]
    outcome.llm_reads = [(o.stats.llm_prefill_tokens, [r.llm_catchup for r in o.stats.call_records])
                         for o in outputs]
    outcome.aborted = {i for i, o in enumerate(outputs) if o.finish_reason == "abort"}
    outcome.llm_prefix_hits = engine.llm.prefix_hit_tokens if engine.llm else 0
    return outcome


def run_or_failure(case: dict, variant: dict, checkpoints: tuple[Path, Path]) -> Outcome | str:
    try:
        return run(case, variant, checkpoints)
    except Failure as failure:
        return str(failure)
    except Exception as error:  # noqa: BLE001 - any engine exception is a finding, with its traceback
        return "".join(traceback.format_exception(error))[-3000:]


def same_logprobs(a: list[float] | None, b: list[float] | None) -> bool:
    if a is None or b is None:
        return a is b
    return len(a) == len(b) and all(abs(x - y) <= LOGPROB_TOLERANCE or (math.isnan(x) and math.isnan(y))
                                    for x, y in zip(a, b))


def differences(variant: dict, base: Outcome, got: Outcome) -> list[str]:
    problems = []
    requests = len(base.outputs)
    for i, have in enumerate(got.outputs):
        want = base.outputs[i % requests]  # request i of a repeated pass is the baseline's i % requests
        if i in got.aborted:
            if have["token_ids"] != want["token_ids"][:len(have["token_ids"])]:
                problems.append(f"request {i} (aborted): {have['token_ids']} is no prefix of {want['token_ids']}")
            continue
        changed = {key: (want[key], have[key]) for key in want if want[key] != have[key]}
        if changed:
            problems.append(f"request {i}: " + "; ".join(f"{key}: baseline {a!r}, got {b!r}"
                                                         for key, (a, b) in changed.items()))
        elif not same_logprobs(base.logprobs[i % requests], got.logprobs[i]):
            problems.append(f"request {i}: log-probs {base.logprobs[i % requests]} vs {got.logprobs[i]}")
    reads_may_change = (variant["relay"]["llm_prefetch_tokens"] or variant["relay"]["early_catchup_tokens"]
                        or variant["llm_cache"] != "persistent" or got.llm_prefix_hits or got.preemptions
                        or got.llm_views_released or got.aborted)
    if not problems and not reads_may_change:
        problems += [f"request {i}: LLM prefill / catch-ups baseline {want}, got {have}"
                     for i, have in enumerate(got.llm_reads)
                     if (want := base.llm_reads[i % requests]) != have
                     and base.outputs[i % requests]["finish"] != "error"]
    if got.over_limits:
        problems.append(f"forwards over their model's batch limits (model, rows, tokens): {got.over_limits[:5]}")
    return problems


def invariant_problems(case: dict, outcome: Outcome) -> list[str]:
    relay, problems = case["relay"], []
    for i, (request, out) in enumerate(zip(case["requests"], outcome.outputs)):
        length = len(out["token_ids"])
        ends = [0] + [end for _, _, end in out["spans"]]
        tiled = ends[-1] == length and all(start == before and end > start
                                           for (_, start, end), before in zip(out["spans"], ends))
        llm_spans = sum(end - start for source, start, end in out["spans"] if source == "llm")
        checks = [(length <= request["max_tokens"], f"{length} tokens > max_tokens {request['max_tokens']}"),
                  (out["slm_tokens"] + out["llm_tokens"] == length, "slm + llm tokens != response length"),
                  (tiled, f"spans {out['spans']} do not tile the {length} tokens"),
                  (llm_spans == out["llm_tokens"], "llm spans != llm tokens"),
                  (out["calls"] <= relay["max_calls"], f"{out['calls']} calls > max_calls"),
                  (all(served <= relay["max_call_tokens"] for _, served, _ in out["records"]),
                   f"a call served more than max_call_tokens: {out['records']}")]
        problems += [f"request {i}: {message}" for ok, message in checks if not ok]
    return problems


def reference_problems(case: dict, outcome: Outcome, models: tuple) -> list[str]:
    """Greedy requests whose processors are deterministic, against ``reference_generate`` (HF models)."""
    problems = []
    for i, request in enumerate(case["requests"]):
        llm = request["llm"]
        deterministic = [spec[0] == "history" for spec in request["processors"]]
        if request["temperature"] or not all(deterministic) or (llm and (llm["temperature"] or llm["processors"])):
            continue
        slm, llm = models
        want = comparable(reference_generate([request["prompt"]], slm, llm if case["with_llm"] else None,
                                             tokenizer(), slm_sampling(request), llm_sampling(request),
                                             RelayConfig(**case["relay"]))[0])
        changed = {key: (want[key], outcome.outputs[i][key]) for key in want
                   if key != "error" and want[key] != outcome.outputs[i][key]}
        if changed:
            problems.append(f"request {i} differs from the reference relay: {changed}")
    return problems


def check_baseline(case: dict, checkpoints: tuple[Path, Path], backend: str = "torch") -> tuple[Outcome | None,
                                                                                                list[str]]:
    """The baseline's outcome (None when it failed) and its problems."""
    base = run_or_failure(case, baseline_variant(backend), checkpoints)
    if isinstance(base, str):
        return None, [f"baseline failed: {base}"]
    return base, invariant_problems(case, base)


def check_variant(case: dict, variant: dict, base: Outcome, checkpoints: tuple[Path, Path]) -> list[str]:
    got = run_or_failure(case, variant, checkpoints)
    return [got] if isinstance(got, str) else differences(variant, base, got)
