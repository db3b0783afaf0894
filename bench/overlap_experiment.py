"""Can the LLM's reading hide beside the SLM's decode on one GPU? (GPU only.)

    python bench/overlap_experiment.py --out overlap.json [--cache-dir /tmp/relaykern-checkpoints]

The throughput goal (0.90 of the ideal decode mix) needs it: at 1 % LLM tokens the LLM's catch-up prefill is about
a quarter of a batch-64 run, and it hid nowhere on an H200 (bench/results/nvidia-h200-2026-11-27.json: reading
ahead on a low-priority stream was slower than reading at the calls). A prefill chunk is compute-bound, a batch-64
SLM decode step memory-bound, so at once they could take little more than the longer of the two, if the GPU shares
its SMs between them. This times K SLM decode steps (batch 64, pipelined as the engine runs them, a CUDA graph) and
one LLM forward of a 1024-token prefill chunk, alone and at once, K chosen so that both take about as long alone.
Everything is queued behind a device-side sleep before any of it runs, so the times are the GPU's alone (launching
an eager 8B forward takes the host ~20 ms). The ways of sharing the GPU:

- ``background``: the LLM's chunk replayed from a CUDA graph on its runner's low-priority stream (how the engine
  reads ahead); ``same_priority``: on its serving stream; ``background_eager``: launched kernel by kernel;
- ``cublaslt``: eager, its matmuls on cuBLASLt (the baseline of the next); ``lt_leaves_N``: cuBLASLt told to leave
  N SMs alone (``torch._C._set_sm_carveout_experimental``, which only cuBLASLt reads), so that the SLM's kernels find
  free SMs at once;
- ``green_N``: the chunk's graph replayed on a stream of a CUDA green context of N SMs (``torch.cuda.green_contexts``;
  the driver rounds N to its SM granularity); ``green_N_ctx`` also makes that context current while it launches.
  Only the LLM is confined: the SLM may use every SM.

For each: the LLM's time alone that way, when the SLM's steps ended and when the LLM's forward ended at once, the
whole, and how much of the shorter of the two alone it hid (1: none of it added, 0: they ran as if in turn); whether
the LLM sampled what the first way's forward samples (bf16 matmuls of other algorithms may flip a random model's
greedy pick). Writes JSON (device, versions, commit) to --out after each way; a way the software does not offer is
recorded with its error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
from pathlib import Path
from typing import Callable, Iterator

import torch

from relaykern.bench.model_bench import Probe, eager
from relaykern.bench.presets import build_pair, get_preset
from relaykern.bench.timing import environment
from relaykern.config import EngineConfig
from relaykern.engine.cuda_graphs import GraphShape, StepGraphs
from relaykern.engine.row import Row
from relaykern.engine.runner import ModelRunner

SLM_BATCH, SLM_CONTEXT = 64, 384
"""The throughput workloads' decode shape (batch, mean context)."""
CHUNK_TOKENS, CHUNK_CONTEXT = 1024, 512
"""A read-ahead chunk (the preset's llm_prefetch_tokens) over a prompt already read."""
LLM_SMS = (32, 64, 96)
"""SMs the LLM may use (green contexts), or cuBLASLt leaves to the SLM (carve-outs)."""
GATE_CYCLES = 200_000_000
"""The device-side sleep everything waits behind: ~0.1 s at 2 GHz, longer than launching any of it."""

Launch = Callable[[], torch.Tensor]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/relaykern-checkpoints"),
                        help="where the random 1.7B and 8B checkpoints are (written there if missing)")
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args(argv)


