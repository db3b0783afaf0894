"""Host values to the device in one copy that does not block the host."""
from __future__ import annotations

import torch


def host_to_device(device: torch.device, values: list, dtype: torch.dtype) -> torch.Tensor:
    """One host-to-device copy (from pinned memory on CUDA, so it does not block the host)."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host
