"""Native kernels (C, built by the package build) behind a small Python surface.

Until the C extension is built this module offers nothing (`prepare` returns None), and
every layer uses the numpy reference path.
"""

from __future__ import annotations

import numpy as np

AVAILABLE = False


def prepare(weight) -> object | None:
    """Repack `weight` into the kernel's layout; None when no kernel handles it."""
    return None


def linear(x: np.ndarray, packed: object) -> np.ndarray:
    raise RuntimeError("no native kernels")


def set_threads(n: int | None) -> None:
    """Threads used by the kernels (None: all cores)."""