class Experiment:
    def __init__(self, slm: ModelRunner, llm: ModelRunner, slm_rows: list[Row], llm_rows: list[Row],
                 repeats: int) -> None:
        self.slm, self.llm, self.slm_rows, self.llm_rows, self.repeats = slm, llm, slm_rows, llm_rows, repeats
        self.steps = 1
        self.gate = torch.cuda.Stream(slm.device)

    def slm_steps(self) -> torch.Tensor:
        fed = None
        for _ in range(self.steps):
            fed, _ = self.slm.execute(self.slm_rows, fed_tokens=fed)
        return fed

    def llm_forward(self, background: bool = True) -> torch.Tensor:
        return self.llm.execute(self.llm_rows, background=background)[0]

    def alone_ms(self, launch: Launch, stream: torch.cuda.Stream) -> float:
        self.device_ms([(launch, stream)])  # (warm-up)
        return statistics.median(self.device_ms([(launch, stream)])[0] for _ in range(self.repeats))

    def at_once(self, launch_llm: Launch, llm_stream: torch.cuda.Stream) -> dict:
        """Median ms to the end of the LLM's forward, of the SLM's steps, of both; the LLM's sampled tokens."""
        runs, sampled = [], []

        def llm() -> torch.Tensor:
            sampled.append(launch_llm())
            return sampled[-1]

        for _ in range(self.repeats + 1):  # (the first warms up)
            llm_ms, slm_ms = self.device_ms([(llm, llm_stream), (self.slm_steps, self.slm.stream)])
            runs.append((llm_ms, slm_ms, max(llm_ms, slm_ms)))
        runs = runs[1:]
        return {"llm_ms": statistics.median(r[0] for r in runs), "slm_ms": statistics.median(r[1] for r in runs),
                "total_ms": statistics.median(r[2] for r in runs), "llm_tokens": sampled[-1].tolist()}

    def device_ms(self, launches: list[tuple[Launch, torch.cuda.Stream]]) -> list[float]:
        """Queues each launch behind a device-side sleep (each ends with an event on its stream), then lets them run
        at once: ms from the sleep's end to each one's end."""
        torch.cuda.synchronize()
        with torch.cuda.stream(self.gate):
            torch.cuda._sleep(GATE_CYCLES)
        start = torch.cuda.Event(enable_timing=True)
        start.record(self.gate)
        ends = []
        for launch, stream in launches:
            stream.wait_event(start)
            launch()
            end = torch.cuda.Event(enable_timing=True)
            end.record(stream)
            ends.append(end)
        for end in ends:
            end.synchronize()
        return [start.elapsed_time(end) for end in ends]


@contextlib.contextmanager
def cublaslt(carveout: int | None = None) -> Iterator[None]:
    """Matmuls launched inside the block go to cuBLASLt, told to leave ``carveout`` SMs alone (None: all used)."""
    library, kept = torch.backends.cuda.preferred_blas_library(), torch._C._get_sm_carveout_experimental()
    torch.backends.cuda.preferred_blas_library("cublaslt")
    torch._C._set_sm_carveout_experimental(carveout)
    try:
        yield
    finally:
        torch._C._set_sm_carveout_experimental(kept)
        torch.backends.cuda.preferred_blas_library(library)


def sharing_ways(experiment: Experiment, sms: int, green_contexts: list) -> dict[str, Callable[[], tuple]]:
    """Each way's setup: it returns the LLM's launch and the stream it ends on. Green contexts last: the least tried
    (the report is saved after each way, should one take the process down)."""
    llm = experiment.llm

    def eagerly(carveout: int | None = None, lt: bool = False) -> Launch:
        def launch() -> torch.Tensor:
            with eager(llm), (cublaslt(carveout) if lt else contextlib.nullcontext()):
                return experiment.llm_forward()
        return launch

    ways = {"background": lambda: (experiment.llm_forward, llm.background_stream),
            "same_priority": lambda: (lambda: experiment.llm_forward(background=False), llm.stream),
            "background_eager": lambda: (eagerly(), llm.background_stream),
            "cublaslt": lambda: (eagerly(lt=True), llm.background_stream)}
    for used in LLM_SMS:
        ways[f"lt_leaves_{sms - used}"] = lambda used=used: (eagerly(sms - used, lt=True), llm.background_stream)
    for used in LLM_SMS:
        for current in (False, True):
            ways[f"green_{used}" + ("_ctx" if current else "")] = \
                lambda used=used, current=current: _green(experiment, used, current, green_contexts)
    return ways


