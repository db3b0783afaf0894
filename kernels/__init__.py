"""Triton kernels of relaykern, each beside its plain-torch reference (shipped as ``relaykern.kernels``)."""
