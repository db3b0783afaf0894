"""The relay's cost: one call's latency taken apart, and the engine's throughput on scripted workloads.

Latency of one call that makes the LLM read k new tokens and write N, over a context of C cached tokens:

    detection (one SLM step's) + LLM catch-up of k (its forward also samples the first of the N tokens)
    + (N - 1) LLM decode steps + SLM catch-up of N (its forward also samples the SLM's next token)

Overhead = that latency minus N LLM decode steps, reported in LLM decode steps (the goal: at most 2 for k <= 512).
It counts the SLM catch-up whole, though that forward replaces an SLM decode step the SLM would have run anyway.

Throughput: generated tokens per second of ``RelayEngine.generate`` on a whole workload (prefill included),
against the ideal token-weighted mix of the two models' decode speeds at the same batch and context
(1 / ((1 - r) / slm_tokens_per_s + r / llm_tokens_per_s) for an LLM-token ratio r) and against the SLM alone.
The ideal time adds the prompts' prefill, timed on its own (both the ideal and the run must read the prompts).
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import faulthandler
import random
import statistics
import sys
from typing import Callable, Iterator

import torch

from relaykern.config import RelayConfig, SamplingParams
from relaykern.engine.cuda_graphs import EXTEND_TOKENS
from relaykern.engine.readback import Readback
from relaykern.engine.relay import RelayEngine
from relaykern.engine.sequence import Sequence
from relaykern.bench.forward_trace import summarize, traced
from relaykern.bench.model_bench import GREEDY, Probe, eager
from relaykern.bench.presets import Preset
from relaykern.bench.timing import median_ms, timed
from relaykern.bench.workloads import LOWEST_PROMPT_TOKEN, Workload, command_ids, preset_workload
from relaykern.scripted import force_tokens
from relaykern.stop_rule import StopRule


def detection_step(engine: RelayEngine, batch: int) -> Callable[[], list]:
    """The fused detection of one SLM step over ``batch`` rows: table lookup on the device, one readback."""
    never = StopRule.of(GREEDY, eos=())
    seqs = [Sequence([1], GREEDY, GREEDY, True, 0, 0, never, never) for _ in range(batch)]
    tokens = torch.randint(1000, 5000, (batch,), device=engine.slm.device)
    detector = engine.detector
    return lambda: detector.unpack(Readback(detector.launch(tokens, seqs)).wait()[0], seqs)


def detection_ms(engine: RelayEngine, batch: int, repeats: int) -> float:
    return median_ms(detection_step(engine, batch), engine.slm.device, repeats)


def measure_latency(engine: RelayEngine, preset: Preset) -> dict:
    slm, llm = Probe(engine.slm, preset.repeats), Probe(engine.llm, preset.repeats)
    context = preset.catchup_context
    detection = detection_ms(engine, preset.relay_batch, preset.repeats)
    llm_catchup = {k: llm.forward_ms(k, context) for k in preset.catchup_lengths}
    llm_decode = {n: llm.decode_chain_ms(n, context) for n in preset.call_lengths}
    slm_catchup = {n: slm.forward_ms(n, context) for n in preset.call_lengths}
    # The catch-ups that CUDA graphs replay (the small ones), launched kernel by kernel: what the graphs save.
    with eager(engine.llm):
        llm_eager = {k: llm.forward_ms(k, context) for k in preset.catchup_lengths if k <= EXTEND_TOKENS[-1]}
    with eager(engine.slm):
        slm_eager = {n: slm.forward_ms(n, context) for n in preset.call_lengths if n <= EXTEND_TOKENS[-1]}
    relays = []
    for k, catchup_ms in llm_catchup.items():
        for n, decode_ms in llm_decode.items():
            step_ms = decode_ms / n
            latency = detection + catchup_ms + (n - 1) * step_ms + slm_catchup[n]
            relays.append({"k": k, "n": n, "latency_ms": latency, "overhead_ms": latency - decode_ms,
                           "overhead_llm_steps": (latency - decode_ms) / step_ms})
    return {
        "context": context,
        "batch_for_detection": preset.relay_batch,
        "detection_ms": detection,
        "llm_catchup": [{"k": k, "ms": ms, "eager_ms": llm_eager.get(k)} for k, ms in llm_catchup.items()],
        "llm_decode": [{"n": n, "ms": ms, "ms_per_step": ms / n} for n, ms in llm_decode.items()],
        "slm_catchup": [{"n": n, "ms": ms, "eager_ms": slm_eager.get(n)} for n, ms in slm_catchup.items()],
        "relays": relays,
    }


END_TO_END_SLM_TOKENS = 4
"""SLM tokens before the command and after the call in the end-to-end runs."""
END_TO_END_SEED = 7


def measure_end_to_end(engine: RelayEngine, preset: Preset, max_k: int) -> dict:
    """One request at a time through ``generate``, as the engine's own loop serves a relay: its overhead with the
    engine's settings, with the LLM reading from the command's first tokens when at least the preset's
    ``early_catchup_tokens`` wait (``early``), and (on a GPU) that at the priority of the models' steps
    (``early_same_priority``: ``read_ahead_yields=False``).

    The relay request reads k tokens into the LLM at its call (a prompt of k - 4 tokens, then 4 SLM tokens; the
    command's are stripped), the LLM writes n, the SLM 4 more. Beside it, "alone": the same request with the command
    left as text (``max_calls=0``), the SLM writing the n tokens, so that both force the same tokens through the
    same logits processor. Runs are interleaved, fresh prompts each (no prefix-cache hits); medians and minima are
    kept. Over the call lengths n,

        T_relay(n) - T_alone(n) = overhead + n * (per-token difference)

    and the fitted intercept is what the relay costs beyond the LLM writing n of the tokens, in LLM decode steps
    (batch 1, pipelined, at context k): the slope takes the LLM's and the SLM's per-token costs inside the engine's
    loop, which step times probed outside it would miss by more than the goal's margin at n = 100. With one n only,
    the probed steps stand in for the slope. Unlike the composed figure it counts the SLM's catch-up only beyond the
    SLM step it replaces.

    Per k, one more run of each request at the middle call length is traced (``forward_trace``): every forward's
    launch and device times, and the device's busy and idle time, to show where the overhead goes."""
    rng = random.Random(END_TO_END_SEED)
    top = min(engine.slm.model_config.vocab_size, 150000)
    ahead = END_TO_END_SLM_TOKENS
    early = dataclasses.replace(engine.relay, early_catchup_tokens=preset.early_catchup_tokens)
    modes = [("default", None), ("early", early)]
    as_text = dataclasses.replace(engine.relay, max_calls=0, after_max_calls="continue")
    if engine.llm.stream is not None:  # reading early at the steps' priority (a CPU has no streams to prioritize)
        modes.append(("early_same_priority", dataclasses.replace(early, read_ahead_yields=False)))
    relays, fits = [], []
    traced_n = preset.call_lengths[len(preset.call_lengths) // 2]
    for k in [k for k in preset.catchup_lengths if k <= max_k]:
        slm_step = Probe(engine.slm, preset.repeats).pipelined_decode_ms(1, k)
        llm_step = Probe(engine.llm, preset.repeats).pipelined_decode_ms(1, k)
        rows = []
        for n in preset.call_lengths:
            command = command_ids(engine.tokenizer, n)
            length = ahead + len(command) + n + ahead

            def seconds() -> float:
                prompt = [rng.randrange(LOWEST_PROMPT_TOKEN, top) for _ in range(max(1, k - ahead))]
                sampling = SamplingParams(temperature=0, max_tokens=length, ignore_eos=True,
                                          logits_processors=[force_tokens({ahead: command})])
                return timed(lambda: engine.generate([prompt], sampling), engine.slm.device)[1]

            timings: dict[str, list[float]] = {name: [] for name in ("alone", *(mode for mode, _ in modes))}
            for repeat in range(preset.repeats + 1):  # interleaved (drift hits every variant alike); first: warm-up
                for name, relay in (("alone", as_text), *modes):
                    with using_relay(engine, relay):
                        elapsed = seconds() * 1e3
                    if repeat:
                        timings[name].append(elapsed)
            row = {"k": k, "n": n, "alone_ms": statistics.median(timings["alone"]),
                   "alone_min_ms": min(timings["alone"])}
            for mode, _ in modes:
                row[mode] = {"relay_ms": statistics.median(timings[mode]), "relay_min_ms": min(timings[mode])}
            rows.append(row)
            if n == traced_n:
                trace = {"n": n}
                for name, relay in (("alone", as_text), ("relay", None)):
                    with using_relay(engine, relay), traced(engine) as forwards:
                        seconds()
                    timeline = forwards.timeline()
                    trace[name] = {**summarize(timeline), "forwards": timeline}
        fit = {"k": k, "slm_step_ms": slm_step, "llm_step_ms": llm_step, "trace": trace}
        ns = [r["n"] for r in rows]
        for mode, _ in modes:
            extra = [r[mode]["relay_ms"] - r["alone_ms"] for r in rows]
            intercept, slope = overhead_fit(ns, extra, llm_step - slm_step)
            from_minima, _ = overhead_fit(ns, [r[mode]["relay_min_ms"] - r["alone_min_ms"] for r in rows],
                                          llm_step - slm_step)
            fit[mode] = {"overhead_ms": intercept, "per_token_ms": slope, "overhead_llm_steps": intercept / llm_step,
                         "overhead_ms_from_minima": from_minima}
        relays += rows
        fits.append(fit)
    return {"slm_tokens_around_the_call": ahead, "early_catchup_tokens": preset.early_catchup_tokens,
            "relays": relays, "overheads": fits}


def overhead_fit(ns: list[int], extra_ms: list[float], probed_slope: float) -> tuple[float, float]:
    """(intercept, slope) of the least-squares line through (n, extra); with a single n, the probed slope."""
    mean_n, mean_extra = statistics.fmean(ns), statistics.fmean(extra_ms)
    spread = sum((n - mean_n) ** 2 for n in ns)
    slope = (sum((n - mean_n) * (e - mean_extra) for n, e in zip(ns, extra_ms)) / spread if spread
             else probed_slope)
    return mean_extra - slope * mean_n, slope


RELAY_KNOBS = ("llm_batch_wait_steps", "llm_batch_min_rows", "llm_prefetch_tokens", "early_catchup_tokens",
               "read_ahead_yields", "overlap_steps", "decouple_llm")
"""The RelayConfig fields a run that changes the engine's scheduling records beside its figures."""


def prefetching(relay: RelayConfig, preset: Preset) -> RelayConfig:
    """``relay`` with the LLM reading ahead, as the preset's prefetch runs do."""
    return dataclasses.replace(relay, llm_prefetch_tokens=preset.llm_prefetch_tokens)


@contextlib.contextmanager
def using_relay(engine: RelayEngine, relay: RelayConfig | None) -> Iterator[dict]:
    """Runs the block with ``engine.relay = relay`` (None: the engine's own), restored after; yields the knobs to
    record beside the figures (none for the engine's own)."""
    kept = engine.relay
    engine.relay = relay or kept
    try:
        yield {} if relay is None else {knob: getattr(relay, knob) for knob in RELAY_KNOBS}
    finally:
        engine.relay = kept


STALL_DUMP_S = 120
"""A workload running longer than this dumps every thread's stack to stderr (again each period), so that a run cut
off by a timeout still shows where it was."""


def run_workload(engine: RelayEngine, workload: Workload) -> tuple[dict, list]:
    """Runs the whole workload once through ``generate``; returns its figures and the outputs."""
    faulthandler.dump_traceback_later(STALL_DUMP_S, repeat=True)
    steps, overlapped = engine.steps, dict(engine.overlapped_steps)
    read_ahead = (engine.read_ahead.forwards, engine.read_ahead.tokens) if engine.read_ahead else (0, 0)
    try:
        with traced(engine) as trace:  # (two timing events a forward: negligible beside a batch-64 step)
            outputs, seconds = timed(lambda: engine.generate(workload.prompts, workload.samplings), engine.slm.device)
    finally:
        faulthandler.cancel_dump_traceback_later()
    print(f"bench: workload {workload.name!r} (batch {workload.batch}): {seconds:.2f} s", file=sys.stderr, flush=True)
    failed = [o for o in outputs if o.finish_reason != "length"]
    if failed:  # (scripted, greedy and ignoring EOS, every request writes its max_tokens)
        raise RuntimeError(f"workload {workload.name!r}: {len(failed)} of {len(outputs)} requests ended "
                           f"{failed[0].finish_reason!r} ({failed[0].error}), not at max_tokens: not the work timed")
    tokens = sum(len(o.token_ids) for o in outputs)
    llm_tokens = sum(o.stats.llm_tokens for o in outputs)
    figures = {
        "name": workload.name,
        "batch": workload.batch,
        "prompt_length": len(workload.prompts[0]),
        "max_tokens": workload.max_tokens,
        "target_ratio": workload.target_ratio,
        "ratio": llm_tokens / tokens if tokens else 0.0,
        "calls": sum(o.stats.calls for o in outputs),
        "tokens": tokens,
        "llm_tokens": llm_tokens,
        "llm_prefill_tokens": sum(o.stats.llm_prefill_tokens for o in outputs),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds,
        "finish_reasons": dict(collections.Counter(o.finish_reason for o in outputs)),
        "steps": engine.steps - steps,
        "overlapped_slm_steps": engine.overlapped_steps["slm"] - overlapped["slm"],
        "overlapped_llm_steps": engine.overlapped_steps["llm"] - overlapped["llm"],
    }
    if engine.read_ahead is not None:  # early catch-ups and prefetch chunks: whether the run read ahead at all
        figures["read_ahead_forwards"] = engine.read_ahead.forwards - read_ahead[0]
        figures["read_ahead_tokens"] = engine.read_ahead.tokens - read_ahead[1]
    figures["device"] = summarize(trace.timeline())  # how much of the run each model kept the GPU busy, and both
    return figures, outputs


def median_run(engine: RelayEngine, workload_named: Callable[[str], Workload], name: str, repeats: int) -> dict:
    """The figures of the run of median time out of ``repeats``. Each repeat gets fresh prompts (``name``, then
    ``name #1``, ...): a greedy rerun of the same prompts would find both models' views in their prefix caches."""
    runs = [run_workload(engine, workload_named(name + (f" #{i}" if i else "")))[0] for i in range(repeats)]
    runs.sort(key=lambda f: f["seconds"])
    return dict(runs[len(runs) // 2], name=name)


def ideal_tokens_per_s(ratio: float, slm_decode: dict, llm_decode: dict) -> float:
    """The token-weighted (harmonic) mix of the two models' decode throughputs at the same batch."""
    return 1.0 / ((1 - ratio) / slm_decode["tokens_per_s"] + ratio / llm_decode["tokens_per_s"])


def measure_throughput(engine: RelayEngine, preset: Preset, slm_decode: dict, llm_decode: dict,
                       on_run: Callable[[dict], None] = lambda partial: None) -> dict:
    """``slm_decode``/``llm_decode``: each model's decode point at the relay batch and the workload's mean context.
    ``on_run`` gets the figures so far after each run (the report saves them: a run cut off keeps the others).

    ``of_ideal``: the ideal time (the prompts' prefill, timed alone, plus the tokens at the ideal mix) over the run's.
    The ideal mix counts decode only, yet on every call the LLM must first read the SLM's text since its last turn
    (its catch-up prefill). ``of_ideal_with_catchup`` adds that work, timed as LLM forwards of catch-ups of the
    run's mean length, as many rows as a forward takes: what is left between it and 1 is the engine's own cost."""
    def workloads(ratio: float, staggered: bool = False) -> Callable[[str], Workload]:
        return lambda name: preset_workload(engine.tokenizer, preset, engine.slm.model_config.vocab_size, name,
                                            ratio, staggered=staggered)

    def catchup_s(figures: dict) -> float:
        length = max(1, round(figures["llm_prefill_tokens"] / max(figures["calls"], 1)))
        rows = max(1, min(figures["batch"], engine.llm.config.max_num_batched_tokens // length))
        forward_ms = Probe(engine.llm, preset.repeats).forward_ms(length, 0, rows)
        return figures["llm_prefill_tokens"] / (rows * length) * forward_ms / 1e3

    run_workload(engine, workloads(max(preset.call_ratios))("warm-up"))  # compiles, allocator growth, full batch
    prefill_s = statistics.median(run_workload(engine, workloads(0.0)(f"prompts #{i}").prompts_only())[0]["seconds"]
                                  for i in range(preset.throughput_repeats))
    slm_only = median_run(engine, workloads(0.0), "slm-only", preset.throughput_repeats)
    slm_only["of_ideal"] = (prefill_s + slm_only["tokens"] / slm_decode["tokens_per_s"]) / slm_only["seconds"]
    with using_relay(engine, dataclasses.replace(engine.relay, overlap_steps=False)) as knobs:
        in_turn = dict(median_run(engine, workloads(0.0), "slm-only, steps in turn", preset.throughput_repeats),
                       **knobs)
    slm_only["overlap_speedup"] = slm_only["tokens_per_s"] / in_turn["tokens_per_s"]
    runs = []
    result = {"batch": preset.relay_batch, "slm_decode_ms": slm_decode["ms"], "llm_decode_ms": llm_decode["ms"],
              "decode_context": slm_decode["context"], "prompt_prefill_s": prefill_s, "slm_only": slm_only,
              "slm_only_in_turn": in_turn, "runs": runs}
    default_relay = engine.relay
    named = [(f"aligned {r:.1%}", r, False, None) for r in preset.call_ratios]
    if preset.llm_prefetch_tokens:
        named.append(("prefetching, aligned 1.0%", 0.01, False, prefetching(default_relay, preset)))
    # The engine's default (the LLM reads at calls) against it reading from a command's first tokens.
    early = dataclasses.replace(default_relay, early_catchup_tokens=preset.early_catchup_tokens)
    named.append(("reading early, aligned 1.0%", 0.01, False, early))
    if engine.llm.stream is not None:  # (on a CPU there are no streams to prioritize)
        named.append(("reading early at serving priority, aligned 1.0%", 0.01, False,
                      dataclasses.replace(early, read_ahead_yields=False)))
    if preset.staggered:
        batched = dataclasses.replace(default_relay, llm_batch_wait_steps=preset.llm_batch_wait_steps,
                                      llm_batch_min_rows=preset.llm_batch_min_rows)
        lockstep = dataclasses.replace(default_relay, decouple_llm=False)  # the SLM's steps wait for the LLM's
        named += [("staggered 1.0%", 0.01, True, None), ("staggered 1.0%, lockstep", 0.01, True, lockstep),
                  ("staggered 1.0% batched", 0.01, True, batched)]
    for name, ratio, staggered, relay in named:
        with using_relay(engine, relay) as knobs:
            figures = dict(median_run(engine, workloads(ratio, staggered), name, preset.throughput_repeats), **knobs)
        figures["ideal_tokens_per_s"] = ideal_tokens_per_s(figures["ratio"], slm_decode, llm_decode)
        ideal_s = prefill_s + figures["tokens"] / figures["ideal_tokens_per_s"]
        figures["of_ideal"] = ideal_s / figures["seconds"]
        figures["of_slm_only"] = figures["tokens_per_s"] / slm_only["tokens_per_s"]
        figures["catchup_s"] = catchup_s(figures)
        figures["of_ideal_with_catchup"] = (ideal_s + figures["catchup_s"]) / figures["seconds"]
        runs.append(figures)
        on_run(result)
    return result
