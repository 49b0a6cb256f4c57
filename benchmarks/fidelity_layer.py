"""Symmetric merge+restore fidelity on one SD 2.1 self-attention layer, at random-weight and
at sharpened attention (issue 12).

The layer and tokens are those of ``benchmarks/layer_benchmark.py`` (5 photographs, 64 x 64
grid, C = 320, 5 heads). With random weights the layer's attention is nearly uniform
(entropy about 0.99 of ``log N``), where merging looks cheap and methods differ little; the
sharpened setting scales the query and key projections until the entropy is ``--entropy``
of ``log N`` (trained diffusion and vision models sit around 0.6-0.8). Every symmetric method
merges queries, keys and values to M tokens and restores after attention (``query_share=1``
for MaMe), as tomesd does, and is compared with tomesd at its own M (the ``M`` column: a
block of 16 or global merging keeps a few more tokens at ratio 0.9); errors are relative to
full attention, averaged over the photos.

Times: batch 2, interleaved rounds (every method once per round), median and spread.

    python benchmarks/fidelity_layer.py                      # errors, ratios 0.5 0.75 0.9
    python benchmarks/fidelity_layer.py --time-rounds 7      # and CPU times at 0.75
"""

from __future__ import annotations

import argparse
import warnings

import torch
from tqdm import tqdm

from mame_diffusers import merge_layout
from mame_diffusers.benchmarking.layer import (
    LayerBench,
    full_attention,
    kv_pool_at_mame_length,
    mame_attention,
    tomesd_attention,
)
from mame_diffusers.benchmarking.report import environment, markdown_table, write_report

SYMMETRIC = {"query_share": 1.0}

# name -> builder of the layer method at a ratio
METHODS = {
    "tomesd": lambda ratio: tomesd_attention(),
    "MaMe symmetric (copy restore)": lambda ratio: mame_attention(ratio=ratio, **SYMMETRIC),
    "MaMe symmetric, refine=1": lambda ratio: mame_attention(ratio=ratio, refine=1, **SYMMETRIC),
    "MaMe symmetric, affine restore": lambda ratio: mame_attention(ratio=ratio, restore="affine", **SYMMETRIC),
    "MaMe symmetric, refine=1 + affine restore": lambda ratio: mame_attention(
        ratio=ratio, refine=1, restore="affine", **SYMMETRIC
    ),
    "MaMe symmetric, refine=2 + affine restore": lambda ratio: mame_attention(
        ratio=ratio, refine=2, restore="affine", **SYMMETRIC
    ),
    "MaMe symmetric, distinct anchors, refine=1 + affine": lambda ratio: mame_attention(
        ratio=ratio, anchor="distinct", refine=1, restore="affine", **SYMMETRIC
    ),
    "MaMe symmetric, distinct anchors, refine=2 + affine": lambda ratio: mame_attention(
        ratio=ratio, anchor="distinct", refine=2, restore="affine", **SYMMETRIC
    ),
    "MaMe symmetric, block 16 halo 4, distinct, refine=1 + affine": lambda ratio: mame_attention(
        ratio=ratio, anchor="distinct", refine=1, restore="affine", block=16, halo=4, **SYMMETRIC
    ),
    "MaMe symmetric, block 16 halo 4, refine=1 + affine": lambda ratio: mame_attention(
        ratio=ratio, refine=1, restore="affine", block=16, halo=4, **SYMMETRIC
    ),
    "MaMe symmetric, global, refine=1 (copy)": lambda ratio: mame_attention(
        ratio=ratio, refine=1, block=None, halo=0, **SYMMETRIC
    ),
    # The default keys/values-only path, for reference (it never restores), and its
    # like-for-like peer: keys/values average-pooled to the same length (ToDo-style).
    "MaMe defaults (keys/values only)": lambda ratio: mame_attention(ratio=ratio),
    "keys/values pooling (ToDo) at MaMe's K/V length": kv_pool_at_mame_length,
    "MaMe defaults, refine=1": lambda ratio: mame_attention(ratio=ratio, refine=1),
    "MaMe defaults, distinct anchors": lambda ratio: mame_attention(ratio=ratio, anchor="distinct"),
    # Ranked slots in blocks (docs/operator.md section 7): which tokens merge, by content.
    "MaMe symmetric, ranked block 8 (copy)": lambda ratio: mame_attention(
        ratio=ratio, anchor="ranked", halo=0, **SYMMETRIC
    ),
    "MaMe symmetric, ranked block 8 + affine": lambda ratio: mame_attention(
        ratio=ratio, anchor="ranked", halo=0, restore="affine", **SYMMETRIC
    ),
    "MaMe symmetric, ranked block 16 (copy)": lambda ratio: mame_attention(
        ratio=ratio, anchor="ranked", block=16, halo=0, **SYMMETRIC
    ),
    "MaMe symmetric, ranked block 16 + affine": lambda ratio: mame_attention(
        ratio=ratio, anchor="ranked", block=16, halo=0, restore="affine", **SYMMETRIC
    ),
    "MaMe defaults, ranked block 8": lambda ratio: mame_attention(ratio=ratio, anchor="ranked", halo=0),
}

