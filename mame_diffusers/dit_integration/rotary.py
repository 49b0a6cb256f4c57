"""Rotary position tables of merged tokens.

A merged token gets the size-weighted mean of its members' ``cos`` and ``sin`` tables (the
same plan as the tokens). Its rotated query is then ``mean(R_i) q``, close to
``mean(R_i q_i)``, what merging the rotated queries of its members would give, since merged
members have similar ``q_i``. Measured on a Flux attention at full width (docs/dits.md, "Rotary
positions"): as faithful as rotating every token's query and key before merging them (which
costs the full-length projections), and more faithful than rescaling the means to rotations.
"""

from __future__ import annotations

import torch

from .grids import GridPlan

__all__ = ["NORMALIZE", "merge_rotary"]

#: Rescale merged (cos, sin) pairs to unit length (a rotation by the members' mean angle).
#: Off: measured less faithful than the plain means (docs/dits.md); kept for that study.
NORMALIZE = False


def merge_rotary(
    layout: str, plan: GridPlan, tables: tuple[torch.Tensor, torch.Tensor], batch: int, text_tokens: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rotary tables of the merged sequence, one per sample.

    ``layout`` is the block's (:class:`~.families.BlockKind`): ``"joint"`` takes Flux's
    ``(text + image, D)`` tables (text first) and gives ``(B, text + M, D)``; ``"video"`` takes
    Wan's ``(1, image, 1, D)`` tables and gives ``(B, M, 1, D)``.
    """
    cos, sin = tables
    if layout == "joint":
        text_cos, image_cos = cos.split([text_tokens, cos.shape[0] - text_tokens])
        text_sin, image_sin = sin.split([text_tokens, sin.shape[0] - text_tokens])
        merged_cos, merged_sin = _merged_pair(plan, image_cos, image_sin, batch)
        return (
            torch.cat([text_cos.expand(batch, -1, -1), merged_cos], dim=1),
            torch.cat([text_sin.expand(batch, -1, -1), merged_sin], dim=1),
        )
    if layout == "video":
        merged_cos, merged_sin = _merged_pair(plan, cos[:, :, 0], sin[:, :, 0], batch)
        return merged_cos[:, :, None], merged_sin[:, :, None]
    raise ValueError(f"unknown rotary layout {layout!r}")


def _merged_pair(
    plan: GridPlan, cos: torch.Tensor, sin: torch.Tensor, batch: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, D)`` or ``(1, N, D)`` tables -> ``(B, M, D)`` merged ones."""
    shape = (batch, cos.shape[-2], cos.shape[-1])
    # One merge for both tables: they share the plan.
    both = torch.cat([cos.expand(shape), sin.expand(shape)], dim=-1)
    merged_cos, merged_sin = plan.merge(both).chunk(2, dim=-1)
    if NORMALIZE:
        length = torch.hypot(merged_cos, merged_sin).clamp_min(torch.finfo(merged_cos.dtype).tiny)
        merged_cos, merged_sin = merged_cos / length, merged_sin / length
    return merged_cos, merged_sin
