"""A timeline of every forward an engine's two runners launch: which model, what rows, when the host launched it,
and (on a GPU) when its work began and ended on its stream. What a relay costs beyond its forwards (the device idle
between them, forwards slower than probed alone, one model's forward waiting on the other's) shows in it; a step
time probed outside the engine's loop cannot show it.

The device times come from CUDA events recorded on the forward's stream just before and after it (timing events,
so the trace slows the loop a little: it is taken on a run beside the timed ones). All times are ms from the
trace's start. Off CUDA there are no streams: only the host's launch times.
"""
from __future__ import annotations

import contextlib
import dataclasses
import time
from typing import Iterator

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
    """Host time when the launch began."""
    start_ms: float | None = None
    end_ms: float | None = None
    """Device times of its work (None off CUDA)."""


class ForwardTrace:
    def __init__(self, engine: RelayEngine) -> None:
        self.engine = engine
        self.forwards: list[TracedForward] = []
        self._events: list[tuple[TracedForward, torch.cuda.Event, torch.cuda.Event]] = []
        self._origin_s = time.perf_counter()
        self._first_step = engine.steps
        self._origin_event: torch.cuda.Event | None = None
        if engine.slm.device.type == "cuda":
            self._origin_event = torch.cuda.Event(enable_timing=True)
            self._origin_event.record(engine.slm.stream or torch.cuda.current_stream(engine.slm.device))

    def wrap(self, runner: ModelRunner, name: str):
        execute = runner.execute

        def traced(rows, fed_tokens=None, background=False):
            forward = TracedForward(self.engine.steps - self._first_step, name, len(rows),
                                    sum(len(row.tokens) for row in rows), fed_tokens is not None, background,
                                    (time.perf_counter() - self._origin_s) * 1e3)
            self.forwards.append(forward)
            if self._origin_event is None or runner.device != self.engine.slm.device:  # (events time one device)
                return execute(rows, fed_tokens, background)
            stream = runner.background_stream if background else runner.stream
            if background:  # (execute makes it wait so too: the start then marks the forward's own work)
                stream.wait_stream(runner.stream)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record(stream)
            try:
                return execute(rows, fed_tokens, background)
            finally:
                end.record(stream)
                self._events.append((forward, start, end))
        return traced

    def timeline(self) -> list[dict]:
        """The forwards in launch order, device times filled in (waits for the device)."""
        if self._origin_event is not None:
            torch.cuda.synchronize(self.engine.slm.device)
            for forward, start, end in self._events:
                forward.start_ms = self._origin_event.elapsed_time(start)
                forward.end_ms = self._origin_event.elapsed_time(end)
        return [{key: round(value, 3) if isinstance(value, float) else value
                 for key, value in dataclasses.asdict(forward).items()} for forward in self.forwards]


@contextlib.contextmanager
def traced(engine: RelayEngine) -> Iterator[ForwardTrace]:
    """Traces every forward of ``engine``'s runners inside the block (``trace.timeline()`` after it)."""
    trace = ForwardTrace(engine)
    runners = [(engine.slm, "slm")] + ([(engine.llm, "llm")] if engine.llm is not None else [])
    for runner, name in runners:
        runner.execute = trace.wrap(runner, name)
    try:
        yield trace
    finally:
        for runner, _ in runners:
            del runner.execute  # the class's method again


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
