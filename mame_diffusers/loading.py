"""Loading what the command line runs: the device, the dtype and the pipeline, and the one
error a user's request can raise (:class:`UsageError`, reported as one line).

A Stable Diffusion pipeline (``--model``'s, or SD 2.1 built offline) denoises with a UNet; a
PixArt-α/Σ, SD3, Flux or Wan pipeline with a diffusion transformer. Which one a command runs is
known before any weights load (:func:`denoiser_family`: ``--arch``, or ``--model``'s
``model_index.json``), and so are the defaults that depend on it (resolution, frames, ratio).

Shared by ``mame-diffusers bench`` and ``generate`` (``benchmarking.runs``) and the batch
generator (``generation``).
"""

from __future__ import annotations

import torch

from .offline import offline_pipeline_components

__all__ = [
    "DIT_PIPELINES",
    "UsageError",
    "call_arguments",
    "check_generates",
    "denoiser_family",
    "first_line",
    "frame_size",
    "generate_family",
    "index_family",
    "is_dit_pipeline",
    "load_pipeline",
    "patch_target",
    "pictures",
    "pipeline_index",
    "resolve_device",
    "resolve_dtype",
    "resolve_frames",
    "resolve_ratio",
    "resolve_resolution",
]


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


#: Text-to-image and text-to-video pipelines with a diffusion transformer that ``generate`` runs.
DIT_PIPELINES = (
    "PixArtAlphaPipeline",
    "PixArtSigmaPipeline",
    "StableDiffusion3Pipeline",
    "FluxPipeline",
    "WanPipeline",
)


def pipeline_index(model: str) -> dict:
    """``model``'s ``model_index.json`` (a hub id or a folder): the pipeline class and its parts."""
    from diffusers import DiffusionPipeline

    try:
        return DiffusionPipeline.load_config(model)
    except (OSError, ValueError) as error:
        raise UsageError(f"cannot load model {model!r}: {first_line(error)}") from error


def index_family(index: dict) -> str | None:
    """The DiT family (``"pixart"``, ``"sd3"``, ``"flux"``, ``"wan"``) of the ``transformer`` a
    ``model_index.json`` names, or ``None`` when it names none that MaMe supports."""
    from .dit_integration import FAMILIES

    transformer = index.get("transformer")
    if not (isinstance(transformer, (list, tuple)) and len(transformer) == 2):
        return None
    return next((family.name for family in FAMILIES if family.class_name == transformer[1]), None)


def denoiser_family(model: str | None, arch: str | None) -> str:
    """What a command will run, known before any weights load: ``"unet"`` (a Stable Diffusion
    pipeline: ``--model``'s, or the offline SD 2.1 one), or the DiT family of ``--arch`` or of
    ``--model``'s ``model_index.json``."""
    if model is None:
        return "unet" if arch in (None, "sd21") else arch
    if arch is not None:
        raise UsageError(
            "--arch builds a model offline with random weights; with --model the model's own architecture "
            "runs: drop --arch"
        )
    return index_family(pipeline_index(model)) or "unet"


def check_generates(model: str) -> None:
    """``generate`` runs text-to-image and text-to-video pipelines (:data:`DIT_PIPELINES`, and
    Stable Diffusion's): one line saying so for ``model``'s other DiT pipelines, before they load."""
    name = pipeline_index(model).get("_class_name")
    if name not in DIT_PIPELINES:
        raise UsageError(
            f"generate runs the text-to-image and text-to-video pipelines {', '.join(DIT_PIPELINES)}; {model!r} "
            f"is a {name}, which needs other inputs (bench times its transformer: mame-diffusers bench --model)"
        )


def generate_family(args) -> str:
    """:func:`denoiser_family` for ``generate``: diffusion transformers
    need real weights (random ones make noise at a DiT's full cost; ``bench --arch`` times
    them), and their pipeline must be one that ``generate`` can call."""
    arch = getattr(args, "arch", None)
    if args.model is None and arch not in (None, "sd21"):
        raise UsageError(
            f"generate needs real weights for diffusion transformers: pass a {arch} pipeline as --model "
            f"(a hub id or folder); `mame-diffusers bench --arch {arch}` times the random-weight one"
        )
    family = denoiser_family(args.model, arch)
    if family != "unet":
        check_generates(args.model)
    return family


def resolve_ratio(ratio: float | None, family: str) -> float:
    """``--ratio``, or MaMe's default ratio for ``family`` (UNets' and DiTs' differ)."""
    if ratio is not None:
        return ratio
    if family == "unet":
        from .defaults import DEFAULT_RATIO

        return DEFAULT_RATIO
    from .dit_integration import DEFAULT_DIT_RATIO

    return DEFAULT_DIT_RATIO


