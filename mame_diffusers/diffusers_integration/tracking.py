"""Per-forward state of a patched UNet: each ``Transformer2DModel``'s token grid, whether
the call merges, the plans a level shares and the deep stacks' merges.

Forward pre-hooks record what the processors cannot see (the latent size, each
transformer's exact grid). Everything a forward finds lives in a :class:`ForwardState`
that the forward's own thread keeps (:class:`~mame_diffusers.per_thread.PerThread`): threads
sharing one patched UNet never see each other's grids or plans.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from ..merging import MergePlan
from ..per_thread import PerThread

if TYPE_CHECKING:
    from ..merging.kernels import SlotPlan

__all__ = ["ForwardState", "GridTracker", "StackState", "TransformerRecord", "nearest_power_of_two"]


def nearest_power_of_two(value: float) -> int:
    return 2 ** max(0, round(math.log2(max(value, 1.0))))


@dataclass
class StackState:
    """One deep stack's merge in one forward: the plan that merged its tokens (MaRe restores
    with it after the stack), the tokens entering the stack and what they merged into."""

    plan: MergePlan | SlotPlan
    input: torch.Tensor
    merged: torch.Tensor


@dataclass(eq=False)
class ForwardState:
    """What one UNet forward found: the latent size, whether it merges, the plans its levels
    share, and each ``Transformer2DModel``'s grid and stack merge (keyed by its record).

    Kept until the same thread's next forward (not cleared when the model moves on), so that
    blocks that gradient checkpointing recomputes in the backward pass find what their
    forward found.
    """

    latent_hw: tuple[int, int] | None = None
    #: Downsample factor of the first (highest-resolution) level with attention.
    top_downsample: int | None = None
    #: Whether this forward merges at all (``MaMeConfig.merges_call``).
    merging: bool = True
    #: Plans made during this forward, shared by the self-attentions of one level:
    #: ``(grid, ratio name) -> (the processor that made it, plan)``.
    level_plans: dict = field(default_factory=dict)
    grids: dict = field(default_factory=dict)
    stacks: dict = field(default_factory=dict)


@dataclass(eq=False)  # records are dictionary keys of the forward states: identity
class TransformerRecord:
    """One patched ``Transformer2DModel``: its token grid and, when its blocks run on merged
    tokens, its stack's merge, both in the current forward. ``on_forward`` is its forward
    pre-hook."""

    tracker: GridTracker = field(repr=False)

    @property
    def hw(self) -> tuple[int, int] | None:
        return self.tracker.current.grids.get(self)

    @property
    def stack(self) -> StackState | None:
        return self.tracker.current.stacks.get(self)

    @stack.setter
    def stack(self, value: StackState | None) -> None:
        self.tracker.current.stacks[self] = value

    def on_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.get("hidden_states")
        hw = None
        if isinstance(hidden, torch.Tensor) and hidden.ndim == 4:
            hw = (int(hidden.shape[-2]), int(hidden.shape[-1]))
        state = self.tracker.current
        state.grids[self] = hw
        state.stacks.pop(self, None)
        if state.top_downsample is None and hw is not None:
            state.top_downsample = self.tracker.downsample(hw)


@dataclass(eq=False)
class GridTracker:
    """Token grids seen during the forwards of one patched UNet (nothing here is global).

    A thread that ran no forward (autograd's device threads, which recompute checkpointed
    blocks during the backward pass) sees the latest forward's state.
    """

    #: One record per patched ``Transformer2DModel``.
    transformers: list = field(default_factory=list)
    _forward: PerThread = field(default_factory=lambda: PerThread(ForwardState()), repr=False)

    @property
    def current(self) -> ForwardState:
        return self._forward.get()

    def start_forward(self, latent: torch.Tensor | None, merging: bool) -> None:
        """A new UNet forward on ``latent`` (``(B, C, H, W)``) begins in this thread."""
        latent_hw = tuple(latent.shape[-2:]) if isinstance(latent, torch.Tensor) else None
        self._forward.set(ForwardState(latent_hw=latent_hw, merging=merging))

    def new_transformer(self) -> TransformerRecord:
        """A record for one more ``Transformer2DModel`` (its pre-hook: ``on_forward``)."""
        record = TransformerRecord(self)
        self.transformers.append(record)
        return record

    def downsample(self, hw: tuple[int, int]) -> int:
        latent_hw = self.current.latent_hw
        if latent_hw is None:
            return 1
        return nearest_power_of_two(latent_hw[0] / hw[0])

    def within(self, hw: tuple[int, int], max_downsample: int) -> bool:
        """Whether a grid lies at a level that ``max_downsample`` lets merge."""
        top = self.current.top_downsample or self.downsample(hw)
        return self.downsample(hw) <= top * max_downsample

    # Copies start with no forward recorded (the latest one's plans hold its tensors).
    def __getstate__(self) -> dict:
        return {"transformers": self.transformers}

    def __setstate__(self, state: dict) -> None:
        self.transformers = state["transformers"]
        self._forward = PerThread(ForwardState())
