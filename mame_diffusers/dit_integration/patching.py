"""Installing MaMe on a DiT and taking it off: :func:`apply_mame_to_dit`,
:func:`remove_mame_from_dit`, and which models of a pipeline to patch (:func:`dit_models_of`).

``apply_mame_to_dit`` adds plain ``torch.nn.Module`` hooks: a forward pre-hook on the model
that reads the image grid from the call's inputs, and a pre-hook and a hook on each merged
block (:class:`~.blocks.BlockHooks`). Block classes stay as they are (diffusers' caches find
blocks by class). SD3's, Flux's and Wan's default attention processors are wrapped
(:mod:`.processors`: proportional attention, per-sample rotary tables), PixArt's are not.
Diffusers' own hooks (``enable_cache``, group offloading) replace ``forward``, inside the
module call that runs torch's hooks: they see the merged tokens of a merged block, and MaMe
works with them in either order (:func:`~.blocks.runs_cache_boundary`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ..diffusers_integration import uncompiled
from .blocks import BlockHooks
from .config import DiTMaMeConfig
from .families import Family, family_of, supported_classes
from .processors import FluxMergedAttnProcessor, SD3MergedAttnProcessor, WanMergedAttnProcessor
from .state import ForwardTracker

__all__ = ["apply_mame_to_dit", "dit_models_of", "is_dit", "patched_dit_config", "remove_mame_from_dit"]

_PATCH_ATTRIBUTE = "_mame_dit_patch"
#: MaMe's wrapper for each diffusers processor it wraps (:mod:`.processors`).
_WRAPPERS = {
    "FluxAttnProcessor": FluxMergedAttnProcessor,
    "JointAttnProcessor2_0": SD3MergedAttnProcessor,
    "WanAttnProcessor": WanMergedAttnProcessor,
}
#: Pipeline attributes that hold a DiT (Wan 2.2's second expert is ``transformer_2``).
_PIPELINE_MODELS = ("transformer", "transformer_2")


@dataclass
class _Patch:
    """What apply_mame changed on one model, so that remove_mame undoes exactly that."""

    config: DiTMaMeConfig
    family: Family
    tracker: ForwardTracker
    grid_reader: Any
    hooks: list = field(default_factory=list)
    #: attention module -> (the processor it had, MaMe's wrapper)
    processors: dict = field(default_factory=dict)

    def on_model_forward(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """The model's forward pre-hook: the call's image grid, and whether it merges."""
        grid = self.grid_reader(model, args, kwargs)
        merging = False
        if grid is not None:
            hidden = args[0] if args else kwargs.get("hidden_states")
            merging = self.config.merges_call(int(hidden.shape[0]) * grid.tokens, hidden.device)
        self.tracker.start_forward(grid, merging)


def patched_dit_config(model: torch.nn.Module) -> DiTMaMeConfig | None:
    """The MaMe settings applied to ``model``, or ``None`` when it is not patched."""
    patch = getattr(uncompiled(model), _PATCH_ATTRIBUTE, None)
    return patch.config if patch is not None else None


def apply_mame_to_dit(model: torch.nn.Module, config: DiTMaMeConfig) -> torch.nn.Module:
    """Install MaMe on the blocks of a supported DiT (applying again replaces old settings)."""
    model = uncompiled(model)
    family = family_of(model)
    if family is None:
        raise TypeError(
            f"MaMe does not support {type(model).__name__}; supported diffusion transformers: "
            f"{', '.join(supported_classes())}"
        )
    if getattr(model, _PATCH_ATTRIBUTE, None) is not None:
        remove_mame_from_dit(model)
    blocks = family.blocks(model)
    if config.blocks is not None and config.blocks and config.blocks[-1] >= len(blocks):
        raise ValueError(
            f"blocks={config.blocks} names blocks beyond the {len(blocks)} of this {type(model).__name__} "
            f"(indices 0 to {len(blocks) - 1}, in the order they run)"
        )
    tracker = ForwardTracker()
    patch = _Patch(config=config, family=family, tracker=tracker, grid_reader=family.grid_reader())
    patch.hooks.append(model.register_forward_pre_hook(patch.on_model_forward, with_kwargs=True))
    for index, block in enumerate(blocks):
        if not config.merges_block(index):
            continue
        kind = family.kind_of(block)
        processors = _install_processors(block, kind, patch)
        hooks = BlockHooks(index=index, kind=kind, tracker=tracker, config=config, processors=processors)
        patch.hooks.append(block.register_forward_pre_hook(hooks.before, with_kwargs=True))
        patch.hooks.append(block.register_forward_hook(hooks.after, with_kwargs=True))
    setattr(model, _PATCH_ATTRIBUTE, patch)
    return model


def remove_mame_from_dit(model: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply_mame_to_dit`: hooks and processors as they were; a no-op when not
    patched. A processor set after ``apply_mame`` stays."""
    model = uncompiled(model)
    patch = getattr(model, _PATCH_ATTRIBUTE, None)
    if patch is None:
        return model
    for hook in patch.hooks:
        hook.remove()
    for attention, (original, ours) in patch.processors.items():
        if attention.processor is ours:
            attention.set_processor(original)
    delattr(model, _PATCH_ATTRIBUTE)
    return model


def _install_processors(block: torch.nn.Module, kind, patch: _Patch) -> tuple:
    """Wrap the processors ``kind`` lists on ``block``; returns ``(attention, ours)`` pairs. A
    processor of another class (IP-Adapter, fused projections, a user's) is left alone, and
    the block will run unmerged (its hooks say so once)."""
    pairs = []
    for name, class_name in kind.processors:
        attention = getattr(block, name, None)
        if attention is None:  # SD3 blocks without an image-only attn2
            continue
        original = attention.processor
        ours = _WRAPPERS[class_name](original) if type(original).__name__ == class_name else None
        if ours is not None:
            attention.set_processor(ours)
            patch.processors[attention] = (original, ours)
        pairs.append((attention, ours))
    return tuple(pairs)


def is_dit(target: Any) -> bool:
    """Whether ``target`` is a diffusion transformer, or a pipeline holding one (and no UNet):
    the models :func:`apply_mame_to_dit` takes, or that it refuses with a clear error."""
    model = uncompiled(target) if isinstance(target, torch.nn.Module) else getattr(target, "transformer", None)
    if isinstance(target, torch.nn.Module):
        return _is_diffusers_transformer(model)
    return isinstance(model, torch.nn.Module) and not isinstance(getattr(target, "unet", None), torch.nn.Module)


def dit_models_of(target: Any) -> list[torch.nn.Module]:
    """The DiTs of ``target``: a pipeline's ``transformer`` (and Wan 2.2's ``transformer_2``),
    or the model itself."""
    if isinstance(target, torch.nn.Module):
        return [uncompiled(target)]
    models = [getattr(target, name, None) for name in _PIPELINE_MODELS]
    return [uncompiled(m) for m in models if isinstance(m, torch.nn.Module)]


def _is_diffusers_transformer(model: torch.nn.Module) -> bool:
    # Transformer2DModel is the UNet's attention stack: the UNet integration patches it alone too.
    cls = type(model)
    return family_of(model) is not None or (
        cls.__module__.startswith("diffusers.models.transformers") and cls.__name__ != "Transformer2DModel"
    )
