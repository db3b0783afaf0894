"""A timeline of every forward an engine's two runners launch: which model, what rows, when the host began and
ended launching it, and (on a GPU) when its stream began and ended its work. What a relay costs beyond its forwards
(the device idle between them, forwards slower than probed alone, one model's forward waiting on the other's, a
forward the host takes longer to launch than the GPU to run) shows in it; a step time probed outside the engine's
loop cannot show it.

The device times come from CUDA events recorded on the forward's stream just before and after its launch (timing
events, a few microseconds a forward). A forward's device start is when its stream was free to begin it, so for a
forward the host launches kernel by kernel it includes the host's launching: compare ``return_ms``. All times are ms
from the trace's start, each device's from an event recorded on it then (a model on another GPU: its own clock).
Off CUDA there are no streams: only the host's times.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Callable, Iterator

import torch

from relaykern.engine.relay import RelayEngine
from relaykern.engine.runner import ModelRunner


@dataclasses.dataclass
class TracedForward:
    step: int
    """The engine step that launched it, counted from the trace's start."""
    model: str
    rows: int
    tokens: int
    fed: bool
    """Launched before the forward before it was read (its rows fed on the device)."""
    background: bool
    """Reading ahead on the LLM's low-priority stream."""
    launch_ms: float
    return_ms: float = 0.0
    """Host times when its launch began and ended."""
    start_ms: float | None = None
    end_ms: float | None = None
    """Device times of its work (None off CUDA)."""


class ForwardTrace:
    def __init__(self, engine: RelayEngine) -> None:
        self.engine = engine
        self.forwards: list[TracedForward] = []
        self._events: list[tuple[TracedForward, torch.cuda.Event, torch.cuda.Event, torch.cuda.Event]] = []
        self._first_step = engine.steps
        self._origins: dict[ModelRunner, torch.cuda.Event] = {}
        for runner in (engine.slm, engine.llm):
            if runner is not None and runner.stream is not None:
                torch.cuda.synchronize(runner.device)  # (so that no earlier work ends after the origin)
                origin = torch.cuda.Event(enable_timing=True)
                origin.record(runner.stream)
                self._origins[runner] = origin
        self._origin_s = time.perf_counter()

    def _host_ms(self) -> float:
        return (time.perf_counter() - self._origin_s) * 1e3

    def wrap(self, runner: ModelRunner, name: str, execute: Callable) -> Callable:
        """``execute`` (the runner's own) traced."""
        def traced(rows, fed_tokens=None, background=False):
            forward = TracedForward(self.engine.steps - self._first_step, name, len(rows),
                                    sum(len(row.tokens) for row in rows), fed_tokens is not None, background,
                                    self._host_ms())
            self.forwards.append(forward)
            timed = runner in self._origins
            if timed:
                stream = runner.background_stream if background else runner.stream
                if background:  # (execute makes it wait so too: the start then marks the forward's own work)
                    stream.wait_stream(runner.stream)
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record(stream)
            try:
                return execute(rows, fed_tokens, background)
            finally:
                forward.return_ms = self._host_ms()
                if timed:
                    end.record(stream)
                    self._events.append((forward, self._origins[runner], start, end))
        return traced

    def timeline(self) -> list[dict]:
        """The forwards in launch order, device times filled in (waits for the devices)."""
        for forward, origin, start, end in self._events:
            end.synchronize()
            forward.start_ms = origin.elapsed_time(start)
            forward.end_ms = origin.elapsed_time(end)
        return [{key: round(value, 3) if isinstance(value, float) else value
                 for key, value in dataclasses.asdict(forward).items()} for forward in self.forwards]


@contextlib.contextmanager
def traced(engine: RelayEngine) -> Iterator[ForwardTrace]:
    """Traces every forward of ``engine``'s runners inside the block (``trace.timeline()`` after it)."""
    trace = ForwardTrace(engine)
    runners = [(engine.slm, "slm")] + ([(engine.llm, "llm")] if engine.llm is not None else [])
    patched = []
    try:
        for runner, name in runners:
            patched.append((runner, runner.__dict__.get("execute")))  # (an earlier patch of this runner, if any)
            runner.execute = trace.wrap(runner, name, runner.execute)
        yield trace
    finally:
        for runner, earlier in patched:
            if earlier is None:
                del runner.execute  # the class's method again
            else:
                runner.execute = earlier


def summarize(timeline: list[dict]) -> dict:
    """Device ms from the first forward's start to the last's end (``span_ms``), each model busy in it (the union of
    its forwards' spans), both at once (``both_ms``), and neither (``idle_ms``). Empty off CUDA."""
    spans = [(f["start_ms"], f["end_ms"], f["model"]) for f in timeline if f["start_ms"] is not None]
    if not spans:
        return {}
    summary = {"span_ms": max(e for _, e, _ in spans) - min(s for s, _, _ in spans)}
    busy = {model: _union([(s, e) for s, e, m in spans if m == model]) for model in sorted({m for _, _, m in spans})}
    summary.update({f"{model}_busy_ms": ms for model, ms in busy.items()})
    either = _union([(s, e) for s, e, _ in spans])
    summary["both_ms"] = sum(busy.values()) - either
    summary["idle_ms"] = summary["span_ms"] - either
    return {key: round(value, 3) for key, value in summary.items()}


def _union(intervals: list[tuple[float, float]]) -> float:
    total, reach = 0.0, float("-inf")
    for start, end in sorted(intervals):
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total
