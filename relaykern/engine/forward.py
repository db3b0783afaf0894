"""A model's forward as the relay loop launches it: failures isolated to the requests that cause them, and what a
launched forward hands back (its results arrive through a readback, read when the loop needs them)."""
from __future__ import annotations

import dataclasses

import torch

from relaykern.engine.readback import Readback
from relaykern.engine.row import Row
from relaykern.engine.runner import ModelRunner
from relaykern.engine.scheduler import Scheduler
from relaykern.engine.sequence import Sequence


@dataclasses.dataclass
class Launched:
    """One model's forward of this step, launched; its results arrive through ``readback``."""

    seqs: list[Sequence]
    rows: list[Row]
    readback: Readback
    sampled: torch.Tensor
    """The sampled ids on the device: what an overlapped next forward feeds its rows."""
    detected: torch.Tensor | None = None
    """The SLM's: sampled ids, detection events and automaton states on the device (what ``readback`` copies)."""
    fed: int = 0
    """Launched before the forward before it was read back (overlapped), its first ``fed`` rows fed on the device
    the tokens that forward samples."""


def run_forward(runner: ModelRunner, scheduler: Scheduler, seqs: list[Sequence], rows: list[Row],
                background: bool = False) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """Runs a forward (``background``: as ``ModelRunner.execute`` says): (sampled ids, log-probs) on the device. If
    it fails (a broken logits processor, say), each row is retried alone so that only the requests that fail are
    finished with ``finish_reason="error"`` (their blocks freed, and dropped from ``seqs`` and ``rows`` in place);
    rewriting a row's KV is idempotent. Log-probs: ``None`` if no row asked for them. None if no row ran."""
    try:
        return runner.execute(rows, background=background)
    except Exception as err:  # noqa: BLE001 - reported on the affected requests; the engine goes on
        if len(rows) == 1:
            scheduler.release(seqs[0], keep_cached=False)
            seqs[0].finish("error", f"{type(err).__name__}: {err}")
            return None
        results = [run_forward(runner, scheduler, [seq], [row], background) for seq, row in zip(seqs, rows)]
    kept = [i for i, result in enumerate(results) if result is not None]
    seqs[:] = [seqs[i] for i in kept]
    rows[:] = [rows[i] for i in kept]
    if not kept:
        return None
    tokens = torch.cat([results[i][0] for i in kept])
    logprobs = [results[i][1] for i in kept]
    if all(lp is None for lp in logprobs):
        return tokens, None
    return tokens, torch.cat([torch.zeros_like(tokens[:1], dtype=torch.float32) if lp is None else lp
                              for lp in logprobs])
