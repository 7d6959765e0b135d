"""Every stored video's perceptual hash in memory, for ingest's near-duplicate search.

The hashes are rows of one numpy uint64 array (a frame hash per column, a mask for the frames
that could not be decoded), so a search is a handful of vectorised operations over all rows:
~10 ms for 100 000 videos, where comparing them one by one in Python took ~350 ms after a
~90 ms SELECT of every hash, all under the store's one lock (which reads then shared).

A search answers what comparing `media.phash_distance` with every stored video in the order
they were stored (the order of their rowids, which the old full-table SELECT went by) would:
the smallest distance within the threshold, the earliest stored video among equals. A removed
row is overwritten by the last one, so rows are not in that order: each carries its number.

Not thread-safe: its owner (the Ingestor) serialises every call.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import numpy.typing as npt

from vidcache.media import PerceptualHash

_INITIAL_ROWS = 1024

_Scalar = TypeVar("_Scalar", bound=np.generic)

_M1 = np.uint64(0x5555555555555555)
_M2 = np.uint64(0x3333333333333333)
_M4 = np.uint64(0x0F0F0F0F0F0F0F0F)
_H01 = np.uint64(0x0101010101010101)


def _popcount(x: npt.NDArray[np.uint64]) -> npt.NDArray[np.uint64]:
    """Set bits of each element (SWAR; np.bitwise_count needs numpy 2, the floor is 1.26)."""
    x = x - ((x >> np.uint64(1)) & _M1)
    x = (x & _M2) + ((x >> np.uint64(2)) & _M2)
    x = (x + (x >> np.uint64(4))) & _M4
    return (x * _H01) >> np.uint64(56)


class PhashIndex:
    def __init__(self, frames: int) -> None:
        """An empty index of hashes of `frames` frames (media.FRAMES): a longer hash is cut,
        a shorter one counts as missing its last frames, as zip() in phash_distance does."""
        self._width = frames
        self._hashes: list[str] = []  # content hash of each row
        self._rows: dict[str, int] = {}
        self._bits = np.zeros((_INITIAL_ROWS, frames), dtype=np.uint64)
        self._present = np.zeros((_INITIAL_ROWS, frames), dtype=bool)
        self._order = np.zeros(_INITIAL_ROWS, dtype=np.int64)
        self._added = 0

    def __len__(self) -> int:
        return len(self._hashes)

    def add(self, content_hash: str, phash: PerceptualHash) -> None:
        """Index a video stored after every one indexed so far."""
        row = len(self._hashes)
        if row == len(self._order):
            self._bits = _grown(self._bits)
            self._present = _grown(self._present)
            self._order = _grown(self._order)
        self._bits[row], self._present[row] = self._encode(phash)
        self._order[row] = self._added
        self._added += 1
        self._hashes.append(content_hash)
        self._rows[content_hash] = row

    def remove(self, content_hash: str) -> None:
        row = self._rows.pop(content_hash)
        last = len(self._hashes) - 1
        moved = self._hashes.pop()
        if row != last:
            self._bits[row], self._present[row] = self._bits[last], self._present[last]
            self._order[row] = self._order[last]
            self._hashes[row] = moved
            self._rows[moved] = row

    def nearest(self, phash: PerceptualHash, threshold: int) -> tuple[str, int] | None:
        """(hash, distance) of the nearest indexed video if its distance is <= threshold."""
        count = len(self._hashes)
        bits, present = self._encode(phash)
        if count == 0 or not present.any():
            return None
        columns = np.flatnonzero(present)
        both = self._present[:count, columns]
        pairs = both.sum(axis=1)
        differing = _popcount(self._bits[:count, columns] ^ bits[columns])
        total = np.where(both, differing, 0).sum(axis=1, dtype=np.int64)
        # phash_distance's round(total / pairs) in integers: halves go to the even neighbour
        quotient, remainder = np.divmod(total, np.maximum(pairs, 1))
        twice = 2 * remainder
        distance = quotient + ((twice > pairs) | ((twice == pairs) & (quotient % 2 == 1)))
        distance[pairs == 0] = threshold + 1  # no frame in common: no distance at all
        best = int(distance.min())
        if best > threshold:
            return None
        tied = np.flatnonzero(distance == best)
        row = int(tied[np.argmin(self._order[tied])])
        return self._hashes[row], best

    def _encode(self, phash: PerceptualHash) -> tuple[npt.NDArray[np.uint64],
                                                      npt.NDArray[np.bool_]]:
        frames = list(phash[: self._width])
        frames += [None] * (self._width - len(frames))
        bits = np.array([0 if h is None else h for h in frames], dtype=np.uint64)
        present = np.array([h is not None for h in frames], dtype=bool)
        return bits, present


def _grown(array: npt.NDArray[_Scalar]) -> npt.NDArray[_Scalar]:
    bigger = np.zeros((2 * len(array), *array.shape[1:]), dtype=array.dtype)
    bigger[: len(array)] = array
    return bigger
