"""Can the LLM's reading hide beside the SLM's decode on one GPU? (GPU only.)

    python bench/overlap_experiment.py --out overlap.json [--cache-dir /tmp/relaykern-checkpoints]

The throughput goal (0.90 of the ideal decode mix) needs it: at 1 % LLM tokens the LLM's catch-up prefill is about
a quarter of a batch-64 run, and it hid nowhere on an H200 (bench/results/nvidia-h200-2026-11-27.json: reading
ahead on a low-priority stream was slower than reading at the calls). A prefill chunk is compute-bound, a batch-64
SLM decode step memory-bound, so at once they could take little more than the longer of the two, if the GPU shares
its SMs between them. This times K SLM decode steps (batch 64, pipelined as the engine runs them, CUDA graphs) and
one LLM forward of a prefill chunk (eager, as read-ahead chunks run), alone and launched at once (the LLM's first),
K chosen so that both take about as long alone. The ways of sharing the GPU:

- ``background``: the LLM on its runner's low-priority stream (how the engine reads ahead today);
- ``same_priority``: on its serving stream;
- ``carveout_N``: cuBLAS told to leave N SMs alone during the LLM's forward
  (``torch._C._set_sm_carveout_experimental``), so that the SLM's kernels find free SMs at once;
- ``green_N``: the LLM's forward on a stream of a CUDA green context of N SMs (``torch.cuda.green_contexts``), the
  SLM on the others; ``green_N_ctx`` also makes that context current while it launches.

For each: when the SLM's steps ended, when the LLM's forward ended, the whole, and how much of the shorter of the two
alone it hid (1: none of it added, 0: they ran as if in turn); whether the LLM sampled what it samples alone. Writes
JSON (device, versions, commit) to --out; a way the software does not offer is recorded with its error.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Callable

import torch

from relaykern.bench.model_bench import Probe
from relaykern.bench.presets import build_pair, get_preset
from relaykern.bench.timing import environment
from relaykern.config import EngineConfig
from relaykern.engine.runner import ModelRunner

SLM_BATCH, SLM_CONTEXT = 64, 384
"""The throughput workloads' decode shape (batch, mean context)."""
CHUNK_TOKENS, CHUNK_CONTEXT = 1024, 512
"""A read-ahead chunk (the preset's llm_prefetch_tokens) over a prompt already read."""
LLM_SHARES = (0.25, 0.5, 0.75)
"""Fractions of the SMs the LLM may use (green contexts), or leaves to the SLM (carve-outs)."""


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/relaykern-checkpoints"),
                        help="where the random 1.7B and 8B checkpoints are (written there if missing)")
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args(argv)


class Experiment:
    def __init__(self, slm: ModelRunner, llm: ModelRunner, slm_rows, llm_rows, repeats: int) -> None:
        self.slm, self.llm, self.slm_rows, self.llm_rows, self.repeats = slm, llm, slm_rows, llm_rows, repeats
        self.steps = 1

    def slm_steps(self) -> torch.Tensor:
        fed = None
        for _ in range(self.steps):
            fed, _ = self.slm.execute(self.slm_rows, fed_tokens=fed)
        return fed

    def llm_forward(self, background: bool = True) -> torch.Tensor:
        return self.llm.execute(self.llm_rows, background=background)[0]

    def alone_ms(self, launch: Callable[[], torch.Tensor], stream: torch.cuda.Stream) -> float:
        def once() -> float:
            return self._timed([(launch, stream)])[0]
        once()
        return statistics.median(once() for _ in range(self.repeats))

    def at_once(self, launch_llm: Callable[[], torch.Tensor], llm_stream: torch.cuda.Stream) -> dict:
        """Median ms (from the launch) to the end of the LLM's forward, of the SLM's steps, of both; the LLM's
        sampled tokens."""
        runs, sampled = [], []

        def llm() -> torch.Tensor:
            sampled.append(launch_llm())
            return sampled[-1]

        for _ in range(self.repeats + 1):  # (the first warms up)
            llm_ms, slm_ms = self._timed([(llm, llm_stream), (self.slm_steps, self.slm.stream)])
            runs.append((llm_ms, slm_ms, max(llm_ms, slm_ms), sampled[-1].tolist()))
        runs = runs[1:]
        return {"llm_ms": statistics.median(r[0] for r in runs), "slm_ms": statistics.median(r[1] for r in runs),
                "total_ms": statistics.median(r[2] for r in runs), "llm_tokens": runs[0][3]}

    def _timed(self, launches: list[tuple[Callable[[], torch.Tensor], torch.cuda.Stream]]) -> list[float]:
        """Launches each on the GPU at once (in order; each ends with an event on its stream): ms from the first
        launch to each one's end."""
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        start.record(launches[0][1])
        for _, stream in launches[1:]:
            stream.wait_event(start)
        ends = []
        for launch, stream in launches:
            launch()
            end = torch.cuda.Event(enable_timing=True)
            end.record(stream)
            ends.append(end)
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for end in ends]


