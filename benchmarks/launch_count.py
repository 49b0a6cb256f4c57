"""Operations per UNet forward, counted on the meta device: the launch-bound GPU's cost, no GPU.

On a GPU at batch 2, an eager SD forward is bound by the host launching its kernels (README,
"On a GPU"), so what merging adds in launches it adds in wall time. This counts, for one
forward of the full-size architectures (SD 2.1 at 512, 768 and 1024, SDXL at 1024, batch
2, float16), the operations that launch work (``mame_diffusers.benchmarking.ops.work_ops``:
top-level ATen operations, and each launch of MaMe's Triton kernels):

- stock;
- MaMe merging every call (``min_latent_tokens=0``) with the default settings (queries,
  keys and values merged, queries restored), with the torch path (``backend="torch"``) and
  with the fused Triton kernels (``backend="triton"``);
- the same with ``keys_values_only=True`` (keys and values merged, nothing restored).

On the meta device nothing is computed, so a whole SDXL forward counts in seconds. An ATen
operation launches one kernel or a few on a GPU (the H200 profiler counted 1,159 kernels
for a stock SD 2.1 forward); the counts are a proxy for launches, not a measurement of them.

    python benchmarks/launch_count.py          # writes benchmarks/results/launches_meta.{json,md}
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import torch
from diffusers import UNet2DConditionModel
from diffusers.utils import logging as diffusers_logging
from tqdm import tqdm

from mame_diffusers.benchmarking.ops import unet_forward_ops
from mame_diffusers.benchmarking.report import environment, markdown_table, write_report
from mame_diffusers.merging import kernels
from mame_diffusers.offline import unet_config, unet_inputs

SETTINGS = [("sd21", 512), ("sd21", 768), ("sd21", 1024), ("sdxl", 1024)]
METHODS: list[tuple[str, dict[str, Any] | None]] = [
    ("stock", None),
    ("MaMe torch", {}),
    ("MaMe triton", {"backend": "triton"}),
    ("MaMe torch, keys_values_only", {"keys_values_only": True}),
    ("MaMe triton, keys_values_only", {"keys_values_only": True, "backend": "triton"}),
]


def count_forward(unet: torch.nn.Module, inputs: dict[str, Any], settings: dict[str, Any] | None) -> dict[str, int]:
    """ATen operations and Triton launches of one forward with MaMe ``settings`` (``None``: stock)."""
    counts = unet_forward_ops(unet, inputs, settings)
    triton = sum(n for name, n in counts.items() if name.startswith("triton::"))
    return {"aten": sum(counts.values()) - triton, "triton": triton, "total": sum(counts.values())}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default="benchmarks/results/launches_meta", help="path without suffix")
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args(argv)
    diffusers_logging.set_verbosity_error()  # casting a meta UNet to float16 is what is meant
    methods = [(n, s) for n, s in METHODS if kernels.available() or "triton" not in n]
    rows = []
    for model, resolution in tqdm(SETTINGS, desc="UNets"):
        with torch.device("meta"):
            unet = UNet2DConditionModel.from_config(unet_config(model)).to(torch.float16)
        inputs = unet_inputs(unet, (resolution // 8, resolution // 8), batch=args.batch)
        stock = None
        for name, settings in methods:
            counted = count_forward(unet, inputs, settings)
            stock = stock or counted["total"]
            rows.append({
                "UNet": f"{'SD 2.1' if model == 'sd21' else 'SDXL'} {resolution} b{args.batch}",
                "method": name,
                **counted,
                "vs stock": counted["total"] / stock,
            })
    table = markdown_table(rows, ["UNet", "method", "aten", "triton", "total", "vs stock"], {"vs stock": ".3f"})
    env = environment(torch.device("meta"), torch.float16)
    env["triton"] = getattr(kernels.triton, "__version__", None)
    payload = {"environment": env, "rows": rows}
    write_report(Path(args.out), payload, table)
    print(table)
    if not kernels.available():
        print("\ntriton is not importable here: the Triton rows are missing", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
