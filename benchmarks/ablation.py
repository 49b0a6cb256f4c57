"""Quality/speed study of the operator's variants on one SD 2.1 self-attention layer.

Layer fidelity (relative error against full attention, tokens from real photographs) and
time per call (batch 2, N = 4096, C = 320, 5 heads, this machine) for every variant at the
given ratios, with tomesd, keys/values pooling (ToDo) and pool/unpool on the same axes.
Writes ``docs/ablation_layer.{json,md}``, the frontier plot ``docs/ablation_frontier.png``
and the tau illustration ``docs/tau.png``.

    python benchmarks/ablation.py                 # all variants, ratios 0.5 0.75 0.9
    python benchmarks/ablation.py --quick         # a handful, to check the script
"""

from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch
from tqdm import tqdm

from mame_diffusers import merge_layout, plan_merge
from mame_diffusers.benchmarking.layer import (
    LayerBench,
    full_attention,
    kv_pool_attention,
    mame_attention,
    pool_attention,
    tomesd_attention,
)
from mame_diffusers.benchmarking.photos import PHOTOS, load_photo, photo_tokens
from mame_diffusers.benchmarking.report import environment, markdown_table, write_report

# (family, label, settings): settings go to MaMeProcessor; peers are built separately.
MAME_VARIANTS = [
    ("split", "defaults (query_share=0)", {}),
    ("split", "query_share=0.5", {"query_share": 0.5}),
    ("split", "query_share=1 (symmetric)", {"query_share": 1.0}),
    ("reach", "symmetric, global", {"query_share": 1.0, "block": None, "halo": 0}),
    ("reach", "symmetric, block 4, halo 2", {"query_share": 1.0, "block": 4}),
    ("reach", "symmetric, block 16, halo 2", {"query_share": 1.0, "block": 16}),
    ("reach", "symmetric, halo 0", {"query_share": 1.0, "halo": 0}),
    ("reach", "symmetric, halo 4", {"query_share": 1.0, "halo": 4}),
    ("reach", "keys/values only, global", {"block": None, "halo": 0}),
    ("reach", "keys/values only, halo 0", {"halo": 0}),
    ("reach", "keys/values only, block 16", {"block": 16}),
    ("anchor", "symmetric, pooled anchors", {"query_share": 1.0, "anchor": "pooled"}),
    ("anchor", "symmetric, random anchors", {"query_share": 1.0, "anchor": "random"}),
    ("anchor", "keys/values only, pooled anchors", {"anchor": "pooled"}),
    ("anchor", "keys/values only, random anchors", {"anchor": "random"}),
    ("assignment", "symmetric, soft (temperature 0.1)", {"query_share": 1.0, "temperature": 0.1}),
    ("assignment", "symmetric, soft (temperature 0.03)", {"query_share": 1.0, "temperature": 0.03}),
    ("assignment", "keys/values only, soft (temperature 0.1)", {"temperature": 0.1}),
    ("attention", "symmetric, no proportional attention", {"query_share": 1.0, "proportional_attention": False}),
    ("attention", "keys/values only, no proportional attention", {"proportional_attention": False}),
    ("tau", "tau=-1", {"tau": -1.0}),
    ("tau", "tau=0.5", {"tau": 0.5}),
    ("tau", "tau=0.8", {"tau": 0.8}),
    ("tau", "tau=1 (pooling)", {"tau": 1.0}),
    ("tau", "symmetric, tau=-1", {"query_share": 1.0, "tau": -1.0}),
    ("tau", "symmetric, tau=0.5", {"query_share": 1.0, "tau": 0.5}),
    ("tau", "symmetric, tau=1 (pool/unpool)", {"query_share": 1.0, "tau": 1.0}),
]
QUICK = {"defaults (query_share=0)", "query_share=1 (symmetric)", "tau=1 (pooling)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.5, 0.75, 0.9])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", default="docs")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_grad_enabled(False)
    out = Path(args.out)

    bench = LayerBench(PHOTOS[:2] if args.quick else PHOTOS)
    variants = [v for v in MAME_VARIANTS if not args.quick or v[1] in QUICK]
    jobs = [(ratio, family, label, settings) for ratio in args.ratios for family, label, settings in variants]
    jobs += [(ratio, "peer", name, None) for ratio in args.ratios for name in ("tomesd", "ToDo (kv pooling)", "pool/unpool")]
    rows, calls = [], {"full": (full_attention, 0)}
    for ratio, family, label, settings in tqdm(jobs, desc="ablation errors"):
        num_merged = merge_layout(bench.hw, ratio).num_merged
        if settings is None:
            method = {"tomesd": tomesd_attention(), "ToDo (kv pooling)": kv_pool_attention, "pool/unpool": pool_attention}[label]
        else:
            method = mame_attention(ratio=ratio, **settings)
        calls[f"{ratio} {label}"] = (method, num_merged)
        rows.append({"ratio": ratio, "family": family, "variant": label, "error": bench.error(method, num_merged)})
    # Timed round by round, every variant once per round: drift on a shared machine hits all alike.
    timed = bench.interleaved_milliseconds(calls, rounds=args.repeats)
    full_ms = timed.pop("full")["ms"]
    for row, name in zip(rows, timed):
        row.update(timed[name], speedup=full_ms / timed[name]["ms"])

    for ratio in args.ratios:
        peer = next(r for r in rows if r["ratio"] == ratio and r["variant"] == "tomesd")
        for row in rows:
            if row["ratio"] == ratio:
                row["error_vs_tomesd"] = row["error"] / peer["error"]
                row["time_vs_tomesd"] = row["ms"] / peer["ms"]

    table = markdown_table(
        rows,
        ["ratio", "family", "variant", "error", "error_vs_tomesd", "ms", "min ms", "max ms", "time_vs_tomesd", "speedup"],
        {"ratio": ".2f", "error": ".4f", "error_vs_tomesd": ".2f", "ms": ".1f", "min ms": ".1f", "max ms": ".1f",
         "time_vs_tomesd": ".2f", "speedup": ".2f"},
    )
    print(table)
    payload = {
        "environment": environment(),
        "setup": {
            "grid": bench.hw,
            "channels": 320,
            "heads": 5,
            "batch": 2,
            "photos": list(bench.tokens),
            "full_ms": full_ms,
            "rounds": args.repeats,
            "attention_entropy": bench.attention_entropy(),  # a fraction of log N
        },
        "rows": rows,
    }
    write_report(out / "ablation_layer", payload, table)
    plot_frontier(rows, out / "ablation_frontier.png", full_ms)
    plot_tau(out / "tau.png")


