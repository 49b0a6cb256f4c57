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
    kv_pool_at_mame_length,
    kv_pool_attention,
    mame_attention,
    mame_kv_length,
    pool_attention,
    tomesd_attention,
)
from mame_diffusers.benchmarking.report import environment, markdown_table, write_report

# name -> (builder of the layer method at a ratio, keys/values it attends to given the ratio
# and the merged length M). Peers take M from the caller. Rows at one ratio cost the same
# attention (queries x keys) except the first ToDo row, which keeps every query at M keys.
METHODS = {
    "tomesd": (lambda ratio: tomesd_attention(), lambda ratio, m: m),
    "pool/unpool": (lambda ratio: pool_attention, lambda ratio, m: m),
    "keys/values pooling (ToDo), M keys": (lambda ratio: kv_pool_attention, lambda ratio, m: m),
    "keys/values pooling (ToDo), MaMe's K/V length": (kv_pool_at_mame_length, lambda ratio, m: mame_kv_length(ratio)),
    "MaMe (defaults)": (lambda ratio: mame_attention(ratio=ratio), lambda ratio, m: mame_kv_length(ratio)),
    "MaMe symmetric (query_share=1)": (lambda ratio: mame_attention(ratio=ratio, query_share=1.0), lambda ratio, m: m),
    "MaMe symmetric, global (block=None)": (
        lambda ratio: mame_attention(ratio=ratio, query_share=1.0, block=None, halo=0),
        lambda ratio, m: m,
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
    jobs = [(ratio, name) for ratio in args.ratios for name in args.methods]
    calls = {"full attention (SDPA)": (full_attention, 0)}
    rows = [{"ratio": 0.0, "method": "full attention (SDPA)", "M": 4096, "keys/values": 4096, "error": 0.0}]
    for ratio, name in tqdm(jobs, desc="layer errors"):
        num_merged = merge_layout(bench.hw, ratio).num_merged
        build, kv_length = METHODS[name]
        method = build(ratio)
        calls[f"{ratio} {name}"] = (method, num_merged)
        row = {"ratio": ratio, "method": name, "M": num_merged, "keys/values": kv_length(ratio, num_merged)}
        rows.append({**row, "error": bench.error(method, num_merged)})
    # Timed round by round, every method once per round: drift on a shared machine hits all alike.
    timed = bench.interleaved_milliseconds(calls, rounds=args.repeats)
    for row, name in zip(rows, calls):
        row.update(timed[name])
    full_ms = rows[0]["ms"]
    for row in rows:
        row["speedup"] = full_ms / row["ms"]

    table = markdown_table(
        rows,
        ["ratio", "method", "M", "keys/values", "error", "ms", "min ms", "max ms", "speedup"],
        {"ratio": ".2f", "error": ".4f", "ms": ".1f", "min ms": ".1f", "max ms": ".1f", "speedup": ".2f"},
    )
    print(table)
    setup = {
        "grid": bench.hw, "channels": 320, "heads": 5, "batch": 2, "rounds": args.repeats,
        "attention_entropy": bench.attention_entropy(),  # a fraction of log N
    }
    payload = {"environment": environment(), "setup": setup, "rows": rows}
    json_path, md_path = write_report(args.out, payload, table)
    print(f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
