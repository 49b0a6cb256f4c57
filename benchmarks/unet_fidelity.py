"""UNet-level fidelity and speed: the whole UNet with MaMe and tomesd settings side by side.

The UNet (SD 2.1 or SDXL architecture, random weights, config shipped in the package) gets
latents encoded from real photographs (scikit-image), batch 2, fixed seeds. Each row gives
the median time of a UNet forward and the relative error of its noise prediction against the
unmerged UNet, so settings can be compared at equal speed or at equal fidelity.

    python benchmarks/unet_fidelity.py --sweep sd21 --resolution 768
    python benchmarks/unet_fidelity.py --sweep sdxl --resolution 1024 --repeats 5
    python benchmarks/unet_fidelity.py --sweep sdxl-defaults --resolution 1024 --repeats 5
"""

from __future__ import annotations

import argparse
import warnings

import torch

from mame_diffusers.benchmarking.photos import photo_latent_batch
from mame_diffusers.benchmarking.report import environment, markdown_table, write_report
from mame_diffusers.benchmarking.unet import compare_unet
from mame_diffusers.methods import baseline, mame, tomesd_method
from mame_diffusers.offline import build_unet, unet_inputs

# The settings worth comparing on each architecture (a sweep's name starts with it): tomesd at
# the max_downsample MaMe uses (SDXL needs 2: its defaults merge nothing there), also merging
# cross-attention and MLP tokens as MaMe's deep-stack merge does; MaMe at its defaults and at
# the settings that trade fidelity for speed. SD 2.1's full frontier: benchmarks/frontier.py.
SWEEPS = {
    "sd21": lambda: [
        tomesd_method(0.5, max_downsample=2),
        tomesd_method(0.75, max_downsample=2),
        mame(),
        mame(max_downsample=1),
        mame(keys_values_only=True),
    ],
    # The defaults' SDXL check: the default, without its deep-stack merge, and tomesd's peer.
    "sdxl-defaults": lambda: [
        tomesd_method(0.5, max_downsample=2),
        mame(),
        mame(stack_ratio=0.0),
    ],
    "sdxl": lambda: [
        tomesd_method(0.5, max_downsample=2),
        tomesd_method(0.5, max_downsample=2, merge_crossattn=True, merge_mlp=True),
        mame(),
        mame(stack_ratio=0.0),
        mame(stack_ratio=0.75),
        mame(keys_values_only=True),
    ],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --model: the name the first published runs used (their reports record it).
    parser.add_argument("--sweep", "--model", dest="sweep", choices=sorted(SWEEPS), default="sd21")
    parser.add_argument("--resolution", type=int, default=768)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="report path without suffix (default docs/unet_<sweep>_<res>)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")

    latent = args.resolution // 8
    model = args.sweep.split("-")[0]
    unet = build_unet(model)
    inputs = unet_inputs(unet, (latent, latent), latents=photo_latent_batch((latent, latent)))
    methods = [baseline()] + [m for m in SWEEPS[args.sweep]() if m is not None]
    rows = compare_unet(unet, inputs, methods, repeats=args.repeats, warmup=1)
    for row in rows:
        row["min-max"] = f"{row['min_seconds']:.1f}-{row['max_seconds']:.1f}"

    table = markdown_table(
        rows,
        ["method", "attends", "seconds", "min-max", "speedup", "error"],
        {"seconds": ".2f", "speedup": ".3f", "error": ".4f"},
    )
    print(table)
    out = args.out or f"docs/unet_{args.sweep.replace('-', '_')}_{args.resolution}"
    payload = {
        "environment": environment("cpu", torch.float32),
        "model": model,
        "sweep": args.sweep,
        "resolution": args.resolution,
        "batch": 2,
        "rows": rows,
    }
    for path in write_report(out, payload, table):
        print("wrote", path)


if __name__ == "__main__":
    main()