def sharing_ways(experiment: Experiment, sms: int) -> dict[str, Callable[[], tuple[Callable, torch.cuda.Stream]]]:
    """Each way's setup: it returns the LLM's launch and the stream it ends on. Green contexts last: the least tried
    (the report is saved after each way, should one take the process down)."""
    llm = experiment.llm
    ways = {"background": lambda: (experiment.llm_forward, llm.background_stream),
            "same_priority": lambda: (lambda: experiment.llm_forward(background=False), llm.stream)}
    for share in LLM_SHARES:
        left = round(sms * (1 - share))
        ways[f"carveout_{left}"] = lambda left=left: (_carved(experiment, left), llm.background_stream)
    for share in LLM_SHARES:
        used = round(sms * share)
        for current in (False, True):
            ways[f"green_{used}" + ("_ctx" if current else "")] = \
                lambda used=used, current=current: _green(experiment, used, current)
    return ways


def _carved(experiment: Experiment, carveout: int) -> Callable[[], torch.Tensor]:
    def launch() -> torch.Tensor:
        previous = torch._C._get_sm_carveout_experimental()
        torch._C._set_sm_carveout_experimental(carveout)
        try:
            return experiment.llm_forward()
        finally:
            torch._C._set_sm_carveout_experimental(previous if previous is not None else 0)
    return launch


def _green(experiment: Experiment, sms: int, current: bool) -> tuple[Callable[[], torch.Tensor], torch.cuda.Stream]:
    from torch.cuda.green_contexts import GreenContext

    llm = experiment.llm
    context = GreenContext.create(num_sms=sms, device_id=llm.device.index or 0)
    stream = context.Stream()
    if not isinstance(stream, torch.cuda.Stream):  # (some versions hand back a torch.Stream)
        stream = torch.cuda.Stream(stream_id=stream.stream_id, device_index=stream.device_index,
                                   device_type=stream.device_type)

    def launch() -> torch.Tensor:
        kept = llm.background_stream
        llm.background_stream = stream
        if current:
            context.set_context()
        try:
            return experiment.llm_forward()
        finally:
            if current:
                context.pop_context()
            llm.background_stream = kept
    return launch, stream


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if not torch.cuda.is_available():
        print("overlap_experiment: needs a CUDA GPU", file=sys.stderr)
        return 2
    device = torch.device("cuda")
    report = {"meta": dict(environment(device, []), command_line="python bench/overlap_experiment.py " +
                           " ".join(sys.argv[1:] if argv is None else argv)), "ways": []}
    slm_path, llm_path = build_pair(get_preset("gpu", quick=True), args.cache_dir)
    slm = ModelRunner(slm_path, EngineConfig(device="cuda", dtype="bfloat16", kv_cache_memory_gb=4,
                                             max_num_seqs=SLM_BATCH, max_num_batched_tokens=16))
    llm = ModelRunner(llm_path, EngineConfig(device="cuda", dtype="bfloat16", kv_cache_memory_gb=4, cuda_graphs=False,
                                             max_num_batched_tokens=CHUNK_TOKENS))
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    with Probe(slm, 1).decode_rows(SLM_BATCH, SLM_CONTEXT) as slm_rows, \
            Probe(llm, 1).forward_rows(CHUNK_TOKENS, CHUNK_CONTEXT) as llm_rows:
        experiment = Experiment(slm, llm, slm_rows, llm_rows, args.repeats)
        slm_step = experiment.alone_ms(experiment.slm_steps, slm.stream)
        llm_alone = experiment.alone_ms(experiment.llm_forward, llm.background_stream)
        experiment.steps = max(1, round(llm_alone / slm_step))
        slm_alone = experiment.alone_ms(experiment.slm_steps, slm.stream)
        alone_tokens = experiment.llm_forward().tolist()
        report.update(sms=sms, slm_batch=SLM_BATCH, slm_context=SLM_CONTEXT, chunk_tokens=CHUNK_TOKENS,
                      chunk_context=CHUNK_CONTEXT, slm_steps=experiment.steps, slm_step_ms=slm_alone / experiment.steps,
                      slm_alone_ms=slm_alone, llm_alone_ms=llm_alone, in_turn_ms=slm_alone + llm_alone)
        print(f"SMs {sms}: {experiment.steps} SLM steps alone {slm_alone:.2f} ms, LLM chunk alone {llm_alone:.2f} ms",
              flush=True)
        for name, setup in sharing_ways(experiment, sms).items():
            try:
                launch, stream = setup()
                figures = experiment.at_once(launch, stream)
            except Exception as err:  # noqa: BLE001 - a way this torch or driver does not offer: recorded
                report["ways"].append({"way": name, "error": f"{type(err).__name__}: {err}"})
                args.out.write_text(json.dumps(report, indent=2) + "\n")
                print(f"{name:>16}: {type(err).__name__}: {err}", flush=True)
                continue
            hidden = (slm_alone + llm_alone - figures["total_ms"]) / min(slm_alone, llm_alone)
            row = {"way": name, "llm_ms": figures["llm_ms"], "slm_ms": figures["slm_ms"],
                   "total_ms": figures["total_ms"], "hidden": hidden,
                   "same_llm_tokens": figures["llm_tokens"] == alone_tokens}
            report["ways"].append(row)
            args.out.write_text(json.dumps(report, indent=2) + "\n")
            print(f"{name:>16}: LLM {row['llm_ms']:.2f} ms, SLM {row['slm_ms']:.2f} ms, both {row['total_ms']:.2f} ms,"
                  f" hidden {hidden:.2f}, same tokens {row['same_llm_tokens']}", flush=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
