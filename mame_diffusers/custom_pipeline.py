"""The file to give diffusers as a custom pipeline, from any folder and after ``pip install``::

    import mame_diffusers
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(
        model_id_or_path, custom_pipeline=mame_diffusers.CUSTOM_PIPELINE, trust_remote_code=True
    )

``mame_diffusers.CUSTOM_PIPELINE`` is this file's path. diffusers copies the file into its
modules cache and imports the copy, so it holds absolute imports only (diffusers would look
for relative ones next to the copy) and exactly one ``DiffusionPipeline`` subclass: the
package's ``StableDiffusionMaMePipeline``, one definition for this file, the CLI and
``import mame_diffusers``. The repository's ``pipelines/pipeline_stable_diffusion_mame.py``
is the same entry point for loading by a relative path from a clone.
"""

from pathlib import Path

from mame_diffusers.pipeline_stable_diffusion_mame import StableDiffusionMaMePipeline

__all__ = ["CUSTOM_PIPELINE", "StableDiffusionMaMePipeline"]

#: This file, as ``custom_pipeline=`` takes it: an absolute path ending in ``.py``.
CUSTOM_PIPELINE = str(Path(__file__).resolve())
