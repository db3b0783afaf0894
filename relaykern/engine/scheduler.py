"""Picks, each step, the rows of one model's forward, and keeps its block manager in step with the views.

Both models are scheduled by the same policy over the sequences in their phase: running sequences that feed one
token (decode) first, then the other running ones (catch-ups, prefills), oldest first, then waiting ones, until
that model's ``max_num_seqs`` rows or ``max_num_batched_tokens`` tokens (its ``EngineConfig``). A row feeds its
view's uncached tokens; when they do not fit in what is left of the token budget, it feeds a chunk (chunked
prefill: a long prompt or catch-up spreads over several steps and never stalls the decode rows), and only its
last chunk samples. Blocks are taken from the model's C++ block manager just before the forward, for the tokens
that forward computes and no more.

When blocks run out, the pool makes room in two stages. First the newest running sequence that is in the other
model's phase gives back its cache in this pool alone (a sequence the SLM is serving does not need the LLM's KV
until its next call; both caches persist otherwise): that model recomputes its view when it next serves it. Else the
newest running sequence in this phase that is in neither this step's batch nor the other model's forward is
preempted: both of its caches are freed and it is recomputed later from its token views (its tokens are never lost).
(The first stage may take the cache of a sequence in the other model's unread forward: that forward does not read
this pool.) A block is registered for prefix sharing only in the step that computes it, so no sequence ever shares a
block whose KV is not written.

``schedule_overlapped`` schedules a model's next step before the tokens of its launched one are known on the host
(``RelayConfig.overlap_steps``): positions whose tokens come later are covered with ``reserve_positions`` and given
to the block manager once known (``take_fed_tokens``).

``schedule_prefetch`` fills the LLM's forwards while it has no call to serve with what sequences the SLM is serving
have written (``RelayConfig.llm_prefetch_tokens``): free blocks only, never making room.
"""
from __future__ import annotations

import dataclasses
from collections import deque
from typing import Callable, Iterator

from relaykern._C import OutOfBlocks
from relaykern.engine.row import FED_ON_DEVICE, Row
from relaykern.engine.runner import ModelRunner
from relaykern.engine.sequence import ModelView, Phase, Sequence


class PoolTooSmall(ValueError):
    """A single request needs more KV blocks than the whole pool has."""


ViewOf = Callable[[Sequence], "ModelView | None"]


