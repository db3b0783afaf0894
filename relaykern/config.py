"""User-facing settings, validated on construction so a bad value fails before any work starts."""
from __future__ import annotations

import math
import numbers
import operator
from dataclasses import dataclass
from typing import Callable, Iterable, Literal, Sequence

import torch

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]
"""``(generated_token_ids, logits[vocab]) -> logits``: applied to the SLM's logits of one row (as in vLLM/HF).

A processor that reads only ``len(generated_token_ids)`` (the position) may say so with an attribute
``position_only = True`` (``relaykern.scripted.force_tokens`` does): it then runs in overlapped steps
(``RelayConfig.overlap_steps``), called before the host knows the last token, which it sees as -1. Any other
processor makes its request's steps wait for the host to read each token."""


GREEDY_BELOW_TEMPERATURE = 1e-5
"""Temperatures below this are greedy (as in vLLM): dividing logits by them overflows."""


@dataclass
class SamplingParams:
    """How one model samples. ``temperature == 0`` (or below 1e-5) means greedy, and a greedy request is not
    top-k / top-p / min-p filtered; ``top_k == 0`` means no top-k cut (ties at the k-th logit are kept, as in vLLM /
    HF); ``min_p`` drops tokens less likely than ``min_p`` times the most likely one (0 = off). The filters apply
    in HF's order: temperature, top-k, top-p, then min-p over what top-p kept (vLLM applies min-p first).

    Penalties (vLLM's, applied to the raw logits before logits processors, greedy requests included) count the
    tokens of the model's view of the request: ``repetition_penalty`` (1 = off) divides the positive logits and
    multiplies the others of every token in the prompt or the response; ``presence_penalty`` and
    ``frequency_penalty`` (0 = off) subtract themselves once, and once per occurrence, for each token in the
    response. For the SLM the response is all it has read (the LLM's tokens and the commands too, as the reference
    relay's HF ``repetition_penalty`` counts them: a penalty makes a later command's tokens, so later calls, less
    likely); for the LLM (``llm_sampling``) it is its tag-free view.

    ``stop`` strings and ``stop_token_ids`` end the request where a token completes them, and that token stays in
    ``token_ids`` and ``text`` (vLLM's ``include_stop_str_in_output=True``). Before the response holds
    ``min_tokens`` tokens (both models' count) the model cannot sample EOS (unless ``ignore_eos``) or a stop id,
    and no stop string ends the request, as in vLLM. ``logprobs=True`` returns the log-prob of each sampled token
    under the distribution it was drawn from: after penalties, logits processors, temperature and the filters
    (greedy: ``log_softmax`` of the processed logits). ``seed`` makes the request reproducible whatever else is
    batched with it; the LLM's draws use ``llm_sampling.seed`` when given, else one derived from this.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    max_tokens: int = 256
    min_tokens: int = 0
    seed: int | None = None
    stop: Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    logprobs: bool = False
    logits_processors: Sequence[LogitsProcessor] = ()

    def __post_init__(self) -> None:
        require_ints(self, "max_tokens", "min_tokens", "top_k", "seed")
        require_numbers(self, "temperature", "top_p", "min_p", "repetition_penalty", "presence_penalty",
                        "frequency_penalty")
        if not 0 <= self.temperature < math.inf:
            raise ValueError(f"SamplingParams.temperature must be finite and >= 0, got {self.temperature}")
        if self.temperature < GREEDY_BELOW_TEMPERATURE:
            self.temperature = 0.0
        if not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingParams.top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.min_p <= 1:
            raise ValueError(f"SamplingParams.min_p must be in [0, 1] (0 = off), got {self.min_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"SamplingParams.repetition_penalty must be finite and > 0 (1 = off), got "
                             f"{self.repetition_penalty}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise ValueError(f"SamplingParams.{name} must be in [-2, 2] (0 = off), got {getattr(self, name)}")
        if not isinstance(self.logprobs, bool):
            raise ValueError(f"SamplingParams.logprobs is True or False (the log-prob of each sampled token; no "
                             f"top-n alternatives), got {self.logprobs!r}")
        require_at_least(self, 0, "top_k", why=" (0 = off)")
        require_at_least(self, 1, "max_tokens")
        if not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"SamplingParams.min_tokens must be in [0, max_tokens={self.max_tokens}], got "
                             f"{self.min_tokens}")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not (isinstance(self.stop, (list, tuple)) and
                                          all(isinstance(s, str) and s for s in self.stop)):
            raise ValueError(f"SamplingParams.stop holds non-empty strings (token ids go in stop_token_ids), got "
                             f"{self.stop!r:.60}")
        if self.stop_token_ids is not None:
            try:
                self.stop_token_ids = [operator.index(t) for t in self.stop_token_ids]
            except TypeError:
                raise ValueError(f"SamplingParams.stop_token_ids must be ints, got {self.stop_token_ids!r:.60}"
                                 ) from None
        self.logits_processors = tuple(self.logits_processors)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    def stop_ids(self, eos: Iterable[int]) -> set[int]:
        """The token ids that end a request under these params, given the model's ``eos`` ids."""
        return set(self.stop_token_ids or ()) | (set() if self.ignore_eos else set(eos))