#: ``(block, halo)`` of the methods whose merged length can differ from the default layout's
#: (at ratio 0.9 on 64 x 64: 400 or 408 tokens where blocks of 8 keep 384). Each method is
#: compared with tomesd at its own merged length.
LAYOUTS = {
    "MaMe symmetric, block 16 halo 4, distinct, refine=1 + affine": (16, 4),
    "MaMe symmetric, block 16 halo 4, refine=1 + affine": (16, 4),
    "MaMe symmetric, global, refine=1 (copy)": (None, 0),
    "MaMe symmetric, ranked block 16 (copy)": (16, 0),
    "MaMe symmetric, ranked block 16 + affine": (16, 0),
}

TIMED = [
    "tomesd",
    "MaMe symmetric (copy restore)",
    "MaMe symmetric, affine restore",
    "MaMe symmetric, refine=1 + affine restore",
    "MaMe symmetric, distinct anchors, refine=1 + affine",
    "MaMe defaults (keys/values only)",
    "MaMe defaults, refine=1",
    "MaMe symmetric, ranked block 8 + affine",
    "MaMe symmetric, ranked block 16 (copy)",
    "MaMe symmetric, ranked block 16 + affine",
    "MaMe defaults, ranked block 8",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--entropy", type=float, default=0.7, help="sharpened attention entropy, over log N")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--time-rounds", type=int, default=0, help="interleaved timing rounds at ratio 0.75 (0: none)")
    parser.add_argument("--out", default="benchmarks/results/fidelity_layer")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_grad_enabled(False)

    rows, settings, timing = [], [], []
    for attention in ("random weights", "sharpened"):
        bench = LayerBench()
        scale = 1.0 if attention == "random weights" else bench.sharpen_to_entropy(args.entropy)
        entropy = bench.attention_entropy()
        settings.append({"attention": attention, "qk_scale": scale, "entropy": entropy})
        print(f"{attention}: q/k scale {scale:.3f}, attention entropy {entropy:.3f} log N", flush=True)
        for ratio in args.ratios:
            tomesd_errors: dict[int, float] = {}  # tomesd at each merged length in use
            for name in tqdm(args.methods, desc=f"{attention}, ratio {ratio}"):
                block, halo = LAYOUTS.get(name, (8, 2))
                num_merged = merge_layout(bench.hw, ratio, block=block, halo=halo).num_merged
                if num_merged not in tomesd_errors:
                    tomesd_errors[num_merged] = bench.error(METHODS["tomesd"](ratio), num_merged)
                error = tomesd_errors[num_merged] if name == "tomesd" else bench.error(METHODS[name](ratio), num_merged)
                rows.append(
                    {
                        "attention": attention,
                        "entropy": entropy,
                        "ratio": ratio,
                        "method": name,
                        "M": num_merged,
                        "error": error,
                        "vs tomesd": error / tomesd_errors[num_merged],
                    }
                )
        if args.time_rounds and attention == "random weights":
            num_merged = merge_layout(bench.hw, 0.75).num_merged
            timed = {"full attention (SDPA)": full_attention}
            timed.update({name: METHODS[name](0.75) for name in TIMED})
            calls = {name: (method, num_merged) for name, method in timed.items()}
            for name, ms in bench.interleaved_milliseconds(calls, rounds=args.time_rounds).items():
                timing.append(
                    {
                        "method": name,
                        "ms median": ms["ms"],
                        "ms min": ms["min ms"],
                        "ms max": ms["max ms"],
                        "rounds": args.time_rounds,
                    }
                )

    formats = {"entropy": ".3f", "ratio": ".2f", "error": ".4f", "vs tomesd": ".3f"}
    table = markdown_table(rows, ["attention", "entropy", "ratio", "method", "M", "error", "vs tomesd"], formats)
    if timing:
        timing_table = markdown_table(
            timing,
            ["method", "ms median", "ms min", "ms max", "rounds"],
            {"ms median": ".1f", "ms min": ".1f", "ms max": ".1f"},
        )
        table += "\n\nCPU time per call at ratio 0.75 (batch 2, N = 4096, C = 320), interleaved rounds:\n\n" + timing_table
    print(table)
    setup = {"grid": [64, 64], "channels": 320, "heads": 5, "photos": 5, "settings": settings}
    payload = {"environment": environment(), "setup": setup, "rows": rows, "timing": timing}
    json_path, md_path = write_report(args.out, payload, table)
    print(f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
