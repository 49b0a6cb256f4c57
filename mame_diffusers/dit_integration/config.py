"""Settings of MaMe on diffusion transformers: :class:`DiTMaMeConfig`, validated in one place."""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..defaults import DEFAULT_BLOCK
from ..merging import OperatorSettings, check_ratio, cuda_graph_recording

__all__ = ["DEFAULT_DIT_MIN_IMAGE_TOKENS", "DEFAULT_DIT_RATIO", "DiTMaMeConfig"]

#: Fraction of the image tokens each merged block drops. Chosen on the speed-error trade-off
#: of docs/dits.md ("Ratio"): at 0.5 every family passes its speed target with the transformer
#: output within a few percent of stock; 0.75 is faster with about twice the error.
DEFAULT_DIT_RATIO = 0.5

#: Per device type, when ``min_image_tokens`` is not given: calls whose batch holds fewer image
#: tokens (batch x image tokens after patching) run unmerged. Not measured on a GPU (none was
#: at hand): scaled from the UNet's measured 65,536 latent tokens at width 320 by the work per
#: token, which grows with the width squared (DiT widths 1152-3072: 12-90x more), so a
#: 1024 x 1024 image at batch 1 (4,096 tokens) merges. CPUs (and devices not listed) merge every
#: call: they are never bound by kernel launches.
DEFAULT_DIT_MIN_IMAGE_TOKENS = {"cuda": 4096, "cuda-graph": 2048}


@dataclass(frozen=True)
class DiTMaMeConfig(OperatorSettings):
    """Settings of MaMe on a diffusion transformer (PixArt, SD3, Flux, Wan); validated when built.

    Each merged block runs on merged image tokens (MaMe before it) and hands every token its
    own input plus the restored update (MaRe after it): ``x + restore(block(merge(x)) -
    merge(x))``. Text tokens are never merged. Measured reasons for every default:
    ``docs/dits.md``.

    Args:
        ratio: fraction of the image tokens each merged block removes, in ``[0, 1)``. Higher is
            faster and less faithful.
        blocks: indices of the blocks that merge, counted over the model's blocks in the order
            they run (Flux: the double-stream blocks, then the single-stream ones); ``None``
            (default): every block. A block a diffusers cache (FirstBlockCache, MagCache) uses as
            its first or last block always runs unmerged (the cache compares and adds its
            residuals on every token).
        min_image_tokens: a call merges only when its batch holds at least this many image
            tokens (batch x tokens after patching; video: x frames); smaller calls run exactly as
            without MaMe. ``None`` chooses per device (:data:`DEFAULT_DIT_MIN_IMAGE_TOKENS`).
    """

    ratio: float = DEFAULT_DIT_RATIO
    blocks: tuple[int, ...] | None = None
    min_image_tokens: int | None = None
    #: Side of the blocks of the token grid in which slots are chosen: the operator's default.
    block: ClassVar[int] = DEFAULT_BLOCK

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", check_ratio(self.ratio))
        object.__setattr__(self, "blocks", _check_blocks(self.blocks))
        tokens = self.min_image_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, numbers.Integral) or tokens < 0):
            raise ValueError(
                f"min_image_tokens must be a non-negative int or None (chosen per device), got {tokens!r}"
            )
        self.remember_layout_settings("ratio")

    def merges_block(self, index: int) -> bool:
        """Whether the block at ``index`` (in running order) merges."""
        return self.ratio > 0.0 and (self.blocks is None or index in self.blocks)

    def merges_call(self, image_tokens: int, device: torch.device) -> bool:
        """Whether a call with ``image_tokens`` (batch x tokens) on ``device`` merges at all."""
        return self.ratio > 0.0 and image_tokens >= self.token_threshold(device)

    def token_threshold(self, device: torch.device) -> int:
        """``min_image_tokens``, or the default for ``device`` when it is ``None``."""
        if self.min_image_tokens is not None:
            return int(self.min_image_tokens)
        kind = device.type
        if kind == "cuda" and not torch.compiler.is_compiling() and cuda_graph_recording(device):
            kind = "cuda-graph"
        return DEFAULT_DIT_MIN_IMAGE_TOKENS.get(kind, 0)


def _check_blocks(blocks: Any) -> tuple[int, ...] | None:
    if blocks is None:
        return None
    if isinstance(blocks, (str, bytes)) or not hasattr(blocks, "__iter__"):
        raise ValueError(f"blocks must be None (every block) or a sequence of block indices, got {blocks!r}")
    values = tuple(blocks)
    if not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in values):
        raise ValueError(f"blocks must hold non-negative int block indices, got {blocks!r}")
    return tuple(sorted({int(v) for v in values}))
