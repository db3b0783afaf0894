"""Fused temperature sampling: Gumbel-max with counter-based noise and the sampled token's log-prob, in one pass.

Row r samples ``argmax_c(scaled[r, c] + gumbel(r, c))`` with ``scaled = logits / temperature`` (temperature 0:
greedy, ``argmax_c logits[r, c]``, no noise), which draws exactly from ``softmax(scaled[r])``. The noise of column c
is a hash of (``row_key[r]``, c) (``row_keys``: a hash of the request's seed and step), so a row's sample does not
depend on its batch, on preemption or on any RNG state:

    bits = hash32(row_key ^ (c * 0x85EBCA6B mod 2**32))      (lowbias32, uint32)
    u = ((bits >> 9) + 0.5) * 2**-23                          (top 23 bits; exact in fp32, 0 < u < 1)
    gumbel = -log(-log(u))

Why 23 bits: ``k + 0.5`` is exact in fp32 only for ``k < 2**23``; with 24 bits ``(2**24 - 1) + 0.5`` rounds to
``2**24``, i.e. u = 1 and an infinite Gumbel. Exact u makes the kernel and the torch reference agree bit for bit on
u; ``log`` may still differ in the last ulp between libdevice and torch (only razor-thin top-2 gaps can flip).
The log-prob is ``scaled[token] - logsumexp(scaled)``, i.e. ``log_softmax(scaled)`` at the token.

Kernel layout: program (r, k) reads columns ``[k * CHUNK, (k + 1) * CHUNK)`` of row r in tiles of BLOCK and keeps,
per lane, the best perturbed value and its column (strict ``>``: the first, i.e. lowest, column wins ties, as in
``torch.argmax``) and an online ``(max, sum of exp(x - max))`` of ``scaled``; it stores the chunk's
(best value, best column, max, sum) at ``partial[r * num_chunks + k]``. One program per row then combines its
chunks (lowest column among the best values; ``sum_k s_k * exp(m_k - m)``). Splitting the vocabulary beats one
program per row because rollout batches are small: one program per row puts 64 rows (or 1) on 64 (or 1) of an
H100's 132 SMs, each streaming 600 KB and computing two logs per element, while CHUNK = 4096 gives 38 programs
per Qwen3 row (2432 at 64 rows: every SM busy). The second launch reads 16 bytes per chunk. CHUNK depends only on
the vocabulary size, so a row's log-prob (a float sum) is bit-identical in every batch, like its token.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

_MASK32 = 0xFFFFFFFF
U_STEP = 2.0 ** -23
"""Spacing of the uniforms: u = (k + 0.5) * U_STEP for the top 23 bits k of the column's hash."""
BLOCK = 1024
CHUNK = 4 * BLOCK
_INDEX_NONE: tl.constexpr = tl.constexpr(2**31 - 1)  # above any column: loses every "lowest column" reduction
_U_STEP: tl.constexpr = tl.constexpr(U_STEP)
_LOWEST: tl.constexpr = tl.constexpr(-torch.finfo(torch.float32).max)
"""Start of the running maxima: finite, so ``x - max`` is never ``-inf - -inf`` (NaN); empty lanes keep sum 0."""


def hash32(x: torch.Tensor | int) -> torch.Tensor | int:
    """lowbias32 (Wellons) of uint32 values held by a Python int or int64 lanes (the low 32 bits of each product
    are exact, then masked), or by int32 lanes as their bit patterns (products wrap mod 2**32; right shifts are
    masked to be logical): the noise of a whole vocabulary moves half the bytes that way."""
    if isinstance(x, torch.Tensor) and x.dtype == torch.int32:
        x = x ^ ((x >> 16) & 0xFFFF)  # a new tensor: the rest works in place
        x *= 0x7FEB352D
        x ^= (x >> 15) & 0x1FFFF
        x *= _as_int32(0x846CA68B)
        x ^= (x >> 16) & 0xFFFF
        return x
    x = ((x ^ (x >> 16)) * 0x7FEB352D) & _MASK32
    x = ((x ^ (x >> 15)) * 0x846CA68B) & _MASK32
    return x ^ (x >> 16)


def _as_int32(value: int) -> int:
    """The int32 with the bit pattern of uint32 ``value``."""
    return value - (1 << 32) if value >= 1 << 31 else value


def row_keys(seeds: torch.Tensor | int, steps: torch.Tensor | int) -> torch.Tensor | int:
    """int64 [R] keys in [0, 2**32) of the noise of each row, from its request's seed and the sampled step (or one
    row's key from Python ints: the same value, as long as ``steps * 0x9E3779B1`` fits in int64)."""
    return hash32((hash32(seeds & _MASK32) ^ hash32((steps * 0x9E3779B1 + (seeds >> 32)) & _MASK32)) & _MASK32)


