"""OpenAI-style request bodies to relaykern's settings, and relaykern's outputs to OpenAI-style response bodies.

A request is checked whole before anything runs: a field relaykern does not know, or a value it cannot serve
(top-n log-probs, ``echo``), is a ``BadRequest`` naming it, never silently dropped. Each choice also says how
the relay went (``relay``: who wrote which tokens, the calls, the call ratio) and holds its ``token_ids``; each
streamed chunk names the model that wrote it (``source``).
"""
from __future__ import annotations

import dataclasses
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from relaykern.config import SamplingParams
from relaykern.engine.background import Delta
from relaykern.outputs import RelayOutput

SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "presence_penalty",
                   "frequency_penalty", "max_tokens", "min_tokens", "seed", "stop", "stop_token_ids", "ignore_eos")
"""Request fields that go to ``SamplingParams`` as they are (vLLM's extra fields included)."""
COMMON_FIELDS = ("model", "stream", "stream_options", "user", "n", "llm_sampling", "logprobs",
                 "include_stop_str_in_output")
COMPLETION_FIELDS = COMMON_FIELDS + SAMPLING_FIELDS + ("prompt", "echo", "best_of")
CHAT_FIELDS = COMMON_FIELDS + SAMPLING_FIELDS + ("messages", "max_completion_tokens", "top_logprobs",
                                                 "chat_template_kwargs")
COMPLETION_MAX_TOKENS = 16
"""OpenAI's default ``max_tokens`` for completions (a chat request defaults to the server's)."""


class BadRequest(ValueError):
    """A request relaykern cannot serve as asked; the message names the field."""


@dataclass
class Request:
    """What one HTTP request asks for: a prompt (a string or token ids) and the SLM's sampling per choice (``n`` a
    prompt, in OpenAI's order: prompt i's j-th at ``i * n + j``), the LLM's sampling, how to answer."""

    chat: bool
    prompts: list[str | list[int]]
    samplings: list[SamplingParams]
    n: int
    llm_sampling: SamplingParams | None
    stream: bool
    include_usage: bool


def parse_request(body: Any, chat: bool, apply_chat_template: Any, default_max_tokens: int) -> Request:
    """The request in ``body`` (parsed JSON), or ``BadRequest``/``ValueError`` (from ``SamplingParams``)."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    fields = {key: value for key, value in body.items() if value is not None}  # (clients send null for unset)
    unknown = sorted(set(fields) - set(CHAT_FIELDS if chat else COMPLETION_FIELDS))
    if unknown:
        raise BadRequest(f"unsupported field(s): {', '.join(unknown)}")
    n = fields.get("n", 1)
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise BadRequest(f"n must be an int >= 1 (choices per prompt), got {n!r}")
    for name, served, why in (("best_of", n, "the n choices it samples, none ranked out"),
                              ("echo", False, "the completion only"),
                              ("include_stop_str_in_output", True, "the stop string in the text")):
        if name in fields and fields[name] != served:
            raise BadRequest(f"{name} must be {served!r} (relaykern returns {why}), got {fields[name]!r}")
    sampling = {name: fields[name] for name in SAMPLING_FIELDS if name in fields}
    if chat:
        prompts = [_chat_prompt(fields, apply_chat_template)]
        if "max_completion_tokens" in fields:
            sampling["max_tokens"] = fields["max_completion_tokens"]
        sampling.setdefault("max_tokens", default_max_tokens)
        logprobs = _flag(fields, "logprobs")
        if fields.get("top_logprobs", 0) != 0:
            raise BadRequest("top_logprobs must be 0: relaykern returns the sampled token's log-prob only")
    else:
        prompts = _completion_prompts(fields.get("prompt"))
        sampling.setdefault("max_tokens", COMPLETION_MAX_TOKENS)
        if fields.get("logprobs", 0) not in (0, False):
            raise BadRequest("logprobs must be 0: relaykern returns the sampled token's log-prob only, no top-n")
        logprobs = fields.get("logprobs", False) is not False  # (0: the sampled tokens' log-probs)
    options = fields.get("stream_options", {})
    if not isinstance(options, dict):
        raise BadRequest("stream_options must be an object")
    llm_fields = fields.get("llm_sampling")
    if llm_fields is not None and not isinstance(llm_fields, dict):
        raise BadRequest("llm_sampling must be an object of sampling fields")
    base = _sampling_params(sampling, logprobs, "request")
    # The n choices of a prompt differ: choice j draws with seed + j (reproducible when a seed is given).
    choices = [base if base.seed is None or j == 0 else dataclasses.replace(base, seed=base.seed + j)
               for j in range(n)]
    return Request(chat=chat, prompts=[p for p in prompts for _ in range(n)], samplings=choices * len(prompts), n=n,
                   llm_sampling=None if llm_fields is None else _sampling_params(llm_fields, False, "llm_sampling"),
                   stream=_flag(fields, "stream"), include_usage=_flag(options, "include_usage"))


def _flag(fields: dict[str, Any], name: str) -> bool:
    value = fields.get(name, False)
    if not isinstance(value, bool):
        raise BadRequest(f"{name} must be true or false, got {value!r}")
    return value


def _sampling_params(fields: dict[str, Any], logprobs: bool, where: str) -> SamplingParams:
    known = {f.name for f in dataclasses.fields(SamplingParams)} - {"logits_processors", "logprobs"}
    unknown = sorted(set(fields) - known)
    if unknown:
        raise BadRequest(f"{where}: unsupported field(s): {', '.join(unknown)}")
    try:
        return SamplingParams(**fields, logprobs=logprobs)
    except TypeError as err:  # e.g. a number where a list belongs
        raise BadRequest(f"{where}: {err}") from None


def _completion_prompts(prompt: Any) -> list[str | list[int]]:
    """OpenAI's four prompt forms: a string, a token id list, or a list of either (a batch)."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt)):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        return list(prompt)
    raise BadRequest("prompt must be a string, a list of token ids, or a non-empty list of either")


