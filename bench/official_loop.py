"""The official evaluation loop's structure (RelayLLM's ``eval/generate_withhelp.py``) run over our own engine: what
its rounds cost when nothing else differs.

The official code serves a batch in rounds. One vLLM ``generate`` of the SLM over every request waiting for it,
each on its prompt + its text so far and stopping at ``</call>`` or its end; then one ``generate`` of the LLM (a
vLLM server) over every request that called, on its prompt + its text so far without the tags, for N tokens; and
again. Each ``generate`` waits for its longest request, so a request whose call comes early waits for the others'
runs before the LLM serves it. vLLM 0.8.5, the version that code pins, runs the V1 engine, whose automatic prefix
caching is on by default: a restarted prompt finds the KV blocks computed for it before (while the cache has room),
so each model recomputes about the text written since its last turn, not the whole context.

Here each ``generate`` is our engine serving one model (prefix caching on, 16-token blocks, as vLLM's): the figures
differ from our relay's only by the loop. Token ids pass between the models as in our relay (the official code
decodes the text, replaces each tag by a space and encodes it again), and ``relaykern.protocol`` decides commands,
N and the LLM's view, so with greedy sampling both write the same tokens.
"""
from __future__ import annotations

import dataclasses

from relaykern import protocol
from relaykern.config import RelayConfig, SamplingParams
from relaykern.engine.relay import RelayEngine
from relaykern.outputs import CallRecord, RelayOutput, RelayStats, Source, append_span
from relaykern.scripted import force_tokens
from relaykern.tokenizer import encode_bytes

STOP = protocol.CLOSE.decode()


@dataclasses.dataclass
class _Request:
    prompt: list[int]
    sampling: SamplingParams
    schedule: dict[int, int]
    response: list[int] = dataclasses.field(default_factory=list)
    spans: list[tuple[Source, int, int]] = dataclasses.field(default_factory=list)
    stats: RelayStats = dataclasses.field(default_factory=RelayStats)
    finish: str | None = None
    call: int = 0
    """Tokens the LLM is to write next (0: the SLM's turn)."""
    asked: int = 0
    """The N of the command that call serves."""

    @property
    def tokens_left(self) -> int:
        return self.sampling.max_tokens - len(self.response)

    def add(self, source: Source, tokens: list[int]) -> None:
        append_span(self.spans, source, len(self.response), len(self.response) + len(tokens))
        self.response += tokens
        if source == "slm":
            self.stats.slm_tokens += len(tokens)
        else:
            self.stats.llm_tokens += len(tokens)


def official_loop(slm: RelayEngine, llm: RelayEngine, prompts: list[list[int]], samplings: list[SamplingParams],
                  schedules: list[dict[int, int]], relay: RelayConfig | None = None) -> tuple[list[RelayOutput], int]:
    """Runs the scripted requests (``schedules``: forced tokens by response position, what each request's logits
    processor writes) in rounds over two single-model engines; returns the outputs and the number of rounds."""
    relay = relay or RelayConfig()
    table = slm.token_bytes
    requests = [_Request(list(p), s, sched) for p, s, sched in zip(prompts, samplings, schedules)]
    rounds = 0
    while any(r.finish is None for r in requests):
        rounds += 1
        turn = [r for r in requests if r.finish is None and not r.call]
        outputs = slm.generate([r.prompt + r.response for r in turn], [_slm_params(r) for r in turn])
        for request, output in zip(turn, outputs):
            request.add("slm", output.token_ids)
            _after_slm_turn(request, output, table, relay)
        turn = [r for r in requests if r.finish is None and r.call]
        views = [r.prompt + protocol.llm_view(r.response, r.spans, table, lambda raw: encode_bytes(slm.tokenizer, raw))
                 for r in turn]
        outputs = llm.generate(views, [_llm_params(r) for r in turn]) if turn else []
        for request, view, output in zip(turn, views, outputs):
            request.stats.calls += 1
            request.stats.llm_prefill_tokens += len(view)
            request.stats.call_records.append(CallRecord(request.asked, len(output.token_ids), llm_catchup=len(view)))
            request.add("llm", output.token_ids)
            request.call = 0
            if output.finish_reason == "stop":  # the LLM's EOS ends the request
                request.finish = "stop"
            elif request.tokens_left <= 0:
                request.finish = "length"
    return [RelayOutput(r.prompt, r.response, slm.tokenizer.decode(r.response, skip_special_tokens=True), r.spans,
                        r.finish, r.stats) for r in requests], rounds


def _slm_params(request: _Request) -> SamplingParams:
    """The SLM's turn: the rest of the budget, stopping after a command's ``</call>``; the script goes on from the
    response's current position."""
    done = len(request.response)
    script = force_tokens({p - done: [t] for p, t in request.schedule.items() if p >= done})
    return dataclasses.replace(request.sampling, max_tokens=request.tokens_left, logits_processors=[script],
                               stop=[*(request.sampling.stop or ()), STOP])


def _llm_params(request: _Request) -> SamplingParams:
    return dataclasses.replace(request.sampling, max_tokens=request.call, logits_processors=())


def _after_slm_turn(request: _Request, output: RelayOutput, table: list[bytes], relay: RelayConfig) -> None:
    """Ends the request, or sets the call its turn ended with (the protocol's rules, as our relay applies them)."""
    if output.finish_reason != "stop" or request.tokens_left <= 0:
        request.finish = output.finish_reason if request.tokens_left > 0 else "length"
        return
    data = b"".join(table[t] for t in output.token_ids)
    last_token_at = len(data) - len(table[output.token_ids[-1]])
    commands = protocol.find_commands(data).commands
    if not commands or commands[-1].end <= last_token_at:
        if data.find(protocol.CLOSE, max(0, last_token_at - len(protocol.CLOSE) + 1)) < 0:
            request.finish = "stop"  # EOS or one of the request's own stop strings
        return  # else a stray "</call>": text, the SLM goes on
    n = commands[-1].n
    if n == 0:
        return
    if request.stats.calls == relay.max_calls:
        if relay.after_max_calls == "finish":
            request.finish = "max_calls"
        else:
            request.stats.unserved_calls += 1
        return
    request.asked, request.call = n, protocol.serve_length(n, relay.max_call_tokens, request.tokens_left)
