"""GPU benchmark: SD 2.1 at 512 and 768, SDXL at 1024; baseline SDPA vs MaMe vs tomesd.

float16, batch 2 (classifier-free guidance), random weights from the shipped configs
(architecture is what sets the speed). For each setting: UNet forward eager, UNet forward
under ``torch.compile`` (SD 2.1 at 512), and a 25-step pipeline call (SD 2.1). Sections
run while the time budget lasts; what is skipped is written in the report.

Run through ``benchmarks/gpu.sh OUT_DIR`` (installs nothing). ``--quick`` runs tiny models
on any device, to check the script itself.
"""

from __future__ import annotations

import argparse
import time
import warnings
from pathlib import Path
from typing import Any

import torch

from mame_diffusers import DEFAULT_RATIO
from mame_diffusers.benchmarking.photos import photo_latent_batch
from mame_diffusers.benchmarking.report import environment, markdown_table, write_report
from mame_diffusers.benchmarking.runs import time_pipeline
from mame_diffusers.benchmarking.unet import baseline, call_like_a_pipeline, compare_unet, mame, tomesd_method
from mame_diffusers.offline import build_unet, offline_pipeline_components, unet_inputs


def unet_methods(ratio: float, sdxl: bool) -> list:
    methods = [baseline(), mame(ratio=ratio)]
    # tomesd's defaults merge nothing on SDXL (no attention at full resolution); give it the
    # level that has attention so that the comparison means something.
    peer = tomesd_method(ratio, max_downsample=2) if sdxl else tomesd_method(ratio)
    return methods + ([peer] if peer is not None else [])


def latents_for(hw: tuple[int, int], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    try:
        return photo_latent_batch(hw).to(device, dtype)
    except ImportError:  # no scikit-image on the machine: noise has the same cost
        return torch.randn(2, 4, *hw, device=device, dtype=dtype)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="folder for gpu.json and gpu.md")
    parser.add_argument("--ratio", type=float, default=DEFAULT_RATIO)
    parser.add_argument("--budget", type=float, default=420.0, help="seconds; later sections are skipped past it")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--quick", action="store_true", help="tiny models: check the script on any machine")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    device = torch.device(args.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    skipped: list[str] = []

    def within_budget(section: str) -> bool:
        if time.perf_counter() - started < args.budget:
            print(f"== {section} ({time.perf_counter() - started:.0f}s elapsed)", flush=True)
            return True
        skipped.append(section)
        return False

    def record(section: str, results: list[dict[str, Any]], **extra: Any) -> None:
        for row in results:
            row = {"section": section, **extra, **row}
            rows.append(row)
        print(markdown_table(results, ["method", "seconds", "speedup", "error"], {"seconds": ".4f", "speedup": ".2f", "error": ".4f"}), flush=True)

    settings = [("sd21", 512, False), ("sd21", 768, False), ("sdxl", 1024, True)]
    if args.quick:
        settings = [("tiny-sd", 128, False), ("tiny-sdxl", 256, True)]
    for name, resolution, sdxl in settings:
        section = f"{name} UNet {resolution} eager"
        if not within_budget(section):
            continue
        unet = build_unet(name, dtype=dtype, device=device)
        hw = (resolution // 8, resolution // 8)
        inputs = unet_inputs(unet, hw, latents=latents_for(hw, device, dtype))
        results = compare_unet(unet, inputs, unet_methods(args.ratio, sdxl), repeats=args.repeats, warmup=3, progress=False)
        record(section, results, model=name, resolution=resolution, mode="eager")
        if name in ("sd21", "tiny-sd") and resolution in (512, 128):
            section = f"{name} UNet {resolution} torch.compile"
            if within_budget(section):
                compiled = torch.compile(unet)
                methods = [m for m in unet_methods(args.ratio, sdxl) if not m.name.startswith("tomesd")]
                results = compare_unet(
                    unet, inputs, methods, repeats=args.repeats, warmup=2, progress=False,
                    call=lambda model, kwargs: call_like_a_pipeline(compiled, kwargs),
                )
                record(section, results, model=name, resolution=resolution, mode="compile")
        del unet
        if device.type == "cuda":
            torch.cuda.empty_cache()

    pipeline_settings = [(128, "tiny")] if args.quick else [(512, "sd21"), (768, "sd21")]
    pipe = None
    for resolution, size in pipeline_settings:
        section = f"SD 2.1 pipeline {args.steps} steps {resolution}"
        if not within_budget(section):
            continue
        if pipe is None:
            from mame_diffusers.pipeline_stable_diffusion_mame import StableDiffusionMaMePipeline

            pipe = StableDiffusionMaMePipeline(**offline_pipeline_components(size, device=device)).to(device, dtype)
            pipe.set_progress_bar_config(disable=True)
        methods = unet_methods(args.ratio, sdxl=False)
        time_pipeline(pipe, methods, resolution=resolution, steps=args.steps, seed=0)  # warm-up
        results = time_pipeline(pipe, methods, resolution=resolution, steps=args.steps, seed=0)
        for row in results:
            row.update(seconds=row["pipeline_seconds"], speedup=row["pipeline_speedup"], error=row["latent_error"])
        record(section, results, model="sd21", resolution=resolution, mode="pipeline")

    table = markdown_table(
        rows,
        ["section", "method", "seconds", "speedup", "error"],
        {"seconds": ".4f", "speedup": ".2f", "error": ".4f"},
    )
    if skipped:
        table += "\n\nSkipped (time budget): " + ", ".join(skipped)
    payload = {
        "environment": environment(device, dtype),
        "setup": {"batch": 2, "ratio": args.ratio, "repeats": args.repeats, "pipeline_steps": args.steps},
        "rows": rows,
        "skipped": skipped,
        "seconds_total": time.perf_counter() - started,
    }
    json_path, md_path = write_report(Path(args.out) / "gpu", payload, table)
    print(table)
    print(f"wrote {json_path} and {md_path} in {payload['seconds_total']:.0f}s")


if __name__ == "__main__":
    main()