@dataclass
class RelayConfig:
    """The relay protocol's knobs (see relaykern/protocol.py for the grammar).

    max_calls: commands served per request; a later command is left as text (``after_max_calls="continue"``)
        or ends the request with ``finish_reason="max_calls"`` (``"finish"``).
    max_call_tokens: cap on N; N is also capped by the request's remaining ``max_tokens``.
    llm_batch_wait_steps, llm_batch_min_rows: throughput mode (GRPO rollouts, offline batches). An LLM decode
        forward costs about as much for one row as for several, so a sequence waiting for the LLM (to start a call
        or for its next token) may wait up to ``llm_batch_wait_steps`` engine steps; the LLM runs as soon as one
        has waited that long, ``llm_batch_min_rows`` are waiting, or the SLM has nothing to do. 0 (default): the
        LLM runs every step it has work, the lowest latency.
    llm_prefetch_tokens: while the LLM has no call to serve, it reads ahead what running requests have written
        (prompts, then the SLM's text up to points no later command can reach back past), in forwards of exactly
        this many tokens, launched whenever that many are waiting; a call's catch-up then covers only what came
        after. The forwards run beside the SLM's on a stream of the LLM's and the host never waits for them; they
        take only free LLM KV blocks, and a pool under pressure takes them back first. Each reads all the LLM's
        weights, hence full chunks only (a few hundred tokens or more amortize it); text after a request's last
        call is read for nothing. 0 (default): the LLM reads at calls only, as the official code does. Outputs do
        not depend on it.
    early_catchup_tokens: once the SLM has written ``<call`` (Qwen3 writes ``<call>N</call>`` as ``<``,
        ``call``, ``>``, digits, ``</``, ``call``, ``>``), an LLM with no call to serve starts reading what the
        request has written up to the command (to its last byte that is not whitespace), in a forward on a stream
        of its own while the SLM writes the rest, if at least this many of those tokens are unread; the call's
        catch-up is then only what is left: the same tokens, read earlier. Fewer are left for the call, whose
        catch-up of a few tokens costs about one decode step anyway (reading the weights dominates: on an H200, an
        8B catch-up of 64 tokens took 1.35 decode steps, of 256 tokens 2.2), so reading them early would save
        nothing and slow the SLM's steps beside it. Tokens are read for nothing only when the command is no call
        after all (``N = 0`` with no call later, malformed, cut by ``max_tokens``). Off while
        ``llm_batch_wait_steps`` batches calls, whose point is fewer LLM forwards.
        0 (default): the LLM reads at calls only. Measured on an H200 (bench/results/nvidia-h200-2026-11-27.json,
        at 256), reading early gained nothing: one request's relay overhead was 3.4 against 3.1 LLM steps at
        k = 256 unread tokens and 8.2 against 5.7 at k = 512, and batch-64 throughput at 1 % LLM tokens 0.71 of the
        ideal either way (likely since the SLM's steps slow beside the LLM's forward and the call still needs a
        forward of its own: not traced yet). On a CPU forwards run in turn, so reading early only adds one. Outputs
        do not depend on it.
    read_ahead_yields: the LLM reads ahead (both ways above) on a stream of lower priority than the models' steps,
        so that the GPU hands free SMs to the SLM's kernels (and the LLM's calls') first; False: at their priority.
        Timing only (default on).
    overlap_steps: while the GPU runs a model's step, the host launches that model's next one before it reads
        this one's tokens back: each row that samples goes on, fed on the device the token this step samples for
        it, and catch-ups, prefills and new requests join from free blocks. The host's bookkeeping then runs beside
        the GPU instead of between its steps. A row whose request stops, calls or ends its call at the token it was
        fed is dropped; a request whose command has come as far as ``</call`` (its next token most likely calls)
        is left out of the overlapped step. The LLM's next step is launched once the SLM's tokens are read, so that
        the calls they start join it (and never while ``llm_batch_wait_steps`` holds calls back). A step runs in
        turn when no row goes on, a row to carry on has a logits processor that needs the tokens on the host (see
        ``LogitsProcessor``), or blocks are short. Outputs do not depend on it (default on).
    decouple_llm: the SLM's steps go on while an LLM forward runs: a step reads the LLM's oldest forward only once
        the device has run it (or when the SLM has nothing to do), so that a catch-up or a decode step of the larger
        model does not hold every other request to one SLM step per LLM forward. At most two LLM forwards are
        unread, the second launched overlapped (as ``overlap_steps`` says; without it, one). False: each step waits
        for both models' forwards. On a CPU a forward has run when it returns, so nothing changes there; on a GPU
        which rows share a forward then depends on timing, so outputs may differ from run to run as much as rounding
        in another batch makes them (in bf16, a greedy pick now and then). Default on.
    """

    max_calls: int = 5
    max_call_tokens: int = 4096
    after_max_calls: Literal["continue", "finish"] = "continue"
    llm_batch_wait_steps: int = 0
    llm_batch_min_rows: int = 16
    llm_prefetch_tokens: int = 0
    early_catchup_tokens: int = 0
    read_ahead_yields: bool = True
    overlap_steps: bool = True
    decouple_llm: bool = True

    def __post_init__(self) -> None:
        if self.early_catchup_tokens is None:  # (its default until 2026-11-27: 256 on a GPU, 0 on a CPU)
            raise ValueError("RelayConfig.early_catchup_tokens takes a token count: 0 (off, the default) or e.g. 256; "
                             "None (256 on a GPU) is no longer accepted")
        require_ints(self, "max_calls", "max_call_tokens", "llm_batch_wait_steps", "llm_batch_min_rows",
                     "llm_prefetch_tokens", "early_catchup_tokens")
        require_at_least(self, 0, "max_calls", "llm_batch_wait_steps")
        require_at_least(self, 0, "llm_prefetch_tokens", "early_catchup_tokens", why=" (0 = off)")
        require_at_least(self, 1, "max_call_tokens", "llm_batch_min_rows")
        if self.after_max_calls not in ("continue", "finish"):
            raise ValueError("RelayConfig.after_max_calls must be 'continue' or 'finish', "
                             f"got {self.after_max_calls!r}")


