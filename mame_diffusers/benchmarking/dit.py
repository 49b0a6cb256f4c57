"""Measuring MaMe on diffusion transformers (PixArt, SD3, Flux, Wan): the models, their inputs,
the ToMe-style peer, and the stock-vs-MaMe comparison of ``mame-diffusers bench --arch``.

Shared by ``mame-diffusers bench`` (:func:`run_dit_bench`), ``benchmarks/dit_benchmark.py``
(the CPU study) and ``benchmarks/gpu_benchmark.py`` (the DiT sections of ``gpu.sh``).

Models are built from the shipped configs with random weights (:class:`Subject`): the real
widths with a few blocks, or tiny ones. Inputs have the statistics of photographs (latents
projected from scikit-image's photos; videos: a slow pan across a photo), not noise, so that
merging sees smooth regions, edges and texture.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ..dit_integration import TokenGrid, build_transformer, transformer_inputs
from ..loading import frame_size
from ..dit_integration import blocks as dit_blocks
from ..methods import Method, share_of_tokens
from .photos import load_photo, photo_latents, project_photo

__all__ = [
    "DIT_ARCHS",
    "QUICK",
    "SUBJECTS",
    "BipartitePlan",
    "PeerHooks",
    "Subject",
    "dit_family",
    "dit_forward",
    "dit_methods",
    "frame_size",
    "merged_tokens",
    "panning_latents",
    "peer_method",
    "photo_latents",
    "swap_hooks",
    "with_layers",
]

#: What ``--arch`` builds offline besides ``sd21``: the DiT families of :data:`SUBJECTS`.
DIT_ARCHS = ("pixart", "sd3", "flux", "wan")
#: Text tokens per call when the benchmark makes up the prompt's embeddings (PixArt-α's 120,
#: SD3's 77 + 256, Flux's and Wan's 512).
TEXT_TOKENS = {"pixart": 120, "sd3": 333, "flux": 512, "wan": 512}


# -- subjects ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Subject:
    """One transformer to measure: family, blocks, latent size, text length, speed target."""

    name: str
    family: str
    label: str
    latent: tuple[int, ...]
    text: int
    layers: int
    single_layers: int | None = None
    target: float | None = None
    size: str = "wide"

    def build(
        self, seed: int = 0, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
    ) -> torch.nn.Module:
        return build_transformer(
            self.family, self.size, num_layers=self.layers, num_single_layers=self.single_layers, seed=seed,
            dtype=dtype, device=device,
        )

    def inputs(self, model: torch.nn.Module, photo: str = "astronaut") -> dict:
        """One call's keyword arguments, the latents from ``photo`` (made on the CPU in
        float32, then moved to the model's device and dtype)."""
        return dit_inputs(model, self.latent, photo=photo, text_length=self.text)


SUBJECTS = {
    "pixart": Subject("pixart", "pixart", "PixArt-α width (1152, 16 heads), 1024², 4 blocks", (128, 128), 120, 4,
                      target=1.5),
    "sd3": Subject("sd3", "sd3", "SD3-medium width (1536, 24 heads), 1024², 3 blocks", (128, 128), 333, 3, target=1.5),
    "flux": Subject("flux", "flux", "Flux.1 width (3072, 24 heads), 1 double + 1 single block, 1024²", (128, 128), 512,
                    1, single_layers=1, target=1.4),
    "wan": Subject("wan", "wan", "Wan2.1-1.3B width (1536, 12 heads, FFN 8960), 33 frames 480p, 2 blocks",
                   (9, 60, 104), 512, 2, target=1.8),
}
QUICK = {
    "pixart": Subject("pixart", "pixart", "tiny PixArt", (32, 48), 8, 2, size="tiny"),
    "sd3": Subject("sd3", "sd3", "tiny SD3.5", (32, 48), 8, 3, size="tiny"),
    "flux": Subject("flux", "flux", "tiny Flux", (32, 48), 8, 1, single_layers=2, size="tiny"),
    "wan": Subject("wan", "wan", "tiny Wan", (5, 32, 48), 8, 2, size="tiny"),
}


