"""When the LLM runs besides serving each call at once: held back to batch calls (``llm_runs_now``), and reading
ahead between calls (``ReadAhead``: from a command's first tokens, and in chunks). See ``RelayConfig`` for the
knobs."""
from __future__ import annotations

from typing import Callable

import torch

from relaykern.config import RelayConfig
from relaykern.engine.forward import run_forward
from relaykern.engine.runner import ModelRunner
from relaykern.engine.scheduler import Scheduler
from relaykern.engine.sequence import Phase, Sequence
from relaykern.protocol import OPENING


def llm_runs_now(relay: RelayConfig, scheduler: Scheduler, step: int, slm_busy: bool) -> bool:
    """Whether this step runs the LLM (see ``RelayConfig.llm_batch_wait_steps``); without a wait it always does
    (its scheduling finds the sequences, if any)."""
    if relay.llm_batch_wait_steps == 0 or not slm_busy:
        return True
    waiting = [s for s in scheduler.sequences() if s.phase is Phase.LLM]
    return bool(waiting) and (len(waiting) >= relay.llm_batch_min_rows or
                              step - min(s.call.waiting_since for s in waiting) >= relay.llm_batch_wait_steps)


class ReadAhead:
    """LLM forwards reading ahead, while the LLM has no call to serve, what sequences the SLM is serving have written
    so far (their prompts, then their runs up to a safe point: engine/llm_view.py): for sequences whose SLM has
    begun a command (``RelayConfig.early_catchup_tokens``), and in full chunks for all of them
    (``llm_prefetch_tokens``)."""

    def __init__(self, scheduler: Scheduler, llm: ModelRunner, feed_view: Callable[[Sequence, int], None]) -> None:
        """``feed_view(seq, upto)`` extends the LLM's view of ``seq`` by its SLM run up to token ``upto``."""
        self.scheduler = scheduler
        self.llm = llm
        self.feed_view = feed_view
        self.done: torch.cuda.Event | None = None
        self.forwards = self.tokens = 0
        """Counters: read-ahead forwards launched, and the tokens they read."""

    def launch(self, relay: RelayConfig) -> None:
        """Launches a forward if a command has begun or a full chunk waits (on the LLM's background stream if
        ``relay.read_ahead_yields``). The views count it as cached at once (the LLM's later forwards wait for it),
        and nothing else waits for it. At most one is in flight, so they never pile up ahead of a call's forward."""
        threshold = 0 if relay.llm_batch_wait_steps else relay.early_catchup_tokens  # (batching saves forwards)
        if not (threshold or relay.llm_prefetch_tokens) or (self.done is not None and not self.done.query()):
            return
        may_call = [s for s in self.scheduler.running if s.phase is Phase.SLM and s.stats.calls < relay.max_calls]
        opening = [s for s in may_call if s.scan_state >= OPENING] if threshold else []
        if not (opening or relay.llm_prefetch_tokens):
            return  # no command begun: most steps, which then scan the sequences no further
        if any(s.phase is Phase.LLM for s in self.scheduler.sequences()):
            return  # a call waits (held back, or short of blocks): its forward comes first, and may need them
        for seq in may_call if relay.llm_prefetch_tokens else opening:
            if seq.run_safe > seq.run_fed:
                self.feed_view(seq, seq.run_safe)
        # (A view that could not be extended finished its request; a read leaves a view's last token to the call.)
        may_call = [s for s in may_call if not s.finished]
        opening = [s for s in opening if not s.finished and s.llm.num_pending >= max(threshold, 2)]
        if opening:
            seqs, budget = opening, self.llm.config.max_num_batched_tokens
        elif relay.llm_prefetch_tokens and \
                sum(max(0, s.llm.num_pending - 1) for s in may_call) >= relay.llm_prefetch_tokens:
            seqs, budget = may_call, relay.llm_prefetch_tokens  # a forward reads all the weights: full chunks only
        else:
            return
        seqs, rows = self.scheduler.schedule_prefetch(self.llm, Phase.LLM.view, seqs, budget)
        if not rows:
            return
        background = relay.read_ahead_yields
        with self.llm.scope(background):
            if run_forward(self.llm, self.scheduler, seqs, rows, background) is None:
                return  # (each row that failed finished its request)
            if self.llm.stream is not None:
                self.done = torch.cuda.Event()
                self.done.record()  # on the current stream: the one it ran on
        self.forwards += 1
        for seq, row in zip(seqs, rows):  # the rows that ran
            seq.llm.num_cached = row.start + len(row.tokens)
            seq.stats.llm_prefill_tokens += len(row.tokens)
            self.tokens += len(row.tokens)