@dataclass
class EngineConfig:
    """How one model is served: device, precision, paged KV pool, batching.

    The pool is sized by ``num_blocks`` if given, else by ``kv_cache_memory_gb``, else from the GPU's free memory
    (85 %, shared with the other model of a relay) or, on CPU, at most 1 GiB and 4096 blocks.
    ``attention_backend`` picks the Triton kernels or their torch references (same results; the references are
    the fallback where Triton cannot run). A forward feeds at most ``max_num_seqs`` rows and
    ``max_num_batched_tokens`` tokens: longer prompts and catch-ups are fed in chunks over several steps.
    """

    device: str | torch.device | None = None
    dtype: torch.dtype | str | None = None
    block_size: int = 16
    num_blocks: int | None = None
    kv_cache_memory_gb: float | None = None
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 8192
    max_model_len: int | None = None
    attention_backend: Literal["triton", "torch"] | None = None
    cuda_graphs: bool = True
    enable_prefix_caching: bool = True

    def __post_init__(self) -> None:
        require_ints(self, "block_size", "num_blocks", "max_num_seqs", "max_num_batched_tokens", "max_model_len")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"EngineConfig.block_size must be a power of two, got {self.block_size}")
        require_at_least(self, 1, "num_blocks", "max_num_seqs", "max_num_batched_tokens")
        require_at_least(self, 2, "max_model_len", why=" (a prompt token and one more)")
        if self.kv_cache_memory_gb is not None and not self.kv_cache_memory_gb > 0:
            raise ValueError(f"EngineConfig.kv_cache_memory_gb must be > 0, got {self.kv_cache_memory_gb}")
        if self.attention_backend not in (None, "triton", "torch"):
            raise ValueError("EngineConfig.attention_backend must be 'triton' or 'torch', "
                             f"got {self.attention_backend!r}")
        if isinstance(self.dtype, str):
            try:
                self.dtype = getattr(torch, self.dtype)
            except AttributeError:
                raise ValueError(f"EngineConfig.dtype: unknown dtype {self.dtype!r}") from None
        if self.dtype is not None and not (isinstance(self.dtype, torch.dtype) and self.dtype.is_floating_point):
            raise ValueError(f"EngineConfig.dtype must be a floating-point torch dtype, got {self.dtype!r}")
        self.device = resolve_device(self.device)

    def resolved_dtype(self) -> torch.dtype:
        """bf16 on GPU, fp32 on CPU unless set."""
        if self.dtype is not None:
            return self.dtype
        return torch.bfloat16 if self.device.type == "cuda" else torch.float32

    def resolved_backend(self) -> str:
        """Triton on GPU; the torch references on CPU unless Triton's interpreter is on."""
        if self.attention_backend is not None:
            return self.attention_backend
        return "triton" if self.device.type == "cuda" else "torch"


