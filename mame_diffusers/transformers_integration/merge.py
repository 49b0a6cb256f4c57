"""One merge step on a vision token grid: :func:`mame_token_merge`, the similarity features, the record of a merge."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..merging import MergeLayout, MergePlan, merge_layout
from .config import VisionMaMeConfig


@dataclass
class TokenMerge:
    """The result of merging the patch tokens entering one layer.

    ``tokens`` (B, M, C) and ``sizes`` (B, M) (0 marks an empty slot) replace the patch
    tokens; ``grid`` is the grid they lie on (row-major), for the next merge; ``spread``
    maps a (B, M, C') tensor back to the (B, N, C') layout of the tokens that were merged,
    every token its slot's value (how membership maps are drawn).
    """

    tokens: torch.Tensor
    sizes: torch.Tensor
    grid: tuple[int, ...]
    spread: Callable[[torch.Tensor], torch.Tensor]


#: ``(patch tokens, grid, sizes or None, ratio, config) -> TokenMerge``, or ``None`` when
#: nothing merges. :func:`mame_token_merge` is MaMe's; the benchmarks plug in peers.
TokenMerger = Callable[[torch.Tensor, tuple, "torch.Tensor | None", float, VisionMaMeConfig], "TokenMerge | None"]


def mame_token_merge(
    patches: torch.Tensor,
    grid: tuple[int, ...],
    sizes: torch.Tensor | None,
    ratio: float,
    config: VisionMaMeConfig,
) -> TokenMerge | None:
    """MaMe on ``(B, N, C)`` patch tokens on a 2-D ``(H, W)`` or video ``(T, H, W)`` grid.

    Returns ``None`` when ``ratio`` is too small to remove a row or column of the grid.
    """
    # The 2-D grid the tokens merge on: the image grid, one frame's grid, or the space-time grid.
    if len(grid) == 2:
        hw = grid
    elif config.video_grid == "per_frame":
        hw = grid[1:]
    else:
        hw = (grid[1], grid[2] * grid[0])
    layout = merge_layout(hw, ratio, block=config.block)
    if not layout.merges:
        return None
    if len(grid) == 2:
        plan, merged = _merge_on_grid(patches, layout, sizes, config)
        return TokenMerge(merged, plan.sizes, plan.merged_hw, plan.spread)
    frames, height, width = grid
    batch, _, channels = patches.shape
    if config.video_grid == "per_frame":
        # Frames fold into the batch: each frame's H x W grid merges on its own.
        flat = patches.reshape(batch * frames, height * width, channels)
        flat_sizes = None if sizes is None else sizes.reshape(batch * frames, height * width)
        plan, merged = _merge_on_grid(flat, layout, flat_sizes, config)

        def spread_frames(tokens: torch.Tensor) -> torch.Tensor:
            spread = plan.spread(tokens.reshape(batch * frames, plan.num_merged, tokens.shape[-1]))
            return spread.reshape(batch, frames * height * width, tokens.shape[-1])

        merged = merged.reshape(batch, frames * plan.num_merged, channels)
        return TokenMerge(merged, plan.sizes.reshape(batch, -1), (frames, *plan.merged_hw), spread_frames)

    # Space-time: (t, h, w) order -> an H x (W*T) grid with time innermost; later merges see
    # only the merged 2-D grid. A permute, not an index op.
    def to_spacetime(tokens: torch.Tensor) -> torch.Tensor:
        tail = tokens.shape[2:]
        grid5 = tokens.reshape(batch, frames, height, width, *tail).movedim(1, 3)
        return grid5.reshape(batch, height * width * frames, *tail)

    def from_spacetime(tokens: torch.Tensor) -> torch.Tensor:
        tail = tokens.shape[2:]
        grid5 = tokens.reshape(batch, height, width, frames, *tail).movedim(3, 1)
        return grid5.reshape(batch, frames * height * width, *tail)

    spacetime_sizes = None if sizes is None else to_spacetime(sizes)
    plan, merged = _merge_on_grid(to_spacetime(patches), layout, spacetime_sizes, config)
    return TokenMerge(merged, plan.sizes, plan.merged_hw, lambda t: from_spacetime(plan.spread(t)))


def _merge_on_grid(
    tokens: torch.Tensor, layout: MergeLayout, sizes: torch.Tensor | None, config: VisionMaMeConfig
) -> tuple[MergePlan, torch.Tensor]:
    """Plan on the similarity features, merge the tokens at full width."""
    plan = config.plan_on(similarity_features(tokens, config.similarity_channels), layout, sizes)
    return plan, plan.merge(tokens)


def similarity_features(tokens: torch.Tensor, channels: int | None) -> torch.Tensor:
    """What tokens are compared on: ``channels`` sums of equal groups of adjacent channels.

    A fixed sparse projection, computed by a reshape and a sum. Like ToMe's head-averaged
    keys it keeps cosine similarity close while making the similarity products
    ``C / channels`` times cheaper. ``None``, or a count that does not divide the width,
    compares the tokens as they are.
    """
    width = tokens.shape[-1]
    if channels is None or channels >= width or width % channels:
        return tokens
    return tokens.reshape(*tokens.shape[:-1], channels, width // channels).sum(dim=-1)


@dataclass
class MergeRecord:
    """One merge of the last forward pass: which layer's input, onto which grid, with which
    sizes ``(B, M)`` (detached). ``spread`` is kept only while :func:`merge_membership` records."""

    layer: int
    grid: tuple[int, ...]
    sizes: torch.Tensor
    spread: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)


