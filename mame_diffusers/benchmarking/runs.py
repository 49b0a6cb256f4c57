"""What ``mame-diffusers bench`` and ``mame-diffusers generate`` do.

Kept out of the CLI module so that the notebook and scripts call the same functions.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from .. import DEFAULT_TAU
from ..offline import offline_pipeline_components
from .report import environment, markdown_table, write_report
from .timing import synchronize
from .unet import Method, baseline, call_like_a_pipeline, compare_unet, mame, tomesd_method

PROMPT = "a photo of an astronaut riding a horse on the moon, high quality"


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
    from ..pipeline_stable_diffusion_mame import StableDiffusionMaMePipeline

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


def _latents(pipe, resolution: int, batch: int, seed: int) -> torch.Tensor:
    """Latents with a photograph's statistics when scikit-image is there, else noise."""
    side = resolution // pipe.vae_scale_factor
    try:
        from .photos import photo_latent_batch

        return photo_latent_batch((side, side), batch, seed=seed)
    except ImportError:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(batch, pipe.unet.config.in_channels, side, side, generator=generator)


def _unet_inputs(pipe, resolution: int, seed: int) -> dict[str, Any]:
    """One classifier-free-guidance UNet call: batch 2 (unconditional + prompt)."""
    device = pipe.unet.device
    dtype = pipe.unet.dtype
    with torch.inference_mode():
        positive, negative = pipe.encode_prompt(PROMPT, device, 1, True, negative_prompt="")
    return {
        "sample": _latents(pipe, resolution, 2, seed).to(device=device, dtype=dtype),
        "timestep": torch.full((2,), 500, dtype=torch.long, device=device),
        "encoder_hidden_states": torch.cat([negative, positive]),
    }


def bench_methods(ratios: Sequence[float], tau: float) -> list[Method]:
    """Baseline, then MaMe and tomesd at each ratio (tomesd when installed)."""
    methods = [baseline()]
    for ratio in ratios:
        methods.append(_mame_at(ratio, tau))
        peer = tomesd_method(ratio)
        if peer is not None:
            methods.append(peer)
    return methods


def _mame_at(ratio: float, tau: float, **settings: Any) -> Method:
    """MaMe at ``ratio`` (and any further ``settings``); ``tau`` named only when it is not the default."""
    return mame(ratio=ratio, **settings) if tau == DEFAULT_TAU else mame(ratio=ratio, tau=tau, **settings)


def time_pipeline(pipe, methods: list[Method], *, resolution: int, steps: int, seed: int) -> list[dict[str, Any]]:
    """One pipeline call per method (after the UNet runs warmed everything up).

    The call encodes the prompt and runs the denoising loop; decoding is left out
    (``output_type="latent"``): the VAE is the same for every method and would only add
    the same seconds to each.
    """
    rows, images = [], {}
    for method in tqdm(methods, desc="pipeline calls"):
        method.patch(pipe.unet)
        try:
            generator = torch.Generator().manual_seed(seed)
            start = time.perf_counter()
            with torch.inference_mode():
                image = pipe(
                    PROMPT,
                    height=resolution,
                    width=resolution,
                    num_inference_steps=steps,
                    generator=generator,
                    output_type="latent",
                ).images
            synchronize(pipe.device)
            seconds = time.perf_counter() - start
        finally:
            method.unpatch(pipe.unet)
        images[method.name] = image.float().cpu()
        rows.append({"method": method.name, "pipeline_seconds": seconds})
    reference = images[methods[0].name]
    for row in rows:
        difference = images[row["method"]] - reference
        row["pipeline_speedup"] = rows[0]["pipeline_seconds"] / row["pipeline_seconds"]
        row["latent_error"] = float(difference.norm() / reference.norm())
    return rows