def require_at_least(config: object, minimum: int, *names: str, why: str = "") -> None:
    """Each of ``config``'s fields ``names`` (None where optional) is at least ``minimum``; ``why``: the error's note
    after the bound."""
    for name in names:
        value = getattr(config, name)
        if value is not None and value < minimum:
            raise ValueError(f"{type(config).__name__}.{name} must be >= {minimum}{why}, got {value!r}")


def require_ints(config: object, *names: str) -> None:
    """Integer fields (None where optional) hold ints: a float block size or token count is a mistake, said here
    rather than deep inside a step. Integer numpy / torch scalars become ints."""
    for name in names:
        value = getattr(config, name)
        if value is None:
            continue
        try:
            if isinstance(value, bool):
                raise TypeError
            setattr(config, name, operator.index(value))
        except TypeError:
            raise ValueError(f"{type(config).__name__}.{name} must be an int, got {value!r}") from None


def require_numbers(config: object, *names: str) -> None:
    """Real-valued fields hold numbers (not strings or bools), as floats."""
    for name in names:
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{type(config).__name__}.{name} must be a number, got {value!r}")
        setattr(config, name, float(value))


def resolve_device(device: str | torch.device | None) -> torch.device:
    """None → cuda if available else cpu. Asking for CUDA without a GPU is an error, not a silent fallback."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device {device!r} is unknown: give e.g. 'cpu', 'cuda' or 'cuda:1'") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} requested but CUDA is not available on this machine (use device='cpu')")
    return device
