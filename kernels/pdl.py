"""Programmatic dependent launch (PDL, Hopper and later): the kernels of a batch-1 decode step each move a few MB,
so the gap between two kernels (the next one's launch and ramp-up while the last programs of the one before drain)
costs about as much as a kernel's own work. Launched with PDL, a kernel's programs may start as soon as every
program of the kernel before it has signalled, and do what does not depend on that kernel (a GEMV loads its first
weight tile, which no step writes) before they wait for it to finish.

The contract, for every kernel given ``PDL=True``: each program calls ``wait_for_earlier_kernels`` before it reads
anything the kernel just before it may write and before it writes anything. The wait returns once the kernel before
has finished and its writes are visible; since that kernel waited in turn, every earlier one has finished too. The
signal to the next kernel comes right after the wait, so a kernel starts only once every kernel but the one just
before it has finished (what those wrote may be read before the wait: the decode attention reads its first keys so),
and the next kernel's programs only take the SM slots this one leaves free once all of its own have started. That
chain holds only if some program of every launch waits: a program may return before its wait, never all of them.

Off PDL (``PDL=False``, the default, and always under the Triton interpreter) the kernels are unchanged. The runner
serves with PDL only if a batch-1 step replays faster with it and gives the same logits (engine/startup.py).
"""
import os

import torch
import triton
import triton.language as tl

INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
"""Whether Triton runs the kernels in its interpreter (set before it was imported): no PDL there, and launches whose
programs the interpreter would run one by one take fewer, larger ones."""


@triton.jit
def wait_for_earlier_kernels(PDL: tl.constexpr):
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def launch_options(pdl: bool) -> dict:
    """The launch keyword that turns PDL on (none when off, so that the interpreter never sees it)."""
    return {"launch_pdl": True} if pdl else {}


def pdl_supported(device: torch.device) -> bool:
    """Whether kernels on ``device`` can be launched with PDL: a Hopper or later GPU, and a Triton that has it."""
    return (device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9
            and hasattr(tl.extra.cuda, "gdc_wait") and "launch_pdl" in _cuda_option_names())


def _cuda_option_names() -> set[str]:
    from triton.backends.nvidia.compiler import CUDAOptions
    return set(CUDAOptions.__dataclass_fields__)
