"""Loading what the command line runs: the device, the dtype and the pipeline, and the one
error a user's request can raise (:class:`UsageError`, reported as one line).

Shared by ``mame-diffusers bench`` and ``generate`` (``benchmarking.runs``) and the batch
generator (``generation``).
"""

from __future__ import annotations

import torch

from .offline import offline_pipeline_components

__all__ = ["UsageError", "load_pipeline", "resolve_device", "resolve_dtype"]


class UsageError(Exception):
    """A problem with what the user asked for: reported as one line, no traceback."""


def resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UsageError(f"unknown device {name!r}") from error
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("CUDA was requested (--device cuda) but no GPU is available to torch")
    return device


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    dtype = getattr(torch, name)
    if dtype == torch.float16 and device.type == "cpu":
        raise UsageError("float16 runs on GPUs; on a CPU use --dtype float32 or bfloat16")
    return dtype


def load_pipeline(model: str | None, *, quick: bool, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The pipeline to measure: real weights from ``model``, else built offline."""
    from .pipeline_stable_diffusion_mame import StableDiffusionMaMePipeline

    if model is not None:
        if quick:
            raise UsageError("--quick builds a tiny random model; it cannot be combined with --model")
        try:
            # Cast after loading: the dtype keyword's name differs across diffusers versions.
            pipe = StableDiffusionMaMePipeline.from_pretrained(model)
        except (OSError, ValueError) as error:
            reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            raise UsageError(f"cannot load model {model!r}: {reason}") from error
    else:
        # Built on the device in the dtype: no cast afterwards (diffusers warns on every one).
        components = offline_pipeline_components("tiny" if quick else "sd21", seed=seed, device=device, dtype=dtype)
        pipe = StableDiffusionMaMePipeline(**components)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)
