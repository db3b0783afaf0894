"""When the LLM runs besides serving each call at once: held back to batch calls (``llm_runs_now``), and reading
ahead between calls (``ReadAhead``). See ``RelayConfig`` for the knobs."""
from __future__ import annotations

from typing import Callable

import torch

from relaykern.config import RelayConfig
from relaykern.engine.forward import run_forward
from relaykern.engine.runner import ModelRunner
from relaykern.engine.scheduler import Scheduler
from relaykern.engine.sequence import Phase, Sequence


def llm_runs_now(relay: RelayConfig, scheduler: Scheduler, step: int, slm_busy: bool) -> bool:
    """Whether this step runs the LLM (see ``RelayConfig.llm_batch_wait_steps``); without a wait it always does
    (its scheduling finds the sequences, if any)."""
    if relay.llm_batch_wait_steps == 0 or not slm_busy:
        return True
    waiting = [s for s in scheduler.sequences() if s.phase is Phase.LLM]
    return bool(waiting) and (len(waiting) >= relay.llm_batch_min_rows or
                              step - min(s.call.waiting_since for s in waiting) >= relay.llm_batch_wait_steps)


class ReadAhead:
    """LLM forwards reading ahead what sequences the SLM is serving have written so far (their prompts, then their
    runs up to a safe point: engine/llm_view.py), while the LLM has no call to serve (``llm_prefetch_tokens``)."""

    def __init__(self, scheduler: Scheduler, llm: ModelRunner, feed_view: Callable[[Sequence, int], None]) -> None:
        """``feed_view(seq, upto)`` extends the LLM's view of ``seq`` by its SLM run up to token ``upto``."""
        self.scheduler = scheduler
        self.llm = llm
        self.feed_view = feed_view
        self.done: torch.cuda.Event | None = None

    def launch(self, relay: RelayConfig) -> None:
        """Launches a forward if a full chunk waits; the views count it as cached at once (the LLM's later forwards
        follow on its stream), and nothing waits for it. At most one is in flight, so they never pile up ahead of a
        call's forward on that stream."""
        if self.done is not None and not self.done.query():
            return
        if any(s.phase is Phase.LLM for s in self.scheduler.sequences()):
            return  # a call waits (held back, or short of blocks): its forward comes first, and may need them
        may_call = [s for s in self.scheduler.running if s.phase is Phase.SLM and s.stats.calls < relay.max_calls]
        for seq in may_call:
            if seq.run_safe > seq.run_fed:
                self.feed_view(seq, seq.run_safe)
        if sum(max(0, s.llm.num_pending - 1) for s in may_call) < relay.llm_prefetch_tokens:
            return  # a forward reads all the LLM's weights: only ever for a full chunk
        seqs, rows = self.scheduler.schedule_prefetch(self.llm, lambda s: s.llm, may_call, relay.llm_prefetch_tokens)
        if not rows:
            return
        with self.llm.scope():
            if run_forward(self.llm, self.scheduler, seqs, rows) is None:
                return  # (each row that failed finished its request)
            if self.llm.stream is not None:
                self.done = torch.cuda.Event()
                self.done.record(self.llm.stream)
        for seq, row in zip(seqs, rows):  # the rows that ran
            seq.llm.num_cached = row.start + len(row.tokens)
            seq.stats.llm_prefill_tokens += len(row.tokens)
