"""Which transformers models MaMe supports, and where their towers, layers and attention modules are."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import transformers
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel

from .config import SUPPORTED_VISION_MODELS


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


