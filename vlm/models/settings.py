"""Typed reads of a checkpoint's settings (config.json's vision_config, preprocessor_config.json).

Checkpoint JSON is input like any other: a value of the wrong type or range is one VlmError
naming the key, never a TypeError or ValueError from a conversion deep inside a family.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from PIL import Image

from vlm.errors import VlmError, shown


def _bad(key: str, value: Any, want: str) -> VlmError:
    return VlmError(f"bad model config: {key} must be {want}, got {shown(repr(value))}")


def whole(d: Mapping, key: str, default: int, low: int = 1) -> int:
    """d[key] (default when absent or null) as an int >= low."""
    v = d.get(key)
    if v is None:
        return default
    if isinstance(v, float) and v.is_integer():  # JSON writers may say 2.0
        v = int(v)
    if not isinstance(v, int) or isinstance(v, bool) or v < low:
        raise _bad(key, v, f"a whole number >= {low}")
    return v


def number(d: Mapping, key: str, default: float, positive: bool = True) -> float:
    """d[key] (default when absent or null) as a finite float, > 0 unless `positive` is False."""
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v) or (positive and v <= 0):
        raise _bad(key, v, "a finite number" + (" > 0" if positive else ""))
    return float(v)


def numbers(d: Mapping, key: str, default: tuple[float, ...], count: int, positive: bool = False
            ) -> tuple[float, ...]:
    """d[key] (default when absent or null) as `count` finite floats (each > 0 if `positive`)."""
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, list | tuple) or len(v) != count:
        raise _bad(key, v, f"a list of {count} numbers")
    return tuple(number({key: x}, key, 0.0, positive) for x in v)


def wholes(d: Mapping, key: str, default: tuple[int, ...], low: int = 0) -> tuple[int, ...]:
    """d[key] (default when absent or null) as ints >= low."""
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, list | tuple):
        raise _bad(key, v, f"a list of whole numbers >= {low}")
    return tuple(whole({key: x}, key, 0, low) for x in v)


def text(d: Mapping, key: str, default: str) -> str:
    """d[key] (default when absent or null) as a string."""
    v = d.get(key)
    if v is None:
        return default
    if not isinstance(v, str):
        raise _bad(key, v, "a string")
    return v


def resample_filter(d: Mapping, default: int) -> int:
    """d["resample"] (default when absent or null) as one of Pillow's resampling filters."""
    v = whole(d, "resample", int(default), low=0)
    if v not in {int(f) for f in Image.Resampling}:
        raise _bad("resample", v, "a Pillow resampling filter (0-5)")
    return v


def section(d: Mapping, key: str) -> Mapping:
    """d[key] as a mapping ({} when absent or null)."""
    v = d.get(key)
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise _bad(key, v, "an object")
    return v
