"""One entry point for every model MaMe supports: ``apply_mame`` and ``remove_mame``."""

from __future__ import annotations

from typing import Any, TypeVar

import torch

from .diffusers_integration import (
    DEFAULT_QUERY_SHARE,
    DEFAULT_RATIO,
    MaMeConfig,
    apply_mame_to_unet,
    remove_mame_from_unet,
)
from .merging import DEFAULT_ANCHOR, DEFAULT_BLOCK, DEFAULT_HALO, DEFAULT_TAU

__all__ = ["apply_mame", "remove_mame"]

Target = TypeVar("Target")

_SUPPORTED = (
    "a diffusers pipeline with a `unet` (StableDiffusion, SDXL, img2img, inpaint, ControlNet, ...), "
    "a diffusers UNet2DConditionModel"
)


def _unets_of(target: Any) -> list[torch.nn.Module]:
    """The UNet(s) of a pipeline, or the model itself."""
    unet = getattr(target, "unet", None)
    if isinstance(unet, torch.nn.Module):
        return [unet]
    if isinstance(target, torch.nn.Module):
        return [target]
    raise TypeError(f"apply_mame cannot patch a {type(target).__name__}; supported: {_SUPPORTED}")


def apply_mame(
    target: Target,
    ratio: float = DEFAULT_RATIO,
    tau: float = DEFAULT_TAU,
    max_downsample: int = 1,
    *,
    query_share: float = DEFAULT_QUERY_SHARE,
    block: int | None = DEFAULT_BLOCK,
    halo: int = DEFAULT_HALO,
    anchor: str = DEFAULT_ANCHOR,
    temperature: float | None = None,
    straight_through: bool = False,
    proportional_attention: bool = True,
) -> Target:
    """Apply MaMe + MaRe to a pipeline or model, in place; returns it.

    Applying again replaces the earlier settings. :func:`remove_mame` undoes it exactly.

    Args:
        target: a diffusers pipeline with a ``unet``, or a ``UNet2DConditionModel``.
        ratio: fraction of self-attention tokens removed by merging, in ``[0, 1)``.
        tau: similarity threshold in ``[-1, 1]`` for leaving one's own cell.
        max_downsample: merge at the highest-resolution attention level (``1``) or also
            at the next ``2``, ``4``, ``8`` times coarser ones.
        query_share: how the attention budget splits between queries (merged, then
            restored) and keys/values; see :class:`MaMeConfig`.
        block, halo, anchor, temperature, straight_through: operator options; see
            :func:`mame_diffusers.plan_merge`.
        proportional_attention: weight merged keys by how many tokens they stand for.
    """
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
    for unet in _unets_of(target):
        apply_mame_to_unet(unet, config)
    return target


def remove_mame(target: Target) -> Target:
    """Undo :func:`apply_mame`: processors and hooks exactly as before. A no-op when unpatched."""
    for unet in _unets_of(target):
        remove_mame_from_unet(unet)
    return target
