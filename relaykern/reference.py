"""The reference relay: slow, obviously correct, over plain ``transformers`` models.

It is the oracle the engine is tested against token for token (greedy), and a baseline the benchmarks compare
with: like the official eval code (``eval/generate_withhelp.py``) it gives the LLM the whole context on every call
and restarts the SLM's ``generate`` after every turn, but with no prefix cache (vLLM's would serve what an earlier
turn computed), so it re-prefills both. Requests run one by one.

One request's loop (rules from ``relaykern/protocol.py``, which win over the official code where they differ):

1. The SLM generates (HF ``generate`` with its KV cache, ``max_new_tokens`` = tokens left) on prompt + response.
   A ``StoppingCriteria`` sees each new token: it ends the request on EOS, ``stop_token_ids`` or a ``stop`` string,
   and feeds the token's bytes to ``protocol.scan`` to stop right after the token that completes a command or
   makes it malformed. The official code stops on the stop string ``</call>`` (vLLM, which also cuts the text
   there: the ``,`` of a final token ``>,`` is lost, while the protocol keeps it). HF's ``stop_strings`` would
   stop at ``>,`` too, but not at a malformed command (``<call>abc`` has no ``</call>``), and it would stop at a
   stray ``</call>`` with no command; the automaton gives exactly the protocol's events, with N and offsets, and
   is what the engine's detection runs. Each event is then confirmed with ``protocol.find_commands`` (the regex
   specification) on the bytes of the current SLM run.
2. A call with ``N > 0`` is served with ``serve_length(N, max_call_tokens, tokens left)`` LLM tokens, written on
   prompt + the LLM's view of the response, rebuilt from scratch: LLM tokens as they are, and each SLM run (the
   SLM tokens between two LLM turns) minus the bytes of every command found in it and of the whitespace before it
   (``view_cuts``, ``strip_commands``). Commands
   never span an LLM turn: the automaton restarts at each SLM run, so per-run stripping is exact.
3. The LLM's tokens join the response (source ``"llm"``) and the SLM goes on, reading everything.

Ordering within one token: a stop (EOS, stop id, stop string) wins over a command event; a command served or not
comes before the ``max_tokens`` check; a command with no token left to serve ends the request with ``"length"``
and is not counted. EOS and stop tokens are kept in ``token_ids`` (and counted), as HF ``generate`` does; stop
strings are matched on the response's bytes (LLM text included) and must end inside the new token; the text is
not cut at them.

Sampling: ``temperature == 0`` is greedy; otherwise HF's temperature, top-k, top-p and min-p warpers, after the
user's ``logits_processors``, which come after the penalties (HF's ``repetition_penalty``, then vLLM's presence and
frequency penalties over the response) and ``min_tokens``' mask of the stop ids. ``seed`` re-seeds torch before
every ``generate`` call, so a run is reproducible, but the engine draws from a different random stream: only greedy
outputs are compared token for token. ``llm_sampling`` defaults to ``sampling`` without logits processors (its stop
rules apply to the LLM's tokens too: the request stops wherever the response completes one); its ``max_tokens`` and
``logprobs`` are unused (the call decides the length; ``sampling.logprobs`` decides logprobs for all tokens).
Logits processors see the whole response so far (both models' tokens, commands included), for either model.
Logprobs are taken from the processed distribution (after processors and warpers) that the token was drawn from.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers import LogitsProcessorList, StoppingCriteriaList

from relaykern import protocol
from relaykern.config import RelayConfig, SamplingParams
from relaykern.outputs import CallRecord, RelayOutput, RelayStats, Source, append_span
from relaykern.reference_hooks import (NoStopBefore, ProcessorAdapter, ResponsePenalties, SharedIdsOnly, TurnWatcher,
                                       bytes_of, generation_config)
from relaykern.stop_rule import StopRule
from relaykern.tokenizer import encode_bytes, load_qwen3_tokenizer, token_bytes


def reference_generate(
    prompts: list[list[int]],
    slm: PreTrainedModel,
    llm: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    sampling: SamplingParams,
    llm_sampling: SamplingParams | None = None,
    relay: RelayConfig | None = None,
) -> list[RelayOutput]:
    """Runs the relay on each prompt (token ids), one request at a time. ``llm=None`` leaves every command as text."""
    if llm_sampling is None:
        llm_sampling = dataclasses.replace(sampling, logits_processors=())
    if any(len(prompt) == 0 for prompt in prompts):
        raise ValueError("reference_generate: every prompt needs at least one token (give a BOS or some text)")
    table = token_bytes(tokenizer)
    return [
        _Request(list(prompt), slm, llm, tokenizer, table, sampling, llm_sampling, relay or RelayConfig()).run()
        for prompt in prompts
    ]


def load_reference_models(
    slm_path: str | Path,
    llm_path: str | Path | None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | str = torch.float32,
) -> tuple[PreTrainedModel, PreTrainedModel | None, object]:
    """``(slm, llm or None, tokenizer)`` from local checkpoint directories (no download).

    The tokenizer comes from the SLM's directory, or is the offline Qwen3 tokenizer when the directory has none.
    """
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype

    def load(path: str | Path) -> PreTrainedModel:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, local_files_only=True)
        return model.to(device).eval()

    has_tokenizer = any((Path(slm_path) / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json"))
    if has_tokenizer:
        tokenizer = AutoTokenizer.from_pretrained(slm_path, local_files_only=True)
    else:
        tokenizer = load_qwen3_tokenizer()
    return load(slm_path), (load(llm_path) if llm_path is not None else None), tokenizer


def eos_token_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> set[int]:
    """The model's EOS ids as HF ``generate`` picks them: generation config, then model config, then tokenizer."""
    for ids in (model.generation_config.eos_token_id, model.config.eos_token_id, tokenizer.eos_token_id):
        if ids is not None:
            return set(ids) if isinstance(ids, (list, tuple)) else {ids}
    return set()