def plot_frontier(rows, path: Path, full_ms: float) -> None:
    """Error against time, one panel per ratio: lower-left is better."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ratios = sorted({r["ratio"] for r in rows})
    figure, axes = plt.subplots(1, len(ratios), figsize=(5.5 * len(ratios), 4.8), squeeze=False)
    styles = {"peer": ("s", "#d62728"), "split": ("o", "#1f77b4"), "tau": ("^", "#2ca02c")}
    for axis, ratio in zip(axes[0], ratios):
        for row in (r for r in rows if r["ratio"] == ratio):
            marker, colour = styles.get(row["family"], ("x", "#7f7f7f"))
            axis.scatter(row["ms"], row["error"], marker=marker, color=colour, s=40)
            if row["family"] in ("peer", "split") or row["variant"].endswith("global"):
                axis.annotate(row["variant"], (row["ms"], row["error"]), fontsize=7, xytext=(4, 3), textcoords="offset points")
        axis.set_title(f"ratio {ratio} (full attention: {full_ms:.0f} ms)")
        axis.set_xlabel("ms per call (batch 2, this CPU)")
        axis.set_ylabel("relative error vs full attention")
        axis.set_xscale("log")
        axis.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        axis.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        axis.grid(alpha=0.3)
    figure.suptitle("Layer fidelity vs time: red = peers, blue = query/key split, green = tau, grey = other variants")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_tau(path: Path) -> None:
    """What tau does: the slots a photo's patches merge into, for several tau values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hw = (64, 64)
    tokens = photo_tokens("astronaut", hw)
    photo = load_photo("astronaut", (512, 512)).permute(1, 2, 0).numpy()
    taus = [1.0, 0.9, 0.5, -1.0]
    figure, axes = plt.subplots(2, len(taus) + 1, figsize=(3.2 * (len(taus) + 1), 6.6))
    axes[0, 0].imshow(photo)
    axes[0, 0].set_title("photo (64x64 patches)")
    axes[1, 0].axis("off")
    axes[1, 0].text(0, 0.5, "top: each patch coloured by\nthe slot it merges into\n\nbottom: the photo rebuilt\nfrom the merged slots\n(restore(merge(pixels)))", fontsize=10)
    pixels = torch.nn.functional.unfold(torch.from_numpy(photo).permute(2, 0, 1)[None], 8, stride=8).transpose(1, 2)
    generator = torch.Generator().manual_seed(0)
    palette = torch.rand(1, 1024, 3, generator=generator)
    for column, tau in enumerate(taus, start=1):
        plan = plan_merge(tokens, hw, ratio=0.75, tau=tau)
        slots = plan.restore(palette).reshape(64, 64, 3)
        rebuilt = plan.restore(plan.merge(pixels))
        rebuilt = torch.nn.functional.fold(rebuilt.transpose(1, 2), (512, 512), 8, stride=8)[0].permute(1, 2, 0)
        moved = (plan.assignment.float().argmax(-1) != plan.layout.own_candidate_matrix("cpu", torch.float32).argmax(-1)).float().mean()
        axes[0, column].imshow(slots.numpy(), interpolation="nearest")
        axes[0, column].set_title(f"tau={tau}\n{100 * moved:.0f}% of patches leave their cell", fontsize=10)
        axes[1, column].imshow(rebuilt.clamp(0, 1).numpy())
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
    figure.suptitle("ratio 0.75 (M = N/4): tau sets how readily a patch leaves its own 2x2 cell for a more similar anchor nearby")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


if __name__ == "__main__":
    main()
