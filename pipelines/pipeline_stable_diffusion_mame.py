"""Community-pipeline entry point for ``StableDiffusionMaMePipeline``.

Load with::

    DiffusionPipeline.from_pretrained(
        model_id_or_path,
        custom_pipeline="pipelines/pipeline_stable_diffusion_mame.py",
        trust_remote_code=True,
    )

The class lives in the installed ``mame_diffusers`` package (``pip install mame-diffusers``)
so that this file, the CLI and ``import mame_diffusers`` all use one definition.
"""

from mame_diffusers.pipeline_stable_diffusion_mame import StableDiffusionMaMePipeline

__all__ = ["StableDiffusionMaMePipeline"]
