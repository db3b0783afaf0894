"""When a token ends a request: the stop rule that the engine and the reference relay both apply."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

from relaykern.config import SamplingParams


@dataclass(frozen=True)
class StopRule:
    """One model's ``SamplingParams`` as a stop rule, built once per request: a token ends the request if it is a
    stop id (EOS unless ``ignore_eos``, or one of ``stop_token_ids``) or a ``stop`` string ends inside it (matched
    on the response's bytes), once the response holds ``min_tokens``."""

    ids: frozenset[int]
    strings: tuple[bytes, ...]
    min_tokens: int

    @classmethod
    def of(cls, params: SamplingParams, eos: Iterable[int]) -> StopRule:
        """The rule of ``params`` for a model whose EOS ids are ``eos``."""
        return cls(frozenset(params.stop_ids(eos)), tuple(s.encode() for s in params.stop or ()), params.min_tokens)

    def ends(self, token: int, text: bytes | bytearray, token_start: int, response_len: int) -> bool:
        """Whether ``token`` ends the request: the response's ``response_len``-th token, whose bytes start at
        ``token_start`` of the response's bytes ``text`` (those bytes included)."""
        if response_len < self.min_tokens:
            return False
        # A stop string counts once it ends inside this token: search from where such a match could begin.
        return token in self.ids or any(text.find(s, max(0, token_start - len(s) + 1)) >= 0 for s in self.strings)
