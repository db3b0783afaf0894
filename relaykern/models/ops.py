"""The kernels a forward runs, by backend: the Triton kernels, or their plain-torch references (the CPU path and the
specification). The model's layers hold weights; which code computes with them is chosen per step, by
``AttentionContext.backend`` (and ``AttentionContext.pdl``: the Triton kernels launched with programmatic dependent
launch, kernels/pdl.py)."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Callable

from relaykern.kernels.activation import silu_and_mul, silu_and_mul_reference
from relaykern.kernels.attention import paged_attention, paged_attention_reference
from relaykern.kernels.gemv import gemv, gemv_reference
from relaykern.kernels.rms_norm import rms_norm, rms_norm_reference
from relaykern.kernels.rope import qk_norm_rope_store, qk_norm_rope_store_reference


@dataclass(frozen=True)
class Ops:
    rms_norm: Callable
    qk_norm_rope_store: Callable
    silu_and_mul: Callable
    attention: Callable
    gemv: Callable


BACKENDS = {
    "triton": Ops(rms_norm, qk_norm_rope_store, silu_and_mul, paged_attention, gemv),
    "torch": Ops(rms_norm_reference, qk_norm_rope_store_reference, silu_and_mul_reference, paged_attention_reference,
                 gemv_reference),
}
PDL_OPS = Ops(*(functools.partial(kernel, pdl=True) for kernel in dataclasses.astuple(BACKENDS["triton"])))
"""The Triton kernels, each launched with programmatic dependent launch."""
