"""What a settings dataclass that carries the operator's options gets for free.

The UNet, DiT and vision configs each declare ``block`` (and their ratios) with their own
defaults; :class:`OperatorSettings` plans and lays out merges with them, correctly under
``torch.compile`` too.
"""

from __future__ import annotations

import torch

from .layout import MergeLayout, merge_layout
from .plan import MergePlan, plan_on_layout

__all__ = ["OperatorSettings"]


class OperatorSettings:
    """What a settings dataclass with a ``block`` field gets for free: layouts and plans with
    its options, correct under ``torch.compile`` too.

    Subclasses call :meth:`remember_layout_settings` once their fields are checked.
    """

    block: int | None

    def plan_on(self, tokens: torch.Tensor, layout: MergeLayout, sizes: torch.Tensor | None = None) -> MergePlan:
        """:func:`~mame_diffusers.merging.plan_on_layout`: the plan of ``tokens`` on ``layout``."""
        return plan_on_layout(tokens, layout, sizes)

    def remember_layout_settings(self, *ratio_names: str) -> None:
        """Write down, as text, what :meth:`layout` needs for each of ``ratio_names``."""
        keys = {name: f"{float(getattr(self, name))!r},{self.block!r}" for name in ratio_names}
        object.__setattr__(self, "_layout_settings", keys)

    def layout(self, hw: tuple[int, int], ratio_name: str) -> MergeLayout:
        """The merge layout of an ``hw`` grid at the ratio this config names ``ratio_name``.

        While ``torch.compile`` traces, it is computed outside the trace from the settings
        written down as text: dynamo turns a number that changed since the last compile (a
        new ratio applied to a compiled model) into a symbolic value, which the layout's
        integer arithmetic cannot take; text stays a constant.
        """
        if torch.compiler.is_compiling():
            return MergeLayout(*_constant_layout_fields(tuple(hw), self._layout_settings[ratio_name]))
        return merge_layout(hw, getattr(self, ratio_name), block=self.block)


@torch.compiler.assume_constant_result
def _constant_layout_fields(hw: tuple[int, int], settings: str) -> tuple[int, ...]:
    """:func:`merge_layout`'s fields for ``settings`` = ``"ratio,block"`` (reprs)."""
    ratio, block = settings.split(",")
    return merge_layout(hw, float(ratio), block=None if block == "None" else int(block)).init_fields()
