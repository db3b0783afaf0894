"""A model's forward as the relay loop launches it: scheduled over the sequences in the model's phase, failures
isolated to the requests that cause them, the SLM's followed by fused command detection on the device, and what a
launched forward hands back (its results arrive through a readback, read when the loop needs them)."""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable

import torch

from relaykern.config import RelayConfig
from relaykern.engine.detection import Detector
from relaykern.engine.readback import Readback
from relaykern.engine.row import Row
from relaykern.engine.runner import ModelRunner
from relaykern.engine.scheduler import Scheduler
from relaykern.engine.sequence import Phase, Sequence
from relaykern.engine.transfer import host_to_device


@dataclasses.dataclass
class Launched:
    """One model's forward of this step, launched; its results arrive through ``readback``."""

    seqs: list[Sequence]
    rows: list[Row]
    readback: Readback
    sampled: torch.Tensor
    """The sampled ids on the device: what an overlapped next forward feeds its rows."""
    detected: torch.Tensor | None = None
    """The SLM's: sampled ids, detection events and automaton states on the device (what ``readback`` copies)."""
    fed: int = 0
    """Launched before the forward before it was read back (overlapped), its first ``fed`` rows fed on the device
    the tokens that forward samples."""


def run_forward(runner: ModelRunner, scheduler: Scheduler, seqs: list[Sequence], rows: list[Row],
                background: bool = False) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Runs a forward (``background``: as ``ModelRunner.execute`` says): (sampled ids, log-probs) on the device. If
    it fails (a broken logits processor, say), each row is retried alone so that only the requests that fail are
    finished with ``finish_reason="error"`` (their blocks freed, and dropped from ``seqs`` and ``rows`` in place);
    rewriting a row's KV is idempotent. Log-probs: ``None`` if no row asked for them. None if no row ran."""
    try:
        return runner.execute(rows, background=background)
    except Exception as err:  # noqa: BLE001 - reported on the affected requests; the engine goes on
        if len(rows) == 1:
            scheduler.release(seqs[0], keep_cached=False)
            seqs[0].finish("error", f"{type(err).__name__}: {err}")
            return None
        results = [run_forward(runner, scheduler, [seq], [row], background) for seq, row in zip(seqs, rows)]
    kept = [i for i, result in enumerate(results) if result is not None]
    seqs[:] = [seqs[i] for i in kept]
    rows[:] = [rows[i] for i in kept]
    if not kept:
        return None
    tokens = torch.cat([results[i][0] for i in kept])
    logprobs = [results[i][1] for i in kept]
    if all(lp is None for lp in logprobs):
        return tokens, None
    return tokens, torch.cat([torch.zeros_like(tokens[:1], dtype=torch.float32) if lp is None else lp
                              for lp in logprobs])


@dataclasses.dataclass
class Launcher:
    """Launches one model's forwards: over the sequences in ``phase``, sampling, and with a ``detector`` (the SLM's)
    command detection on the sampled ids."""

    runner: ModelRunner
    phase: Phase
    scheduler: Scheduler
    detector: Detector | None = None
    may_leave: Callable[[Sequence, RelayConfig], bool] | None = None
    """Whether a request's next token may make it leave ``phase`` under the relay's settings: an overlapped step
    leaves its row out."""
    overlapped: int = 0
    """Counter: forwards launched before the one before them was read back."""
    failed_after: Launched | None = None
    """The forward after which an overlapped launch failed: none is tried again until it is read."""

    def launch(self, busy: list[Sequence]) -> Launched | None:
        """Schedules and launches a forward and starts reading its results back; ``busy``: the sequences of the other
        model's forwards not read yet, which scheduling must not preempt. None if no row ran."""
        seqs, rows = self.scheduler.schedule(self.phase, self.runner, self.phase.view, busy)
        with self.runner.scope():  # detection and the readback go on the model's stream, after its forward
            result = run_forward(self.runner, self.scheduler, seqs, rows) if rows else None
            return None if result is None else self._launched(seqs, rows, *result)

    def launch_overlapped(self, launched: Launched, relay: RelayConfig) -> Launched | None:
        """Launches the next forward before ``launched`` is read back, its rows fed on the device with the tokens
        ``launched`` samples; None when the next forward must be scheduled as usual
        (``Scheduler.schedule_overlapped``)."""
        if launched is self.failed_after:
            return None
        self.failed_after = None  # (an older forward's: read by now)
        may_leave = None if self.may_leave is None else lambda seq: self.may_leave(seq, relay)  # noqa: E731
        plan = self.scheduler.schedule_overlapped(self.phase, self.runner, self.phase.view, launched.seqs,
                                                  launched.rows, may_leave)
        if plan is None:
            return None
        carried, seqs, rows = plan
        with self.runner.scope():
            index = None if carried == list(range(len(launched.rows))) else \
                host_to_device(self.runner.device, carried, torch.int64)
            pick = (lambda t: t) if index is None else (lambda t: t[..., index])  # noqa: E731
            try:
                tokens, logprobs = self.runner.execute(rows, fed_tokens=pick(launched.sampled) if carried else None)
            except Exception as err:  # noqa: BLE001 - scheduled in turn once ``launched`` is read, where a failing
                # row fails alone
                warnings.warn(f"an overlapped {self.phase.value.upper()} step failed, scheduled in turn: {err!r}")
                for seq in seqs[len(carried):]:  # their blocks were registered for KV never written
                    self.scheduler.release(seq, keep_cached=False)
                self.failed_after = launched
                return None
            self.overlapped += 1
            fed_states = pick(launched.detected[5:]) if carried and self.detector else None
            return self._launched(seqs, rows, tokens, logprobs, fed_states, len(carried))

    def goes_on(self, seq: Sequence, row: Row) -> bool:
        """Whether ``seq`` goes on in this model from the token a carried ``row`` was fed (the last it wrote)."""
        return seq.goes_on(self.phase, self.phase.view(seq), row.start + 1)

    def _launched(self, seqs: list[Sequence], rows: list[Row], tokens: torch.Tensor, logprobs: torch.Tensor | None,
                  fed_states: torch.Tensor | None = None, fed: int = 0) -> Launched:
        """A launched forward's results, read back from the device, the SLM's with fused detection on its sampled
        ``tokens`` (``fed_states`` as ``Detector.launch`` takes them)."""
        if self.detector is None:
            return Launched(seqs, rows, Readback(tokens, logprobs), tokens, fed=fed)
        if not all(row.samples for row in rows):  # a chunk's token is no token: detection skips it (-1)
            samples = host_to_device(self.runner.device, [row.samples for row in rows], torch.bool)
            tokens = torch.where(samples, tokens, -1)
        detected = self.detector.launch(tokens, seqs, fed_states)
        return Launched(seqs, rows, Readback(detected, logprobs), tokens, detected, fed=fed)
