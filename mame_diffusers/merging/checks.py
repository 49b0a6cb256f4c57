"""Checks of the operator's two settings: ``ratio`` (the fraction of tokens removed) and
``block`` (the side of the blocks that slots are chosen in; ``None``: the whole grid)."""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = ["check_block", "check_ratio", "is_number"]


def is_number(value: Any) -> bool:
    """A real number (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def check_ratio(ratio: Any, name: str = "ratio") -> float:
    """``ratio`` as a float in ``[0, 1)``, else ``ValueError`` saying what is allowed."""
    if not is_number(ratio) or not math.isfinite(ratio):
        raise ValueError(f"{name} must be a number in [0, 1), got {ratio!r}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"{name} is the fraction of tokens removed and must lie in [0, 1), got {ratio}")
    return float(ratio)


def check_block(block: Any) -> int | None:
    """``block``: a positive int, or ``None`` (one block of the whole grid)."""
    if block is not None and (isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1):
        raise ValueError(f"block must be a positive int or None (the whole grid as one block), got {block!r}")
    return None if block is None else int(block)
