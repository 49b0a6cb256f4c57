"""Community-pipeline entry point for ``StableDiffusionMaMePipeline``.

From any folder, with the package installed, give diffusers the installed copy of this entry
point (``mame_diffusers/custom_pipeline.py``)::

    import mame_diffusers

    DiffusionPipeline.from_pretrained(
        model_id_or_path, custom_pipeline=mame_diffusers.CUSTOM_PIPELINE, trust_remote_code=True
    )

This file is the same entry point for a clone of the repository, by path::

    DiffusionPipeline.from_pretrained(
        model_id_or_path,
        custom_pipeline="pipelines/pipeline_stable_diffusion_mame.py",
        trust_remote_code=True,
    )

``custom_pipeline`` is a path there: relative ones resolve from the working folder (so this
one only from the repository's root). The class lives in the ``mame_diffusers`` package,
which must be installed (it is not on the package index: ``pip install -e .`` in a clone of
this repository), so that this file, the CLI and ``import mame_diffusers`` all use one
definition. A folder saved by ``StableDiffusionMaMePipeline.save_pretrained`` also reopens
with plain ``DiffusionPipeline.from_pretrained(folder)`` (as the stock pipeline).
"""

from mame_diffusers.pipeline_stable_diffusion_mame import StableDiffusionMaMePipeline

__all__ = ["StableDiffusionMaMePipeline"]
