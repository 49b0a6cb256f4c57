"""MaMe for Hugging Face transformers vision models: ViT, DeiT, CLIP, SigLIP, SigLIP2, VideoMAE.

Every transformers concept MaMe touches lives in this file:

* **Where tokens merge.** Between encoder layers: a forward pre-hook on each merging layer
  merges the hidden states entering it (MaMe). Nothing is restored (no MaRe): classification
  and pooled features need only the merged tokens. Special tokens (CLS; DeiT's CLS and
  distillation tokens) are split off by slicing, never merged, and put back in front.
* **Later merges.** Merged tokens keep the anchor-grid layout (``MergePlan.merged_hw``): the
  ``M`` tokens of one merge lie row-major on an ``Hm x Wm`` grid, so the next merging layer
  merges them again on that smaller grid, weighting each by its size. Shapes stay static and
  the path stays matrix-only.
* **What is compared.** Tokens are compared on a cheap 64-channel view of themselves (sums of
  channel groups, :func:`similarity_features`) and merged at full width.
* **Video.** VideoMAE's ``(T, H, W)`` tokens merge per frame by default (each frame's grid on
  its own, frames folded into the batch) or, with ``video_grid="spacetime"``, on one
  ``H x (W*T)`` grid with time innermost, so that static content merges across frames.
* **Sizes.** A per-model state object, created by :func:`apply_mame_to_vision_model` and
  reached only through the hooks and the attention modules, tracks how many original patches
  each token stands for. It is reset at the start of every forward pass.
* **Proportional attention.** The model's attention implementation (``eager`` or ``sdpa``)
  is swapped for a wrapper registered with transformers' ``AttentionInterface``
  (``mame_eager`` / ``mame_sdpa``). The wrapper finds the state through an attribute set on
  each attention module at apply time and adds ``log(size)`` to the keys' logits, then calls
  the original implementation. The wrapper looks the bias up by key length, so it is right
  even when gradient checkpointing recomputes a layer later.
* **Pooling.** CLS-pooled models need nothing. SigLIP's attention-pooling head gets the
  log-size bias on its keys; VideoMAE's mean pooling becomes a size-weighted mean.
* **Outputs.** ``last_hidden_state`` holds the merged tokens (special tokens first).
  With ``output_hidden_states=True``, ``hidden_states[0]`` is the first layer's input as that
  layer saw it (merged if it merges) and ``hidden_states[i + 1]`` the output of layer ``i``,
  before the next layer merges it, so lengths shrink. ``output_attentions=True`` (eager only,
  as in transformers) gives attention weights over the merged tokens, size bias included.
  :func:`merge_history` gives the grid and sizes after each merge of the last forward pass;
  :func:`merge_membership` which original patches each merged token holds.

:func:`remove_mame_from_vision_model` removes every hook and attribute and restores the
attention implementation, so outputs are bit-identical to before. ``ratio=0`` merges nothing
and is bit-identical to the unpatched model.
"""

from __future__ import annotations

import inspect
import math
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .merging import (
    DEFAULT_ANCHOR,
    DEFAULT_HALO,
    DEFAULT_TAU,
    MergePlan,
    OperatorSettings,
    check_merge_settings,
    is_number,
    merge_layout,
    proportional_attention_bias,
)

__all__ = [
    "DEFAULT_SIMILARITY_CHANNELS",
    "DEFAULT_VIDEO_GRID",
    "DEFAULT_VISION_BLOCK",
    "DEFAULT_VISION_RATIO",
    "SUPPORTED_VISION_MODELS",
    "VIDEO_GRIDS",
    "MergeRecord",
    "TokenMerge",
    "TokenMerger",
    "VisionMaMeConfig",
    "apply_mame_to_vision_model",
    "is_supported_vision_model",
    "mame_token_merge",
    "merge_history",
    "merge_membership",
    "patched_vision_config",
    "remove_mame_from_vision_model",
    "similarity_features",
    "visualize_merges",
]

# Defaults chosen with benchmarks/vit_benchmark.py (--sweep; results in benchmarks/results/).
#: Fraction of the tokens entering each merging layer that the layer removes. On ViT-B/16 at
#: 224 the first 8 layers take 197 tokens down to 65: about 2x the throughput on CPU; 0.08
#: stays under 1.8x.
DEFAULT_VISION_RATIO = 0.1
#: Global merging (one dense product per merge). On ViT-size grids it is about twice as fast
#: on CPU as windowed merging (block=8), whose window bookkeeping outweighs its smaller products.
DEFAULT_VISION_BLOCK: int | None = None
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


