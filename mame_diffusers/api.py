"""One entry point for every model MaMe supports: ``apply_mame`` and ``remove_mame``.

Each kind of model has its own settings class, with its own defaults and validation:
:class:`~mame_diffusers.MaMeConfig` for diffusers UNets (and their ControlNets),
:class:`~mame_diffusers.dit_integration.DiTMaMeConfig` for diffusion transformers (PixArt, SD3,
Flux, Wan), :class:`~mame_diffusers.VisionMaMeConfig` for transformers vision models.
``apply_mame`` only routes the settings it is given to the right one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence, TypeVar

from transformers import PreTrainedModel

from .diffusers_integration import MaMeConfig, apply_mame_to_unet, diffusion_models_of, remove_mame_from_unet
from .dit_integration import DiTMaMeConfig, apply_mame_to_dit, dit_models_of, is_dit, remove_mame_from_dit
from .transformers_integration import VisionMaMeConfig, apply_mame_to_vision_model, remove_mame_from_vision_model

__all__ = ["apply_mame", "remove_mame"]

Target = TypeVar("Target")

_SUPPORTED = (
    "a diffusers pipeline with a `unet` (StableDiffusion, SDXL, img2img, inpaint, ControlNet, ...), "
    "a diffusers UNet2DConditionModel or ControlNetModel, a diffusion transformer or its pipeline "
    "(PixArtTransformer2DModel, SD3Transformer2DModel, FluxTransformer2DModel, WanTransformer3DModel), "
    "a transformers vision model (ViT, DeiT, CLIP, SigLIP, SigLIP2, VideoMAE)"
)
_KINDS = {
    MaMeConfig: "diffusers UNets",
    DiTMaMeConfig: "diffusion transformers",
    VisionMaMeConfig: "transformers vision models",
}


def apply_mame(target: Target, ratio: float | Sequence[float] | None = None, **settings: Any) -> Target:
    """Apply MaMe to a pipeline or model, in place, and return it.

    Applying again replaces the earlier settings; :func:`remove_mame` undoes it exactly.

    Args:
        target: a diffusers pipeline with a ``unet`` (its ControlNets are patched too), a
            ``UNet2DConditionModel`` or ``ControlNetModel``, a diffusion transformer (PixArt,
            SD3, Flux, Wan) or a pipeline with one (``pipe.transformer``, and Wan 2.2's
            ``pipe.transformer_2``), or a transformers vision model (see
            :data:`mame_diffusers.transformers_integration.SUPPORTED_VISION_MODELS`).
        ratio: the merge ratio, in ``[0, 1)``. UNets: the attention budget of each merging
            self-attention, as tomesd's ratio. DiTs: the fraction of image tokens each merged
            block removes. Vision models: the fraction of tokens each merging layer removes, or
            a per-layer schedule (a sequence).
        **settings: any other field of :class:`~mame_diffusers.MaMeConfig` (UNets:
            ``max_downsample``, ``min_latent_tokens``, ``keys_values_only``, ``stack_ratio``,
            ``block``, ``backend``), of :class:`~mame_diffusers.dit_integration.DiTMaMeConfig`
            (DiTs: ``blocks``, ``min_image_tokens``) or of
            :class:`~mame_diffusers.VisionMaMeConfig` (vision models: ``layers``, ``block``,
            ``video_grid``, ``similarity_channels``).
            Settings not given take that class's defaults; settings of the other kind of
            model raise ``ValueError``.
    """
    if ratio is not None:
        settings["ratio"] = ratio
    if isinstance(target, PreTrainedModel):
        apply_mame_to_vision_model(target, _config(VisionMaMeConfig, settings, target))
        return target
    if isinstance(ratio, (list, tuple)):
        raise ValueError("a per-layer ratio schedule applies to transformers vision models only")
    if is_dit(target):
        config = _config(DiTMaMeConfig, settings, target)
        for model in dit_models_of(target):
            apply_mame_to_dit(model, config)
        return target
    config = _config(MaMeConfig, settings, target)
    for model in _diffusion_models(target):
        apply_mame_to_unet(model, config)
    return target


def remove_mame(target: Target) -> Target:
    """Undo :func:`apply_mame`: processors, hooks and outputs exactly as before; a no-op when
    nothing is patched."""
    if isinstance(target, PreTrainedModel):
        remove_mame_from_vision_model(target)
        return target
    if is_dit(target):
        for model in dit_models_of(target):
            remove_mame_from_dit(model)
        return target
    for model in _diffusion_models(target):
        remove_mame_from_unet(model)
    return target


def _config(config_class: type, settings: dict[str, Any], target: Any):
    """``config_class(**settings)``, saying which settings belong to the other kind of model."""
    names = {f.name for f in dataclasses.fields(config_class)}
    foreign = [name for name in settings if name not in names]
    if foreign:
        for other in _KINDS:
            names_of_other = {f.name for f in dataclasses.fields(other)}
            if other is not config_class and all(name in names_of_other for name in foreign):
                verb = "apply" if len(foreign) > 1 else "applies"
                raise ValueError(
                    f"{', '.join(foreign)} {verb} to {_KINDS[other]} only, not to {type(target).__name__}"
                )
        raise TypeError(
            f"unknown MaMe setting(s) {', '.join(sorted(foreign))}; {_KINDS[config_class]} take "
            f"{', '.join(sorted(names))}"
        )
    return config_class(**settings)


def _diffusion_models(target: Any) -> list:
    """The UNet and ControlNets of a pipeline, or the model itself."""
    try:
        return diffusion_models_of(target)
    except TypeError:
        raise TypeError(f"apply_mame cannot patch a {type(target).__name__}; supported: {_SUPPORTED}") from None