def _chat_prompt(fields: dict[str, Any], apply_chat_template: Any) -> str:
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        raise BadRequest("messages must be a non-empty list of {role, content} objects")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise BadRequest(f"messages[{i}] must be an object with a string role")
        content = message.get("content")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise BadRequest(f"messages[{i}].content: only text parts are served")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise BadRequest(f"messages[{i}].content must be a string or a list of text parts")
        plain.append({"role": message["role"], "content": content})
    kwargs = fields.get("chat_template_kwargs", {})
    if not isinstance(kwargs, dict):
        raise BadRequest("chat_template_kwargs must be an object (e.g. {\"enable_thinking\": false})")
    try:
        return apply_chat_template(plain, tokenize=False, add_generation_prompt=True, **kwargs)
    except Exception as err:  # noqa: BLE001 - the template's own error (e.g. a role it does not know)
        raise BadRequest(f"messages: the chat template failed: {err}") from None


# ---------------------------------------------------------------------------------------------- responses
@dataclass
class Reply:
    """The identity of one response: its id, time and model name (every chunk of a stream repeats them)."""

    chat: bool
    model: str
    id: str = field(init=False)
    created: int = field(default_factory=lambda: int(time.time()), init=False)

    def __post_init__(self) -> None:
        self.id = f"{'chatcmpl' if self.chat else 'cmpl'}-{uuid.uuid4().hex}"

    def body(self, choices: list[dict[str, Any]], chunk: bool = False, **extra: Any) -> dict[str, Any]:
        kind = ("chat.completion" + ".chunk" * chunk) if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model, "choices": choices,
                **extra}

    def choice(self, index: int, text: str, finish_reason: str | None, logprobs: dict | None,
               delta: bool = False, first: bool = False, **extra: Any) -> dict[str, Any]:
        """One choice (``delta``: of a streamed chunk; ``first``: the first chunk of this choice, which names the
        role)."""
        if not self.chat:
            content = {"text": text}
        elif delta:
            content = {"delta": {"role": "assistant", "content": text} if first else {"content": text}}
        else:
            content = {"message": {"role": "assistant", "content": text}}
        return {"index": index, **content, "logprobs": logprobs, "finish_reason": finish_reason, **extra}


def relay_info(output: RelayOutput) -> dict[str, Any]:
    """The relay's account of one choice: spans, the statistics (and call records), the call ratio, any error."""
    info = {"spans": [list(span) for span in output.spans], **dataclasses.asdict(output.stats),
            "call_ratio": output.stats.call_ratio}
    return {**info, "error": output.error} if output.error else info


def usage(outputs: list[RelayOutput], n: int) -> dict[str, int]:
    """Token counts, each prompt's counted once for its ``n`` choices (as OpenAI's)."""
    prompt = sum(len(o.prompt_token_ids) for o in outputs[::n])
    completion = sum(len(o.token_ids) for o in outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def logprobs_body(chat: bool, token_bytes: list[bytes], token_ids: list[int], logprobs: list[float] | None
                  ) -> dict[str, Any] | None:
    """OpenAI's log-prob object for these tokens (each a sampled token's log-prob under the distribution it was
    drawn from; no alternatives)."""
    if logprobs is None:
        return None
    data = [token_bytes[t] if t < len(token_bytes) else b"" for t in token_ids]
    if chat:
        return {"content": [{"token": raw.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(raw),
                             "top_logprobs": []} for raw, lp in zip(data, logprobs)]}
    return {"tokens": [raw.decode("utf-8", errors="replace") for raw in data], "token_logprobs": list(logprobs),
            "top_logprobs": None}


def delta_choice(reply: Reply, delta: Delta, text: str, first: bool, token_bytes: list[bytes]) -> dict[str, Any]:
    """A streamed chunk's choice for one ``Delta``: its text, the model that wrote it, its ids (and log-probs)."""
    return reply.choice(delta.index, text, None, logprobs_body(reply.chat, token_bytes, delta.token_ids,
                                                                delta.logprobs),
                        delta=True, first=first, source=delta.source, token_ids=delta.token_ids)
