"""Installing MaMe on a UNet and taking it off: :func:`apply_mame_to_unet`,
:func:`remove_mame_from_unet`, and what to patch in a pipeline (:func:`diffusion_models_of`).

``apply_mame_to_unet`` installs one :class:`MaMeProcessor` per self-attention module and
forward pre-hooks that record the latent size and each ``Transformer2DModel``'s grid (plain
``torch.nn.Module`` hooks: diffusers' ``HookRegistry`` measured no better here, see
``docs/architecture.md``). Whatever processors are installed at that moment (attention
slicing, IP-Adapter, fused QKV) become the fallbacks; whatever replaces MaMe's processors
afterwards is detected at the model's next forward and warned about once.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.models.attention_processor import Attention
from diffusers.models.controlnets import MultiControlNetModel, MultiControlNetUnionModel
from diffusers.models.transformers.transformer_2d import Transformer2DModel

from ..defaults import STACK_MIN_LAYERS
from .config import MaMeConfig
from .processor import MaMeProcessor, unwrapped
from .stacks import StackMerge
from .tracking import GridTracker

__all__ = [
    "apply_mame_to_unet",
    "diffusion_models_of",
    "patched_config",
    "remove_mame_from_unet",
    "self_attention_modules",
    "uncompiled",
]

_PATCH_ATTRIBUTE = "_mame_patch"


@dataclass
class _Patch:
    """What apply_mame changed on one model, so that remove_mame can undo exactly that."""

    config: MaMeConfig
    tracker: GridTracker
    hooks: list = field(default_factory=list)
    #: attention module -> (the processor it had, the MaMe processor put in its place)
    processors: dict = field(default_factory=dict)
    #: Set once the "processors were replaced" warning has been given for this patch.
    warned_replaced: bool = False

    def on_model_forward(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """The model's forward pre-hook: check that MaMe is still installed, then start the
        forward's state with the latent size and whether this call merges."""
        if not self.warned_replaced:
            self._check_processors(module)
        sample = args[0] if args else kwargs.get("sample")
        merging = True
        if isinstance(sample, torch.Tensor) and sample.ndim == 4:
            batch, _, height, width = sample.shape
            merging = self.config.merges_call(batch * height * width, sample.device)
        self.tracker.start_forward(sample, merging)

    def _check_processors(self, module: torch.nn.Module) -> None:
        # One identity test per patched module (a few dozen), no tensor work: cheap, and
        # under torch.compile it only adds guards, so the graph stays one graph. The warning
        # (a graph break) is reached only when the processors were actually replaced.
        replaced = sum(attention.processor is not ours for attention, (_, ours) in self.processors.items())
        if replaced:
            self.warned_replaced = True
            warnings.warn(
                f"MaMe's attention processors on {replaced} of {len(self.processors)} self-attention modules of "
                f"this {type(module).__name__} were replaced after apply_mame (enable_attention_slicing, "
                "load_ip_adapter, fuse_qkv_projections and set_attn_processor all replace processors), so "
                "those modules no longer merge tokens as configured. Call apply_mame again to put MaMe back "
                "on top of the new processors.",
                stacklevel=2,
            )


def patched_config(model: torch.nn.Module) -> MaMeConfig | None:
    """The MaMe settings applied to ``model``, or ``None`` when it is not patched."""
    patch = getattr(model, _PATCH_ATTRIBUTE, None)
    return patch.config if patch is not None else None


def self_attention_modules(model: torch.nn.Module) -> list[tuple[str, Transformer2DModel, Attention]]:
    """``(name, parent transformer, attention)`` for every self-attention MaMe can patch."""
    found = []
    for name, transformer in model.named_modules():
        # MaMe needs the latent's spatial grid: patch-embedded (PixArt-style) or vectorised
        # inputs have none it can see.
        if not isinstance(transformer, Transformer2DModel) or not getattr(transformer, "is_input_continuous", True):
            continue
        for sub_name, module in transformer.named_modules():
            if isinstance(module, Attention) and sub_name.endswith("attn1") and not module.is_cross_attention:
                found.append((f"{name}.{sub_name}", transformer, module))
    return found


def apply_mame_to_unet(unet: torch.nn.Module, config: MaMeConfig) -> torch.nn.Module:
    """Install MaMe on every self-attention of ``unet`` (re-applying replaces old settings)."""
    if getattr(unet, _PATCH_ATTRIBUTE, None) is not None:
        remove_mame_from_unet(unet)
    targets = self_attention_modules(unet)
    if not targets:
        raise ValueError(
            f"{type(unet).__name__} has no self-attention inside a Transformer2DModel for MaMe to patch; "
            "supported: diffusers UNet2DConditionModel (SD 1.x, SD 2.x, SDXL) and models built from "
            "Transformer2DModel blocks"
        )
    tracker = GridTracker()
    patch = _Patch(config=config, tracker=tracker)
    patch.hooks.append(unet.register_forward_pre_hook(patch.on_model_forward, with_kwargs=True))
    records = {}
    for transformer in {id(t): t for _, t, _ in targets}.values():
        record = records[id(transformer)] = tracker.new_transformer()
        patch.hooks.append(transformer.register_forward_pre_hook(record.on_forward, with_kwargs=True))
        blocks = getattr(transformer, "transformer_blocks", None)
        if config.stack_ratio > 0 and blocks is not None and len(blocks) >= STACK_MIN_LAYERS:
            stack = StackMerge(tracker, record, config)
            patch.hooks.append(blocks[0].register_forward_pre_hook(stack.before_first_block, with_kwargs=True))
            patch.hooks.append(blocks[-1].register_forward_hook(stack.after_last_block, with_kwargs=True))
    for _, transformer, attention in targets:
        processor = MaMeProcessor(config=config, fallback=unwrapped(attention.processor))
        processor._tracker, processor._record = tracker, records[id(transformer)]
        patch.processors[attention] = (attention.processor, processor)
        attention.set_processor(processor)
    setattr(unet, _PATCH_ATTRIBUTE, patch)
    return unet


