"""The speed-quality frontier of the SD 2.1 UNet: MaMe + MaRe against its peers (issue 22).

SD 2.1 architecture (random weights from the shipped config), 768 x 768 (96 x 96 latents),
batch 2 (classifier-free guidance), latents made from photographs, this CPU. Every method is
timed in interleaved rounds (one call of each per round; median, min and max) and its noise
prediction compared with stock's (relative L2 error), twice: with the random weights, whose
attention is nearly uniform, and with every self-attention sharpened to 0.70 of ``log N``
entropy as trained models have it (``mame_diffusers.benchmarking.sharpen``; times are the
same weights' shape, so they are measured once). Methods:

- stock;
- tomesd at ratios 0.3, 0.5 and 0.75 (``max_downsample=2``, as MaMe), and at 0.5 and 0.75
  also merging cross-attention and MLP tokens (``merge_crossattn``, ``merge_mlp``);
- ToDo-style keys/values pooling at the key/value length of MaMe's keys/values-only merge;
- MaMe keys/values only (``keys_values_only=True``) at 0.75;
- MaMe + MaRe at ratios 0.5, 0.75 and 0.9, with the query share of the default (0.5: queries
  merge to ``N (1 - ratio)**0.5``, keys and values to ``N (1 - ratio)**1.5``) and with 1
  (queries, keys and values merge alike, at the same attention cost;
  ``mame_diffusers.benchmarking.variants``), and at the default ratio with a plan for every
  self-attention instead of one per UNet level.

A method is on the frontier when no other measured method is both faster and more faithful.

    python benchmarks/frontier.py                 # benchmarks/results/frontier_sd21_768.{json,md,png}, about an hour
    python benchmarks/frontier.py --quick --out /tmp/frontier   # tiny UNet, seconds
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import warnings

import torch

from mame_diffusers.benchmarking.frontier import dominated_by, plot_frontier
from mame_diffusers.benchmarking.peers import keys_values_pooling
from mame_diffusers.benchmarking.photos import photo_latent_batch
from mame_diffusers.benchmarking.report import environment, markdown_table, write_report
from mame_diffusers.benchmarking.sharpen import sharpen_self_attention
from mame_diffusers.benchmarking.unet import call_like_a_pipeline, compare_unet
from mame_diffusers.benchmarking.variants import mame_planning_every_block, mame_with_query_share
from mame_diffusers.diffusers_integration import MaMeConfig
from mame_diffusers.methods import Method, baseline, mame, tomesd_method
from mame_diffusers.offline import build_unet, unet_inputs

DEFAULT = "MaMe (defaults)"


def methods(ratios: tuple[float, ...] = (0.5, 0.75, 0.9)) -> list[Method]:
    found = [baseline()]
    for ratio in (0.3, 0.5, 0.75):
        found.append(tomesd_method(ratio, max_downsample=2))
    for ratio in (0.5, 0.75):
        found.append(tomesd_method(ratio, max_downsample=2, merge_crossattn=True, merge_mlp=True))
    found.append(keys_values_pooling(0.75))
    kv_only = mame(ratio=0.75, keys_values_only=True)
    found.append(dataclasses.replace(kv_only, name="MaMe keys/values only (ratio=0.75)"))
    for ratio in ratios:
        found.append(mame() if ratio == MaMeConfig().ratio else mame(ratio=ratio))
        found.append(mame_with_query_share(ratio, 1.0))
    found.append(mame_planning_every_block(MaMeConfig().ratio))
    return [method for method in found if method is not None]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resolution", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (each method once per round)")
    parser.add_argument("--entropy", type=float, default=0.7, help="sharpened attention entropy, over log N")
    parser.add_argument("--quick", action="store_true", help="tiny UNet at 256 x 256, one round: a smoke run")
    parser.add_argument("--out", default="benchmarks/results/frontier_sd21_768", help="report path without suffix")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.manual_seed(0)

    name, resolution = ("tiny-sd", 256) if args.quick else ("sd21", args.resolution)
    rounds = 1 if args.quick else args.rounds
    unet = build_unet(name, seed=0)
    latent = resolution // 8
    inputs = unet_inputs(unet, (latent, latent), latents=photo_latent_batch((latent, latent)))
    measured = methods()

    rows = compare_unet(unet, inputs, measured, repeats=rounds, warmup=0 if args.quick else 1, desc="timed rounds")
    sharpened = copy.deepcopy(unet)
    layers = sharpen_self_attention(sharpened, lambda: call_like_a_pipeline(sharpened, inputs), args.entropy)
    sharp_rows = compare_unet(sharpened, inputs, measured, repeats=1, warmup=0, desc="sharpened errors")
    for row, sharp in zip(rows, sharp_rows):
        row["sharpened_error"] = sharp["error"]
    for key, column in (("error", "dominated"), ("sharpened_error", "sharpened_dominated")):
        beaten = dominated_by(rows, key)
        for row in rows:
            row[column] = beaten[row["method"]]
    for row in rows:
        row["on frontier"] = ("yes" if not row["dominated"] else "no") + (
            ", yes" if not row["sharpened_dominated"] else ", no"
        )
        row["min-max"] = f"{row['min_seconds']:.2f}-{row['max_seconds']:.2f}"

    table = markdown_table(
        rows,
        ["method", "attends", "seconds", "min-max", "speedup", "error", "sharpened_error", "on frontier"],
        {"seconds": ".2f", "speedup": ".2f", "error": ".4f", "sharpened_error": ".4f"},
    )
    entropies = [layer["entropy"] for layer in layers]
    setup = {
        "unet": name,
        "resolution": resolution,
        "batch": 2,
        "rounds": rounds,
        "sharpened_entropy_target": args.entropy,
        "sharpened_layers": layers,
    }
    legend = (
        f"{name} UNet, {resolution} x {resolution}, batch 2, photo latents; seconds: median of {rounds} interleaved "
        "rounds (min-max); error: relative L2 error of the noise prediction against stock, at random weights and with "
        f"every self-attention sharpened (entropy {min(entropies):.2f}-{max(entropies):.2f} of log N after "
        "sharpening); on frontier: no other method both faster and more faithful (random, sharpened)."
    )
    print(legend + "\n\n" + table)
    payload = {"environment": environment("cpu", torch.float32), "setup": setup, "rows": rows}
    json_path, md_path = write_report(args.out, payload, legend + "\n\n" + table)
    png = plot_frontier(
        rows,
        f"{args.out}.png",
        panels=[("error", "random weights (entropy 0.99 log N)"), ("sharpened_error", f"sharpened ({args.entropy} log N)")],
        default=DEFAULT,
        title=f"{name} UNet {resolution} x {resolution}, batch 2, this CPU: speed against noise-prediction error",
    )
    for path in (json_path, md_path, png):
        print("wrote", path)
    default = next(row for row in rows if row["method"] == DEFAULT)
    if default["dominated"] or default["sharpened_dominated"]:
        print(f"the default is dominated: {default['dominated']} / {default['sharpened_dominated']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
