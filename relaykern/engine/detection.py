"""Fused command detection for the engine: one table lookup per SLM row on the device, one small readback.

The table (kernels/detect.py) lifts relaykern/protocol.py's byte automaton to tokens. The host keeps each
sequence's automaton state between steps (it changes only here), sends the batch's states with the step, and reads
back sampled ids, events and new states in a single transfer. The rows of an overlapped step
(``RelayConfig.overlap_steps``) carried on from the step before, launched before the host has read it, take the
states that step left on the device instead.
"""
from __future__ import annotations

import torch

from relaykern.config import RelayConfig
from relaykern.engine.transfer import host_to_device
from relaykern.engine.sequence import Sequence
from relaykern.kernels.detect import build_detection_table, detect_commands, detect_commands_reference
from relaykern.protocol import EVENT_CALL

DetectedRow = tuple[int, int, int, int, int]
"""(token, event, n, start_offset, event_end) of one row."""


class Detector:
    def __init__(self, token_bytes: list[bytes], device: torch.device, backend: str) -> None:
        self.table = build_detection_table(token_bytes, device)
        self.device = device
        self.kernel = detect_commands if backend == "triton" else detect_commands_reference
        self.call_states = set(torch.nonzero((self.table.event == EVENT_CALL).any(dim=1)).flatten().tolist())
        """Automaton states from which some token completes a command (for Qwen3, after ``</call``)."""

    def may_call(self, seq: Sequence, relay: RelayConfig) -> bool:
        """Whether the SLM's next token may complete a command that sends the request to the LLM or ends it (most
        likely, once the command's text has come this far): a row fed that token would be dropped. Not a command
        of N = 0, or one left as text (no LLM, or ``max_calls`` reached with ``after_max_calls="continue"``)."""
        return seq.scan_state in self.call_states and seq.scan_n > 0 and not seq.command_stays_text(relay)

    def launch(self, tokens: torch.Tensor, seqs: list[Sequence], fed_states: torch.Tensor | None = None
               ) -> torch.Tensor:
        """Runs detection on the sampled ``tokens`` (no host sync); returns the [7, rows] tensor to read back.
        ``fed_states``: the automaton states (rows 5 and 6 of that tensor, of the step before) of the first rows,
        not on the host yet; the other rows' come from the host."""
        from_host = seqs[0 if fed_states is None else fed_states.shape[1]:]
        states = host_to_device(self.device, [[s.scan_state for s in from_host], [s.scan_n for s in from_host]],
                                torch.int64)
        if fed_states is not None:
            states = torch.cat([fed_states, states], dim=1)
        state, n = states[0].to(torch.int32), states[1].clone()
        result = self.kernel(tokens, state, n, self.table)
        return torch.stack([tokens, result.event.long(), result.n, result.start_offset.long(),
                            result.event_end.long(), state.long(), n])

    @staticmethod
    def unpack(packed: list[list[int]], seqs: list[Sequence | None]) -> list[DetectedRow]:
        """The read-back ``launch`` tensor, per row; stores each sequence's new automaton state (None: a row whose
        results are dropped)."""
        rows = []
        for i, seq in enumerate(seqs):
            if seq is not None:
                seq.scan_state, seq.scan_n = packed[5][i], packed[6][i]
            rows.append((packed[0][i], packed[1][i], packed[2][i], packed[3][i], packed[4][i]))
        return rows
