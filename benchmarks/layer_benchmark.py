"""One SD 2.1 full-resolution self-attention: MaMe + MaRe against its peers at equal
attention cost, at random and at sharpened attention (docs/frontier.md, "One layer").

Tokens come from five photographs (scikit-image), cut into 8 x 8 patches on a 64 x 64 grid
and projected to 320 channels; the layer is a diffusers ``Attention`` (5 heads of 64) with
random weights, whose attention is nearly uniform (entropy 0.99 of ``log N``). The
sharpened setting scales its query and key projections until the entropy is ``--entropy``
of ``log N``, as in trained models. Every row at one ratio costs the same attention (queries
x keys = M x M, M = N (1 - ratio)): tomesd merges queries, keys and values to M; MaMe + MaRe
(the default) merges queries to ``N (1 - ratio)**0.5`` and keys and values to ``N (1 -
ratio)**1.5`` (query share 0.5), or all three to M (query share 1); MaMe
``keys_values_only`` and ToDo-style pooling keep every query and attend to M^2 / N keys. Error: relative error of the layer output against full attention,
averaged over the photos, and as a multiple of tomesd's at the same M. Times: batch 2 (a
classifier-free-guidance pair), ratio ``--time-ratio``, methods interleaved round by round.

    python benchmarks/layer_benchmark.py                  # benchmarks/results/layer_cpu.{json,md}
"""

from __future__ import annotations

import argparse
import warnings

import torch
from tqdm import tqdm

from mame_diffusers import MaMeConfig, merge_layout
from mame_diffusers.benchmarking.layer import (
    LayerBench,
    full_attention,
    kv_pool_at_mame_length,
    mame_attention,
    mame_kv_length,
    pool_attention,
    tomesd_attention,
)
from mame_diffusers.benchmarking.report import environment, markdown_table, write_report
from mame_diffusers.benchmarking.variants import QueryShareConfig

# name -> (builder of the layer method at a ratio, keys/values it attends to at that ratio
# and merged length M)
METHODS = {
    "tomesd": (lambda ratio: tomesd_attention(), lambda ratio, m: m),
    "pool/unpool": (lambda ratio: pool_attention, lambda ratio, m: m),
    "ToDo K/V pooling": (kv_pool_at_mame_length, lambda ratio, m: mame_kv_length(ratio)),
    "MaMe (default: MaMe + MaRe)": (
        lambda ratio: mame_attention(ratio=ratio),
        lambda ratio, m: merge_layout((64, 64), MaMeConfig(ratio=ratio).kv_ratio).num_merged,
    ),
    "MaMe keys/values only": (
        lambda ratio: mame_attention(ratio=ratio, keys_values_only=True),
        lambda ratio, m: mame_kv_length(ratio),
    ),
    "MaMe, query share 1": (
        lambda ratio: mame_attention(QueryShareConfig(ratio=ratio, share=1.0, min_latent_tokens=0)),
        lambda ratio, m: merge_layout((64, 64), QueryShareConfig(ratio=ratio, share=1.0).kv_ratio).num_merged,
    ),
    "MaMe, blocks of 8": (lambda ratio: mame_attention(ratio=ratio, block=8), lambda ratio, m: m),
    "MaMe, one block (global)": (lambda ratio: mame_attention(ratio=ratio, block=None), lambda ratio, m: m),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--entropy", type=float, default=0.7, help="sharpened attention entropy, over log N")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (every method once per round)")
    parser.add_argument("--time-ratio", type=float, default=MaMeConfig().ratio)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default="benchmarks/results/layer_cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_grad_enabled(False)

    rows, settings = [], []
    for attention in ("random weights", "sharpened"):
        bench = LayerBench()
        scale = 1.0 if attention == "random weights" else bench.sharpen_to_entropy(args.entropy)
        entropy = bench.attention_entropy()
        settings.append({"attention": attention, "qk_scale": scale, "entropy": entropy})
        for ratio in args.ratios:
            num_merged = merge_layout(bench.hw, ratio).num_merged
            tomesd_error = bench.error(METHODS["tomesd"][0](ratio), num_merged)
            for name in tqdm(args.methods, desc=f"{attention}, ratio {ratio}"):
                build, kv_length = METHODS[name]
                error = tomesd_error if name == "tomesd" else bench.error(build(ratio), num_merged)
                rows.append({
                    "attention": attention, "entropy": entropy, "ratio": ratio, "method": name, "M": num_merged,
                    "keys/values": kv_length(ratio, num_merged), "error": error, "vs tomesd": error / tomesd_error,
                })

    bench = LayerBench()
    num_merged = merge_layout(bench.hw, args.time_ratio).num_merged
    calls = {"full attention (SDPA)": (full_attention, num_merged)}
    calls.update({name: (METHODS[name][0](args.time_ratio), num_merged) for name in args.methods})
    timing = [
        {"method": name, "ms": ms["ms"], "min ms": ms["min ms"], "max ms": ms["max ms"]}
        for name, ms in bench.interleaved_milliseconds(calls, rounds=args.rounds).items()
    ]
    full_ms = timing[0]["ms"]
    for row in timing:
        row["speedup"] = full_ms / row["ms"]

    formats = {"entropy": ".3f", "ratio": ".2f", "error": ".4f", "vs tomesd": ".3f"}
    table = markdown_table(rows, ["attention", "entropy", "ratio", "method", "M", "keys/values", "error", "vs tomesd"], formats)
    timing_table = markdown_table(
        timing, ["method", "ms", "min ms", "max ms", "speedup"],
        {"ms": ".1f", "min ms": ".1f", "max ms": ".1f", "speedup": ".2f"},
    )
    text = (
        f"{table}\n\nCPU time per call at ratio {args.time_ratio} (batch 2, N = 4096, C = 320), median of "
        f"{args.rounds} interleaved rounds (min-max):\n\n{timing_table}"
    )
    print(text)
    setup = {"grid": list(bench.hw), "channels": 320, "heads": 5, "photos": 5, "settings": settings, "rounds": args.rounds}
    payload = {"environment": environment(), "setup": setup, "rows": rows, "timing": timing}
    json_path, md_path = write_report(args.out, payload, text)
    print(f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
