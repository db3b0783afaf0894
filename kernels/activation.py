"""SiLU-and-mul of the MLP (``silu(gate) * up`` for ``x = [gate | up]``): a Triton kernel and its torch reference.

Rounded as torch does it in the model dtype: silu to the dtype, then the product to the dtype. One kernel instead of
two (and no strided read of the gate half).
"""
import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from relaykern.kernels.pdl import launch_options, wait_for_earlier_kernels

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, N: tl.constexpr, BLOCK: tl.constexpr, PDL: tl.constexpr):
    wait_for_earlier_kernels(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    dtype = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + N + offs, mask=mask, other=0.0).to(tl.float32)
    silu = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(out_ptr + row * N + offs, (silu * up).to(dtype), mask=mask)


def _check_input(x: torch.Tensor) -> None:
    if x.dim() != 2 or x.shape[1] % 2 or x.stride(1) != 1:
        raise ValueError(f"silu_and_mul needs x [T, 2N] with contiguous rows; got {tuple(x.shape)} {x.stride()}")


def silu_and_mul(x: torch.Tensor, pdl: bool = False) -> torch.Tensor:
    """x [T, 2N] = [gate | up] → [T, N]. ``pdl``: launched with programmatic dependent launch (kernels/pdl.py)."""
    _check_input(x)
    num_rows, n = x.shape[0], x.shape[1] // 2
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    if num_rows:
        block = min(BLOCK, triton.next_power_of_2(n))
        _silu_and_mul_kernel[(num_rows, triton.cdiv(n, block))](x, out, x.stride(0), N=n, BLOCK=block, PDL=pdl,
                                                                num_warps=4, **launch_options(pdl))
    return out


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    _check_input(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
