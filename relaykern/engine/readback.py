"""Device-to-host copies started when a forward is launched and waited for only when its results are needed.

The relay step launches the SLM's forward, starts its readback, then launches the LLM's forward before waiting:
the host handles the SLM's tokens while the GPU runs the LLM. The copies and their event go on the current
stream (the model's own, inside ``ModelRunner.scope``); a plain ``.cpu()`` would block the host at once.
"""
from __future__ import annotations

import torch


class Readback:
    def __init__(self, *tensors: torch.Tensor | None) -> None:
        self.host: list[torch.Tensor | None] = []
        self.event: torch.cuda.Event | None = None
        for tensor in tensors:
            if tensor is None or tensor.device.type != "cuda":
                self.host.append(tensor)
                continue
            pinned = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=True)
            pinned.copy_(tensor, non_blocking=True)
            self.host.append(pinned)
            if self.event is None:
                self.event = torch.cuda.Event()
            self.event.record(torch.cuda.current_stream(tensor.device))

    def ready(self) -> bool:
        """Whether ``wait`` would return at once: the device has run everything up to the copies."""
        return self.event is None or self.event.query()

    def wait(self) -> list[list | None]:
        """Each tensor as a (nested) list, ``None`` kept."""
        if self.event is not None:
            self.event.synchronize()
        return [None if tensor is None else tensor.tolist() for tensor in self.host]
