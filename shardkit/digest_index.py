"""A compact set of 16-byte digests, each remembering the first record index that had it.

Planning keeps one per thing that must be unique across a whole source (paths, keys, image
bytes under --dedup). A Python set of strings costs 150+ bytes per record; this open-addressing
table costs 24 bytes a slot and stays at most two-thirds full, so planning a billion records
does not need a billion Python objects.
"""

from __future__ import annotations

import hashlib
from array import array

_EMPTY = -1
_FIRST_CAPACITY = 1 << 12


def digest_of(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def _halves(digest: bytes) -> tuple[int, int]:
    return int.from_bytes(digest[:8], "little", signed=True), int.from_bytes(digest[8:16], "little", signed=True)


class DigestIndex:
    def __init__(self) -> None:
        self._allocate(_FIRST_CAPACITY)
        self._count = 0

    def _allocate(self, capacity: int) -> None:
        # array.array, not numpy: indexing one element from Python is several times faster.
        self._high = array("q", bytes(8 * capacity))
        self._low = array("q", bytes(8 * capacity))
        self._first = array("q", [_EMPTY]) * capacity

    def __len__(self) -> int:
        return self._count

    @property
    def nbytes(self) -> int:
        """The memory the table holds."""
        return sum(a.itemsize * len(a) for a in (self._high, self._low, self._first))

    def first(self, digest: bytes) -> int | None:
        """The index recorded with ``digest``, or None."""
        found = self._first[self._find(*_halves(digest))]
        return None if found == _EMPTY else found

    def first_or_add(self, digest: bytes, index: int) -> int | None:
        """The index first recorded with ``digest``, or None after recording ``index`` (>= 0) with it."""
        high, low = _halves(digest)
        slot = self._find(high, low)
        earlier = self._first[slot]
        if earlier != _EMPTY:
            return earlier
        self._high[slot], self._low[slot], self._first[slot] = high, low, index
        self._count += 1
        if 3 * self._count > 2 * len(self._first):
            self._grow()
        return None

    def _find(self, high: int, low: int) -> int:
        """The slot holding the digest, or the empty slot where it belongs (linear probing)."""
        first, highs, lows = self._first, self._high, self._low
        mask = len(first) - 1
        slot = low & mask
        while first[slot] != _EMPTY and (highs[slot] != high or lows[slot] != low):
            slot = (slot + 1) & mask
        return slot

    def _grow(self) -> None:
        old = (self._high, self._low, self._first)
        self._allocate(2 * len(self._first))
        for high, low, first in zip(*old):
            if first == _EMPTY:
                continue
            slot = self._find(high, low)
            self._high[slot], self._low[slot], self._first[slot] = high, low, first