def _green(experiment: Experiment, sms: int, current: bool, keep: list) -> tuple[Launch, torch.cuda.Stream]:
    from torch.cuda.green_contexts import GreenContext

    llm = experiment.llm
    context = GreenContext.create(num_sms=sms, device_id=llm.device.index or 0)
    keep.append(context)  # alive to the end: the allocator may hold blocks of its stream
    stream = context.Stream()
    if not isinstance(stream, torch.cuda.Stream):  # (some versions hand back a torch.Stream)
        stream = torch.cuda.Stream(stream_id=stream.stream_id, device_index=stream.device_index,
                                   device_type=stream.device_type)

    def launch() -> torch.Tensor:
        kept = llm.background_stream
        llm.background_stream = stream
        try:
            if current:
                context.set_context()
            try:
                return experiment.llm_forward()
            finally:
                if current:
                    context.pop_context()
        finally:
            llm.background_stream = kept
    return launch, stream


def runners(cache_dir: Path) -> tuple[ModelRunner, ModelRunner]:
    """Both models, each with the one CUDA graph it replays here (no other start-up work)."""
    slm_path, llm_path = build_pair(get_preset("gpu", quick=True), cache_dir)
    config = EngineConfig(device="cuda", dtype="bfloat16", kv_cache_memory_gb=4, cuda_graphs=False)
    slm, llm = ModelRunner(slm_path, config), ModelRunner(llm_path, config)
    with slm.scope():
        slm.graphs = StepGraphs(slm, shapes=[GraphShape(rows=SLM_BATCH, tokens=SLM_BATCH, decode=True)])
    with llm.scope():
        llm.graphs = StepGraphs(llm, shapes=[GraphShape(rows=2, tokens=CHUNK_TOKENS, decode=False)])
    return slm, llm


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("overlap_experiment: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    report = {"meta": dict(environment(device, []), command_line="python bench/overlap_experiment.py " +
                           " ".join(argv)), "sms": sms, "ways": []}

    def save() -> None:
        args.out.write_text(json.dumps(report, indent=2) + "\n")

    slm, llm = runners(args.cache_dir)
    green_contexts: list = []
    with Probe(slm, 1).decode_rows(SLM_BATCH, SLM_CONTEXT) as slm_rows, \
            Probe(llm, 1).forward_rows(CHUNK_TOKENS, CHUNK_CONTEXT) as llm_rows:
        experiment = Experiment(slm, llm, slm_rows, llm_rows, args.repeats)
        slm_step = experiment.alone_ms(experiment.slm_steps, slm.stream)
        llm_graph = experiment.alone_ms(experiment.llm_forward, llm.background_stream)
        experiment.steps = max(1, round(llm_graph / slm_step))
        slm_alone = experiment.alone_ms(experiment.slm_steps, slm.stream)
        report.update(slm_batch=SLM_BATCH, slm_context=SLM_CONTEXT, chunk_tokens=CHUNK_TOKENS,
                      chunk_context=CHUNK_CONTEXT, slm_steps=experiment.steps, slm_step_ms=slm_alone / experiment.steps,
                      slm_alone_ms=slm_alone)
        print(f"{sms} SMs: {experiment.steps} SLM steps alone {slm_alone:.2f} ms", flush=True)
        first_tokens = None
        for name, setup in sharing_ways(experiment, sms, green_contexts).items():
            try:
                launch, stream = setup()
                llm_alone = experiment.alone_ms(launch, stream)
                figures = experiment.at_once(launch, stream)
            except Exception as err:  # noqa: BLE001 - a way this torch or driver does not offer: recorded
                report["ways"].append({"way": name, "error": f"{type(err).__name__}: {err}"})
                save()
                print(f"{name:>16}: {type(err).__name__}: {err}", flush=True)
                continue
            first_tokens = first_tokens or figures["llm_tokens"]
            hidden = (slm_alone + llm_alone - figures["total_ms"]) / min(slm_alone, llm_alone)
            row = {"way": name, "llm_alone_ms": llm_alone, "llm_ms": figures["llm_ms"], "slm_ms": figures["slm_ms"],
                   "total_ms": figures["total_ms"], "in_turn_ms": slm_alone + llm_alone, "hidden": hidden,
                   "same_llm_tokens": figures["llm_tokens"] == first_tokens}
            report["ways"].append(row)
            save()
            print(f"{name:>16}: LLM alone {llm_alone:.2f} ms; at once LLM {row['llm_ms']:.2f}, SLM {row['slm_ms']:.2f},"
                  f" both {row['total_ms']:.2f} ms; hidden {hidden:.2f}; same tokens {row['same_llm_tokens']}",
                  flush=True)
    save()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
