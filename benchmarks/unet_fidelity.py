"""UNet-level fidelity and speed: the whole UNet with MaMe and tomesd settings side by side.

The UNet (SD 2.1 or SDXL architecture, random weights, config shipped in the package) gets
latents encoded from real photographs (scikit-image), batch 2, fixed seeds. Each row gives
the median time of a UNet forward and the relative error of its noise prediction against the
unmerged UNet, so settings can be compared at equal speed or at equal fidelity.

    python benchmarks/unet_fidelity.py --sweep sd21 --resolution 768
    python benchmarks/unet_fidelity.py --sweep sd21-stack --resolution 768
    python benchmarks/unet_fidelity.py --sweep sdxl --resolution 1024 --repeats 2
    python benchmarks/unet_fidelity.py --sweep sd21-restore --resolution 768 --repeats 1
    python benchmarks/unet_fidelity.py --sweep sd21-distinct --resolution 768 --repeats 1
    python benchmarks/unet_fidelity.py --sweep sd21-ranked --resolution 768 --repeats 1
    python benchmarks/unet_fidelity.py --sweep sdxl-ranked --resolution 1024 --repeats 1
"""

from __future__ import annotations

import argparse
import warnings

import torch

from mame_diffusers.benchmarking.photos import photo_latent_batch
from mame_diffusers.benchmarking.report import environment, markdown_table, write_report
from mame_diffusers.benchmarking.unet import baseline, compare_unet, mame, tomesd_method
from mame_diffusers.offline import build_unet, unet_inputs

# The settings worth comparing on each architecture: tomesd at its defaults and at the
# max_downsample SDXL needs, MaMe at its defaults and at the settings that trade fidelity
# for speed (more merging, merged queries, merging before deep stacks). A sweep's name
# starts with the architecture it runs on.
SWEEPS = {
    "sd21": lambda: [
        tomesd_method(0.5),
        tomesd_method(0.75),
        tomesd_method(0.75, max_downsample=2),
        mame(),
        mame(max_downsample=1),
        mame(ratio=0.9),
        mame(query_share=1.0),
        mame(ratio=0.9, query_share=1.0),
    ],
    # Merging before SD 2.1's one-layer transformer blocks too, as deep-stack merging does
    # before SDXL's ten-layer ones: what stack_min_layers=4 (the default) rules out.
    "sd21-stack": lambda: [
        tomesd_method(0.75, max_downsample=2),
        mame(),
        mame(stack_min_layers=1),
        mame(stack_min_layers=1, stack_ratio=0.3),
        mame(stack_min_layers=1, max_downsample=1),
    ],
    # Symmetric merge+restore (query_share=1) against tomesd at matched max_downsample, with
    # the operator's anchor refinement and affine restore (issue 12).
    "sd21-restore": lambda: [
        tomesd_method(0.75),
        mame(query_share=1.0, max_downsample=1),
        mame(query_share=1.0, max_downsample=1, refine=1, restore="affine"),
        tomesd_method(0.75, max_downsample=2),
        mame(query_share=1.0),
        mame(query_share=1.0, restore="affine"),
        mame(query_share=1.0, refine=1, restore="affine"),
    ],
    # The same with content-following anchors (each cell's least typical token).
    "sd21-distinct": lambda: [
        tomesd_method(0.75),
        mame(query_share=1.0, max_downsample=1, anchor="distinct", refine=1, restore="affine"),
        tomesd_method(0.75, max_downsample=2),
        mame(query_share=1.0, anchor="distinct", refine=1, restore="affine"),
    ],
    # Ranked slots in blocks (docs/operator.md section 7): which tokens merge, chosen by content.
    "sd21-ranked": lambda: [
        tomesd_method(0.75),
        mame(query_share=1.0, max_downsample=1, anchor="ranked", block=16, halo=0, restore="affine"),
        tomesd_method(0.75, max_downsample=2),
        mame(query_share=1.0, anchor="ranked", block=16, halo=0, restore="affine"),
        mame(query_share=1.0, anchor="ranked", block=8, halo=0, restore="affine"),
        mame(query_share=1.0, anchor="ranked", block=16, halo=0),
    ],
    # MaMe's deep-stack merge runs whole layers (self- and cross-attention, MLP) on fewer
    # tokens; tomesd's matching knobs are merge_crossattn and merge_mlp.
    "sdxl-stack-peers": lambda: [
        tomesd_method(0.5, max_downsample=2, merge_crossattn=True, merge_mlp=True),
        mame(),
    ],
    # The deep-stack merge restores each stack's update: the operator options there.
    "sdxl-ranked": lambda: [
        tomesd_method(0.5, max_downsample=2, merge_crossattn=True, merge_mlp=True),
        mame(),
        mame(anchor="ranked", halo=0, restore="affine"),
        mame(anchor="ranked", block=16, halo=0, restore="affine"),
        mame(anchor="distinct", refine=1, restore="affine"),
    ],
    "sdxl": lambda: [
        tomesd_method(0.75, max_downsample=2),
        mame(),
        mame(stack_ratio=0.0),
        mame(stack_ratio=0.75),
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

    table = markdown_table(
        rows, ["method", "seconds", "speedup", "error"], {"seconds": ".2f", "speedup": ".3f", "error": ".4f"}
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
