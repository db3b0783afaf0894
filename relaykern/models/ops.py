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
from relaykern.kernels.attention import paged_rope_attention, paged_rope_attention_reference
from relaykern.kernels.gemv import gemv, gemv_reference
from relaykern.kernels.rms_norm import rms_norm, rms_norm_reference


@dataclass(frozen=True)
class Ops:
    rms_norm: Callable
    silu_and_mul: Callable
    rope_attention: Callable
    gemv: Callable


BACKENDS = {
    "triton": Ops(rms_norm, silu_and_mul, paged_rope_attention, gemv),
    "torch": Ops(rms_norm_reference, silu_and_mul_reference, paged_rope_attention_reference, gemv_reference),
}
PDL_OPS = Ops(*(functools.partial(kernel, pdl=True) for kernel in dataclasses.astuple(BACKENDS["triton"])))
"""The Triton kernels, each launched with programmatic dependent launch."""
