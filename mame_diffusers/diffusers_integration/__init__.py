"""MaMe for diffusers UNets (SD 1.x, SD 2.x, SDXL, and their ControlNets), one module per concept:

- :mod:`.config`: :class:`MaMeConfig`, the settings, validated in one place;
- :mod:`.tracking`: what one forward found (grids, plans, stack merges), kept per thread;
- :mod:`.processor`: :class:`MaMeProcessor`, the attention processor (MaMe, attention, MaRe);
- :mod:`.stacks`: merging before a deep transformer stack and restoring after it (SDXL);
- :mod:`.patching`: ``apply_mame_to_unet`` / ``remove_mame_from_unet`` and what to patch.

Two ways in: :func:`mame_diffusers.apply_mame` (recommended: exact grids of any shape, plans
shared per level, deep-stack merging) or ``unet.set_attn_processor(MaMeProcessor())``.
"""

from .config import MaMeConfig
from .patching import (
    apply_mame_to_unet,
    diffusion_models_of,
    patched_config,
    remove_mame_from_unet,
    self_attention_modules,
    uncompiled,
)
from .processor import MaMeProcessor

__all__ = [
    "MaMeConfig",
    "MaMeProcessor",
    "apply_mame_to_unet",
    "diffusion_models_of",
    "patched_config",
    "remove_mame_from_unet",
    "self_attention_modules",
    "uncompiled",
]
