"""Per-forward state of a patched DiT, kept by each thread for itself.

The model's forward pre-hook records the image tokens' grid (read from the model's own
inputs) and whether the call merges; each merged block's pre-hook records its plan and the
tokens it merged, for its post-hook to restore. All of it lives in a :class:`ForwardState`
that the forward's thread keeps (:class:`~mame_diffusers.per_thread.PerThread`), never on the
shared model: threads sharing one patched model never see each other's grids or plans.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..per_thread import PerThread
from .grids import GridPlan, TokenGrid

__all__ = ["BlockMerge", "ForwardState", "ForwardTracker"]


@dataclass
class BlockMerge:
    """One block's merge in one forward: its plan, the image tokens entering it, what they
    merged into. The post-hook restores ``tokens + plan.restore(block(merged) - merged)``."""

    plan: GridPlan
    tokens: torch.Tensor
    merged: torch.Tensor


@dataclass(eq=False)
class ForwardState:
    """What one forward of the patched model found: its image grid, whether it merges, and the
    merges of the blocks running now (by block index)."""

    grid: TokenGrid | None = None
    merging: bool = False
    blocks: dict = field(default_factory=dict)


class ForwardTracker:
    """Each thread's :class:`ForwardState` for one patched model.

    A thread that ran no forward (autograd's threads recomputing checkpointed blocks in the
    backward pass) and a graph being traced see the latest state any thread set.
    """

    def __init__(self) -> None:
        self._forward = PerThread(ForwardState())

    @property
    def current(self) -> ForwardState:
        return self._forward.get()

    def start_forward(self, grid: TokenGrid | None, merging: bool) -> None:
        self._forward.set(ForwardState(grid=grid, merging=merging and grid is not None))

    def __getstate__(self) -> dict:  # copies start with no forward recorded
        return {}

    def __setstate__(self, state: dict) -> None:
        self._forward = PerThread(ForwardState())
