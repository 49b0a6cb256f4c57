"""The image tokens' grid and the plan over it: :class:`TokenGrid` and :class:`GridPlan`.

A DiT's image tokens lie row-major on a ``frames x height x width`` grid (``frames == 1`` for
images). The operator plans on 2-D grids, so a video is cut into groups of at most
:data:`MAX_FRAMES_PER_GROUP` consecutive frames (as even as can be), each group laid out as
one 2-D grid whose rows interleave its frames (row ``h * t + f``): a 16 x 16 block of the
operator then spans ``16 / t`` rows of ``t`` neighbouring frames, and a token can merge with
the same place in other frames (a still background, or content that moved a little) as well
as with its spatial neighbours. The groups are folded into the batch; when the frames do not
split evenly, the last group is one frame shorter. Every step is a reshape, a permute, a split
or a concatenation: no index op.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..merging import MergePlan, proportional_attention_bias

__all__ = ["MAX_FRAMES_PER_GROUP", "GridPlan", "TokenGrid"]

#: Most frames that merge together in video (space-time merging). Measured on Wan 2.1 widths
#: with panning photo videos (docs/dits.md, "Video"): the more frames a group held, the more
#: faithful, from each frame alone (the error 1.6-2.8x higher) to all 9 latent frames of a
#: 33-frame video, the most measured; longer videos split into groups of at most 9.
MAX_FRAMES_PER_GROUP = 9


@dataclass(frozen=True)
class TokenGrid:
    """Where a model's image tokens lie: ``frames x height x width``, row-major."""

    frames: int
    height: int
    width: int

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width

    def groups(self, max_frames: int | None = None) -> tuple[tuple[int, int], ...]:
        """``(count, frames)`` per kind of frame group: ``count`` groups of ``frames`` frames,
        at most ``max_frames`` (default :data:`MAX_FRAMES_PER_GROUP`) frames each, split as
        evenly as the frame count allows (21 frames, at most 9: 3 groups of 7)."""
        cap = max(1, min(max_frames or MAX_FRAMES_PER_GROUP, self.frames))
        count = -(-self.frames // cap)
        size = -(-self.frames // count)
        full = self.frames - (size - 1) * count  # groups of `size` frames; the others one shorter
        return tuple(g for g in ((full, size), (count - full, size - 1)) if g[0] > 0)


class GridPlan:
    """MaMe and MaRe for the image tokens of one :class:`TokenGrid`: one operator plan per
    kind of frame group (images: one plan), applied to ``(B, N, C)`` tokens in the model's
    order and giving ``(B, M, C)`` merged tokens."""

    def __init__(self, grid: TokenGrid, plans: list[MergePlan], groups: tuple[tuple[int, int], ...]) -> None:
        self.grid = grid
        self.plans = plans
        self.groups = groups

    @classmethod
    def plan(
        cls,
        settings,
        tokens: torch.Tensor,
        grid: TokenGrid,
        *,
        features: torch.Tensor | None = None,
        ratio_name: str = "ratio",
        max_frames: int | None = None,
    ) -> tuple["GridPlan", torch.Tensor]:
        """Plan how ``tokens`` (``(B, N, C)`` on ``grid``) merge, with the operator ``settings``
        (an :class:`~mame_diffusers.merging.OperatorSettings`); returns the plan and the merged
        tokens.

        ``features`` (``(B, N, C')``, default the tokens) are what the plan compares, and what
        its restore is fitted to rebuild; the tokens are merged with the plan.
        """
        groups = grid.groups(max_frames)
        planned = _to_groups(tokens if features is None else features, grid, groups)
        plans = []
        for piece, (_, frames) in zip(planned, groups):
            plans.append(settings.plan_on(piece, settings.layout((frames * grid.height, grid.width), ratio_name)))
        self = cls(grid, plans, groups)
        if features is None:  # merge the planned tensors themselves: their blocks are at hand
            return self, self._join([plan.merge(p) for plan, p in zip(plans, planned)], tokens.shape[0])
        return self, self.merge(tokens)

    @property
    def num_merged(self) -> int:
        return sum(count * plan.num_merged for plan, (count, _) in zip(self.plans, self.groups))

    def merge(self, tokens: torch.Tensor) -> torch.Tensor:
        """MaMe: ``(B, N, C)`` -> ``(B, M, C)``, the size-weighted mean of each slot."""
        pieces = _to_groups(tokens, self.grid, self.groups)
        return self._join([plan.merge(p) for plan, p in zip(self.plans, pieces)], tokens.shape[0])

    def restore(self, merged: torch.Tensor) -> torch.Tensor:
        """MaRe: ``(B, M, C)`` -> ``(B, N, C)``, each token the fitted affine combination of its
        slots."""
        batch = merged.shape[0]
        pieces = self._split(merged)
        return _from_groups([plan.restore(p) for plan, p in zip(self.plans, pieces)], self.grid, self.groups, batch)

    def sizes(self) -> torch.Tensor:
        """``(B, M)``: how many image tokens each merged token stands for."""
        return self._join([plan.sizes[..., None] for plan in self.plans], None)[..., 0]

    def key_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """``(B, M)`` proportional-attention bias of the merged tokens: ``log(size)``."""
        return proportional_attention_bias(self.sizes(), dtype)

    def _join(self, merged: list[torch.Tensor], batch: int | None) -> torch.Tensor:
        # Group pieces are (B * count, M_g, C): back to (B, count * M_g, C), then one sequence.
        parts = []
        for piece, (count, _) in zip(merged, self.groups):
            parts.append(piece.reshape(-1, count * piece.shape[1], piece.shape[2]))
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)

    def _split(self, merged: torch.Tensor) -> list[torch.Tensor]:
        lengths = [count * plan.num_merged for plan, (count, _) in zip(self.plans, self.groups)]
        parts = [merged] if len(lengths) == 1 else list(merged.split(lengths, dim=1))
        return [p.reshape(-1, plan.num_merged, p.shape[-1]) for p, plan in zip(parts, self.plans)]


def _to_groups(tokens: torch.Tensor, grid: TokenGrid, groups) -> list[torch.Tensor]:
    """``(B, F*H*W, C)`` -> per kind of group, ``(B * count, H * t * W, C)`` with each group's
    frames interleaved row by row."""
    batch, _, channels = tokens.shape
    frames = tokens.reshape(batch, grid.frames, grid.height, grid.width, channels)
    sizes = [count * t for count, t in groups]
    pieces = [frames] if len(sizes) == 1 else list(frames.split(sizes, dim=1))
    out = []
    for piece, (count, t) in zip(pieces, groups):
        if t == 1:  # one frame per group: already row-major
            out.append(piece.reshape(batch * count, grid.height * grid.width, channels))
            continue
        piece = piece.reshape(batch, count, t, grid.height, grid.width, channels).permute(0, 1, 3, 2, 4, 5)
        out.append(piece.reshape(batch * count, grid.height * t * grid.width, channels))
    return out


def _from_groups(pieces: list[torch.Tensor], grid: TokenGrid, groups, batch: int) -> torch.Tensor:
    """Inverse of :func:`_to_groups`."""
    channels = pieces[0].shape[-1]
    frames = []
    for piece, (count, t) in zip(pieces, groups):
        piece = piece.reshape(batch, count, grid.height, t, grid.width, channels)
        if t > 1:
            piece = piece.permute(0, 1, 3, 2, 4, 5)
        frames.append(piece.reshape(batch, count * t * grid.height * grid.width, channels))
    return frames[0] if len(frames) == 1 else torch.cat(frames, dim=1)