def resolve_resolution(resolution: int | None, family: str, quick: bool) -> int:
    """``--resolution``, or its default for ``family`` (:func:`denoiser_family`): UNets 512 (128
    with ``--quick``), DiTs 1024 (256), Wan a frame height of 480 (256)."""
    if resolution is None:
        if family == "unet":
            return 128 if quick else 512
        return 256 if quick else 480 if family == "wan" else 1024
    if family != "unet" and resolution % 16:
        raise UsageError(f"diffusion transformers take a --resolution that is a multiple of 16, got {resolution}")
    return resolution


def resolve_frames(frames: int | None, family: str, default: int) -> int | None:
    """``--frames`` for a video model (Wan), else ``None``; an error for image models."""
    if family != "wan":
        if frames is not None:
            raise UsageError(f"--frames applies to video models (Wan) only, not to {family}")
        return None
    return frames or default


# -- running a pipeline, whichever denoiser it has ---------------------------------------------


def patch_target(pipe):
    """What a method patches: a UNet pipeline's ``unet`` (tomesd and the UNet methods take the
    UNet), a DiT pipeline itself (``apply_mame`` finds its transformers, Wan 2.2's second too)."""
    return pipe if is_dit_pipeline(pipe) else pipe.unet


def call_arguments(pipe, resolution: int, frames: int | None = None) -> dict:
    """The size arguments of a text-to-image (or, with ``frames``, text-to-video) call of ``pipe``:
    square images; Wan's frames at 480p's shape (:func:`frame_size`), returned as PIL frames."""
    if frames is None:
        return {"height": resolution, "width": resolution}
    height, width = frame_size("wan", resolution)
    return {"height": height, "width": width, "num_frames": frames, "output_type": "pil"}


def pictures(output) -> list:
    """The images of a pipeline's output, or its videos as lists of PIL frames."""
    frames = getattr(output, "frames", None)
    return list(frames) if frames is not None else list(output.images)


def frame_size(family: str, resolution: int) -> tuple[int, int]:
    """``(height, width)`` in pixels: square, except Wan's 480p shape (832 wide at 480 high),
    its width rounded to a multiple of 16."""
    if family == "wan":
        return resolution, 16 * max(1, round(resolution * 832 / 480 / 16))
    return resolution, resolution


def is_dit_pipeline(pipe) -> bool:
    """Whether ``pipe`` denoises with a diffusion transformer (``pipe.transformer``), not a UNet."""
    from .dit_integration import is_dit

    return is_dit(pipe)


def _dtype_keyword() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` since diffusers deprecated ``torch_dtype``."""
    try:
        from diffusers.utils.deprecation_utils import _resolve_dtype  # noqa: F401  (there since ``dtype``)
    except ImportError:
        return "torch_dtype"
    return "dtype"


def first_line(error: BaseException) -> str:
    """An exception's first line, for a one-line error (its type's name when it has no text)."""
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def load_pipeline(model: str | None, *, quick: bool, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The pipeline to measure: real weights from ``model``, else built offline.

    ``model``'s ``model_index.json`` decides the class: a pipeline with a diffusion transformer
    MaMe supports (PixArt-α/Σ, SD3, Flux, Wan) loads with ``DiffusionPipeline.from_pretrained``,
    any other as a Stable Diffusion pipeline (:class:`StableDiffusionMaMePipeline`).
    """
    from .pipeline_stable_diffusion_mame import StableDiffusionMaMePipeline

    if model is not None:
        if quick:
            raise UsageError("--quick builds a tiny random model; it cannot be combined with --model")
        pipeline_class, options = StableDiffusionMaMePipeline, {}
        if index_family(pipeline_index(model)) is not None:
            from diffusers import DiffusionPipeline

            # Loaded in the dtype: a DiT pipeline's float32 copy (Flux: 12B + T5-XXL's 4.7B) may
            # not fit in memory.
            pipeline_class, options = DiffusionPipeline, {_dtype_keyword(): dtype}
        try:
            # Stable Diffusion pipelines are cast after loading (below); DiT pipelines load in the
            # dtype, with the keyword this diffusers takes.
            pipe = pipeline_class.from_pretrained(model, **options)
        except (OSError, ValueError) as error:
            raise UsageError(f"cannot load model {model!r}: {first_line(error)}") from error
    else:
        # Built on the device in the dtype: no cast afterwards (diffusers warns on every one).
        components = offline_pipeline_components("tiny" if quick else "sd21", seed=seed, device=device, dtype=dtype)
        pipe = StableDiffusionMaMePipeline(**components)
        pipe.set_progress_bar_config(disable=True)
        return pipe
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=dtype)