# -- settings ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class VisionMaMeConfig(OperatorSettings):
    """Settings of MaMe on a transformers vision model; validated when built.

    Args:
        ratio: fraction of the tokens entering a merging layer that it removes, in ``[0, 1)``:
            one number for every merging layer, or a sequence with one ratio per merging
            layer (a per-layer schedule). Merged grids are whole anchor grids, so the
            removed fraction is rounded up to whole rows or columns of the grid
            (see :func:`mame_diffusers.merge_layout`).
        layers: indices (from 0) of the encoder layers whose input is merged. ``None``: the
            first ``len(ratio)`` layers for a schedule, else the first two thirds of the
            layers (8 of ViT-B's 12, the paper's setting).
        tau, block, halo, anchor, temperature, straight_through: operator options, see
            :func:`mame_diffusers.plan_merge`.
        proportional_attention: weight each merged key by the number of patches it stands
            for (``log(size)`` added to its logits) in every layer after the first merge and
            in SigLIP's pooling head.
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
    tau: float = DEFAULT_TAU
    block: int | None = DEFAULT_VISION_BLOCK
    halo: int = DEFAULT_HALO
    anchor: str = DEFAULT_ANCHOR
    temperature: float | None = None
    straight_through: bool = False
    proportional_attention: bool = True
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
        for ratio in ratios:
            check_merge_settings(ratio=ratio, tau=0.0, block=None, halo=0)
        object.__setattr__(self, "tau", self.check_operator_settings(ratios[0]))
        schedule = isinstance(self.ratio, (list, tuple))
        object.__setattr__(self, "ratio", tuple(float(r) for r in ratios) if schedule else float(ratios[0]))

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
        if not isinstance(self.proportional_attention, bool):
            raise ValueError(f"proportional_attention must be True or False, got {self.proportional_attention!r}")
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


# -- one merge step --------------------------------------------------------------------------------


@dataclass
class TokenMerge:
    """The result of merging the patch tokens entering one layer.

    ``tokens`` (B, M, C) and ``sizes`` (B, M) (0 marks an empty slot) replace the patch
    tokens; ``grid`` is the grid they lie on (row-major), for the next merge; ``restore``
    maps a (B, M, C') tensor back to the (B, N, C') layout of the tokens that were merged.
    """

    tokens: torch.Tensor
    sizes: torch.Tensor
    grid: tuple[int, ...]
    restore: Callable[[torch.Tensor], torch.Tensor]


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
    if merge_layout(hw, ratio, block=config.block, halo=config.halo).num_merged == hw[0] * hw[1]:
        return None
    if len(grid) == 2:
        plan, merged = _merge_on_grid(patches, grid, sizes, ratio, config)
        return TokenMerge(merged, plan.sizes, plan.merged_hw, plan.restore)
    frames, height, width = grid
    batch, _, channels = patches.shape
    if config.video_grid == "per_frame":
        # Frames fold into the batch: each frame's H x W grid merges on its own.
        flat = patches.reshape(batch * frames, height * width, channels)
        flat_sizes = None if sizes is None else sizes.reshape(batch * frames, height * width)
        plan, merged = _merge_on_grid(flat, (height, width), flat_sizes, ratio, config)

        def restore_frames(tokens: torch.Tensor) -> torch.Tensor:
            restored = plan.restore(tokens.reshape(batch * frames, plan.num_merged, tokens.shape[-1]))
            return restored.reshape(batch, frames * height * width, tokens.shape[-1])

        merged = merged.reshape(batch, frames * plan.num_merged, channels)
        return TokenMerge(merged, plan.sizes.reshape(batch, -1), (frames, *plan.merged_hw), restore_frames)

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
    plan, merged = _merge_on_grid(to_spacetime(patches), hw, spacetime_sizes, ratio, config)
    return TokenMerge(merged, plan.sizes, plan.merged_hw, lambda t: from_spacetime(plan.restore(t)))


def _merge_on_grid(
    tokens: torch.Tensor, hw: tuple[int, int], sizes: torch.Tensor | None, ratio: float, config: VisionMaMeConfig
) -> tuple[MergePlan, torch.Tensor]:
    """Plan on the similarity features, merge the tokens at full width."""
    plan = config.plan(similarity_features(tokens, config.similarity_channels), hw, ratio, sizes)
    return plan, plan.merge(tokens)


def similarity_features(tokens: torch.Tensor, channels: int | None) -> torch.Tensor:
    """What tokens are compared on: ``channels`` sums of equal groups of adjacent channels.

    A fixed sparse projection, computed by a reshape and a sum. Like ToMe's head-averaged
    keys it keeps cosine similarity close while making the similarity and anchor products
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
    sizes ``(B, M)`` (detached). ``restore`` is kept only while :func:`merge_membership` records."""

    layer: int
    grid: tuple[int, ...]
    sizes: torch.Tensor
    restore: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)


# -- the models ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Family:
    name: str
    #: Tokens in front of the patches that never merge (CLS, distillation).
    special_tokens: int
    #: "image": pixel_values (B, C, H, W); "patches": SigLIP2's (B, N, C*p*p) with spatial
    #: shapes; "video": (B, T, C, H, W).
    inputs: str


def _families() -> list[tuple[type, _Family]]:
    t = transformers
    return [
        (t.ViTModel, _Family("ViT", 1, "image")),
        (t.DeiTModel, _Family("DeiT", 2, "image")),
        (t.CLIPVisionModel, _Family("CLIP", 1, "image")),
        (t.SiglipVisionModel, _Family("SigLIP", 0, "image")),
        (t.Siglip2VisionModel, _Family("SigLIP2", 0, "patches")),
        (t.VideoMAEModel, _Family("VideoMAE", 0, "video")),
    ]


def _wrappers() -> list[tuple[type, str]]:
    """Models that hold a supported vision tower, and the attribute it sits in."""
    t = transformers
    return [
        (t.ViTForImageClassification, "vit"),
        (t.DeiTForImageClassification, "deit"),
        (t.DeiTForImageClassificationWithTeacher, "deit"),
        (t.CLIPVisionModelWithProjection, "vision_model"),
        (t.CLIPModel, "vision_model"),
        (t.SiglipModel, "vision_model"),
        (t.Siglip2Model, "vision_model"),
        (t.VideoMAEForVideoClassification, "videomae"),
    ]


@dataclass
class _Target:
    """The parts of a model that MaMe hooks into."""

    model: nn.Module
    tower: PreTrainedModel
    family: _Family
    layers: nn.ModuleList
    attention_modules: list[nn.Module]
    #: SigLIP's attention-pooling head (its ``attention`` is an ``nn.MultiheadAttention``).
    pooling_head: nn.Module | None
    #: VideoMAE classification's norm after the token mean.
    mean_pooling_norm: nn.Module | None


def _unsupported(model: Any) -> TypeError:
    return TypeError(
        f"MaMe does not support {type(model).__name__}; supported transformers vision models: "
        + ", ".join(SUPPORTED_VISION_MODELS)
    )


def _tower_of(model: Any) -> tuple[PreTrainedModel, _Family]:
    for cls, attribute in _wrappers():
        if isinstance(model, cls):
            model = getattr(model, attribute)
            break
    for cls, family in _families():
        if isinstance(model, cls):
            return model, family
    raise _unsupported(model)


def is_supported_vision_model(model: Any) -> bool:
    """Whether :func:`apply_mame_to_vision_model` supports ``model``."""
    try:
        _tower_of(model)
    except TypeError:
        return False
    return True


def _encoder_layers(tower: nn.Module) -> nn.ModuleList:
    # transformers 5 keeps ViT's layers on the model, older releases under encoder.layer.
    for path in ("layers", "encoder.layers", "encoder.layer"):
        module: Any = tower
        for name in path.split("."):
            module = getattr(module, name, None)
        if isinstance(module, nn.ModuleList) and len(module) > 0:
            return module
    raise TypeError(f"cannot find the encoder layers of {type(tower).__name__}")


def _attention_module(layer: nn.Module) -> nn.Module:
    """The module of ``layer`` that calls the attention interface (it holds the config)."""
    found = [
        m
        for m in layer.modules()
        if type(m).__name__.endswith("Attention") and isinstance(getattr(m, "config", None), PretrainedConfig)
    ]
    innermost = [m for m in found if not any(other is not m and other in set(m.modules()) for other in found)]
    if len(innermost) != 1:
        raise TypeError(f"cannot find the self-attention of {type(layer).__name__}")
    return innermost[0]


def _describe(model: Any) -> _Target:
    tower, family = _tower_of(model)
    layers = _encoder_layers(tower)
    attention_modules = [_attention_module(layer) for layer in layers]
    head = getattr(tower, "head", None) if getattr(tower, "use_head", False) else None
    if head is not None and not isinstance(getattr(head, "attention", None), nn.MultiheadAttention):
        raise TypeError(f"unexpected pooling head in {type(tower).__name__}: {type(head).__name__}")
    mean_pooling_norm = None
    if isinstance(model, transformers.VideoMAEForVideoClassification):
        if model.fc_norm is None:
            raise ValueError(
                "VideoMAEForVideoClassification with use_mean_pooling=False classifies from the first patch "
                "token, which MaMe would merge; MaMe supports it with mean pooling (the default) only"
            )
        mean_pooling_norm = model.fc_norm
    return _Target(model, tower, family, layers, attention_modules, head, mean_pooling_norm)


# -- the per-model state ---------------------------------------------------------------------------


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


class _LatestForward:
    """The latest forward's per-forward values, as attributes (dynamo traces setting a plain
    object's attribute, but breaks the graph on a dict mutated while tracing)."""


