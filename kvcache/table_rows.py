"""BlockTableRows: every live block table also kept as a zero-padded row of one int32 array."""
from __future__ import annotations

import numpy as np


class BlockTableRows:
    """A step's padded block tables become one gather of rows written as the tables grew,
    instead of a conversion of every block id of every sequence at every step (at 256
    sequences of ~38 blocks that was ~0.5 ms of each step)."""

    def __init__(self) -> None:
        self._array = np.zeros((0, 1), dtype=np.int32)
        self._lengths = np.zeros(0, dtype=np.int64)
        self._free: list[int] = []

    def add(self, block_ids: list[int]) -> int:
        """A row holding ``block_ids``; returns its index."""
        if not self._free:
            self._grow_rows()
        row = self._free.pop()
        self.extend(row, block_ids)
        return row

    def extend(self, row: int, block_ids: list[int]) -> None:
        """The row's table grew (block tables only grow): write the ids past its old length."""
        start, end = int(self._lengths[row]), len(block_ids)
        if end > self._array.shape[1]:
            self._widen(end)
        self._array[row, start:end] = block_ids[start:]
        self._lengths[row] = end

    def remove(self, row: int) -> None:
        self._array[row, :self._lengths[row]] = 0  # a row is zero past its table
        self._lengths[row] = 0
        self._free.append(row)

    def gather(self, rows: list[int]) -> np.ndarray:
        """The rows' tables, zero-padded to the longest of them: int32 [len(rows), width>=1]."""
        index = np.array(rows, dtype=np.int64)
        width = max(int(self._lengths[index].max(initial=0)), 1)
        return self._array[index, :width]  # a copy: later writes do not reach it

    def _grow_rows(self) -> None:
        old = len(self._lengths)
        new = max(2 * old, 16)
        self._array = np.concatenate(
            [self._array, np.zeros((new - old, self._array.shape[1]), dtype=np.int32)])
        self._lengths = np.concatenate([self._lengths, np.zeros(new - old, dtype=np.int64)])
        self._free.extend(range(new - 1, old - 1, -1))  # the lowest row is taken first

    def _widen(self, width: int) -> None:
        wider = np.zeros((len(self._lengths), max(width, 2 * self._array.shape[1])),
                         dtype=np.int32)
        wider[:, :self._array.shape[1]] = self._array
        self._array = wider
