"""Every stored video's perceptual hash in memory, for ingest's near-duplicate search.

The hashes are rows of one numpy uint64 array (a frame hash per column, masks for the frames
that could not be decoded and for uniform ones, and each video's duration), so a search is a
handful of vectorised operations over the rows of a like duration: ~0.4 ms among 100 000
videos of spread durations, ~20 ms if all are alike (~10 ms over all rows before durations
counted), where comparing them one by one in Python took ~350 ms after a ~90 ms SELECT of
every hash, all under the store's one lock (which reads then shared).

A search answers what `media.near_duplicate` with every stored video in the order they were
stored (the order of their rowids, which the old full-table SELECT went by) would: the smallest
distance of those that match, the earliest stored video among equals; then the next ones in
that order, for ingest's frame and audio checks. A removed row is overwritten by the last one,
so rows are not in that order: each carries its number.

Not thread-safe: its owner (the Ingestor) serialises every call.
"""

from __future__ import annotations

from typing import TypeVar

import numpy as np
import numpy.typing as npt

from vidcache.media import (
    DURATION_SLACK,
    DURATION_SLACK_S,
    MIN_COMPARED,
    UNIFORM_FRAMES,
    PerceptualHash,
)

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
        a shorter one counts as missing its last frames, as zip() in frame_distances does."""
        self._width = frames
        self._hashes: list[str] = []  # content hash of each row
        self._rows: dict[str, int] = {}
        self._bits = np.zeros((_INITIAL_ROWS, frames), dtype=np.uint64)
        self._present = np.zeros((_INITIAL_ROWS, frames), dtype=bool)
        self._uniform = np.zeros((_INITIAL_ROWS, frames), dtype=bool)
        self._durations = np.zeros(_INITIAL_ROWS, dtype=np.float64)
        self._order = np.zeros(_INITIAL_ROWS, dtype=np.int64)
        self._added = 0

    def __len__(self) -> int:
        return len(self._hashes)

    def add(self, content_hash: str, phash: PerceptualHash, duration_s: float) -> None:
        """Index a video stored after every one indexed so far."""
        row = len(self._hashes)
        if row == len(self._order):
            self._bits = _grown(self._bits)
            self._present = _grown(self._present)
            self._uniform = _grown(self._uniform)
            self._durations = _grown(self._durations)
            self._order = _grown(self._order)
        self._bits[row], self._present[row], self._uniform[row] = self._encode(phash)
        self._durations[row] = duration_s
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
            self._uniform[row], self._durations[row] = self._uniform[last], self._durations[last]
            self._order[row] = self._order[last]
            self._hashes[row] = moved
            self._rows[moved] = row

    def matches(self, phash: PerceptualHash, duration_s: float, threshold: int,
                limit: int) -> list[tuple[str, int]]:
        """(hash, distance) of the `limit` nearest indexed videos that near_duplicate matches,
        nearest first, the earliest stored first among equals: the first is the one a search
        one by one keeps; ingest goes on to the next where its frame or audio check tells the
        first apart."""
        count = len(self._hashes)
        bits, present, uniform = self._encode(phash)
        if count == 0 or present.sum() < MIN_COMPARED:
            return []
        # media.durations_alike first: it leaves few rows to compare bit by bit
        durations = self._durations[:count]
        rows = np.flatnonzero(np.abs(durations - duration_s) <= np.maximum(
            DURATION_SLACK_S, DURATION_SLACK * np.maximum(durations, duration_s)))
        compared = self._present[rows] & present & ~(self._uniform[rows] & uniform)
        pairs = compared.sum(axis=1)
        differing = np.where(compared, _popcount(self._bits[rows] ^ bits), np.uint64(0))
        total = differing.sum(axis=1, dtype=np.int64)
        # near_duplicate's round(total / pairs) in integers: halves go to the even neighbour
        quotient, remainder = np.divmod(total, np.maximum(pairs, 1))
        twice = 2 * remainder
        distance = quotient + ((twice > pairs) | ((twice == pairs) & (quotient % 2 == 1)))
        matching = ((pairs >= MIN_COMPARED) & (distance <= threshold)
                    & (differing.max(axis=1, initial=0) <= 2 * threshold))
        found = rows[matching]
        nearest = np.lexsort((self._order[found], distance[matching]))[:limit]
        return [(self._hashes[row], int(d))
                for row, d in zip(found[nearest], distance[matching][nearest], strict=True)]

    def _encode(self, phash: PerceptualHash) -> tuple[npt.NDArray[np.uint64],
                                                      npt.NDArray[np.bool_],
                                                      npt.NDArray[np.bool_]]:
        frames = list(phash[: self._width])
        frames += [None] * (self._width - len(frames))
        bits = np.array([0 if h is None else h for h in frames], dtype=np.uint64)
        present = np.array([h is not None for h in frames], dtype=bool)
        uniform = np.array([h in UNIFORM_FRAMES for h in frames], dtype=bool)
        return bits, present, uniform


def _grown(array: npt.NDArray[_Scalar]) -> npt.NDArray[_Scalar]:
    bigger = np.zeros((2 * len(array), *array.shape[1:]), dtype=array.dtype)
    bigger[: len(array)] = array
    return bigger
