"""mame-diffusers: MaMe + MaRe matrix-based token merging for diffusers and transformers.

The operator lives in :mod:`mame_diffusers.merging` (pure tensor math); each integration in
its own package: :mod:`mame_diffusers.diffusers_integration` (UNets) and
:mod:`mame_diffusers.transformers_integration` (vision transformers).

Names are imported on first use: ``import mame_diffusers.merging`` (the operator alone)
does not pull in diffusers or transformers, which take seconds to import.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.3.0"

#: public name -> the module that defines it
_EXPORTS = {
    "apply_mame": "api",
    "remove_mame": "api",
    "DEFAULT_RATIO": "defaults",
    "MaMeConfig": "diffusers_integration",
    "MaMeProcessor": "diffusers_integration",
    "DEFAULT_BLOCK": "defaults",
    "MergePlan": "merging",
    "merge_layout": "merging",
    "plan_merge": "merging",
    "proportional_attention_bias": "merging",
    "VisionMaMeConfig": "transformers_integration",
    "merge_history": "transformers_integration",
    "visualize_merges": "transformers_integration",
    "StableDiffusionMaMePipeline": "pipeline_stable_diffusion_mame",
    "CUSTOM_PIPELINE": "custom_pipeline",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
