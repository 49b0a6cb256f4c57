"""What ``mame-diffusers bench`` and ``mame-diffusers generate`` do.

Kept out of the CLI module so that the notebook and scripts call the same functions.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Sequence

import torch
from tqdm import tqdm

from ..defaults import DEFAULT_MAX_DOWNSAMPLE, DEFAULT_RATIO
from ..loading import (
    UsageError,
    call_arguments,
    denoiser_family,
    generate_family,
    load_pipeline,
    patch_target,
    pictures,
    resolve_dtype,
    resolve_frames,
    resolve_ratio,
    resolve_resolution,
)
from .report import environment, markdown_table, write_report
from ..methods import Method, baseline, check_settings, mame, parse_mame_settings, tomesd_method
from .unet import call_like_a_pipeline, compare_unet

PROMPT = "a photo of an astronaut riding a horse on the moon, high quality"


def _latents(pipe, resolution: int, batch: int, seed: int) -> torch.Tensor:
    """Latents with a photograph's statistics (scikit-image's photographs): what merging
    sees in real use. Noise would make every token alike and merging look free."""
    side = resolution // pipe.vae_scale_factor
    from .photos import photo_latent_batch

    try:
        import skimage.data  # noqa: F401  (the photographs)
    except ImportError as error:
        raise UsageError(
            f"the bench merges photo latents and needs scikit-image ({error}): pip install scikit-image, "
            "or install the bench extras: pip install -e '.[bench]'"
        ) from error
    return photo_latent_batch((side, side), batch, seed=seed)


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


def bench_methods(ratios: Sequence[float]) -> list[Method]:
    """Baseline, then at each ratio (equal attention cost, as tomesd counts its ratio):
    MaMe as it ships (merge + restore), and tomesd at MaMe's ``max_downsample`` (when
    installed)."""
    methods = [baseline()]
    for ratio in ratios:
        methods.append(mame(ratio=ratio))
        peer = tomesd_method(ratio, max_downsample=DEFAULT_MAX_DOWNSAMPLE)
        if peer is not None:
            methods.append(peer)
    return methods


def time_pipeline(
    pipe, methods: list[Method], *, resolution: int, steps: int, seed: int, rounds: int = 2, progress: bool = True
) -> list[dict[str, Any]]:
    """Pipeline calls, ``rounds`` per method, the methods taking turns round by round (after
    the UNet runs warmed everything up); the median call counts.

    A call encodes the prompt and runs the denoising loop; decoding is left out
    (``output_type="latent"``): the VAE is the same for every method and would only add
    the same seconds to each.
    """

    def call(unet: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return pipe(
            PROMPT,
            height=resolution,
            width=resolution,
            num_inference_steps=steps,
            generator=generator,
            output_type="latent",
        ).images

    rows = compare_unet(
        pipe.unet, {}, methods, repeats=rounds, warmup=0, call=call, desc="pipeline calls", progress=progress
    )
    return [
        {
            "method": row["method"],
            "pipeline_seconds": row["seconds"],
            "pipeline_all_seconds": row["all_seconds"],
            "pipeline_speedup": row["speedup"],
            "latent_error": row["error"],
        }
        for row in rows
    ]


def benchmark(
    pipe,
    *,
    resolution: int,
    ratios: Sequence[float],
    repeats: int = 3,
    steps: int | None = 2,
    pipeline_rounds: int = 2,
    compile: bool = False,
    seed: int = 0,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Baseline vs MaMe vs its peers on ``pipe`` (:func:`bench_methods`): UNet calls, then
    (``steps``) pipeline calls; ``progress``: tqdm bars (off for a saved notebook)."""
    inputs = _unet_inputs(pipe, resolution, seed)
    methods = bench_methods(ratios)
    call = None
    if compile:
        compiled = torch.compile(pipe.unet)

        def call(model, kwargs):
            return call_like_a_pipeline(compiled, kwargs)

    rows = compare_unet(pipe.unet, inputs, methods, repeats=repeats, warmup=1, call=call, progress=progress)
    if steps:
        by_name = {row["method"]: row for row in rows}
        timed = time_pipeline(
            pipe, methods, resolution=resolution, steps=steps, seed=seed, rounds=pipeline_rounds, progress=progress
        )
        for extra in timed:
            by_name[extra["method"]].update(extra)
    return rows


