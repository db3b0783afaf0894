"""One request as the engine sees it: the response so far, each model's view of it, and where it is in the relay.

Each model keeps its own token view and how much of it is in its KV cache (``ModelView``): the SLM's view is the
prompt plus the whole response; the LLM's view is the prompt plus the response with every command's text (and the
whitespace before it) removed, extended only when the LLM is called. Whatever part of a view is not yet cached is
what that model's next forward feeds: one token in decode, the other model's new tokens in a catch-up, the prompt
in a prefill, everything after a preemption. So decode, catch-up, prefill and recompute are one code path.
"""
from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from relaykern.config import RelayConfig, SamplingParams
from relaykern.outputs import CallRecord, RelayStats, Source, append_span
from relaykern.protocol import TEXT
from relaykern.stop_rule import StopRule

_request_ids = itertools.count()


class Phase(enum.Enum):
    SLM = "slm"  # the SLM writes (decode, or prefill/catch-up first when its view has uncached tokens)
    LLM = "llm"  # serving a call: the LLM catches up on its view, then writes n_served tokens
    FINISHED = "finished"

    def view(self, seq: "Sequence") -> "ModelView | None":
        """The sequence's view for the model that serves this phase (``Phase.SLM.view``: a scheduler's view_of)."""
        return seq.slm if self is Phase.SLM else seq.llm


@dataclass
class ModelView:
    tokens: list[int]
    num_cached: int = 0
    allocated: bool = False
    """Whether the model's block manager holds this sequence (false before its first forward and after preemption)."""
    reserved: int = 0
    """How many of ``tokens`` the block manager holds (every token fed to the model so far)."""

    @property
    def num_pending(self) -> int:
        return len(self.tokens) - self.num_cached


@dataclass
class PendingCall:
    record: CallRecord
    n_served: int
    waiting_since: int
    """The engine step from which the sequence has been waiting for the LLM's next forward."""
    produced: int = 0
    started_at: float = field(default_factory=time.perf_counter)


class Sequence:
    """A request in flight. Plain attributes; the relay loop (relay.py) is the only writer."""

    def __init__(self, prompt_ids: list[int], sampling: SamplingParams, llm_sampling: SamplingParams,
                 with_llm: bool, seed: int, llm_seed: int, slm_stop: StopRule, llm_stop: StopRule) -> None:
        """``slm_stop``, ``llm_stop``: ``sampling``'s and ``llm_sampling``'s stop rules for the two models' EOS ids."""
        self.request_id = next(_request_ids)
        self.prompt_ids = list(prompt_ids)
        self.sampling = sampling
        self.llm_sampling = llm_sampling
        self.stop_rules = {"slm": slm_stop, "llm": llm_stop}
        self.seed = seed
        self.llm_seed = llm_seed
        self.response: list[int] = []
        self.text = bytearray()  # the response's bytes, for stop strings
        self.logprobs: list[float] = []
        self.spans: list[tuple[Source, int, int]] = []
        self.slm = ModelView(list(prompt_ids))
        self.llm = ModelView(list(prompt_ids)) if with_llm else None
        self.phase = Phase.SLM
        self.stats = RelayStats()
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.reset_detection()
        self.call: PendingCall | None = None
        self.streamed = 0

    @property
    def tokens_left(self) -> int:
        return self.sampling.max_tokens - len(self.response)

    @property
    def finished(self) -> bool:
        return self.phase is Phase.FINISHED

    def append(self, token: int, source: Source, logprob: float | None, data: bytes) -> bool:
        """Adds one generated token (``data``: its bytes) to the response and to the SLM's view (the SLM reads
        everything); True if it ends the request under the stop rule of the model that wrote it."""
        before = len(self.text)
        self.text += data
        start = len(self.response)
        self.response.append(token)
        self.slm.tokens.append(token)
        if self.sampling.logprobs:
            self.logprobs.append(logprob)
        append_span(self.spans, source, start, start + 1)
        if source == "slm":
            self.stats.slm_tokens += 1
        else:
            self.stats.llm_tokens += 1
            self.llm.tokens.append(token)
        return self.stop_rules[source].ends(token, self.text, before, len(self.response))

    def take_new_spans(self) -> list[tuple[Source, int, int]]:
        """The ``(source, start, end)`` runs of the response written since the last call (streaming's cursor)."""
        new = [(source, max(start, self.streamed), end) for source, start, end in self.spans if end > self.streamed]
        self.streamed = len(self.response)
        return new

    def command_stays_text(self, relay: RelayConfig) -> bool:
        """Whether a command completed now would be left as text: no LLM, or ``max_calls`` served with
        ``after_max_calls="continue"`` (with ``"finish"`` it ends the request)."""
        return self.llm is None or (self.stats.calls >= relay.max_calls and relay.after_max_calls == "continue")

    def goes_on(self, phase: Phase, view: ModelView, end: int) -> bool:
        """Whether the request is still in ``phase`` with nothing written after token ``end`` of ``view``: a forward
        that fed the view up to ``end`` is still its latest (what an overlapped step relies on)."""
        return self.phase is phase and len(view.tokens) == end

    def finish(self, reason: str, error: str | None = None) -> None:
        self.phase = Phase.FINISHED
        self.finish_reason = reason
        self.error = error
        if self.call is not None:  # ended during a call (EOS, a stop, the budget, an abort or an error)
            self.end_call()

    def end_call(self) -> None:
        """The LLM's turn is over: its record takes the call's latency."""
        self.call.record.latency_s = time.perf_counter() - self.call.started_at
        self.call = None

    def reset_detection(self) -> None:
        """A new SLM run begins (at the start, and after each LLM turn): LLM text is never scanned for commands.

        Command detection: automaton state and N mirrored from the device, and the SLM run since the LLM's last turn
        (its first response index, byte length, the end of its text before any trailing whitespace, where a pending
        command's cut would begin, and the byte ranges its view leaves out: protocol.view_cuts); how much of the run
        the LLM's view holds (tokens, bytes) and up to where it could (engine/llm_view.py)."""
        self.scan_state, self.scan_n = TEXT, 0
        self.run_start, self.run_bytes, self.run_text_end = len(self.response), 0, 0
        self.pending_cut = 0
        self.run_cuts: list[tuple[int, int]] = []
        self.run_fed = self.run_fed_bytes = self.run_safe = 0
