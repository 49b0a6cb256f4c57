"""Layer fidelity and speed of one SD 2.1 full-resolution self-attention (DESIGN.md section 5).

Tokens come from real photographs (scikit-image), cut into 8x8 patches on a 64x64 grid and
projected to 320 channels; the layer is a diffusers ``Attention`` (5 heads of 64) with
random weights. Fidelity is the relative error of each method's output against full
attention, averaged over the photos; speed is the median time of one call at batch 2
(classifier-free guidance), N = 4096, C = 320, on this machine.

    python benchmarks/layer_benchmark.py --ratios 0.5 0.75 0.9
"""

from __future__ import annotations

import argparse
import warnings

import torch
from tqdm import tqdm

from mame_diffusers import merge_layout
from mame_diffusers.benchmarking.layer import (
    full_attention,
    kv_pool_attention,
    make_self_attention,
    mame_attention,
    pool_attention,
    relative_error,
    tomesd_attention,
)
from mame_diffusers.benchmarking.photos import PHOTOS, photo_tokens
from mame_diffusers.benchmarking.report import environment, markdown_table, write_report
from mame_diffusers.benchmarking.timing import median_seconds

# name -> builder of the layer method at a given ratio (peers take M from the caller).
METHODS = {
    "tomesd": lambda ratio: tomesd_attention(),
    "pool/unpool": lambda ratio: pool_attention,
    "keys/values pooling (ToDo)": lambda ratio: kv_pool_attention,
    "MaMe (defaults)": lambda ratio: mame_attention(ratio=ratio),
    "MaMe symmetric (query_share=1)": lambda ratio: mame_attention(ratio=ratio, query_share=1.0),
    "MaMe symmetric, global (block=None)": lambda ratio: mame_attention(
        ratio=ratio, query_share=1.0, block=None, halo=0
    ),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--out", default="benchmarks/results/layer_cpu")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_grad_enabled(False)

    hw = (64, 64)
    attn = make_self_attention()
    tokens = {name: photo_tokens(name, hw) for name in PHOTOS}
    references = {name: full_attention(attn, t, hw, 0) for name, t in tokens.items()}
    timing_batch = torch.cat([tokens["astronaut"], tokens["coffee"]])

    def seconds(method, num_merged: int) -> float:
        return median_seconds(lambda: method(attn, timing_batch, hw, num_merged), repeats=args.repeats)

    full_ms = 1e3 * seconds(full_attention, 0)
    rows = [{"ratio": 0.0, "method": "full attention (SDPA)", "M": 4096, "error": 0.0, "ms": full_ms, "speedup": 1.0}]
    jobs = [(ratio, name) for ratio in args.ratios for name in args.methods]
    for ratio, name in tqdm(jobs, desc="layer benchmark"):
        num_merged = merge_layout(hw, ratio).num_merged
        method = METHODS[name](ratio)
        error = sum(relative_error(method(attn, t, hw, num_merged), references[n]) for n, t in tokens.items())
        ms = 1e3 * seconds(method, num_merged)
        rows.append(
            {
                "ratio": ratio,
                "method": name,
                "M": num_merged,
                "error": error / len(tokens),
                "ms": ms,
                "speedup": full_ms / ms,
            }
        )

    table = markdown_table(
        rows,
        ["ratio", "method", "M", "error", "ms", "speedup"],
        {"ratio": ".2f", "error": ".4f", "ms": ".1f", "speedup": ".2f"},
    )
    print(table)
    payload = {"environment": environment(), "setup": {"grid": hw, "channels": 320, "heads": 5, "batch": 2}, "rows": rows}
    json_path, md_path = write_report(args.out, payload, table)
    print(f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