#: A method whose timed rounds spread more than this (max - min over the median) is flagged.
SPREAD_WARNING = 0.10


def bench_table(rows: list[dict[str, Any]]) -> str:
    columns = ["method", "attends", "seconds", "min-max", "speedup", "error"]
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
    shown = [{**row, "min-max": f"{row['min_seconds']:.3f}-{row['max_seconds']:.3f}"} for row in rows]
    return markdown_table(shown, columns, formats)


def bench_warnings(rows: list[dict[str, Any]], *, tiny: bool, tomesd_installed: bool) -> list[str]:
    """What the reader of a bench table must know before ranking its rows."""
    notes = []
    if tiny:
        notes.append(
            "tiny model (--quick): its calls are dominated by fixed costs, so the speed-ups say only that "
            "everything runs; time the real architecture (no --quick) to compare methods"
        )
    noisy = [f"{row['method']} {row['spread']:.0%}" for row in rows if row.get("spread", 0.0) > SPREAD_WARNING]
    noisy += [
        f"{row['method']} pipeline {spread:.0%}"
        for row in rows
        if (spread := _spread(row.get("pipeline_all_seconds"))) > SPREAD_WARNING
    ]
    if noisy:
        notes.append(
            f"timed rounds spread more than {SPREAD_WARNING:.0%} (max - min over the median: {', '.join(noisy)}): "
            "the machine's speed changed during the run (shared CPUs, other work), and speed-ups closer than "
            "that spread do not rank the methods; rerun with more --repeats (UNet) or --pipeline-rounds "
            "(pipeline) on a quieter machine"
        )
    if not tomesd_installed:
        notes.append("tomesd is not installed, so its rows are missing: pip install tomesd (or the [bench] extras)")
    return notes


def _spread(seconds: Sequence[float] | None) -> float:
    """Max - min over the median of timed rounds (0 for fewer than two)."""
    if not seconds or len(seconds) < 2:
        return 0.0
    middle = statistics.median(seconds)
    return (max(seconds) - min(seconds)) / middle if middle > 0 else 0.0


def run_bench(args, device: torch.device) -> list[Path]:
    dtype = resolve_dtype(args.dtype, device)
    family = denoiser_family(args.model, getattr(args, "arch", None))
    resolution = resolve_resolution(args.resolution, family, args.quick)
    frames = resolve_frames(getattr(args, "frames", None), family, 17 if args.quick else 33)
    if family != "unet":
        unet_only = {"--compile": args.compile, "--steps": args.steps is not None,
                     "--pipeline-rounds": args.pipeline_rounds is not None, "--no-pipeline": args.no_pipeline}
        given = [name for name, set_ in unet_only.items() if set_]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise UsageError(
                f"{', '.join(given)} {verb} to UNets; a diffusion transformer's forward is timed eagerly, with no "
                "pipeline calls (benchmarks/gpu.sh times DiTs on a GPU)"
            )
        from .dit import run_dit_bench

        return run_dit_bench(args, device, dtype, resolution, frames)
    pipe = load_pipeline(args.model, quick=args.quick, device=device, dtype=dtype, seed=args.seed)
    steps = None if args.no_pipeline else (args.steps or 2)
    pipeline_rounds = args.pipeline_rounds or 2
    rows = benchmark(
        pipe,
        resolution=resolution,
        ratios=args.ratios or [DEFAULT_RATIO],
        repeats=args.repeats,
        steps=steps,
        pipeline_rounds=pipeline_rounds,
        compile=args.compile,
        seed=args.seed,
    )
    table = bench_table(rows)
    notes = bench_warnings(rows, tiny=args.quick, tomesd_installed=tomesd_method(0.5) is not None)
    architecture = "tiny" if args.quick else (args.model or "SD 2.1 architecture, random weights")
    print(f"\nUNet forward ({architecture}, {resolution}x{resolution}, batch 2, {args.dtype}, {device}):")
    legend = (
        "attends = what merged self-attention attends with, of N tokens (every row at one ratio costs the "
        "same attention); seconds = median UNet call, min-max = its fastest and slowest round "
        f"({args.repeats} rounds, methods in turn); error = relative error of the noise prediction vs baseline"
    )
    if steps:
        legend += (
            f"; pipeline = median of {pipeline_rounds} {steps}-step calls (prompt encoding + denoising, "
            "decoding left out), latent_error vs the baseline's final latents"
        )
    print(legend + ".\n")
    print(table)
    for note in notes:
        print(f"\nwarning: {note}")

    out = Path(args.out)
    payload = {
        "environment": environment(device, dtype),
        "setup": {
            "model": architecture,
            "resolution": resolution,
            "batch": 2,
            "repeats": args.repeats,
            "pipeline_steps": steps,
            "pipeline_rounds": pipeline_rounds if steps else None,
            "compile": args.compile,
        },
        "rows": rows,
        "warnings": notes,
    }
    report = "\n\n".join([legend + ".", table, *[f"**Warning:** {note}." for note in notes]])
    json_path, md_path = write_report(out / "bench", payload, report)
    plot_path = plot_latency(rows, out / "bench.png", title=f"UNet forward, {resolution}x{resolution}, batch 2")
    return [json_path, md_path, plot_path]


