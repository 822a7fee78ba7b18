"""Task descriptions: blocks of store rows named by segment paths and row ranges.

A :class:`Block` is what a task receives instead of vectors: the segment files to open
(absolute paths, as the client sees them; every worker must see them at the same path), the
range of rows of each, and the rows of that range to leave out (deleted, or not eligible).
Its included rows are numbered ``first .. first + count - 1`` in the job's order (the live
rows, in the order of ``store.ids()``). A worker opens the files read-only by memory map;
nothing is ever written.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from embedcache.errors import ClusterError, StoreCorruptedError
from embedcache.store._format import View

__all__ = ["Block", "Picks", "Piece", "pick", "plan", "read", "read_picks"]


@dataclass(frozen=True)
class Piece:
    """Rows ``start .. stop - 1`` of one segment file, less ``drop`` (offsets from ``start``)."""

    path: str
    seg_rows: int  # rows the file holds (its shape)
    first_row: int  # store row number of the file's first row
    start: int
    stop: int
    drop: np.ndarray  # sorted int64 offsets in [0, stop - start)

    @property
    def count(self) -> int:
        return self.stop - self.start - len(self.drop)

    def rows(self) -> np.ndarray:
        """Store row numbers of the included rows."""
        r = np.arange(self.start, self.stop, dtype=np.int64)
        if len(self.drop):
            r = np.delete(r, self.drop)
        return r + self.first_row


@dataclass(frozen=True)
class Block:
    """Included rows ``first .. first + count - 1`` of a job, as pieces of segment files."""

    pieces: tuple[Piece, ...]
    dtype: str
    dim: int
    first: int
    count: int

    def rows(self) -> np.ndarray:
        """Store row numbers of the included rows, in order."""
        if not self.pieces:
            return np.empty(0, np.int64)
        return np.concatenate([p.rows() for p in self.pieces])

    @property
    def nbytes(self) -> int:
        """Bytes a task reads to load the block (whole ranges, dropped rows included)."""
        itemsize = np.dtype(self.dtype).itemsize
        return sum((p.stop - p.start) * self.dim * itemsize for p in self.pieces)


def plan(view: View, rows_per_block: int, include: Callable | None = None) -> list[Block]:
    """The included rows of ``view`` in blocks of ``rows_per_block`` (the last one shorter).

    include: ``include(segment) -> bool mask or None`` (None: every row); default: the live
    rows. Segment paths are made absolute without resolving links, so a store reached through
    a link (a mount point) is named the same way on every machine.
    """
    include = include or view.live_mask
    dim = view.dim or 0
    dtype = view.settings["dtype"]
    blocks: list[Block] = []
    pieces: list[Piece] = []
    first = filled = 0
    for s in view.segments:
        mask = include(s)
        offsets = None if mask is None else np.flatnonzero(mask)
        total = s.rows if offsets is None else len(offsets)
        taken = 0  # included rows of s already placed
        while taken < total:
            n = min(rows_per_block - filled, total - taken)
            if offsets is None:
                start, stop, drop = taken, taken + n, np.empty(0, np.int64)
            else:
                inc = offsets[taken : taken + n]
                start, stop = int(inc[0]), int(inc[-1]) + 1
                keep = np.zeros(stop - start, bool)
                keep[inc - start] = True
                drop = np.flatnonzero(~keep).astype(np.int64)
            pieces.append(Piece(os.path.abspath(s.path), s.rows, s.first_row, start, stop, drop))
            taken += n
            filled += n
            if filled == rows_per_block:
                blocks.append(Block(tuple(pieces), dtype, dim, first, filled))
                first += filled
                pieces, filled = [], 0
    if filled:
        blocks.append(Block(tuple(pieces), dtype, dim, first, filled))
    return blocks


def where() -> str:
    """This process, as an error message names it: the Dask worker's address and host."""
    try:
        from distributed import get_worker

        return f"worker {get_worker().address} (host {socket.gethostname()})"
    except (ImportError, ValueError):
        return f"process {os.getpid()} (host {socket.gethostname()})"


def _open(path: str, seg_rows: int, dim: int, dt: np.dtype) -> np.ndarray:
    """The segment file at ``path`` mapped read-only, or a clear error naming this worker."""
    expected = seg_rows * dim * dt.itemsize
    try:
        size = os.stat(path).st_size
        if size != expected:
            raise StoreCorruptedError(
                f"{path}: segment file is {size} bytes on {where()}, the store records {expected}"
            )
        return np.memmap(path, dtype=dt, mode="r", shape=(seg_rows, dim))
    except OSError as exc:
        raise ClusterError(
            f"{where()} cannot read {path}: {exc.strerror or exc}; every worker must see the "
            "store at the same path (a shared filesystem such as NFS)"
        ) from None


def read(block: Block) -> np.ndarray:
    """The included rows of ``block`` as one C-contiguous (count, dim) array in the store's
    dtype, read from the segment files opened read-only by memory map."""
    dt = np.dtype(block.dtype).newbyteorder("<")
    out = np.empty((block.count, block.dim), dt)
    pos = 0
    for p in block.pieces:
        m = _open(p.path, p.seg_rows, block.dim, dt)
        part = m[p.start : p.stop]
        if len(p.drop):
            part = np.delete(part, p.drop, axis=0)
        out[pos : pos + len(part)] = part
        pos += len(part)
        del m
    return out


@dataclass(frozen=True)
class Picks:
    """Rows of a store picked one by one (the rows of a few cells): for each segment file,
    ``(path, rows it holds, sorted offsets of the rows to read)``, files in store order."""

    files: tuple[tuple[str, int, np.ndarray], ...]
    dtype: str
    dim: int

    @property
    def count(self) -> int:
        return sum(len(o) for _, _, o in self.files)


def pick(view: View, rows: np.ndarray) -> Picks:
    """The store rows ``rows`` (sorted, distinct) as :class:`Picks`."""
    segs = view.segments
    starts = np.array([s.first_row for s in segs], dtype=np.int64)
    which = np.searchsorted(starts, rows, side="right") - 1
    cut = np.flatnonzero(np.diff(which)) + 1
    files = []
    for part in np.split(np.arange(len(rows)), cut) if len(rows) else []:
        s = segs[int(which[part[0]])]
        files.append((os.path.abspath(s.path), s.rows, (rows[part] - s.first_row).astype(np.int64)))
    return Picks(tuple(files), view.settings["dtype"], view.dim or 0)


def read_picks(picks: Picks) -> np.ndarray:
    """The rows of ``picks`` in order, as one C-contiguous (count, dim) array in the store's dtype."""
    dt = np.dtype(picks.dtype).newbyteorder("<")
    out = np.empty((picks.count, picks.dim), dt)
    pos = 0
    for path, seg_rows, offsets in picks.files:
        m = _open(path, seg_rows, picks.dim, dt)
        out[pos : pos + len(offsets)] = m[offsets]
        pos += len(offsets)
        del m
    return out