class Scheduler:
    def __init__(self, models: list[tuple[ModelRunner, ViewOf]]) -> None:
        """``models``: each model's runner with the function giving a sequence's view for it. Each model's forwards
        keep to its own ``EngineConfig.max_num_seqs`` and ``max_num_batched_tokens``."""
        self.models = models
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def sequences(self) -> list[Sequence]:
        return self.running + list(self.waiting)

    def schedule(self, phase: Phase, runner: ModelRunner, view_of: ViewOf, busy: list[Sequence] = (), *,
                 in_flight: frozenset[int] = frozenset(), chunk_ends: dict[int, int] | None = None, taken: int = 0
                 ) -> tuple[list[Sequence], list[Row]]:
        """Rows for ``runner``'s forward over the sequences in ``phase``; ``view_of(seq)`` is their view for it.
        ``busy``: sequences in the other model's forwards not read yet, never preempted (their views in this model may
        be released: that model does not read them). For an overlapped step
        (``schedule_overlapped``): ``in_flight``, ids of sequences this model's launched forward computes (their
        views are not up to date yet: left out, except those in ``chunk_ends``, whose launched row is a chunk and
        whose next chunk starts where it ends), ``taken`` rows of one token each already in the step; free blocks
        only, never making room."""
        batch: list[Sequence] = []
        rows: list[Row] = []
        in_batch: set[int] = set()
        busy_ids = {s.request_id for s in busy}
        chunk_ends = chunk_ends or {}
        limits = runner.config
        num_tokens = taken
        for seq in self._candidates(phase, view_of):
            if seq.request_id in in_flight and seq.request_id not in chunk_ends:
                continue
            view = view_of(seq)
            start = chunk_ends.get(seq.request_id, view.num_cached)  # (allocating may then find a cached prefix)
            room = limits.max_num_batched_tokens - num_tokens
            if taken + len(rows) >= limits.max_num_seqs or room <= 0:
                break
            in_batch.add(seq.request_id)  # (making room for it never takes its own blocks)
            make_room = None if in_flight else \
                lambda: self._make_room(runner, view_of, phase, in_batch, busy_ids)  # noqa: E731
            if not self._reserve(seq, view, runner, start + min(len(view.tokens) - start, room), make_room):
                in_batch.discard(seq.request_id)
                break
            batch.append(seq)
            rows.append(self._row(seq, view, phase, chunk_ends.get(seq.request_id, view.num_cached)))
            num_tokens += len(rows[-1].tokens)
        self._start_running(in_batch)
        return batch, rows

    def schedule_prefetch(self, runner: ModelRunner, view_of: ViewOf, seqs: list[Sequence], max_tokens: int
                          ) -> tuple[list[Sequence], list[Row]]:
        """Rows reading ahead into ``runner`` (the LLM) the views of ``seqs`` (running, in the SLM's phase), oldest
        first, at most ``max_tokens`` in all; they sample nothing. Free blocks only: a full pool ends the list.
        A view's last token is left for the call's catch-up, whose last row must feed a token to sample from."""
        batch: list[Sequence] = []
        rows: list[Row] = []
        num_tokens = 0
        for seq in seqs:
            view = view_of(seq)
            ahead = len(view.tokens) - 1
            if view.num_cached >= ahead:
                continue
            room = min(max_tokens, runner.config.max_num_batched_tokens) - num_tokens
            if len(rows) >= runner.config.max_num_seqs or room <= 0:
                break
            if not self._reserve(seq, view, runner, min(ahead, view.num_cached + room), None):
                break
            if view.reserved == view.num_cached:  # all of it found in the prefix cache
                continue
            batch.append(seq)
            rows.append(dataclasses.replace(self._row(seq, view, Phase.LLM, view.num_cached), samples=False))
            num_tokens += len(rows[-1].tokens)
        return batch, rows

    def schedule_overlapped(self, phase: Phase, runner: ModelRunner, view_of: ViewOf, seqs: list[Sequence],
                            rows: list[Row], may_leave: Callable[[Sequence], bool] | None = None
                            ) -> tuple[list[int], list[Sequence], list[Row]] | None:
        """``runner``'s next step, scheduled before the host knows what its launched step (``seqs``, ``rows``)
        samples: (the indices of that step's rows carried on, the next step's sequences, its rows). A row that
        samples is carried on (first, in order), fed the token sampled on it (``FED_ON_DEVICE`` until then) at the
        next position, unless that token ends the request or the LLM's call, may make the request leave ``phase``
        (``may_leave``: the SLM's command completing), or its request is known to have left ``phase`` (its row's
        token will be dropped). Rows for the other sequences in ``phase`` follow, scheduled as
        usual from free blocks (catch-ups, prefills, admissions, and the next chunks of the launched step's chunked
        rows, whose tokens the host knows). None if the next step must be scheduled in turn: no row is carried on (a
        step of new rows alone is the usual schedule's, which also keeps the LLM's batching wait), a row to carry has
        a logits processor that needs the tokens on the host (``LogitsProcessor``), or free blocks are short for the
        carried rows."""
        carried: list[int] = []
        carried_rows: list[Row] = []
        in_flight = frozenset(seq.request_id for seq in seqs)
        chunk_ends: dict[int, int] = {}
        for i, (seq, row) in enumerate(zip(seqs, rows)):
            start = row.start + len(row.tokens)
            view = view_of(seq)
            if not row.samples and seq.phase is phase and view.allocated and view.reserved == start:
                chunk_ends[seq.request_id] = start
            if not (row.samples and view.allocated and seq.goes_on(phase, view, start)):
                continue
            if not all(getattr(p, "position_only", False) for p in row.sampling.logits_processors):
                return None
            if seq.tokens_left <= 1 or (may_leave is not None and may_leave(seq)) or \
                    (phase is Phase.LLM and seq.call.produced + 2 > seq.call.n_served):
                continue
            if not runner.blocks.reserve_positions(seq.request_id, start + 1):
                return None
            carried.append(i)
            carried_rows.append(dataclasses.replace(row, tokens=[FED_ON_DEVICE], start=start, step=row.step + 1))
        if not carried:
            return None
        more_seqs, more_rows = self.schedule(phase, runner, view_of, in_flight=in_flight, chunk_ends=chunk_ends,
                                             taken=len(carried))
        return carried, [seqs[i] for i in carried] + more_seqs, carried_rows + more_rows

    @staticmethod
    def take_fed_tokens(seq: Sequence, runner: ModelRunner, view: ModelView, upto: int) -> None:
        """``runner``'s block manager takes ``view.tokens[:upto]``, some of them written to the cache by an
        overlapped step before the host knew them (their positions reserved by ``schedule_overlapped``)."""
        runner.blocks.append(seq.request_id, view.tokens[view.reserved:upto])
        view.reserved = upto

    def _start_running(self, admitted: set[int]) -> None:
        if any(s.request_id in admitted for s in self.waiting):  # one pass, not one deque scan per sequence
            self.running += [s for s in self.waiting if s.request_id in admitted]
            self.waiting = deque(s for s in self.waiting if s.request_id not in admitted)

    def _candidates(self, phase: Phase, view_of: ViewOf) -> Iterator[Sequence]:
        """The sequences in ``phase`` in scheduling order: running ones that decode, other running ones, waiting
        ones. Snapshots: preemption moves sequences from running to waiting while the caller walks."""
        running, waiting = list(self.running), [s for s in self.waiting if s.phase is phase]
        others = []
        for seq in running:
            if seq.phase is phase:
                if view_of(seq).num_pending == 1:
                    yield seq
                else:
                    others.append(seq)
        yield from others
        yield from waiting

    def _reserve(self, seq: Sequence, view: ModelView, runner: ModelRunner, upto: int,
                 make_room: Callable[[], bool] | None) -> bool:
        """Makes ``runner``'s block manager hold ``view.tokens[:upto]`` (the tokens computed by this step's forward
        and before), calling ``make_room`` while blocks are short (None: never). False: try next step."""
        blocks = runner.blocks
        if runner.blocks_needed(len(view.tokens)) > blocks.num_blocks:
            raise PoolTooSmall(f"request {seq.request_id} needs {runner.blocks_needed(len(view.tokens))} KV blocks "
                               f"for {len(view.tokens)} tokens but the pool has {blocks.num_blocks}; raise "
                               "num_blocks or kv_cache_memory_gb, or lower max_tokens")
        while True:
            if not view.allocated:
                if blocks.can_allocate(view.tokens[:upto]):
                    view.num_cached = blocks.allocate(seq.request_id, view.tokens[:upto])
                    runner.prefix_hit_tokens += view.num_cached
                    view.allocated, view.reserved = True, upto
                    return True
            else:
                try:  # one call in the common case; running out of blocks leaves the manager unchanged
                    blocks.append(seq.request_id, view.tokens[view.reserved:upto])
                    view.reserved = upto
                    return True
                except OutOfBlocks:
                    pass
            if make_room is None or not make_room():
                return False

    def _make_room(self, runner: ModelRunner, view_of: ViewOf, phase: Phase, protected: set[int], busy: set[int]
                   ) -> bool:
        """Frees some of ``runner``'s blocks (see the module docstring); False if nothing may be freed."""
        for victim in reversed(self.running):
            if victim.phase is not phase and victim.request_id not in protected and \
                    runner.blocks.has_seq(victim.request_id):
                self.release_view(runner, victim, view_of(victim))
                return True
        for victim in reversed(self.running):
            if victim.request_id not in protected and victim.request_id not in busy and \
                    runner.blocks.has_seq(victim.request_id):
                self.preempt(victim)
                return True
        return False

    def preempt(self, seq: Sequence) -> None:
        self.release(seq)
        self.running.remove(seq)
        self.waiting.appendleft(seq)

    def release(self, seq: Sequence, keep_cached: bool = True) -> None:
        """Frees the sequence's blocks in every model it holds blocks in; its views will be recomputed.
        ``keep_cached=False``: its KV may never have been computed, so its blocks must not serve prefix hits."""
        for runner, view_of in self.models:
            self.release_view(runner, seq, view_of(seq), keep_cached)

    @staticmethod
    def release_view(runner: ModelRunner, seq: Sequence, view: ModelView | None, keep_cached: bool = True) -> None:
        """Frees one model's blocks of the sequence; that view will be recomputed from its tokens."""
        if view is not None and view.allocated:
            runner.blocks.free(seq.request_id, keep_cached)
            view.allocated = False
            view.num_cached = 0

    def finish(self, seq: Sequence) -> None:
        self.release(seq)
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)

    @staticmethod
    def _row(seq: Sequence, view: ModelView, phase: Phase, start: int) -> Row:
        """The row feeding ``view.tokens[start:view.reserved]`` (``start``: the cached length, or where the launched
        chunk before it ends)."""
        is_slm = phase is Phase.SLM
        return Row(
            seq_id=seq.request_id,
            tokens=view.tokens[start:view.reserved],
            start=start,
            samples=view.reserved == len(view.tokens),
            sampling=seq.sampling if is_slm else seq.llm_sampling,
            seed=seq.seed if is_slm else seq.llm_seed,
            step=len(seq.response),
            history=seq.response,
            want_logprobs=seq.sampling.logprobs,
            context=view.tokens,
            prompt_len=len(seq.prompt_ids),
        )
