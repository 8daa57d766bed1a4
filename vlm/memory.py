"""Giving memory back: dropping file pages of memory-mapped weights once they are not needed.

Weights are read from file maps. Once a weight has been repacked by the kernels (or quantized
into a new array), its file pages are only a resident copy: dropping them brings the load peak
down to about the weights held. They are clean file pages, so anything still read faults back in.
Every place that releases pages goes through here.
"""

from __future__ import annotations

import contextlib
import mmap
from collections.abc import Iterable

import numpy as np


def mapping_of(array: np.ndarray):
    """The read-only file map under a view (an np.memmap opened "r", or np.frombuffer of an mmap
    opened ACCESS_READ), or None. Only such pages may be dropped: they fault back in from the file."""
    while isinstance(array, np.ndarray):
        if isinstance(array, np.memmap):
            return array._mmap if array.mode == "r" else None
        base = array.base
        if isinstance(base, memoryview):
            return base.obj if isinstance(base.obj, mmap.mmap) and base.readonly else None
        array = base
    return None


# Reading one page of a file map also maps its neighbours (Linux's fault-around; a whole large
# folio, up to 2 MiB, on recent kernels): releasing that much either side keeps pages of a
# neighbour released earlier from staying resident. A neighbour still to be read faults back in.
_FAULT_AROUND = 2 << 20


def release_pages(*arrays: np.ndarray | None) -> None:
    """Drop this process's resident pages under memory-mapped arrays and their fault-around
    neighbourhood (clean file pages: they fault back in if read again). Arrays not backed by a
    read-only file map are left alone."""
    for a in arrays:
        m = mapping_of(a) if isinstance(a, np.ndarray) else None
        if m is None or a.nbytes == 0:
            continue
        # the bytes the array spans (a strided view of interleaved blocks spans more than nbytes)
        ends = [(n - 1) * stride for n, stride in zip(a.shape, a.strides, strict=True)]
        at = a.ctypes.data - np.frombuffer(m, np.uint8).ctypes.data
        start, end = at + sum(e for e in ends if e < 0), at + sum(e for e in ends if e > 0) + a.itemsize
        lo = max(0, start - _FAULT_AROUND)
        lo -= lo % mmap.PAGESIZE
        hi = min(len(m), end + _FAULT_AROUND)
        with contextlib.suppress(OSError, ValueError):
            m.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


def release_mappings(mappings: Iterable[mmap.mmap]) -> None:
    """Drop every page this process has touched in whole file maps (after a model is loaded)."""
    for m in mappings:
        with contextlib.suppress(OSError, ValueError):
            m.madvise(mmap.MADV_DONTNEED)