def plot_latency(rows: list[dict[str, Any]], path: Path, *, title: str) -> Path:
    """Bar chart of the median UNet latency per method, speed-ups written on the bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["method"] for row in rows]
    seconds = [row["seconds"] for row in rows]
    colours = ["#888888" if n.startswith(("baseline", "stock")) else "#1f77b4" if n.startswith("MaMe") else "#ff7f0e" for n in names]
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


def generate_grid(
    pipe,
    methods: list[Method],
    *,
    prompt: str,
    resolution: int,
    steps: int,
    seed: int,
    frames: int | None = None,
    progress: bool = True,
):
    """One image per method, same seed, side by side with the method's name above each
    (a video's first frame)."""
    from PIL import Image, ImageDraw

    tiles = []
    target = patch_target(pipe)
    for method in tqdm(methods, desc="generating", disable=not progress):
        method.patch(target)
        try:
            generator = torch.Generator().manual_seed(seed)
            with torch.inference_mode():
                output = pipe(
                    prompt, num_inference_steps=steps, generator=generator, **call_arguments(pipe, resolution, frames)
                )
        finally:
            method.unpatch(target)
        image = pictures(output)[0]
        tiles.append((method.name, image[0] if isinstance(image, list) else image))
    width, height = tiles[0][1].size
    grid = Image.new("RGB", (width * len(tiles), height + 24), "white")
    draw = ImageDraw.Draw(grid)
    for index, (name, image) in enumerate(tiles):
        grid.paste(image, (index * width, 24))
        draw.text((index * width + 4, 4), name, fill="black")
    return grid


def generate_methods(family: str, ratio: float, extra: dict[str, Any]) -> list[Method]:
    """What the grid draws: baseline, tomesd (when installed) and MaMe on UNets; stock and MaMe
    on diffusion transformers (tomesd patches UNets only)."""
    check_settings({"ratio": ratio, **extra}, dit=family != "unet")
    if family != "unet":
        from .dit import dit_methods

        return dit_methods([ratio], **extra)
    methods = [baseline(), *[m for m in [tomesd_method(ratio)] if m is not None]]
    methods.append(mame(ratio=ratio, **extra))
    return methods


def run_generate(args, device: torch.device) -> list[Path]:
    extra = parse_mame_settings(getattr(args, "mame", None) or [])
    dtype = resolve_dtype(args.dtype, device)
    family = generate_family(args)
    resolution = resolve_resolution(args.resolution, family, args.quick)
    frames = resolve_frames(getattr(args, "frames", None), family, 81)
    methods = generate_methods(family, resolve_ratio(args.ratio, family), extra)
    pipe = load_pipeline(args.model, quick=args.quick, device=device, dtype=dtype, seed=args.seed)
    grid = generate_grid(
        pipe, methods, prompt=args.prompt, resolution=resolution, steps=args.steps, seed=args.seed, frames=frames
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "generate.png"
    grid.save(path)
    return [path]

