"""One entry point for every model MaMe supports: ``apply_mame`` and ``remove_mame``."""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

import torch
from transformers import PreTrainedModel

from .diffusers_integration import (
    DEFAULT_MAX_DOWNSAMPLE,
    DEFAULT_QUERY_SHARE,
    DEFAULT_RATIO,
    MaMeConfig,
    apply_mame_to_unet,
    diffusion_models_of,
    remove_mame_from_unet,
)
from .merging import DEFAULT_ANCHOR, DEFAULT_BLOCK, DEFAULT_HALO, DEFAULT_TAU
from .transformers_integration import (
    DEFAULT_VIDEO_GRID,
    DEFAULT_VISION_BLOCK,
    DEFAULT_VISION_RATIO,
    VisionMaMeConfig,
    apply_mame_to_vision_model,
    remove_mame_from_vision_model,
)

__all__ = ["apply_mame", "remove_mame"]

Target = TypeVar("Target")


class _ModelDefault:
    """Marks an argument whose default depends on the kind of model (``None`` means something)."""

    def __repr__(self) -> str:
        return "<the model kind's default>"


_MODEL_DEFAULT: Any = _ModelDefault()

_SUPPORTED = (
    "a diffusers pipeline with a `unet` (StableDiffusion, SDXL, img2img, inpaint, ControlNet, ...), "
    "a diffusers UNet2DConditionModel, a transformers vision model (ViT, DeiT, CLIP, SigLIP, SigLIP2, VideoMAE)"
)


def _reject_options(applies_to: str, target_kind: str, **options: Any) -> None:
    """Options of the other kind of model, given for this one: say so instead of ignoring them."""
    given = [name for name, value in options.items() if value is not None]
    if given:
        verb = "apply" if len(given) > 1 else "applies"
        raise ValueError(f"{', '.join(given)} {verb} to {applies_to} only, not to {target_kind}")


def _diffusion_models(target: Any) -> list[torch.nn.Module]:
    """The UNet and ControlNets of a pipeline, or the model itself."""
    try:
        return diffusion_models_of(target)
    except TypeError:
        raise TypeError(f"apply_mame cannot patch a {type(target).__name__}; supported: {_SUPPORTED}") from None


def apply_mame(
    target: Target,
    ratio: float | Sequence[float] | None = None,
    tau: float = DEFAULT_TAU,
    max_downsample: int | None = None,
    *,
    query_share: float | None = None,
    block: int | None = _MODEL_DEFAULT,
    halo: int = DEFAULT_HALO,
    anchor: str = DEFAULT_ANCHOR,
    temperature: float | None = None,
    straight_through: bool = False,
    proportional_attention: bool = True,
    layers: Sequence[int] | None = None,
    video_grid: str | None = None,
) -> Target:
    """Apply MaMe + MaRe to a pipeline or UNet, or MaMe to a vision model, in place; returns it.

    Applying again replaces the earlier settings. :func:`remove_mame` undoes it exactly.

    Args:
        target: a diffusers pipeline with a ``unet``, a ``UNet2DConditionModel``, or a
            transformers vision model (see
            :data:`mame_diffusers.transformers_integration.SUPPORTED_VISION_MODELS`).
        ratio: fraction of tokens removed by merging, in ``[0, 1)``. UNets: of each merging
            self-attention (default ``DEFAULT_RATIO``). Vision models: of the tokens entering
            each merging layer (default ``DEFAULT_VISION_RATIO``), or a per-layer schedule
            (a sequence).
        tau: similarity threshold in ``[-1, 1]`` for leaving one's own cell.
        max_downsample: UNets only: merge at the highest-resolution attention level (``1``)
            or also at the next ``2``, ``4``, ``8`` times coarser ones (default
            ``DEFAULT_MAX_DOWNSAMPLE``).
        query_share: UNets only: how the attention budget splits between queries (merged,
            then restored) and keys/values; see :class:`MaMeConfig`.
        block: side of the token blocks in which anchors are placed; ``None`` merges
            globally. Default: 8 on UNets, ``None`` on vision models.
        halo, anchor, temperature, straight_through: operator options; see
            :func:`mame_diffusers.plan_merge`.
        proportional_attention: weight merged keys by how many tokens they stand for.
        layers: vision models only: the encoder layers whose input is merged (default: the
            first two thirds); see :class:`VisionMaMeConfig`.
        video_grid: VideoMAE only: ``"per_frame"`` or ``"spacetime"`` merging.
    """
    if isinstance(target, PreTrainedModel):
        _reject_options(
            "diffusers UNets", type(target).__name__, max_downsample=max_downsample, query_share=query_share
        )
        vision_config = VisionMaMeConfig(
            ratio=DEFAULT_VISION_RATIO if ratio is None else ratio,
            layers=layers,
            tau=tau,
            block=DEFAULT_VISION_BLOCK if block is _MODEL_DEFAULT else block,
            halo=halo,
            anchor=anchor,
            temperature=temperature,
            straight_through=straight_through,
            proportional_attention=proportional_attention,
            video_grid=DEFAULT_VIDEO_GRID if video_grid is None else video_grid,
        )
        apply_mame_to_vision_model(target, vision_config)
        return target
    _reject_options("transformers vision models", type(target).__name__, layers=layers, video_grid=video_grid)
    if isinstance(ratio, (list, tuple)):
        raise ValueError("a per-layer ratio schedule applies to transformers vision models only")
    ratio = DEFAULT_RATIO if ratio is None else ratio
    max_downsample = DEFAULT_MAX_DOWNSAMPLE if max_downsample is None else max_downsample
    query_share = DEFAULT_QUERY_SHARE if query_share is None else query_share
    block = DEFAULT_BLOCK if block is _MODEL_DEFAULT else block
    config = MaMeConfig(
        ratio=ratio,
        tau=tau,
        max_downsample=max_downsample,
        query_share=query_share,
        block=block,
        halo=halo,
        anchor=anchor,
        temperature=temperature,
        straight_through=straight_through,
        proportional_attention=proportional_attention,
    )
    for unet in _diffusion_models(target):
        apply_mame_to_unet(unet, config)
    return target


def remove_mame(target: Target) -> Target:
    """Undo :func:`apply_mame`: processors and hooks exactly as before. A no-op when unpatched."""
    if isinstance(target, PreTrainedModel):
        remove_mame_from_vision_model(target)
        return target
    for unet in _diffusion_models(target):
        remove_mame_from_unet(unet)
    return target