def benchmark(
    pipe,
    *,
    resolution: int,
    ratios: Sequence[float],
    tau: float = DEFAULT_TAU,
    repeats: int = 3,
    steps: int | None = 2,
    compile: bool = False,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Baseline vs MaMe vs tomesd on ``pipe``: UNet calls, then (``steps``) a pipeline call."""
    inputs = _unet_inputs(pipe, resolution, seed)
    methods = bench_methods(ratios, tau)
    call = None
    if compile:
        compiled = torch.compile(pipe.unet)

        def call(model, kwargs):
            return call_like_a_pipeline(compiled, kwargs)

    rows = compare_unet(pipe.unet, inputs, methods, repeats=repeats, warmup=1, call=call)
    if steps:
        by_name = {row["method"]: row for row in rows}
        for extra in time_pipeline(pipe, methods, resolution=resolution, steps=steps, seed=seed):
            by_name[extra["method"]].update(extra)
    return rows


def bench_table(rows: list[dict[str, Any]]) -> str:
    columns = ["method", "seconds", "speedup", "error"]
    if "pipeline_seconds" in rows[0]:
        columns += ["pipeline_seconds", "pipeline_speedup", "latent_error"]
    formats = {
        "seconds": ".3f",
        "speedup": ".2f",
        "error": ".4f",
        "pipeline_seconds": ".2f",
        "pipeline_speedup": ".2f",
        "latent_error": ".4f",
    }
    return markdown_table(rows, columns, formats)


def run_bench(args, device: torch.device) -> list[Path]:
    dtype = resolve_dtype(args.dtype, device)
    resolution = 128 if args.quick and args.resolution == 512 else args.resolution
    pipe = load_pipeline(args.model, quick=args.quick, device=device, dtype=dtype, seed=args.seed)
    steps = None if args.no_pipeline else args.steps
    rows = benchmark(
        pipe,
        resolution=resolution,
        ratios=args.ratios,
        tau=args.tau,
        repeats=args.repeats,
        steps=steps,
        compile=args.compile,
        seed=args.seed,
    )
    table = bench_table(rows)
    architecture = "tiny" if args.quick else (args.model or "SD 2.1 architecture, random weights")
    print(f"\nUNet forward ({architecture}, {resolution}x{resolution}, batch 2, {args.dtype}, {device}):")
    print("seconds = median UNet call; error = relative error of the noise prediction vs baseline;")
    if steps:
        print(
            f"pipeline = one {steps}-step call (prompt encoding + denoising, decoding left out); "
            "latent_error vs the baseline's final latents."
        )
    print()
    print(table)

    out = Path(args.out)
    payload = {
        "environment": environment(device, dtype),
        "setup": {
            "model": architecture,
            "resolution": resolution,
            "batch": 2,
            "repeats": args.repeats,
            "pipeline_steps": steps,
            "compile": args.compile,
        },
        "rows": rows,
    }
    json_path, md_path = write_report(out / "bench", payload, table)
    plot_path = plot_latency(rows, out / "bench.png", title=f"UNet forward, {resolution}x{resolution}, batch 2")
    return [json_path, md_path, plot_path]


def plot_latency(rows: list[dict[str, Any]], path: Path, *, title: str) -> Path:
    """Bar chart of the median UNet latency per method, speed-ups written on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["method"] for row in rows]
    seconds = [row["seconds"] for row in rows]
    colours = ["#888888" if n.startswith("baseline") else "#1f77b4" if n.startswith("MaMe") else "#ff7f0e" for n in names]
    figure, axis = plt.subplots(figsize=(8, 0.6 * len(rows) + 1.5))
    bars = axis.barh(names, seconds, color=colours)
    for bar, row in zip(bars, rows):
        axis.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {row['speedup']:.2f}x", va="center")
    axis.invert_yaxis()
    axis.set_xlabel("seconds (median)")
    axis.set_title(title)
    axis.set_xlim(0, max(seconds) * 1.2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def generate_grid(pipe, methods: list[Method], *, prompt: str, resolution: int, steps: int, seed: int):
    """One image per method, same seed, side by side with the method's name above each."""
    from PIL import Image, ImageDraw

    tiles = []
    for method in tqdm(methods, desc="generating"):
        method.patch(pipe.unet)
        try:
            generator = torch.Generator().manual_seed(seed)
            with torch.inference_mode():
                image = pipe(
                    prompt, height=resolution, width=resolution, num_inference_steps=steps, generator=generator
                ).images[0]
        finally:
            method.unpatch(pipe.unet)
        tiles.append((method.name, image))
    grid = Image.new("RGB", (resolution * len(tiles), resolution + 24), "white")
    draw = ImageDraw.Draw(grid)
    for index, (name, image) in enumerate(tiles):
        grid.paste(image, (index * resolution, 24))
        draw.text((index * resolution + 4, 4), name, fill="black")
    return grid


def run_generate(args, device: torch.device) -> list[Path]:
    from ..generation import parse_mame_settings

    extra = parse_mame_settings(getattr(args, "mame", None) or [])
    dtype = resolve_dtype(args.dtype, device)
    resolution = 128 if args.quick and args.resolution == 512 else args.resolution
    pipe = load_pipeline(args.model, quick=args.quick, device=device, dtype=dtype, seed=args.seed)
    methods = [baseline(), *[m for m in [tomesd_method(args.ratio)] if m is not None]]
    methods.append(_mame_at(args.ratio, args.tau, **extra))
    grid = generate_grid(pipe, methods, prompt=args.prompt, resolution=resolution, steps=args.steps, seed=args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "generate.png"
    grid.save(path)
    return [path]