@dataclasses.dataclass
class _Request:
    prompt: list[int]
    slm: PreTrainedModel
    llm: PreTrainedModel | None
    tokenizer: object
    table: list[bytes]
    sampling: SamplingParams
    llm_sampling: SamplingParams
    relay: RelayConfig

    def __post_init__(self) -> None:
        self.response: list[int] = []
        self.text = bytearray()
        self.spans: list[tuple[Source, int, int]] = []
        self.stats = RelayStats()
        self.logprobs: list[float] = []

    @property
    def tokens_left(self) -> int:
        return self.sampling.max_tokens - len(self.response)

    def run(self) -> RelayOutput:
        finish = None
        scan_state = protocol.ScanState()
        while finish is None:
            if self.tokens_left <= 0:
                finish = "length"
                break
            watcher = self._generate(self.slm, self.sampling, self.prompt + self.response, "slm", scan_state)
            if watcher.stopped:
                finish = "stop"
            elif watcher.event is None:
                finish = "length"
            elif self._confirm(watcher.event).kind == protocol.EVENT_MALFORMED:
                finish = "malformed_call"
            else:
                finish = self._on_call(watcher.event.n)
                if self.spans[-1][0] == "llm":
                    scan_state = protocol.ScanState()  # a new SLM run: commands never span an LLM turn
        return RelayOutput(
            prompt_token_ids=self.prompt,
            token_ids=self.response,
            text=self.tokenizer.decode(self.response, skip_special_tokens=True),
            spans=self.spans,
            finish_reason=finish,
            stats=self.stats,
            logprobs=self.logprobs if self.sampling.logprobs else None,
        )

    def _generate(self, model: PreTrainedModel, params: SamplingParams, input_ids: list[int], source: Source,
                  scan_state: protocol.ScanState | None = None, max_new_tokens: int | None = None) -> TurnWatcher:
        """Runs one ``generate`` call and appends its tokens to the response."""
        stop_rule = StopRule.of(params, eos_token_ids(model, self.tokenizer))
        watcher = TurnWatcher(len(input_ids), self.table, bytes(self.text), len(self.response), stop_rule, scan_state)
        processors = LogitsProcessorList()
        if params.min_tokens > len(self.response):
            processors.append(NoStopBefore(stop_rule.ids, params.min_tokens - len(self.response), len(input_ids)))
        if params.presence_penalty or params.frequency_penalty:
            processors.append(ResponsePenalties(params, len(self.prompt)))
        if params.logits_processors:
            processors.append(ProcessorAdapter(params.logits_processors, list(self.response), len(input_ids)))
        shared = min(m.config.vocab_size for m in (self.slm, self.llm) if m is not None)
        if shared < model.config.vocab_size:
            processors.append(SharedIdsOnly(shared))
        max_length = len(input_ids) + (self.tokens_left if max_new_tokens is None else max_new_tokens)
        config = generation_config(params, max_length, output_scores=self.sampling.logprobs)
        if params.seed is not None:
            torch.manual_seed(params.seed)
        with torch.inference_mode():
            out = model.generate(
                input_ids=torch.tensor([input_ids], device=model.device),
                attention_mask=torch.ones(1, len(input_ids), dtype=torch.long, device=model.device),
                generation_config=config,
                logits_processor=processors,
                stopping_criteria=StoppingCriteriaList([watcher]),
            )
        new = out.sequences[0, len(input_ids) :].tolist()
        if new != watcher.tokens:
            raise RuntimeError(f"generate returned {new} but the stopping criterion saw {watcher.tokens}")
        append_span(self.spans, source, len(self.response), len(self.response) + len(new))
        self.response += new
        self.text += b"".join(bytes_of(self.table, t) for t in new)
        if source == "slm":
            self.stats.slm_tokens += len(new)
        else:
            self.stats.llm_tokens += len(new)
        if self.sampling.logprobs:
            self.logprobs += [torch.log_softmax(s[0].float(), -1)[t].item() for s, t in zip(out.scores, new)]
        return watcher

    def _confirm(self, event: protocol.Event) -> protocol.Event:
        """Checks the automaton's event against ``find_commands`` on the bytes of the SLM run the response ends with."""
        _, start, end = self.spans[-1]
        data = [bytes_of(self.table, t) for t in self.response[start:end]]
        run = b"".join(data)
        token_start = len(run) - len(data[-1])  # the event's token is the run's last
        parsed = protocol.find_commands(run)
        if event.kind == protocol.EVENT_CALL:
            command = protocol.Command(token_start + event.start, token_start + event.end, event.n)
            agrees = parsed.commands[-1:] == (command,)
        else:
            agrees = parsed.malformed_at == token_start + event.start
        if not agrees:
            raise RuntimeError(f"protocol.scan gave {event} but find_commands gives {parsed} on {run!r}")
        return event

    def _on_call(self, n: int) -> str | None:
        """Handles a complete command; returns a finish reason or None to let the SLM go on."""
        if n == 0:
            return None
        if self.llm is None or (self.stats.calls == self.relay.max_calls and self.relay.after_max_calls == "continue"):
            self.stats.unserved_calls += 1
            return None
        if self.stats.calls == self.relay.max_calls:
            return "max_calls"
        n_served = protocol.serve_length(n, self.relay.max_call_tokens, self.tokens_left)
        if n_served == 0:
            return "length"
        return self._serve(n, n_served)

    def _serve(self, n_asked: int, n_served: int) -> str | None:
        llm_input = self.prompt + protocol.llm_view(self.response, self.spans, self.table,
                                                    lambda raw: encode_bytes(self.tokenizer, raw))
        started = time.perf_counter()
        watcher = self._generate(self.llm, self.llm_sampling, llm_input, "llm", max_new_tokens=n_served)
        record = CallRecord(n_asked, n_served, llm_catchup=len(llm_input), latency_s=time.perf_counter() - started)
        self.stats.call_records.append(record)
        self.stats.calls += 1
        self.stats.llm_prefill_tokens += len(llm_input)
        if watcher.stopped:
            return "stop"
        if self.tokens_left <= 0:
            return "length"
        record.slm_catchup = len(watcher.tokens)
        self.stats.slm_catchup_tokens += record.slm_catchup
        return None
