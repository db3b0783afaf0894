"""The kernels a forward runs, by backend: the Triton kernels, or their plain-torch references (the CPU path and the
specification). The model's layers hold weights; which code computes with them is chosen per step, by
``AttentionContext.backend``."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from relaykern.kernels.activation import silu_and_mul, silu_and_mul_reference
from relaykern.kernels.attention import paged_attention, paged_attention_reference
from relaykern.kernels.rms_norm import rms_norm, rms_norm_reference
from relaykern.kernels.rope import qk_norm_rope, qk_norm_rope_reference
from relaykern.kernels.store_kv import store_kv, store_kv_reference


@dataclass(frozen=True)
class Ops:
    rms_norm: Callable
    qk_norm_rope: Callable
    silu_and_mul: Callable
    store_kv: Callable
    attention: Callable


BACKENDS = {
    "triton": Ops(rms_norm, qk_norm_rope, silu_and_mul, store_kv, paged_attention),
    "torch": Ops(rms_norm_reference, qk_norm_rope_reference, silu_and_mul_reference, store_kv_reference,
                 paged_attention_reference),
}
