"""``apply_mame_to_vision_model`` / ``remove_mame_from_vision_model``: hooks in, hooks out."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .attention import _AttentionLink, _original_attention, _register_attention
from .config import (
    _ATTENTION_ATTRIBUTE,
    _PATCH_ATTRIBUTE,
    _WRAPPABLE_IMPLEMENTATIONS,
    VisionMaMeConfig,
)
from .merge import MergeRecord, TokenMerger, mame_token_merge
from .models import _describe, _tower_of
from .state import _MergeState


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


