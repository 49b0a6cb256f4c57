"""``StableDiffusionMaMePipeline``: Stable Diffusion with MaMe as a per-call option.

It loads like any diffusers pipeline::

    pipe = StableDiffusionMaMePipeline.from_pretrained("stabilityai/stable-diffusion-2-1")
    pipe = StableDiffusionMaMePipeline.from_pipe(existing_pipe)
    pipe = DiffusionPipeline.from_pretrained(
        model_id_or_path, custom_pipeline="pipelines/pipeline_stable_diffusion_mame.py", trust_remote_code=True
    )

and ``pipe(prompt, mame_ratio=0.75)`` runs that call with MaMe; the UNet is left exactly as
it was afterwards, also when the call raises.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

# diffusers' Stable Diffusion module imports transformers' CLIPImageProcessor (the safety
# checker's inputs); without torchvision, transformers 5 logs on that import that it falls
# back to the PIL processor. Nothing here uses it: keep the notice out of our import.
_import_notices = logging.getLogger("transformers.utils.import_utils")
_level = _import_notices.level
_import_notices.setLevel(logging.ERROR)
try:
    from diffusers import StableDiffusionPipeline
finally:
    _import_notices.setLevel(_level)

from .api import apply_mame, remove_mame
from .diffusers_integration import MaMeConfig, apply_mame_to_unet, patched_config

__all__ = ["StableDiffusionMaMePipeline"]

#: Call arguments this pipeline adds, and the MaMe setting each one sets.
MAME_CALL_ARGUMENTS = {
    "mame_ratio": "ratio",
    "mame_max_downsample": "max_downsample",
    "mame_keys_values_only": "keys_values_only",
}


class StableDiffusionMaMePipeline(StableDiffusionPipeline):
    """A ``StableDiffusionPipeline`` whose call takes MaMe settings.

    Extra call arguments (all optional; giving any of them turns MaMe on for the call):

    * ``mame_ratio``: the attention budget of merged self-attention, in ``[0, 1)``;
    * ``mame_max_downsample``: merge at attention levels down to this downsampling;
    * ``mame_keys_values_only``: merge only keys and values (nothing to restore).

    Settings not given come from an earlier :func:`mame_diffusers.apply_mame` on this
    pipeline, else from MaMe's defaults. Unknown ``mame_*`` arguments raise ``TypeError``
    (the stock pipeline would drop unknown keyword arguments silently).
    """

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """As diffusers saves pipelines, naming ``StableDiffusionPipeline`` as the class, so
        that plain ``DiffusionPipeline.from_pretrained(folder)`` reopens the folder (diffusers
        knows no ``StableDiffusionMaMePipeline``); ``StableDiffusionMaMePipeline.from_pretrained``
        reopens it as this class, whatever the folder names."""
        super().save_pretrained(save_directory, *args, **kwargs)
        index = Path(save_directory) / "model_index.json"
        config = json.loads(index.read_text())
        config["_class_name"] = StableDiffusionPipeline.__name__
        index.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")

    def __call__(self, *args: Any, **kwargs: Any):
        overrides = _pop_mame_arguments(kwargs)
        if not overrides:
            return super().__call__(*args, **kwargs)
        previous = patched_config(self.unet)
        base = dataclasses.asdict(previous) if previous is not None else {}
        # Validate everything before touching the UNet.
        config = MaMeConfig(**{**base, **overrides})
        apply_mame(self.unet, **dataclasses.asdict(config))
        try:
            return super().__call__(*args, **kwargs)
        finally:
            remove_mame(self.unet)
            if previous is not None:
                apply_mame_to_unet(self.unet, previous)


def _pop_mame_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    unknown = sorted(k for k in kwargs if k.startswith("mame_") and k not in MAME_CALL_ARGUMENTS)
    if unknown:
        raise TypeError(
            f"unknown MaMe argument(s) {', '.join(unknown)}; "
            f"StableDiffusionMaMePipeline accepts {', '.join(MAME_CALL_ARGUMENTS)}"
        )
    overrides = {}
    for argument, setting in MAME_CALL_ARGUMENTS.items():
        value = kwargs.pop(argument, None)
        if value is not None:
            overrides[setting] = value
    return overrides