class _PerForward:
    """An attribute of :class:`_MergeState` that each thread keeps for its own forward.

    Threads sharing one patched model must not see each other's grids and sizes. A thread
    that ran no forward (autograd's device threads, recomputing checkpointed layers during
    the backward pass) reads the latest forward's value; so does a graph being traced.
    """

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, state: _MergeState | None, owner: type | None = None) -> Any:
        if state is None:
            return self
        if not torch.compiler.is_compiling():
            mine = state._thread.__dict__
            if self.name in mine:
                return mine[self.name]
        return getattr(state._latest, self.name)

    def __set__(self, state: _MergeState, value: Any) -> None:
        if not torch.compiler.is_compiling():
            setattr(state._thread, self.name, value)
        setattr(state._latest, self.name, value)


class _MergeState:
    """What one patched model knows during a forward pass: the token grid, the sizes of the
    merged tokens, the attention bias for each merged length. Reset by every forward, and
    kept per thread (see :class:`_PerForward`)."""

    grid = _PerForward()
    sizes = _PerForward()
    valid_tokens = _PerForward()
    key_bias = _PerForward()
    pooled_tokens = _PerForward()
    history = _PerForward()
    classifying = _PerForward()

    def __init__(
        self,
        config: VisionMaMeConfig,
        schedule: dict[int, float],
        family: _Family,
        tower: PreTrainedModel,
        merger: TokenMerger,
    ) -> None:
        self.config = config
        self.schedule = schedule
        self.family = family
        self.merger = merger
        self._thread = threading.local()
        self._latest = _LatestForward()
        self.patch_size = _pair(tower.config.patch_size)
        self.tubelet_size = int(getattr(tower.config, "tubelet_size", 1))
        self.signature = inspect.signature(tower.forward)
        self.record_restores = False
        #: Inside a VideoMAEForVideoClassification call, whose mean pooling needs the sizes.
        self.classifying = False
        self.history: list[MergeRecord] = []
        self._reset()

    def _reset(self) -> None:
        self.grid: tuple[int, ...] | None = None
        #: (B, M) sizes of the patch tokens after the latest merge; None before the first.
        self.sizes: torch.Tensor | None = None
        #: SigLIP2 padding: the real patches are the first ``valid_tokens``; the first merge drops the rest.
        self.valid_tokens: int | None = None
        #: key length -> (B, 1, 1, L) additive bias; lengths shrink with every merge, so each is unique.
        self.key_bias: dict[int, torch.Tensor] = {}
        self.pooled_tokens: torch.Tensor | None = None
        self.history = []

    @property
    def merged(self) -> bool:
        return self.sizes is not None

    # A thread-local cannot be copied or pickled: a copy keeps the latest forward's values.
    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "_thread"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._thread = threading.local()

    # -- hooks ---------------------------------------------------------------------------------

    def begin(self, tower: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the vision tower: read the token grid, check the inputs."""
        self._reset()
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        pixels = bound.get("pixel_values")
        if not isinstance(pixels, torch.Tensor):
            raise ValueError("MaMe needs pixel_values to know the token grid")
        inputs = self.family.inputs
        if inputs == "image":
            self.grid = (pixels.shape[-2] // self.patch_size[0], pixels.shape[-1] // self.patch_size[1])
            _check_no_padding(bound.get("attention_mask"), "attention_mask")
        elif inputs == "video":
            if bound.get("bool_masked_pos") is not None:
                raise ValueError(
                    "MaMe merges tokens on VideoMAE's full (T, H, W) grid and cannot be combined with "
                    "bool_masked_pos (tube masking drops tokens); remove MaMe for masked pre-training"
                )
            self.grid = (
                pixels.shape[1] // self.tubelet_size,
                pixels.shape[-2] // self.patch_size[0],
                pixels.shape[-1] // self.patch_size[1],
            )
        else:
            self._begin_siglip2(pixels, bound.get("spatial_shapes"), bound.get("pixel_attention_mask"))

    def _begin_siglip2(
        self, pixels: torch.Tensor, spatial_shapes: torch.Tensor | None, mask: torch.Tensor | None
    ) -> None:
        if spatial_shapes is None:
            raise ValueError("Siglip2VisionModel needs spatial_shapes for MaMe to know the token grid")
        shapes = {tuple(int(v) for v in row) for row in spatial_shapes.tolist()}
        if len(shapes) != 1:
            raise ValueError(
                f"MaMe merges every image of a batch on one token grid, but this SigLIP2 batch mixes spatial "
                f"shapes {sorted(shapes)}; batch images with equal spatial shapes together (or run them one by one)"
            )
        self.grid = shapes.pop()
        valid, length = self.grid[0] * self.grid[1], pixels.shape[1]
        if valid > length:
            raise ValueError(f"spatial shape {self.grid} needs {valid} patches, the inputs hold {length}")
        if mask is not None:
            mask = mask.reshape(mask.shape[0], -1)
            # Checked once per forward pass (a host sync): MaMe needs the padding at the end,
            # as Siglip2's processor puts it, so that the real patches form the grid.
            if not bool(mask[:, :valid].all()) or bool(mask[:, valid:].any()):
                raise ValueError(
                    "MaMe supports SigLIP2 padding only at the end of each sequence, as the Siglip2 processor "
                    f"makes it: pixel_attention_mask must be 1 for the first {valid} patches (the spatial shape "
                    f"{self.grid}) and 0 after them"
                )
        elif valid != length:
            raise ValueError(f"{length - valid} padding patches but no pixel_attention_mask to mark them")
        self.valid_tokens = valid if valid < length else None

    def merge_entering(self, layer_index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Forward pre-hook of a merging layer: merge the hidden states entering it."""
        if self.grid is None:
            raise RuntimeError(
                "MaMe does not know the token grid: call the patched model itself, not its encoder or layers"
            )
        hidden = args[0] if args else kwargs["hidden_states"]
        specials = self.family.special_tokens
        patches = hidden[:, specials:] if specials else hidden
        if self.valid_tokens is not None:
            patches = patches[:, : self.valid_tokens]
        step = self.merger(patches, self.grid, self.sizes, self.schedule[layer_index], self.config)
        if step is None:
            return None
        tokens = torch.cat([hidden[:, :specials], step.tokens], dim=1) if specials else step.tokens
        self.grid, self.sizes, self.valid_tokens = tuple(step.grid), step.sizes, None
        self.key_bias[tokens.shape[1]] = self._key_bias(step.sizes, tokens.dtype)
        restore = step.restore if self.record_restores else None
        self.history.append(MergeRecord(layer_index, self.grid, step.sizes.detach(), restore))
        if args:
            return (tokens, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": tokens}

    def _key_bias(self, sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(B, 1, 1, L)``: log-size per key (0 for special tokens); empty slots masked."""
        bias = proportional_attention_bias(sizes, dtype, proportional=self.config.proportional_attention)
        if self.family.special_tokens:
            bias = torch.cat([bias.new_zeros(bias.shape[0], self.family.special_tokens), bias], dim=1)
        return bias[:, None, None, :]

    def attend(
        self,
        inner: Callable[..., Any],
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> Any:
        """The registered attention wrapper's body: the original implementation plus the size bias."""
        bias = self.key_bias.get(key.shape[-2])
        if bias is None:  # before the first merge: exactly the original call
            return inner(module, query, key, value, attention_mask, **kwargs)
        # The model built attention_mask for the unmerged tokens. begin() checked that it masks
        # only padding, which the first merge dropped, so the size bias replaces it.
        return inner(module, query, key, value, bias.to(query.dtype), **kwargs)

    def on_pooling_head(self, head: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """SigLIP2's head builds a mask from the unmerged pixel_attention_mask: drop it once merged."""
        if not self.merged:
            return None
        if len(args) > 1:
            return (args[0], None, *args[2:]), kwargs
        if kwargs.get("attention_mask") is not None:
            return args, {**kwargs, "attention_mask": None}
        return None

    def on_pooling_attention(self, attention: nn.MultiheadAttention, args: tuple, kwargs: dict):
        """Proportional attention in SigLIP's attention-pooling head: the log-size bias on its keys."""
        if not self.merged:
            return None
        query, key = args[0], args[1]
        bias = self.key_bias[key.shape[1]][:, 0]  # (B, 1, L)
        heads = attention.num_heads
        # nn.MultiheadAttention takes a (B * heads, L_q, L) float mask, batch-major.
        bias = bias[:, None].expand(bias.shape[0], heads, query.shape[1], bias.shape[-1])
        bias = bias.reshape(-1, query.shape[1], bias.shape[-1]).to(query.dtype)
        return args, {**kwargs, "attn_mask": bias}

    def on_tower_output(self, tower: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook of the tower: keep the merged tokens for the classifier's mean pooling.

        The grid is forgotten, so that layers called on their own are refused. The attention
        biases stay until the next forward pass: gradient checkpointing recomputes layers
        during backward, after the forward pass has returned.
        """
        self.grid = None
        if self.classifying and self.merged:
            self.pooled_tokens = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def on_classifier_call(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        self.classifying, self.pooled_tokens = True, None

    def on_classifier_done(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.classifying, self.pooled_tokens = False, None

    def on_mean_pooling(self, norm: nn.Module, args: tuple) -> tuple | None:
        """VideoMAE's classifier pools with a plain token mean; once merged, make it the
        size-weighted mean (what averaging the restored full-length tokens would give)."""
        tokens, self.pooled_tokens = self.pooled_tokens, None
        if not self.classifying or tokens is None or self.sizes is None:
            return None
        weights = (self.sizes / self.sizes.sum(dim=-1, keepdim=True)).to(tokens.dtype)
        return ((weights[:, None, :] @ tokens)[:, 0],)


def _check_no_padding(mask: torch.Tensor | None, name: str) -> None:
    if mask is None:
        return
    if mask.ndim != 2:
        raise ValueError(f"MaMe supports only a 2-D (batch, tokens) {name}, got shape {tuple(mask.shape)}")
    if not bool(mask.bool().all()):
        raise ValueError(
            f"MaMe merges all patch tokens and cannot honour a padding {name} with zeros; "
            "pass no mask (or all ones), or remove MaMe for this call"
        )


# -- the attention wrapper ---------------------------------------------------------------------------


@dataclass
class _AttentionLink:
    """Set on each attention module at apply time: how the registered wrapper finds the state."""

    state: _MergeState
    inner: Callable[..., Any]


def _original_attention(module: nn.Module, implementation: str) -> Callable[..., Any]:
    """The function ``module`` would call for ``implementation`` (eager lives in its model file)."""
    if implementation == "eager":
        function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if function is None:
            raise TypeError(f"cannot find the eager attention of {type(module).__name__}")
        return function
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _proportional_attention_for(implementation: str) -> Callable[..., Any]:
    def proportional_attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> Any:
        link = getattr(module, _ATTENTION_ATTRIBUTE, None)
        if link is None:  # a module of an unpatched model that shares this config
            return _original_attention(module, implementation)(module, query, key, value, attention_mask, **kwargs)
        return link.state.attend(link.inner, module, query, key, value, attention_mask, **kwargs)

    proportional_attention.__name__ = f"mame_{implementation}_attention"
    return proportional_attention


def _register_attention(implementation: str) -> str:
    """Register MaMe's wrapper of ``implementation`` with transformers (once); returns its name.

    The mask interface gets the same entry as the wrapped implementation, so the masks the
    model builds before the first merge are exactly the original ones.
    """
    name = _WRAPPED_PREFIX + implementation
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _proportional_attention_for(implementation))
    if name not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    return name


# -- apply / remove ------------------------------------------------------------------------------------


@dataclass
class _Patch:
    """What apply changed on one vision tower, so that remove can undo exactly that."""

    config: VisionMaMeConfig
    state: _MergeState
    hooks: list = field(default_factory=list)
    attention_modules: list = field(default_factory=list)
    #: (config object, the attention implementation it had)
    implementations: list = field(default_factory=list)


def patched_vision_config(model: nn.Module) -> VisionMaMeConfig | None:
    """The MaMe settings applied to ``model``, or ``None`` when it is not patched."""
    try:
        tower, _ = _tower_of(model)
    except TypeError:
        return None
    patch = getattr(tower, _PATCH_ATTRIBUTE, None)
    return patch.config if patch is not None else None


def apply_mame_to_vision_model(
    model: nn.Module,
    config: VisionMaMeConfig | None = None,
    *,
    token_merger: TokenMerger | None = None,
) -> nn.Module:
    """Install MaMe on a transformers vision model, in place; returns it.

    Applying again replaces the earlier settings. For ``CLIPModel``, ``SiglipModel`` and
    ``Siglip2Model`` only the vision tower is patched. Patch ``VideoMAEForVideoClassification``
    itself, not its ``videomae``, so that its mean pooling is size-weighted. ``token_merger`` replaces MaMe's
    merge rule (:func:`mame_token_merge`), e.g. by a peer method in a benchmark; sizes,
    proportional attention and pooling stay as they are.

    Raises:
        TypeError: for models other than :data:`SUPPORTED_VISION_MODELS`.
        ValueError: for layers the model does not have, an attention implementation other
            than eager or sdpa, or an unsupported head configuration.
    """
    config = VisionMaMeConfig() if config is None else config
    if not isinstance(config, VisionMaMeConfig):
        raise TypeError(f"config must be a VisionMaMeConfig, got {type(config).__name__}")
    target = _describe(model)
    schedule = config.schedule(len(target.layers))
    if getattr(target.tower, _PATCH_ATTRIBUTE, None) is not None:
        remove_mame_from_vision_model(target.tower)

    configs = {id(c): c for c in [target.tower.config, *(m.config for m in target.attention_modules)]}
    original = target.tower.config._attn_implementation
    inner = "eager" if original is None else original
    if inner not in _WRAPPABLE_IMPLEMENTATIONS or any(c._attn_implementation != original for c in configs.values()):
        raise ValueError(
            f"MaMe adds a per-key bias to attention, which needs the eager or sdpa implementation; "
            f"this model uses {original!r}: call model.set_attn_implementation('sdpa') first"
        )
    wrapped = _register_attention(inner)

    state = _MergeState(config, schedule, target.family, target.tower, token_merger or mame_token_merge)
    patch = _Patch(config=config, state=state)
    tower = target.tower
    patch.hooks.append(tower.register_forward_pre_hook(state.begin, with_kwargs=True))
    patch.hooks.append(tower.register_forward_hook(state.on_tower_output, with_kwargs=True))
    for index, ratio in schedule.items():
        if ratio > 0:
            hook = _LayerHook(state, index)
            patch.hooks.append(target.layers[index].register_forward_pre_hook(hook, with_kwargs=True))
    if target.pooling_head is not None:
        patch.hooks.append(target.pooling_head.register_forward_pre_hook(state.on_pooling_head, with_kwargs=True))
        patch.hooks.append(
            target.pooling_head.attention.register_forward_pre_hook(state.on_pooling_attention, with_kwargs=True)
        )
    if target.mean_pooling_norm is not None:
        classifier = target.model
        patch.hooks.append(classifier.register_forward_pre_hook(state.on_classifier_call, with_kwargs=True))
        patch.hooks.append(
            classifier.register_forward_hook(state.on_classifier_done, with_kwargs=True, always_call=True)
        )
        patch.hooks.append(target.mean_pooling_norm.register_forward_pre_hook(state.on_mean_pooling))

    for module in target.attention_modules:
        setattr(module, _ATTENTION_ATTRIBUTE, _AttentionLink(state, _original_attention(module, inner)))
        patch.attention_modules.append(module)
    for model_config in configs.values():
        patch.implementations.append((model_config, model_config._attn_implementation_internal))
        # The tower's own config only: set_attn_implementation would walk the whole composite
        # model (CLIP's text tower too), and the property setter recurses into sub-configs.
        model_config._attn_implementation_internal = wrapped
    setattr(tower, _PATCH_ATTRIBUTE, patch)
    return model


@dataclass
class _LayerHook:
    """Forward pre-hook of merging layer ``index`` (an object, not a closure, so that a
    patched model deep-copies and pickles with its own state)."""

    state: _MergeState
    index: int

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        return self.state.merge_entering(self.index, args, kwargs)


def remove_mame_from_vision_model(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_mame_to_vision_model`: hooks, attributes and attention implementation
    exactly as before. A no-op when the model is not patched."""
    tower, _ = _tower_of(model)
    patch = getattr(tower, _PATCH_ATTRIBUTE, None)
    if patch is None:
        return model
    for hook in patch.hooks:
        hook.remove()
    for module in patch.attention_modules:
        if hasattr(module, _ATTENTION_ATTRIBUTE):
            delattr(module, _ATTENTION_ATTRIBUTE)
    for model_config, implementation in patch.implementations:
        model_config._attn_implementation_internal = implementation
    delattr(tower, _PATCH_ATTRIBUTE)
    return model


def _patch_of(model: nn.Module) -> _Patch:
    tower, _ = _tower_of(model)
    patch = getattr(tower, _PATCH_ATTRIBUTE, None)
    if patch is None:
        raise ValueError(f"{type(model).__name__} is not patched with MaMe")
    return patch


def merge_history(model: nn.Module) -> list[MergeRecord]:
    """The merges of the last forward pass of a patched model, in layer order."""
    return list(_patch_of(model).state.history)


# -- which patches share a token -------------------------------------------------------------------------


def merge_membership(model: nn.Module, **inputs: Any) -> list[tuple[int, torch.Tensor]]:
    """Run ``model(**inputs)`` once and return, for every merge, ``(layer, membership)``.

    ``membership`` is ``(B, N, M)``: row ``i`` is one-hot on the merged token that original
    patch ``i`` ended up in (row-stochastic with a soft assignment). It is built matrix-only,
    by restoring the identity of the ``M`` merged tokens through every plan back to the patches.
    """
    state = _patch_of(model).state
    state.record_restores = True
    try:
        with torch.no_grad():
            model(**inputs)
        records = list(state.history)
        memberships = []
        for k, record in enumerate(records):
            batch, merged = record.sizes.shape
            identity = torch.eye(merged, dtype=record.sizes.dtype, device=record.sizes.device)
            membership = identity.expand(batch, merged, merged)
            for earlier in reversed(records[: k + 1]):
                membership = earlier.restore(membership)
            memberships.append((record.layer, membership))
    finally:
        state.record_restores = False
        for record in state.history:  # the plans hold activations: let them go
            record.restore = None
    return memberships


def _image_array(image: Any) -> torch.Tensor:
    """``(3, H, W)`` float RGB in [0, 1] from an (H, W, 3) array or a (3, H, W) tensor."""
    tensor = torch.as_tensor(image)
    if tensor.ndim == 3 and tensor.shape[-1] in (3, 4) and tensor.shape[0] not in (3, 4):
        tensor = tensor[..., :3].permute(2, 0, 1)
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"image must be an (H, W, 3) RGB array or a (3, H, W) tensor, got shape {tuple(tensor.shape)}")
    tensor = tensor.float()
    return tensor / 255.0 if tensor.max() > 1.0 else tensor


def _vision_inputs(tower: PreTrainedModel, family: _Family, rgb: torch.Tensor) -> tuple[dict, tuple[int, int]]:
    """Model inputs for one photo (normalised to [-1, 1]) and the patch grid."""
    patch = _pair(tower.config.patch_size)
    if family.inputs == "patches":
        side = int(math.isqrt(int(tower.config.num_patches)))
        hw = (side, side)
    else:
        size = _pair(tower.config.image_size)
        hw = (size[0] // patch[0], size[1] // patch[1])
    pixels = F.interpolate(rgb[None], size=(hw[0] * patch[0], hw[1] * patch[1]), mode="bilinear", antialias=True)
    pixels = (pixels.clamp(0, 1) - 0.5) / 0.5
    dtype = next(tower.parameters()).dtype
    device = next(tower.parameters()).device
    if family.inputs == "patches":
        # Siglip2's processor layout: row-major patches, each (p, p, C) flattened.
        patches = pixels[0].reshape(3, hw[0], patch[0], hw[1], patch[1]).permute(1, 3, 2, 4, 0)
        patches = patches.reshape(1, hw[0] * hw[1], -1)
        inputs = {
            "pixel_values": patches.to(device, dtype),
            "pixel_attention_mask": torch.ones(1, hw[0] * hw[1], dtype=torch.long, device=device),
            "spatial_shapes": torch.tensor([hw], device=device),
        }
    else:
        inputs = {"pixel_values": pixels.to(device, dtype)}
    return inputs, hw


def visualize_merges(
    model: nn.Module,
    image: Any,
    path: str | Path,
    *,
    config: VisionMaMeConfig | None = None,
) -> Path:
    """Save a PNG of which patches share a token after each merging layer (the paper's
    token-progression figure): every group of patches is painted in its mean colour, with
    white lines between groups.

    ``image`` is an (H, W, 3) RGB array (e.g. ``skimage.data.astronaut()``) or a (3, H, W)
    tensor in [0, 1]; it is resized to the model's input size. An unpatched model is patched
    with ``config`` (default settings when ``None``) for the figure and restored after.
    Image models only (ViT, DeiT, CLIP, SigLIP, SigLIP2).
    """
    # A bare Figure on the Agg canvas: no pyplot, so no global figure state or backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tower, family = _tower_of(model)
    if family.inputs == "video":
        raise ValueError("visualize_merges draws images; VideoMAE is not supported")
    rgb = _image_array(image)
    inputs, hw = _vision_inputs(tower, family, rgb)
    temporary = getattr(tower, _PATCH_ATTRIBUTE, None) is None
    if temporary:
        apply_mame_to_vision_model(model, config)
    elif config is not None and _patch_of(model).config != config:
        raise ValueError("the model is already patched with other settings; remove MaMe or pass config=None")
    try:
        memberships = merge_membership(tower, **inputs)
    finally:
        if temporary:
            remove_mame_from_vision_model(model)

    side = 32  # pixels per patch in the figure
    photo = F.interpolate(rgb[None], size=(hw[0] * side, hw[1] * side), mode="bilinear", antialias=True)[0]
    patch_colours = F.adaptive_avg_pool2d(rgb[None], hw)[0].reshape(3, -1).T  # (N, 3)
    panels = [("input", photo.permute(1, 2, 0).clamp(0, 1).numpy())]
    for layer, membership in memberships:
        members = membership[0].float()  # (N, M)
        counts = members.sum(dim=0).clamp_min(1e-6)
        group_colours = (members.T @ patch_colours) / counts[:, None]
        painted = (members @ group_colours).T.reshape(3, *hw)
        groups = members.argmax(dim=-1).reshape(hw)  # plotting only: which group to outline
        panels.append((f"layer {layer} input: {int((counts > 0.5).sum())} tokens", _outlined(painted, groups, side)))

    columns = min(len(panels), 5)
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(3 * columns, 3.3 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    for index, (title, picture) in enumerate(panels):
        axis = figure.add_subplot(rows, columns, index + 1)
        axis.imshow(picture)
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.suptitle(f"MaMe token merging on {type(model).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    return path


def _outlined(painted: torch.Tensor, groups: torch.Tensor, side: int):
    """Upsample ``painted`` (3, h, w) by ``side`` and draw white lines where groups change."""
    picture = painted.repeat_interleave(side, dim=1).repeat_interleave(side, dim=2)
    labels = groups.repeat_interleave(side, dim=0).repeat_interleave(side, dim=1)
    edge = torch.zeros_like(labels, dtype=torch.bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    picture = torch.where(edge[None], torch.ones_like(picture), picture)
    return picture.permute(1, 2, 0).clamp(0, 1).numpy()
