"""Settings of MaMe on vision models: :class:`VisionMaMeConfig` and the defaults."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..merging import OperatorSettings, check_block, check_ratio, is_number

# Defaults chosen with benchmarks/vit_benchmark.py (--sweep; results in benchmarks/results/).
#: Fraction of the tokens entering each merging layer that the layer removes. On ViT-B/16 at
#: 224 the first 8 layers take 197 tokens down to 65: about 2x the throughput on CPU; 0.08
#: stays under 1.8x.
DEFAULT_VISION_RATIO = 0.1
#: Global merging (one dense product per merge). On ViT-size grids it is about twice as fast
#: on CPU as windowed merging (block=8), whose window bookkeeping outweighs its smaller products.
DEFAULT_VISION_BLOCK: int | None = None
#: Which tokens merge is chosen by content, as in UNets: with one block of the whole grid,
#: the most redundant tokens wherever they are (bipartite matching by comparisons). On
#: ViT-B/16 with attention sharpened to trained models' entropy (benchmarks/fidelity_vit.py,
#: 60 photo crops) it keeps the pooled features at cosine 0.998 where slots placed on the grid
#: reached 0.971 (top-1 agreement 0.92 against 0.77), level with ToMe-style bipartite
#: matching, and as fast on CPU (ViT-B/16 batch 32: 2.18x the unmerged model's throughput).
#: Share of the encoder layers that merge by default (the paper: the first 8 of ViT-B's 12).
DEFAULT_MERGING_SHARE = 2 / 3
#: Channels that tokens are compared on when planning a merge (``None``: all). 64 halves the
#: cost of a merge on ViT-B for a barely measurable change in feature agreement.
DEFAULT_SIMILARITY_CHANNELS: int | None = 64
#: How VideoMAE's ``(T, H, W)`` token grid is merged (see :class:`VisionMaMeConfig`).
VIDEO_GRIDS = ("per_frame", "spacetime")
#: Per frame: at equal token counts on VideoMAE-B, 20% faster than space-time merging (whose
#: global product over all 1568 tokens costs about one encoder layer), for a somewhat lower
#: feature agreement on panning videos.
DEFAULT_VIDEO_GRID = "per_frame"

SUPPORTED_VISION_MODELS = (
    "ViTModel",
    "ViTForImageClassification",
    "DeiTModel",
    "DeiTForImageClassification",
    "DeiTForImageClassificationWithTeacher",
    "CLIPVisionModel",
    "CLIPVisionModelWithProjection",
    "CLIPModel (its vision tower)",
    "SiglipVisionModel",
    "SiglipModel (its vision tower)",
    "Siglip2VisionModel",
    "Siglip2Model (its vision tower)",
    "VideoMAEModel",
    "VideoMAEForVideoClassification",
)

_PATCH_ATTRIBUTE = "_mame_vision_patch"
_ATTENTION_ATTRIBUTE = "_mame_attention"
_WRAPPED_PREFIX = "mame_"
_WRAPPABLE_IMPLEMENTATIONS = ("eager", "sdpa")


@dataclass(frozen=True)
class VisionMaMeConfig(OperatorSettings):
    """Settings of MaMe on a transformers vision model; validated when built.

    Args:
        ratio: fraction of the tokens entering a merging layer that it removes, in ``[0, 1)``:
            one number for every merging layer, or a sequence with one ratio per merging
            layer (a per-layer schedule). Merged grids are whole slot grids, so the
            removed fraction is rounded up to whole rows or columns of the grid
            (see :func:`mame_diffusers.merge_layout`).
        layers: indices (from 0) of the encoder layers whose input is merged. ``None``: the
            first ``len(ratio)`` layers for a schedule, else the first two thirds of the
            layers (8 of ViT-B's 12, the paper's setting).
        block: side of the blocks in which tokens choose their slots; ``None`` (the
            default): the whole grid, the most redundant tokens wherever they are (see
            :func:`mame_diffusers.plan_merge`).
        video_grid: VideoMAE's ``(T, H, W)`` tokens: ``"per_frame"`` merges each frame's
            ``H x W`` grid on its own (tokens never merge across time); ``"spacetime"`` lays
            the tokens out on an ``H x (W*T)`` grid with time innermost, so a cell holds the
            same place in neighbouring frames and static content merges across time.
        similarity_channels: tokens are compared (never merged) on this many channels, sums
            of equal groups of adjacent channels (see :func:`similarity_features`); ``None``
            compares them on all channels.
    """

    ratio: float | tuple[float, ...] = DEFAULT_VISION_RATIO
    layers: tuple[int, ...] | None = None
    block: int | None = DEFAULT_VISION_BLOCK
    video_grid: str = DEFAULT_VIDEO_GRID
    similarity_channels: int | None = DEFAULT_SIMILARITY_CHANNELS

    def __post_init__(self) -> None:
        if isinstance(self.ratio, (list, tuple)):
            if not self.ratio:
                raise ValueError("ratio must be a number or a non-empty sequence of numbers (one per merging layer)")
            ratios: tuple[float, ...] = tuple(self.ratio)
        elif is_number(self.ratio):
            ratios = (self.ratio,)
        else:
            raise ValueError(f"ratio must be a number in [0, 1) or a sequence of them, got {self.ratio!r}")
        ratios = tuple(check_ratio(ratio) for ratio in ratios)
        object.__setattr__(self, "block", check_block(self.block))
        schedule = isinstance(self.ratio, (list, tuple))
        object.__setattr__(self, "ratio", ratios if schedule else ratios[0])

        if self.layers is not None:
            if isinstance(self.layers, (str, bytes)) or not isinstance(self.layers, Sequence):
                raise ValueError(f"layers must be a sequence of layer indices or None, got {self.layers!r}")
            layers = tuple(self.layers)
            if not layers:
                raise ValueError("layers must name at least one encoder layer (use ratio=0 to merge nothing)")
            for index in layers:
                if isinstance(index, bool) or not isinstance(index, int) or index < 0:
                    raise ValueError(f"layers holds encoder layer indices (ints >= 0), got {index!r}")
            if len(set(layers)) != len(layers):
                raise ValueError(f"layers must not repeat a layer, got {layers}")
            if schedule and len(layers) != len(ratios):
                raise ValueError(
                    f"a ratio schedule needs one ratio per merging layer: {len(ratios)} ratios for "
                    f"{len(layers)} layers {layers}"
                )
            object.__setattr__(self, "layers", layers)
        if self.video_grid not in VIDEO_GRIDS:
            raise ValueError(f"video_grid must be one of {VIDEO_GRIDS}, got {self.video_grid!r}")
        channels = self.similarity_channels
        if channels is not None and (isinstance(channels, bool) or not isinstance(channels, int) or channels < 1):
            raise ValueError(f"similarity_channels must be a positive int or None (all channels), got {channels!r}")

    def schedule(self, num_layers: int) -> dict[int, float]:
        """``{layer index: ratio}`` for a model with ``num_layers`` encoder layers."""
        if isinstance(self.ratio, tuple):
            layers = self.layers if self.layers is not None else tuple(range(len(self.ratio)))
            ratios = self.ratio
        else:
            count = max(1, round(num_layers * DEFAULT_MERGING_SHARE))
            layers = self.layers if self.layers is not None else tuple(range(count))
            ratios = (self.ratio,) * len(layers)
        for index in layers:
            if index >= num_layers:
                raise ValueError(
                    f"layer {index} does not exist: the model has {num_layers} encoder layers (0..{num_layers - 1})"
                )
        return dict(sorted(zip(layers, ratios)))