def remove_mame_from_unet(unet: torch.nn.Module) -> torch.nn.Module:
    """Undo :func:`apply_mame_to_unet`: the original processors come back, hooks go away."""
    patch = getattr(unet, _PATCH_ATTRIBUTE, None)
    if patch is None:
        return unet
    for hook in patch.hooks:
        hook.remove()
    for attention, (original, ours) in patch.processors.items():
        current = attention.processor
        if current is ours:
            attention.set_processor(original)
        elif isinstance(current, MaMeProcessor):
            # A MaMeProcessor that apply_mame did not install, set while patched: load_ip_adapter
            # does this, rebuilding every attn1 processor as ``type(processor)()``, which makes
            # default, untracked MaMeProcessors. Removing MaMe must not leave them behind.
            attention.set_processor(unwrapped(current))
        # Any other processor set after apply_mame (attention slicing, IP-Adapter, ...) is the
        # user's to keep.
    # fuse_qkv_projections saves the processors it replaces, for unfuse_qkv_projections to put
    # back: MaMe's must not come back from there.
    saved = getattr(unet, "original_attn_processors", None)
    if isinstance(saved, dict):
        originals = {id(ours): original for original, ours in patch.processors.values()}
        for name, processor in saved.items():
            if isinstance(processor, MaMeProcessor):
                saved[name] = originals.get(id(processor), unwrapped(processor))
    delattr(unet, _PATCH_ATTRIBUTE)
    return unet


def diffusion_models_of(target: Any, *, include_controlnet: bool = True) -> list[torch.nn.Module]:
    """The models of ``target`` that MaMe patches, each to be patched on its own.

    * A pipeline: its ``unet`` and, unless ``include_controlnet=False``, its ControlNet(s):
      ``pipe.controlnet`` when it is a model, or each of the ``nets`` of a
      ``MultiControlNetModel``. A ControlNet is listed only when it has self-attention
      MaMe can patch and shares no attention module with a model listed before it
      (ControlNet-XS fuses its adapter into ``pipe.unet``; patching it twice would wrap MaMe
      in MaMe).
    * A ``MultiControlNetModel`` given alone: its nets.
    * Any other ``torch.nn.Module``: the model itself (``apply_mame_to_unet`` says whether it
      has anything to patch).

    Each listed model gets its own patch record, grid tracker and hooks; ControlNets run
    their own forward on the latent (``sample``), so their tracker sees the same latent
    size as the UNet's. Raises ``TypeError`` for anything else.
    """
    unet = getattr(target, "unet", None)
    if isinstance(unet, torch.nn.Module):
        unet = uncompiled(unet)
        models = [unet]
        controlnet = getattr(target, "controlnet", None)
        if include_controlnet and isinstance(controlnet, torch.nn.Module):
            patched = {id(a) for _, _, a in self_attention_modules(unet)}
            for net in _controlnets_in(uncompiled(controlnet)):
                net = uncompiled(net)
                attentions = {id(a) for _, _, a in self_attention_modules(net)}
                if attentions and not attentions & patched:
                    models.append(net)
                    patched |= attentions
        return models
    if isinstance(target, torch.nn.Module):
        return [uncompiled(model) for model in _controlnets_in(uncompiled(target))]
    raise TypeError(
        f"apply_mame cannot patch a {type(target).__name__}; it patches diffusers pipelines with a `unet` "
        "(and their ControlNets), UNet2DConditionModel and ControlNetModel"
    )


def uncompiled(model: torch.nn.Module) -> torch.nn.Module:
    """The model inside a ``torch.compile`` wrapper, or ``model`` itself.

    Patches (hooks, processors, the patch record) belong on the real model: the compiled
    wrapper calls it, and a later ``apply``/``remove`` on either finds the same record.
    """
    inner = getattr(model, "_orig_mod", None)  # torch._dynamo's OptimizedModule
    return inner if isinstance(inner, torch.nn.Module) else model


def _controlnets_in(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The nets of a multi-ControlNet wrapper, or the model itself."""
    if isinstance(model, (MultiControlNetModel, MultiControlNetUnionModel)):
        return list({id(net): net for net in model.nets}.values())  # a net listed twice is patched once
    return [model]
