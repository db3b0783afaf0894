"""A RelayEngine stepped by a thread of its own, for servers: any thread submits prompts and reads their tokens as
they are written, while the engine thread batches every request in flight, whoever submitted it.

The engine is touched only by its thread: submissions and cancellations reach it through a queue, tokens leave
through each submission's queue. A forward that raises (a bug, a device lost) fails every request in flight with that
error, stops the thread, and any later submission raises ``EngineDead``: the requests are never left waiting.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence as Seq

from relaykern.config import SamplingParams
from relaykern.engine.relay import RelayEngine
from relaykern.engine.sequence import Sequence
from relaykern.outputs import RelayOutput, Source

log = logging.getLogger("relaykern")


class EngineDead(RuntimeError):
    """The engine thread stopped (closed, or a forward failed): nothing more can be submitted."""


@dataclass
class Delta:
    """Tokens one model just wrote for prompt ``index`` of a submission (with their log-probs if asked for)."""

    index: int
    source: Source
    token_ids: list[int]
    logprobs: list[float] | None


@dataclass
class Done:
    """Prompt ``index`` of a submission finished: its whole output."""

    index: int
    output: RelayOutput


class Submission:
    """Prompts submitted together: ``events()`` yields their ``Delta``s (unless submitted with ``stream=False``) and
    ``Done``s as they come; ``cancel()`` aborts those not finished (each still ends with a ``Done``,
    ``finish_reason="abort"``)."""

    def __init__(self, background: BackgroundEngine, size: int, stream: bool) -> None:
        self.background = background
        self.size = size
        self.stream = stream
        self.seqs: list[Sequence] = []
        self.queue: queue.SimpleQueue[Delta | Done] = queue.SimpleQueue()

    def events(self, heartbeat: Callable[[], None] | None = None, every_s: float = 0.5) -> Iterator[Delta | Done]:
        """Blocks for each event until every prompt is done; ``heartbeat()`` runs every ``every_s`` seconds or so
        meanwhile (a server checks there that its client is still connected). The deltas of a prompt that queued up
        while the reader was busy come as one (a reader slower than the engine catches up in fewer, larger ones)."""
        left, beat = self.size, time.monotonic()
        while left:
            arrived: list[Delta | Done] = []
            try:
                arrived.append(self.queue.get(timeout=every_s if heartbeat else None))
                while True:
                    arrived.append(self.queue.get_nowait())
            except queue.Empty:
                pass
            if heartbeat and time.monotonic() - beat >= every_s:
                heartbeat()
                beat = time.monotonic()
            for event in _merged(arrived):
                left -= isinstance(event, Done)
                yield event

    def results(self, heartbeat: Callable[[], None] | None = None) -> list[RelayOutput]:
        """Waits for every prompt's output (see ``events``); in prompt order."""
        outputs: list[RelayOutput | None] = [None] * self.size
        for event in self.events(heartbeat):
            if isinstance(event, Done):
                outputs[event.index] = event.output
        return outputs

    def cancel(self) -> None:
        self.background.commands.put(("cancel", self))


def _merged(events: list[Delta | Done]) -> list[Delta | Done]:
    """``events`` with each prompt's consecutive deltas from one model joined (each prompt's order kept)."""
    merged: list[Delta | Done] = []
    open_delta: dict[int, Delta] = {}
    for event in events:
        last = open_delta.get(event.index)
        if isinstance(event, Delta) and last is not None and last.source == event.source:
            last.token_ids = last.token_ids + event.token_ids
            last.logprobs = None if last.logprobs is None else last.logprobs + event.logprobs
            continue
        merged.append(event)
        open_delta[event.index] = event if isinstance(event, Delta) else None
    return merged


class BackgroundEngine:
    """Steps ``engine`` on its own thread until ``close()`` (or the ``with`` block ends); meanwhile no other
    thread may call the engine's methods (``generate``, ``step``, ``load_slm_weights``...)."""

    def __init__(self, engine: RelayEngine) -> None:
        self.engine = engine
        self.commands: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self.failure: str | None = None
        """Why the thread stopped, once it has (``"closed"``, or the forward's error)."""
        self.live: dict[Sequence, tuple[Submission, int]] = {}
        self.thread = threading.Thread(target=self._run, name="relaykern-engine", daemon=True)
        self.thread.start()

    def submit(self, prompts: Seq[str | list[int]], sampling: SamplingParams | Seq[SamplingParams] | None = None,
               llm_sampling: SamplingParams | None = None, stream: bool = True) -> Submission:
        """Queues the prompts (all or none: a bad one raises ValueError, as ``RelayEngine.add_requests``); raises
        ``EngineDead`` once the thread has stopped. ``stream=False``: their outputs only, no deltas."""
        submission = Submission(self, len(prompts), stream)
        admitted: Future[None] = Future()
        self.commands.put(("add", submission, list(prompts), sampling, llm_sampling, admitted))
        if self.failure is not None and not admitted.done():  # (stopped before it could take the command)
            self._refuse_waiting()
        admitted.result()
        return submission

    @property
    def alive(self) -> bool:
        return self.failure is None

    def close(self) -> None:
        """Aborts the requests in flight (each gets its ``Done``) and stops the thread."""
        if self.thread.is_alive():
            self.commands.put(("close",))
            self.thread.join()

    def __enter__(self) -> BackgroundEngine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ the engine thread
    def _run(self) -> None:
        try:
            while self._take_commands(wait=not self.live):
                if self.live:
                    self.engine.step()
                self._publish()
            for seq in list(self.live):
                self.engine.abort(seq)
            self._publish()
            self.failure = "closed"
        except Exception as err:  # noqa: BLE001 - every request in flight gets the error, none waits forever
            log.exception("relaykern engine thread failed")
            self.failure = f"the engine failed: {type(err).__name__}: {err}"
            for seq in self.live:
                if not seq.finished:
                    seq.finish("error", self.failure)
            self._publish()
        self._refuse_waiting()

    def _take_commands(self, wait: bool) -> bool:
        """Applies the queued commands (blocking for one when ``wait``); False on ``close``."""
        while True:
            try:
                command = self.commands.get(block=wait)
            except queue.Empty:
                return True
            wait = False
            if command[0] == "close":
                return False
            if command[0] == "cancel":
                for seq in command[1].seqs:
                    self.engine.abort(seq)
                continue
            _, submission, prompts, sampling, llm_sampling, admitted = command
            try:
                submission.seqs = self.engine.add_requests(prompts, sampling, llm_sampling)
            except ValueError as err:
                admitted.set_exception(err)
                continue
            for index, seq in enumerate(submission.seqs):
                self.live[seq] = (submission, index)
            admitted.set_result(None)

    def _publish(self) -> None:
        """Hands each live request's new tokens, then (finished) its output, to its submission."""
        for seq, (submission, index) in list(self.live.items()):
            for source, start, end in seq.take_new_spans() if submission.stream else ():
                logprobs = seq.logprobs[start:end] if seq.sampling.logprobs else None
                submission.queue.put(Delta(index, source, seq.response[start:end], logprobs))
            if seq.finished:
                submission.queue.put(Done(index, self.engine.output(seq)))
                del self.live[seq]

    def _refuse_waiting(self) -> None:
        """Fails the submissions still queued once the thread has stopped."""
        while True:
            try:
                command = self.commands.get_nowait()
            except queue.Empty:
                return
            if command[0] == "add" and not command[-1].done():
                command[-1].set_exception(EngineDead(self.failure or "the engine stopped"))
