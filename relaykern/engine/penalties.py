"""Repetition, presence and frequency penalties on the device (vLLM's semantics), from counts kept per sequence.

Each sequence that asks for a penalty holds a slot in two pooled tensors of one model: a mask of its prompt's
tokens and the counts of its response's tokens, over that model's view of the request. A forward adds the tokens
its sampling rows feed, the one an overlapped row is fed on the device included, so a step costs a few small
kernels however long the request. A row that does not start where its slot's counts end (its first sampling
forward, after a prefix-cache hit, a recompute after preemption, or a chunk that did not sample) has its slot
rebuilt from the host's tokens first. Slots of sequences the block manager no longer holds are reused; the pool
grows by doubling, so a model whose requests ask for no penalty allocates nothing.
"""
from __future__ import annotations

from typing import Callable

import torch

from relaykern.engine.row import FED_ON_DEVICE, Row
from relaykern.engine.transfer import host_to_device


def penalize_logits(logits: torch.Tensor, prompt_mask: torch.Tensor, output_counts: torch.Tensor,
                    repetition: torch.Tensor, presence: torch.Tensor, frequency: torch.Tensor) -> torch.Tensor:
    """logits [R, V] fp32, prompt_mask [R, V] bool, output_counts [R, V] int, penalties [R] → penalized logits."""
    seen = output_counts > 0
    repeated = seen | prompt_mask
    penalty = repetition[:, None]
    logits = torch.where(repeated, torch.where(logits > 0, logits / penalty, logits * penalty), logits)
    return logits - frequency[:, None] * output_counts - presence[:, None] * seen


class Penalties:
    """One model's penalty state. ``holds(seq_id)``: whether the model's block manager still holds the sequence."""

    def __init__(self, vocab_size: int, device: torch.device, holds: Callable[[int], bool]) -> None:
        self.vocab_size, self.device, self.holds = vocab_size, device, holds
        self.prompt_mask = torch.zeros(0, vocab_size, dtype=torch.bool, device=device)
        self.output_counts = torch.zeros(0, vocab_size, dtype=torch.int32, device=device)
        self.slot_of: dict[int, int] = {}
        self.counted_upto: dict[int, int] = {}
        """Per sequence: the position its slot has counted the view up to."""
        self.free_slots: list[int] = []

    def apply(self, logits: torch.Tensor, rows: list[Row], fed_tokens: torch.Tensor | None) -> None:
        """Penalizes in place the logits of the rows that sample and ask for a penalty, after counting their
        tokens; ``fed_tokens`` as ``ModelRunner.execute`` takes it."""
        picked = [i for i, row in enumerate(rows) if row.samples and row.sampling.has_penalties]
        if not picked:
            return
        self._reuse_slots_of_finished()
        rebuilt, prompt_pairs, count_pairs, fed = [], ([], []), ([], []), ([], [])
        for i in picked:
            row = rows[i]
            slot = self._slot(row.seq_id)
            if self.counted_upto.get(row.seq_id) != row.start:
                rebuilt.append(slot)
                self._pairs(prompt_pairs, slot, set(row.context[:row.prompt_len]))
                self._pairs(count_pairs, slot, row.context[row.prompt_len:row.start])
            for position, token in enumerate(row.tokens, row.start):
                if token == FED_ON_DEVICE:
                    fed[0].append(i)
                    fed[1].append(slot)
                elif position >= row.prompt_len:
                    self._pairs(count_pairs, slot, [token])
            self.counted_upto[row.seq_id] = row.start + len(row.tokens)
        if rebuilt:
            self._rebuild(rebuilt, prompt_pairs)
        self._count(count_pairs, fed, fed_tokens)
        self._penalize(logits, rows, picked)

    def _pairs(self, pairs: tuple[list[int], list[int]], slot: int, tokens) -> None:
        """Adds (slot, token) pairs; ids past this model's vocabulary (another model's padding rows) are dropped."""
        kept = [t for t in tokens if 0 <= t < self.vocab_size]
        pairs[0].extend([slot] * len(kept))
        pairs[1].extend(kept)

    def _rebuild(self, slots: list[int], prompt_pairs: tuple[list[int], list[int]]) -> None:
        index = host_to_device(self.device, slots, torch.int64)
        self.prompt_mask[index] = False
        self.output_counts[index] = 0
        if prompt_pairs[0]:
            slot, token = host_to_device(self.device, list(prompt_pairs), torch.int64)
            self.prompt_mask[slot, token] = True

    def _count(self, pairs: tuple[list[int], list[int]], fed: tuple[list[int], list[int]],
               fed_tokens: torch.Tensor | None) -> None:
        if not pairs[0] and not fed[0]:
            return
        slot, token = host_to_device(self.device, list(pairs), torch.int64)
        if fed[0]:
            fed_rows, fed_slots = host_to_device(self.device, list(fed), torch.int64)
            slot, token = torch.cat([slot, fed_slots]), torch.cat([token, fed_tokens[fed_rows]])
        self.output_counts.index_put_((slot, token), torch.ones_like(slot, dtype=torch.int32), accumulate=True)

    def _penalize(self, logits: torch.Tensor, rows: list[Row], picked: list[int]) -> None:
        sampling = [rows[i].sampling for i in picked]
        floats = host_to_device(self.device, [[s.repetition_penalty for s in sampling],
                                              [s.presence_penalty for s in sampling],
                                              [s.frequency_penalty for s in sampling]], torch.float32)
        rows_index, slots = host_to_device(self.device, [picked, [self.slot_of[rows[i].seq_id] for i in picked]],
                                           torch.int64)
        logits[rows_index] = penalize_logits(logits[rows_index], self.prompt_mask[slots], self.output_counts[slots],
                                             *floats)

    def _slot(self, seq_id: int) -> int:
        slot = self.slot_of.get(seq_id)
        if slot is None:
            if not self.free_slots:
                self._grow()
            slot = self.slot_of[seq_id] = self.free_slots.pop()
        return slot

    def _grow(self) -> None:
        old = self.output_counts.shape[0]
        new = max(8, 2 * old)
        self.prompt_mask = torch.cat([self.prompt_mask, self.prompt_mask.new_zeros(new - old, self.vocab_size)])
        self.output_counts = torch.cat([self.output_counts,
                                        self.output_counts.new_zeros(new - old, self.vocab_size)])
        self.free_slots += range(new - 1, old - 1, -1)

    def _reuse_slots_of_finished(self) -> None:
        for seq_id in [s for s in self.slot_of if not self.holds(s)]:
            self.free_slots.append(self.slot_of.pop(seq_id))
            del self.counted_upto[seq_id]
