"""mame-diffusers: MaMe + MaRe matrix-based token merging for diffusers and transformers.

The operator lives in :mod:`mame_diffusers.merging` (pure tensor math); the diffusers
integration in :mod:`mame_diffusers.diffusers_integration`; the transformers vision-model
integration in :mod:`mame_diffusers.transformers_integration`.
"""

from .api import apply_mame, remove_mame
from .diffusers_integration import DEFAULT_RATIO, MaMeConfig, MaMeProcessor
from .merging import (
    DEFAULT_BLOCK,
    DEFAULT_HALO,
    DEFAULT_TAU,
    MergePlan,
    merge_layout,
    plan_merge,
    proportional_attention_bias,
)
from .transformers_integration import VisionMaMeConfig, merge_history, visualize_merges

__version__ = "0.1.0"


def __getattr__(name: str):
    # The pipeline pulls in diffusers' whole Stable Diffusion stack (and CLIP from
    # transformers): import it on first use, not with the package.
    if name == "StableDiffusionMaMePipeline":
        from .pipeline_stable_diffusion_mame import StableDiffusionMaMePipeline

        return StableDiffusionMaMePipeline
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "DEFAULT_BLOCK",
    "DEFAULT_HALO",
    "DEFAULT_RATIO",
    "DEFAULT_TAU",
    "MaMeConfig",
    "MaMeProcessor",
    "MergePlan",
    "StableDiffusionMaMePipeline",
    "VisionMaMeConfig",
    "apply_mame",
    "merge_history",
    "merge_layout",
    "plan_merge",
    "proportional_attention_bias",
    "remove_mame",
    "visualize_merges",
]
