"""RMSNorm with the residual add fused in: a Triton kernel (one program per row) and its plain-torch reference.

``rms_norm(x, weight, eps)`` is ``weight * (x / rms(x))``; with ``residual`` it first forms the new residual stream
``residual + x`` and normalizes that, returning both. The roundings are HF's: the sum is taken in the model dtype,
the norm in fp32, then cast to the model dtype before the weight multiplies it (in the model dtype). Unfused,
this is nine kernels per norm; a decode step at batch 1 has two per layer and spends more time launching than
computing them.
"""
import torch
import triton
import triton.language as tl

from relaykern.kernels.pdl import launch_options, wait_for_earlier_kernels


@triton.jit
def _rms_norm_kernel(x_ptr, residual_ptr, weight_ptr, out_ptr, residual_out_ptr, stride_x, stride_residual, eps,
                     N: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr, PDL: tl.constexpr):
    wait_for_earlier_kernels(PDL)
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < N
    dtype = out_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual + offs, mask=mask, other=0.0).to(tl.float32)
        summed = (x + residual).to(dtype)
        tl.store(residual_out_ptr + row * N + offs, summed, mask=mask)
        x = summed.to(tl.float32)
    inv_rms = tl.rsqrt(tl.sum(x * x, axis=0) / N + eps)
    normed = (x * inv_rms).to(dtype).to(tl.float32)
    weight = tl.load(weight_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * N + offs, (weight * normed).to(dtype), mask=mask)


def _check_inputs(x: torch.Tensor, weight: torch.Tensor, residual: torch.Tensor | None) -> None:
    if x.dim() != 2 or x.stride(1) != 1 or weight.shape != (x.shape[1],):
        raise ValueError(f"rms_norm needs x [T, N] with contiguous rows and weight [N]; got x {tuple(x.shape)} "
                         f"(strides {x.stride()}), weight {tuple(weight.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.stride(1) != 1 or residual.dtype != x.dtype):
        raise ValueError(f"residual {tuple(residual.shape)} {residual.dtype} must match x {tuple(x.shape)} {x.dtype}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             pdl: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """x [T, N] → normed [T, N]; with ``residual`` [T, N] → (normed(residual + x), residual + x). ``pdl``: launched
    with programmatic dependent launch (kernels/pdl.py)."""
    _check_inputs(x, weight, residual)
    num_rows, n = x.shape
    out = torch.empty((num_rows, n), dtype=x.dtype, device=x.device)
    residual_out = torch.empty_like(out) if residual is not None else out
    if num_rows:
        block = triton.next_power_of_2(n)
        _rms_norm_kernel[(num_rows,)](
            x, residual if residual is not None else x, weight, out, residual_out, x.stride(0),
            residual.stride(0) if residual is not None else 0, eps,
            N=n, BLOCK=block, HAS_RESIDUAL=residual is not None, PDL=pdl, num_warps=min(16, max(1, block // 256)),
            **launch_options(pdl),
        )
    return out if residual is None else (out, residual_out)


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
                       ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """HF's RMSNorm (and ``hidden = residual + hidden`` before it) over the last dim of any shape."""
    if residual is not None:
        residual = residual + x
        return rms_norm_reference(residual, weight, eps), residual
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return weight * h.to(x.dtype)
