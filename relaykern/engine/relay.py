"""The relay loop: an SLM and an optional LLM in one continuous-batching engine, both KV caches kept for the
life of each request.

Each ``step()`` launches up to two forwards before it waits on either:

1. one SLM forward over every sequence in the SLM phase (decode rows, and catch-up rows that first read what the
   LLM wrote, packed together), sampling and fused command detection on the device (a table lookup per row);
2. one LLM forward over the sequences in the LLM phase (those not in an LLM forward still unread): its first row
   of a call is a catch-up over only the new tag-free tokens (extend attention over the LLM's paged cache), then
   decode rows until N tokens, EOS or the budget (``RelayConfig.llm_batch_wait_steps`` may hold it back a few
   steps so that more rows share a forward);
3. the host reads back the SLM's ids + detection events (never detokenizing) while the GPU runs the LLM, and per
   sequence appends the token; on ``call(N)`` the LLM's view is extended by the SLM's run since the LLM's last
   turn minus the commands and the whitespace around them (``protocol.view_cuts``) and the sequence moves to the
   LLM phase, served from the next step on;
4. then the LLM's tokens: after the N-th, the sequence goes back to the SLM, whose next forward catches up on
   those tokens by id (same tokenizer: injection without re-encoding).

The SLM does not wait for the LLM (``RelayConfig.decouple_llm``): a step reads the LLM's oldest forward only once
the device has run it, or when the SLM has nothing to do, so while a long catch-up or a step of the larger model
runs, every other sequence goes on in the SLM's steps.

A step in which the LLM has no call to serve may instead launch a forward reading ahead what the sequences the SLM
is serving have written: a request's text up to a command the SLM has begun (``RelayConfig.early_catchup_tokens``),
or full chunks of all of it (``RelayConfig.llm_prefetch_tokens``); nothing waits for it.

Each model's next forward is launched before its results are read (``RelayConfig.overlap_steps``): the SLM's
before step 3, the LLM's between steps 3 and 4 (so that the calls step 3 starts join it), their rows that go on fed
on the device with the tokens this one samples. The host's bookkeeping then overlaps the GPU's next step. A row
whose request stopped, called or ended its call at the token it was fed is dropped when read; a request whose
command has come as far as ``</call`` gets no row (its next token most likely calls).

Without an LLM this is a plain single-model engine (commands stay text and are counted as unserved).
"""
from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Iterable, Iterator, Literal, Sequence as Seq

import torch

from relaykern.config import EngineConfig, RelayConfig, SamplingParams
from relaykern.engine.admission import new_sequence, new_sequences
from relaykern.engine.checkpoint import load_tokenizer, validate_pair
from relaykern.engine.detection import Detector
from relaykern.engine.forward import Launched, Launcher
from relaykern.engine.llm_turns import ReadAhead, llm_runs_now
from relaykern.engine.llm_view import end_run_at_call, feed_llm_view, note_slm_token
from relaykern.engine.runner import ModelRunner
from relaykern.engine.scheduler import Scheduler
from relaykern.engine.sequence import Phase, PendingCall, Sequence
from relaykern.outputs import CallRecord, RelayOutput, Source
from relaykern.protocol import EVENT_CALL, EVENT_MALFORMED, serve_length
from relaykern.tokenizer import encode_bytes, token_bytes