def with_layers(subject: Subject, layers: int) -> Subject:
    """``subject`` with another number of blocks (and a label saying so)."""
    label = subject.label.replace(f"{subject.layers} blocks", f"{layers} blocks")
    return replace(subject, layers=layers, label=label)


def dit_family(model: torch.nn.Module) -> str:
    """``"pixart"``, ``"sd3"``, ``"flux"`` or ``"wan"``: the family of a supported DiT."""
    from ..dit_integration import family_of

    family = family_of(model)
    if family is None:
        raise TypeError(f"not a supported diffusion transformer: {type(model).__name__}")
    return family.name


def latent_size(family: str, resolution: int, frames: int | None = None) -> tuple[int, ...]:
    """The VAE latent's ``(H, W)`` (Wan: ``(F, H, W)``, 4 video frames to a latent frame)."""
    height, width = frame_size(family, resolution)
    spatial = (height // 8, width // 8)
    return ((frames - 1) // 4 + 1, *spatial) if family == "wan" else spatial


# -- inputs with the statistics of photographs ---------------------------------------------------------


def panning_latents(name: str, size: tuple[int, int, int], channels: int, step: int = 1) -> torch.Tensor:
    """``(1, channels, frames, h, w)``: a pan across a photo, ``step`` latent pixels per latent
    frame (a Wan latent frame is 4 video frames)."""
    frames, height, width = size
    wide = load_photo(name, (8 * height, 8 * (width + step * (frames - 1))))
    clips = [project_photo(wide[:, :, 8 * step * t: 8 * step * t + 8 * width], channels) for t in range(frames)]
    video = torch.stack(clips, dim=1)
    return ((video - video.mean()) / video.std())[None]


def dit_inputs(model: torch.nn.Module, latent: tuple[int, ...], *, photo: str = "astronaut", text_length: int = 16,
               seed: int = 0) -> dict:
    """:func:`~mame_diffusers.dit_integration.transformer_inputs` with photo latents (a pan for
    videos) in place of noise. Raises ``ImportError`` without scikit-image."""
    channels = model.config.in_channels // 4 if dit_family(model) == "flux" else model.config.in_channels
    if len(latent) == 3:
        latents = panning_latents(photo, latent, channels)
    else:
        latents = photo_latents(photo, latent, channels)
    return transformer_inputs(model, latent, latents=latents, text_length=text_length, seed=seed)


# -- the ToMe-style peer, at MaMe's place ---------------------------------------------------------------


class BipartitePlan:
    """tomesd's bipartite soft matching (random 2 x 2 destinations) over the image grid, with
    the same interface as :class:`~mame_diffusers.dit_integration.GridPlan`; merges to exactly
    MaMe's merged token count."""

    def __init__(self, merge: Callable, unmerge: Callable) -> None:
        self._merge, self._unmerge = merge, unmerge

    @classmethod
    def plan(cls, tokens: torch.Tensor, grid: TokenGrid, merged_count: int) -> tuple["BipartitePlan", torch.Tensor]:
        from tomesd.merge import bipartite_soft_matching_random2d

        generator = torch.Generator(device=tokens.device).manual_seed(0)
        merge, unmerge = bipartite_soft_matching_random2d(
            tokens, grid.width, grid.frames * grid.height, 2, 2, tokens.shape[1] - merged_count, generator=generator
        )
        self = cls(merge, unmerge)
        self._shape, self._device = tokens.shape, tokens.device
        return self, self.merge(tokens)

    def merge(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._merge(tokens, mode="mean")

    def key_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """Proportional attention, as MaMe's blocks get it: log of how many tokens each holds."""
        sizes = self._merge(torch.ones(*self._shape[:2], 1, device=self._device), mode="sum")[..., 0]
        return sizes.log().to(dtype)

    def restore(self, merged: torch.Tensor) -> torch.Tensor:
        return self._unmerge(merged)


class PeerHooks(dit_blocks.BlockHooks):
    """MaMe's block hooks with the bipartite peer planning the merge, on the same features
    (the layer-normed tokens) and to MaMe's merged count."""

    def _plan(self, tokens, grid):
        merged_count = sum(  # MaMe's merged count on this grid
            count * self.config.layout((frames * grid.height, grid.width), "ratio").num_merged
            for count, frames in grid.groups()
        )
        plan, _ = BipartitePlan.plan(F.layer_norm(tokens, tokens.shape[-1:]), grid, merged_count)
        return plan, plan.merge(tokens)


def swap_hooks(model: torch.nn.Module, hooks_class: type) -> None:
    """Give the block hooks that ``apply_mame`` installed on ``model`` another class."""
    for module in model.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, hook in hooks.items():
                owner = getattr(hook, "__self__", None)
                if isinstance(owner, dit_blocks.BlockHooks):
                    owner.__class__ = hooks_class
                    hooks[key] = getattr(owner, hook.__name__)  # bound anew: overridden methods apply


# -- calling and counting ------------------------------------------------------------------------------


def dit_forward(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """One call of ``model`` on ``inputs``: its output tensor."""
    with torch.inference_mode():
        return model(**inputs).sample


def call_dit(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """``call`` for :func:`~.unet.compare_unet` and :func:`~.unet.compare_unet_copies`."""
    return model(**inputs).sample


def _first_block(model: torch.nn.Module) -> torch.nn.Module:
    return next(iter(model.transformer_blocks if hasattr(model, "transformer_blocks") else model.blocks))


def merged_tokens(model: torch.nn.Module, inputs: dict) -> int:
    """Image tokens the first block sees (after MaMe's merge, when it merges)."""
    seen = []
    handle = _first_block(model).register_forward_pre_hook(
        lambda m, a, k: seen.append((a[0] if a else k["hidden_states"]).shape[1]), with_kwargs=True
    )
    try:
        dit_forward(model, inputs)
    finally:
        handle.remove()
    return seen[0]


# -- methods -------------------------------------------------------------------------------------------


def dit_methods(ratios: list[float] | None = None, **settings: Any) -> list[Method]:
    """Stock, then MaMe at each of ``ratios`` (``None``: at its defaults), with ``settings``."""
    from ..api import apply_mame, remove_mame

    methods = [Method("stock", lambda model: None, lambda model: None)]
    for ratio in ratios or [None]:
        given = {**({} if ratio is None else {"ratio": ratio}), **settings}
        label = ", ".join(f"{k}={v}" for k, v in given.items())
        methods.append(Method(
            f"MaMe ({label})" if label else "MaMe (defaults)",
            lambda model, given=given: apply_mame(model, **given),
            remove_mame,
            given,
        ))
    return methods


def peer_method(**settings: Any) -> Method | None:
    """The ToMe bipartite peer at MaMe's place and merged count (``settings`` as
    :class:`~mame_diffusers.dit_integration.DiTMaMeConfig` takes them), or ``None`` when
    tomesd is not installed."""
    try:
        import tomesd.merge  # noqa: F401
    except ImportError:
        return None
    from ..dit_integration import DiTMaMeConfig, apply_mame_to_dit, remove_mame_from_dit

    def patch(model: torch.nn.Module) -> None:
        apply_mame_to_dit(model, DiTMaMeConfig(**settings))
        swap_hooks(model, PeerHooks)

    return Method("ToMe bipartite (same place, same count)", patch, remove_mame_from_dit, dict(settings))


# -- mame-diffusers bench --arch pixart|sd3|flux|wan, or --model <a DiT pipeline> ------------------------


def describe(model: torch.nn.Module) -> str:
    """``"FluxTransformer2DModel, width 3072, 1 + 1 blocks"``."""
    config = model.config
    width = config.num_attention_heads * config.attention_head_dim
    blocks = len(getattr(model, "transformer_blocks", None) or getattr(model, "blocks", []))
    single = len(getattr(model, "single_transformer_blocks", None) or [])
    count = f"{blocks} + {single}" if single else f"{blocks}"
    return f"{type(model).__name__}, width {width}, {count} blocks"


def run_dit_bench(args, device: torch.device, dtype: torch.dtype, resolution: int, frames: int | None) -> list[Path]:
    """``mame-diffusers bench`` on a DiT: stock vs MaMe on one transformer forward (batch 1),
    methods taking turns round by round; JSON, Markdown and a bar chart in ``--out``."""
    from ..loading import UsageError, first_line, load_pipeline
    from .report import environment, write_report
    from .runs import bench_table, bench_warnings, plot_latency
    from .unet import compare_unet

    if args.model is not None:
        model = load_pipeline(args.model, quick=False, device=device, dtype=dtype, seed=args.seed).transformer
        family = dit_family(model)
        text, source = TEXT_TOKENS[family], f"{args.model} (transformer)"
    else:
        family = args.arch
        subject = (QUICK if args.quick else SUBJECTS)[family]
        model = subject.build(args.seed, dtype=dtype, device=device)
        text, source = subject.text, f"{'tiny' if args.quick else 'real-width'} {family}, random weights"
    latent = latent_size(family, resolution, frames)
    try:
        inputs = dit_inputs(model, latent, text_length=text, seed=args.seed)
    except ImportError as error:
        raise UsageError(
            f"the bench merges photo latents and needs scikit-image ({error}): pip install scikit-image, "
            "or install the bench extras: pip install -e '.[bench]'"
        ) from error
    try:
        tokens_in = merged_tokens(model, inputs)  # also checks that the model runs at this size
    except ValueError as error:  # SD3: a latent larger than its position table
        raise UsageError(f"the {family} transformer cannot run at {resolution} pixels: {first_line(error)}") from error
    methods = dit_methods(getattr(args, "ratios", None))
    rows = compare_unet(model, inputs, methods, repeats=args.repeats, warmup=1, call=call_dit, desc="DiT benchmark")
    for method, row in zip(methods, rows):
        method.patch(model)
        try:
            tokens = merged_tokens(model, inputs)
        finally:
            method.unpatch(model)
        row["attends"] = share_of_tokens(tokens / tokens_in)
        row["tokens_per_block"] = tokens
    table = bench_table(rows)
    notes = bench_warnings(rows, tiny=args.quick, tomesd_installed=True)  # no tomesd rows on DiTs
    unmerged = [row["method"] for row in rows[1:] if row["tokens_per_block"] == tokens_in]
    if unmerged:
        notes.append(
            f"{', '.join(unmerged)} left this call unmerged: on {device.type} MaMe merges only calls of at least "
            "min_image_tokens image tokens (batch x tokens after patching); larger images or videos merge"
        )
    height, width = frame_size(family, resolution)
    size = f"{height}x{width}" + (f", {frames} frames" if frames else "")
    print(f"\nTransformer forward ({describe(model)}; {source}; {size}, batch 1, {args.dtype}, {device}):")
    legend = (
        f"attends = image tokens each merged block runs on, of the N = {tokens_in} entering it; seconds = median "
        f"transformer call, min-max = its fastest and slowest round ({args.repeats} rounds, methods in turn); "
        "error = relative error of the transformer's output vs stock (random text embeddings, photo latents)"
    )
    print(legend + ".\n")
    print(table)
    for note in notes:
        print(f"\nwarning: {note}")
    payload = {
        "environment": environment(device, dtype),
        "setup": {
            "model": source,
            "architecture": describe(model),
            "family": family,
            "resolution": resolution,
            "height": height,
            "width": width,
            "frames": frames,
            "image_tokens": tokens_in,
            "text_tokens": text,
            "batch": 1,
            "repeats": args.repeats,
        },
        "rows": rows,
        "warnings": notes,
    }
    out = Path(args.out)
    report = "\n\n".join([legend + ".", table, *[f"**Warning:** {note}." for note in notes]])
    json_path, md_path = write_report(out / "bench", payload, report)
    plot_path = plot_latency(rows, out / "bench.png", title=f"{type(model).__name__} forward, {size}, batch 1")
    return [json_path, md_path, plot_path]
