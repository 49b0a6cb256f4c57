"""Layer fidelity and speed of one SD 2.1 full-resolution self-attention (docs/operator.md, section 5).

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
    LayerBench,
    full_attention,
    kv_pool_attention,
    mame_attention,
    pool_attention,
    tomesd_attention,
)
from mame_diffusers.benchmarking.report import environment, markdown_table, write_report

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

    bench = LayerBench()
    full_ms = bench.milliseconds(full_attention, 0, args.repeats)
    rows = [{"ratio": 0.0, "method": "full attention (SDPA)", "M": 4096, "error": 0.0, "ms": full_ms, "speedup": 1.0}]
    jobs = [(ratio, name) for ratio in args.ratios for name in args.methods]
    for ratio, name in tqdm(jobs, desc="layer benchmark"):
        num_merged = merge_layout(bench.hw, ratio).num_merged
        method = METHODS[name](ratio)
        error = bench.error(method, num_merged)
        ms = bench.milliseconds(method, num_merged, args.repeats)
        rows.append(
            {
                "ratio": ratio,
                "method": name,
                "M": num_merged,
                "error": error,
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
    setup = {"grid": bench.hw, "channels": 320, "heads": 5, "batch": 2}
    payload = {"environment": environment(), "setup": setup, "rows": rows}
    json_path, md_path = write_report(args.out, payload, table)
    print(f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