def gumbel_noise(row_key: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """fp32 [R, vocab] Gumbel noise of each row's key (the module docstring's formula), hashed on int32 lanes."""
    key = torch.where(row_key >= 1 << 31, row_key - (1 << 32), row_key).to(torch.int32)
    column = torch.arange(vocab_size, device=row_key.device, dtype=torch.int32) * _as_int32(0x85EBCA6B)
    bits = hash32(key[:, None] ^ column[None, :])
    u = ((bits >> 9) & 0x7FFFFF).to(torch.float32).add_(0.5).mul_(U_STEP)
    return u.log_().neg_().log_().neg_()  # -log(-log(u)) without four [R, V] temporaries


def token_logprobs(scaled: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """fp32 [R]: ``log_softmax(scaled)`` at each row's token."""
    return scaled.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(-1)


@triton.jit
def _sample_chunk_kernel(
    logits_ptr, stride_row, temperature_ptr, row_key_ptr,
    best_value_ptr, best_index_ptr, max_ptr, sum_ptr, vocab_size,
    WANT_LOGPROBS: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
):
    row, chunk = tl.program_id(0), tl.program_id(1)
    temperature = tl.load(temperature_ptr + row)
    divisor = tl.where(temperature == 0, 1.0, temperature)
    key = tl.load(row_key_ptr + row).to(tl.uint32)
    row_logits = logits_ptr + row.to(tl.int64) * stride_row
    lanes = tl.arange(0, BLOCK)
    best_value = tl.full([BLOCK], float("-inf"), tl.float32)
    best_index = chunk * CHUNK + lanes  # an all -inf chunk answers its first column, as torch.argmax
    run_max = tl.full([BLOCK], _LOWEST, tl.float32)
    run_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(chunk * CHUNK, tl.minimum((chunk + 1) * CHUNK, vocab_size), BLOCK):
        column = start + lanes
        logits = tl.load(row_logits + column, mask=column < vocab_size, other=float("-inf"))
        scaled = tl.div_rn(logits, divisor)  # IEEE division, as torch's (``/`` may lower to div.full)
        perturbed = scaled
        if temperature != 0:
            # hash32 (lowbias32) on uint32 lanes, inline (a jit helper costs the interpreter a re-patch per call).
            # The products wrap mod 2**32, as the torch version's ``& 0xFFFFFFFF``: not an overflow to sanitize.
            bits = key ^ tl.mul(column.to(tl.uint32), 0x85EBCA6B, sanitize_overflow=False)
            bits = tl.mul(bits ^ (bits >> 16), 0x7FEB352D, sanitize_overflow=False)
            bits = tl.mul(bits ^ (bits >> 15), 0x846CA68B, sanitize_overflow=False)
            bits = bits ^ (bits >> 16)
            u = ((bits >> 9).to(tl.float32) + 0.5) * _U_STEP
            perturbed = scaled + -tl.log(-tl.log(u))
        better = perturbed > best_value  # strict: a lane keeps its first (lowest) column on ties
        best_value = tl.where(better, perturbed, best_value)
        best_index = tl.where(better, column, best_index)
        if WANT_LOGPROBS:
            # One exp per element: the smaller of (x, running max) is rescaled to the larger. -inf adds exp(-inf).
            delta = scaled - run_max
            shrink = tl.exp(-tl.abs(delta))
            run_sum = tl.where(delta > 0, run_sum * shrink + 1.0, run_sum + shrink)
            run_max = tl.maximum(run_max, scaled)
    chunk_best = tl.max(best_value, axis=0)
    slot = row * tl.num_programs(1) + chunk
    tl.store(best_value_ptr + slot, chunk_best)
    tl.store(best_index_ptr + slot, tl.min(tl.where(best_value == chunk_best, best_index, _INDEX_NONE), axis=0))
    if WANT_LOGPROBS:
        chunk_max = tl.max(run_max, axis=0)
        tl.store(max_ptr + slot, chunk_max)
        tl.store(sum_ptr + slot, tl.sum(run_sum * tl.exp(run_max - chunk_max), axis=0))


@triton.jit
def _sample_combine_kernel(
    logits_ptr, stride_row, temperature_ptr, best_value_ptr, best_index_ptr, max_ptr, sum_ptr,
    tokens_ptr, logprobs_ptr, num_chunks, WANT_LOGPROBS: tl.constexpr, CHUNKS_BLOCK: tl.constexpr,
):
    # Chunks are in column order, so the lowest column among the chunks' best values is the global first argmax.
    row = tl.program_id(0)
    chunks = tl.arange(0, CHUNKS_BLOCK)
    valid = chunks < num_chunks
    slots = row * num_chunks + chunks
    value = tl.load(best_value_ptr + slots, mask=valid, other=float("-inf"))
    index = tl.load(best_index_ptr + slots, mask=valid, other=_INDEX_NONE)
    token = tl.min(tl.where(value == tl.max(value, axis=0), index, _INDEX_NONE), axis=0)
    tl.store(tokens_ptr + row, token.to(tl.int64))
    if WANT_LOGPROBS:
        chunk_max = tl.load(max_ptr + slots, mask=valid, other=_LOWEST)
        chunk_sum = tl.load(sum_ptr + slots, mask=valid, other=0.0)
        row_max = tl.max(chunk_max, axis=0)
        total = tl.sum(chunk_sum * tl.exp(chunk_max - row_max), axis=0)
        temperature = tl.load(temperature_ptr + row)
        logit = tl.load(logits_ptr + row.to(tl.int64) * stride_row + token)
        scaled = tl.div_rn(logit, tl.where(temperature == 0, 1.0, temperature))
        tl.store(logprobs_ptr + row, scaled - row_max - tl.log(total))


def _check_inputs(logits: torch.Tensor, temperature: torch.Tensor, row_key: torch.Tensor) -> None:
    if logits.dim() != 2 or logits.dtype != torch.float32 or logits.stride(1) != 1:
        raise ValueError(f"logits must be fp32 [rows, vocab] with contiguous rows, got {logits.dtype} "
                         f"{tuple(logits.shape)} strides {logits.stride()}; call .float().contiguous() first")
    rows = logits.shape[0]
    for name, tensor, dtype in (("temperature", temperature, torch.float32), ("row_key", row_key, torch.int64)):
        if tensor.shape != (rows,) or tensor.dtype != dtype or not tensor.is_contiguous():
            raise ValueError(f"{name} must be a contiguous {dtype} vector with one entry per row of logits "
                             f"({rows}), got {tensor.dtype} {tuple(tensor.shape)}")
    devices = {t.device for t in (logits, temperature, row_key)}
    if len(devices) != 1:
        raise ValueError(f"logits, temperature and row_key must be on one device, got {sorted(map(str, devices))}")


def gumbel_sample(logits: torch.Tensor, temperature: torch.Tensor, row_key: torch.Tensor, want_logprobs: bool,
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples one token per row of ``logits`` (fp32 [R, V]) at ``temperature`` (fp32 [R]; 0 = greedy) with the
    noise of ``row_key`` (int64 [R], from ``row_keys``): int64 [R] tokens and, if ``want_logprobs``, fp32 [R]
    ``log_softmax(logits / temperature)`` at them. Two launches, no [R, V] temporaries (see the module docstring)."""
    _check_inputs(logits, temperature, row_key)
    rows, vocab_size = logits.shape
    tokens = torch.empty(rows, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device) if want_logprobs else None
    if rows == 0:
        return tokens, logprobs
    block = min(BLOCK, triton.next_power_of_2(vocab_size))  # a tiny vocabulary gets a tiny tile
    chunk = CHUNK // BLOCK * block
    num_chunks = triton.cdiv(vocab_size, chunk)
    best_value, max_, sum_ = torch.empty(3, rows, num_chunks, dtype=torch.float32, device=logits.device)
    best_index = torch.empty(rows, num_chunks, dtype=torch.int32, device=logits.device)
    _sample_chunk_kernel[(rows, num_chunks)](
        logits, logits.stride(0), temperature, row_key, best_value, best_index, max_, sum_, vocab_size,
        WANT_LOGPROBS=want_logprobs, CHUNK=chunk, BLOCK=block, num_warps=4,
    )
    _sample_combine_kernel[(rows,)](
        logits, logits.stride(0), temperature, best_value, best_index, max_, sum_, tokens,
        tokens if logprobs is None else logprobs, num_chunks,  # a placeholder pointer when no log-probs are stored
        WANT_LOGPROBS=want_logprobs, CHUNKS_BLOCK=triton.next_power_of_2(num_chunks), num_warps=1,
    )
    return tokens, logprobs


def gumbel_sample_reference(logits: torch.Tensor, temperature: torch.Tensor, row_key: torch.Tensor,
                            want_logprobs: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``gumbel_sample`` in plain torch: the noise materialised as [R, V], then argmax and log_softmax."""
    _check_inputs(logits, temperature, row_key)
    greedy = temperature == 0
    scaled = logits / torch.where(greedy, 1.0, temperature)[:, None]
    perturbed = gumbel_noise(row_key, logits.shape[-1]).add_(scaled)
    tokens = torch.where(greedy, logits.argmax(dim=-1), perturbed.argmax(dim=-1))
    return tokens, token_logprobs(scaled, tokens) if want_logprobs else None