class RelayEngine:
    """Keeps both models loaded between calls. ``llm=None`` serves the SLM alone."""

    def __init__(self, slm: str | Path, llm: str | Path | None = None, *, relay: RelayConfig | None = None,
                 slm_config: EngineConfig | None = None, llm_config: EngineConfig | None = None,
                 llm_cache: Literal["persistent", "reprefill"] = "persistent") -> None:
        """``llm_cache="reprefill"``: the LLM re-reads its whole context on every call (no prefix cache), as the
        official code's LLM server does when its prefix cache has been evicted: a baseline for benchmarks, same
        outputs, more LLM prefill."""
        if llm_cache not in ("persistent", "reprefill"):
            raise ValueError(f"llm_cache must be 'persistent' or 'reprefill', got {llm_cache!r}")
        self.relay = relay or RelayConfig()
        self.reprefill_llm = llm_cache == "reprefill"
        llm_config = llm_config or EngineConfig()
        if self.reprefill_llm:
            llm_config = dataclasses.replace(llm_config, enable_prefix_caching=False)
        self.tokenizer = load_tokenizer(slm)
        if llm is not None:
            validate_pair(slm, llm, self.tokenizer)
        slm_config = slm_config or EngineConfig()
        self.slm = ModelRunner(slm, slm_config, kv_share=0.2 if llm is not None else 1.0)
        self.llm = ModelRunner(llm, llm_config, kv_share=1.0) if llm is not None else None
        vocab = max(r.model_config.vocab_size for r in (self.slm, self.llm) if r is not None)
        if self.llm is not None:  # each model reads what the other writes
            self.slm.sampled_vocab = self.llm.sampled_vocab = min(self.slm.sampled_vocab, self.llm.sampled_vocab)
        known = token_bytes(self.tokenizer)
        self.token_bytes = known + [b""] * (vocab - len(known))  # embedding padding rows write nothing
        with self.slm.scope():  # the table is copied on the stream that will read it
            self.detector = Detector(self.token_bytes, self.slm.device, self.slm.backend)
        models = [(self.slm, Phase.SLM.view)] + ([(self.llm, Phase.LLM.view)] if self.llm else [])
        self.scheduler = Scheduler(models)
        self.slm_forwards = Launcher(self.slm, Phase.SLM, self.scheduler, self.detector,
                                     may_leave=self.detector.may_call)
        self.llm_forwards = Launcher(self.llm, Phase.LLM, self.scheduler) if self.llm else None
        self.steps = 0
        self.next_slm: Launched | None = None
        """The SLM's forward launched overlapped by the step before, read by the next step."""
        self.llm_in_flight: list[Launched] = []
        """The LLM's forwards launched and not read yet, oldest first: at most two (the second launched overlapped)."""
        self.dropped_rows = 0
        """Counter: rows of launched forwards dropped when read (the request left the model's phase)."""
        # (Callables held here must not refer back to the engine: a cycle would keep its pools, on a GPU most of its
        # memory, allocated after the engine is dropped, until Python's cycle collector happens to run.)
        self.feed_llm_view = functools.partial(feed_llm_view, token_bytes=self.token_bytes,
                                               encode=functools.partial(encode_bytes, self.tokenizer),
                                               vocab_size=self.llm.model_config.vocab_size if self.llm else None)
        """``feed_llm_view(seq, upto)``: extends the LLM's view of ``seq`` by its SLM run up to token ``upto``."""
        self.read_ahead = ReadAhead(self.scheduler, self.llm, self.feed_llm_view) if self.llm else None

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: str | list[int], sampling: SamplingParams | None = None,
                    llm_sampling: SamplingParams | None = None) -> Sequence:
        """Validates and queues one request. Bad input raises ValueError here, before any work starts."""
        seq = new_sequence(prompt, sampling, llm_sampling, self.tokenizer, self.slm, self.llm)
        self.scheduler.add(seq)
        return seq

    def generate(self, prompts: Seq[str | list[int]], sampling: SamplingParams | Seq[SamplingParams] | None = None,
                 llm_sampling: SamplingParams | None = None) -> list[RelayOutput]:
        """Runs the prompts to completion with continuous batching; outputs in prompt order. Interrupted (Ctrl-C),
        it aborts its requests, so the engine's next call does not run them."""
        seqs = self.add_requests(prompts, sampling, llm_sampling)
        try:
            while not all(s.finished for s in seqs):
                self.step()
        finally:
            for seq in seqs:
                self.abort(seq)
        return [self.output(s) for s in seqs]

    def stream(self, prompts: Seq[str | list[int]], sampling: SamplingParams | Seq[SamplingParams] | None = None,
               llm_sampling: SamplingParams | None = None) -> Iterator[tuple[int, Source, list[int]]]:
        """Yields ``(prompt index, source model, new token ids)`` as tokens are written. Closing the iterator early
        (a ``break``, a client gone) aborts its requests that have not finished."""
        seqs = self.add_requests(prompts, sampling, llm_sampling)
        try:
            while not all(s.finished for s in seqs):
                self.step()
                for index, seq in enumerate(seqs):
                    for source, start, end in seq.take_new_spans():
                        yield index, source, seq.response[start:end]
        finally:
            for seq in seqs:
                self.abort(seq)

    def abort(self, request: Sequence) -> None:
        """Ends a request now with ``finish_reason="abort"``, keeping what it has written, and frees its KV blocks in
        both pools; a finished request is left as it is. Rows of it already launched are dropped when read (as
        those of a request that stopped)."""
        if request.finished:
            return
        if request not in self.scheduler.running and request not in self.scheduler.waiting:
            raise ValueError(f"request {request.request_id} is not one of this engine's")
        request.finish("abort")
        self.scheduler.finish(request)

    def add_requests(self, prompts: Seq[str | list[int]], sampling: SamplingParams | Seq[SamplingParams] | None,
                     llm_sampling: SamplingParams | None = None) -> list[Sequence]:
        """Queues a batch (one SamplingParams for all, or one per prompt) only once every request in it is valid: a
        bad prompt raises ValueError and leaves nothing half-submitted."""
        seqs = new_sequences(prompts, sampling, llm_sampling, self.tokenizer, self.slm, self.llm)
        for seq in seqs:
            self.scheduler.add(seq)
        return seqs

    def load_slm_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Pushes HF-named SLM weights into the live engine (the GRPO trainer's sync, no disk). The SLM's prefix
        cache is dropped (the old weights computed it); requests in flight keep their KV: sync between requests."""
        self.slm.load_weights(named_tensors)

    @property
    def overlapped_steps(self) -> dict[str, int]:
        """Forwards launched before the one before them was read back, per model."""
        return {"slm": self.slm_forwards.overlapped, "llm": self.llm_forwards.overlapped if self.llm else 0}

    # ------------------------------------------------------------------ the loop
    def step(self) -> None:
        """One SLM forward and one LLM forward, both launched before the host waits on either (the SLM's may have
        been launched by the step before); the LLM's is read once the device has run it
        (``RelayConfig.decouple_llm``)."""
        slm, self.next_slm = self.next_slm, None
        in_flight = self.llm_in_flight
        slm = slm or self.slm_forwards.launch(busy=[seq for launched in in_flight for seq in launched.seqs])
        if not in_flight and self.llm is not None and llm_runs_now(self.relay, self.scheduler, self.steps, bool(slm)):
            self._in_flight(self.llm_forwards.launch(busy=slm.seqs if slm else []))
        if self.llm is not None and not in_flight and not self.reprefill_llm:
            self.read_ahead.launch(self.relay)
        # The SLM goes on while the LLM's oldest forward runs; without SLM work the host waits for it.
        llm = in_flight[0] if in_flight and (slm is None or not self.relay.decouple_llm or
                                             in_flight[0].readback.ready()) else None
        # A call that ends with this LLM forward goes back to the SLM, whose next step is then launched after the read
        # so as to take it. (A forward found done only at the second look below came too late for that: such a
        # request joins the SLM's step after next.)
        returning = llm is not None and any(seq.phase is Phase.LLM and row.samples and
                                            seq.call.produced + 1 >= seq.call.n_served
                                            for seq, row in zip(llm.seqs, llm.rows))
        if self.relay.overlap_steps and not returning:
            self.next_slm = slm and self.slm_forwards.launch_overlapped(slm, self.relay)
        self.steps += 1
        if slm is not None:
            self._read(self.slm_forwards, slm)
        self._reap()
        # After the SLM's tokens, so that the calls they start join it; not while calls wait to be batched. At most
        # one a step, from the one unread LLM forward: before the oldest is read, or after it if two were in flight.
        overlap_llm = self.relay.overlap_steps and self.relay.llm_batch_wait_steps == 0
        launches_now = overlap_llm and len(in_flight) == 1
        if launches_now:
            self._in_flight(self.llm_forwards.launch_overlapped(in_flight[0], self.relay))
        if llm is None and in_flight and in_flight[0].readback.ready():  # (done while the host read the SLM's)
            llm = in_flight[0]
        if llm is not None:
            self._read(self.llm_forwards, in_flight.pop(0))
            if overlap_llm and not launches_now and len(in_flight) == 1:
                self._in_flight(self.llm_forwards.launch_overlapped(in_flight[0], self.relay))
        self._reap()
        if self._nothing_to_read(self.slm_forwards, self.next_slm):
            self.next_slm = None
        if len(in_flight) == 1 and self._nothing_to_read(self.llm_forwards, in_flight[0]):
            in_flight.clear()

    def _in_flight(self, launched: Launched | None) -> None:
        if launched is not None:
            self.llm_in_flight.append(launched)

    def _nothing_to_read(self, forwards: Launcher, launched: Launched | None) -> bool:
        """Whether every request in ``launched`` (the one forward of its model in flight, fed on the device) left that
        model's phase: its rows would all be dropped when read. Counts them as dropped."""
        if launched is None or launched.fed < len(launched.rows) or \
                any(forwards.goes_on(s, r) for s, r in zip(launched.seqs, launched.rows)):
            return False
        self.dropped_rows += len(launched.rows)
        return True

    def _read(self, forwards: Launcher, launched: Launched) -> None:
        """Applies a forward's results: the sampled tokens (with the SLM's detection events) and cached lengths."""
        tokens, logprobs = launched.readback.wait()
        runner, phase = forwards.runner, forwards.phase
        is_slm = phase is Phase.SLM
        # A row is dropped if its request ended, left the phase at the token it was fed (what it sampled is
        # dropped), or had its view released since (a failed overlapped step's chunk: recomputed, as preempted).
        live = [s if not s.finished and phase.view(s).allocated and (i >= launched.fed or forwards.goes_on(s, r))
                else None for i, (s, r) in enumerate(zip(launched.seqs, launched.rows))]
        found = self.detector.unpack(tokens, live) if is_slm else tokens
        for i, (seq, row, token, logprob) in enumerate(zip(live, launched.rows, found, logprobs or [None] * len(live))):
            if seq is None:
                self.dropped_rows += 1
                continue
            view = phase.view(seq)
            if i < launched.fed:
                self.scheduler.take_fed_tokens(seq, runner, view, row.start + 1)
            view.num_cached = row.start + len(row.tokens)
            if not is_slm and seq.call.produced == 0:  # the call's catch-up, in one row or several chunks
                seq.call.record.llm_catchup += len(row.tokens)
                seq.stats.llm_prefill_tokens += len(row.tokens)
            if row.samples and logprob is not None and math.isnan(logprob):
                seq.finish("error", f"the {phase.value.upper()}'s logits for response token {len(seq.response)} have "
                           "nothing to sample (NaN, all -inf, or +inf): a logits processor or the model gave them")
            elif row.samples and is_slm:
                self._on_slm_token(seq, *token, logprob)
            elif row.samples:
                self._on_llm_token(seq, token, logprob)

    def _reap(self) -> None:
        """Frees the blocks of finished requests at once, so the next forward's scheduling can use them."""
        for seq in [s for s in self.scheduler.running if s.finished]:
            self.scheduler.finish(seq)

    def _on_slm_token(self, seq: Sequence, token: int, event: int, n: int, start_offset: int, event_end: int,
                      logprob: float | None) -> None:
        """Order within a token (as the reference): a stop wins over a command event; the command, served or not,
        comes before the max_tokens check."""
        data = self.token_bytes[token]
        if seq.append(token, "slm", logprob, data):
            return seq.finish("stop")
        if event == EVENT_MALFORMED:
            return seq.finish("malformed_call")
        note_slm_token(seq, data, event, start_offset, event_end)
        if event == EVENT_CALL and n > 0:
            self._serve(seq, n)
        if not seq.finished and seq.phase is Phase.SLM and seq.tokens_left <= 0:
            seq.finish("length")

    def _serve(self, seq: Sequence, n: int) -> None:
        if seq.command_stays_text(self.relay):
            seq.stats.unserved_calls += 1
            return
        if seq.stats.calls >= self.relay.max_calls:
            return seq.finish("max_calls")
        n_served = serve_length(n, self.relay.max_call_tokens, seq.tokens_left)
        if n_served == 0:
            return
        if self.reprefill_llm:
            self.scheduler.release_view(self.llm, seq, seq.llm)
        end_run_at_call(seq, self.token_bytes[seq.response[-1]])
        self.feed_llm_view(seq, len(seq.response) - seq.run_start)
        if seq.finished:  # (its view would hold an id the LLM has no embedding for)
            return
        seq.stats.calls += 1
        seq.call = PendingCall(CallRecord(n_asked=n, n_served=n_served), n_served, waiting_since=self.steps)
        seq.stats.call_records.append(seq.call.record)
        seq.phase = Phase.LLM

    def _on_llm_token(self, seq: Sequence, token: int, logprob: float | None) -> None:
        call = seq.call
        stopped = seq.append(token, "llm", logprob, self.token_bytes[token])
        call.produced += 1
        call.waiting_since = self.steps
        done = call.produced == call.n_served
        if stopped:
            seq.finish("stop")
        elif seq.tokens_left <= 0:
            seq.finish("length")
        elif done:
            call.record.slm_catchup = call.produced
            seq.stats.slm_catchup_tokens += call.produced
            seq.phase = Phase.SLM
            seq.reset_detection()
            seq.end_call()

    def output(self, seq: Sequence) -> RelayOutput:
        return RelayOutput(
            prompt_token_ids=seq.prompt_ids,
            token_ids=list(seq.response),
            text=self.tokenizer.decode(seq.response, skip_special_tokens=True),
            spans=list(seq.spans),
            finish_reason=seq.finish_reason,
            stats=seq.stats,
            logprobs=list(seq.logprobs) if seq.sampling.logprobs else None,
            error=seq.error,
        )
