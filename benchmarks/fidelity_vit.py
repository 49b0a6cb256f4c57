"""ViT-B/16 at the default merge schedule: MaMe against the ToMe-style merge at equal token
counts, at random-weight and at sharpened attention (issue 12).

ViT-B/16 (224 x 224, random weights, a 1000-way classifier head) sees crops of real
photographs (scikit-image): ``--crops`` random square crops of the five photos, resized to
224. Every method merges to exactly the same token counts at the same layers with the same
size tracking and proportional attention (``benchmarks/vit_benchmark.py``'s peer). Against
the unmerged model: ``cosine pooled``, the cosine of the final CLS features (mean and
minimum), and ``top-1 agreement``, how often the classifier head's top class is unchanged.

With random weights attention is almost uniform; the sharpened setting scales every layer's
query and key projections until the mean attention entropy (over layers, heads and queries,
unmerged) is ``--entropy`` of ``log N``.

    python benchmarks/fidelity_vit.py
"""

from __future__ import annotations

import argparse
import math
import warnings

import torch
import torch.nn.functional as F
import transformers as tf
from tqdm import tqdm

from mame_diffusers import VisionMaMeConfig
from mame_diffusers.benchmarking.photos import PHOTOS, load_photo
from mame_diffusers.benchmarking.report import environment, markdown_table, write_report
from mame_diffusers.transformers_integration import apply_mame_to_vision_model, remove_mame_from_vision_model

from vit_benchmark import BASE, tome_token_merge  # the same peer as the throughput benchmark


def photo_crops(count: int, size: int = 224, seed: int = 0) -> torch.Tensor:
    """``(count, 3, size, size)``: random square crops (a third to all of the short side) of
    the photos, in turn, resized to ``size``."""
    generator = torch.Generator().manual_seed(seed)
    photos = [load_photo(name, (512, 512)) for name in PHOTOS]
    crops = []
    for index in range(count):
        photo = photos[index % len(photos)]
        side = int(torch.randint(170, 513, (1,), generator=generator))
        top = int(torch.randint(0, 512 - side + 1, (1,), generator=generator))
        left = int(torch.randint(0, 512 - side + 1, (1,), generator=generator))
        crop = photo[:, top : top + side, left : left + side][None]
        crops.append(F.interpolate(crop, size=(size, size), mode="bilinear", antialias=True, align_corners=False)[0])
    return torch.stack(crops).clamp(0, 1)


@torch.no_grad()
def attention_entropy(model: tf.ViTForImageClassification, pixels: torch.Tensor) -> float:
    """Mean attention entropy over ``log N`` (layers, heads, queries) of the unmerged model."""
    out = model.vit(pixel_values=pixels, output_attentions=True)
    total = 0.0
    for probs in out.attentions:
        total += float(-(probs * probs.clamp_min(1e-30).log()).sum(-1).mean()) / math.log(probs.shape[-1])
    return total / len(out.attentions)


@torch.no_grad()
def sharpen(model: tf.ViTForImageClassification, scale: float) -> None:
    for layer in model.vit.layers:
        for projection in (layer.attention.q_proj, layer.attention.k_proj):
            projection.weight.mul_(scale)
            if projection.bias is not None:
                projection.bias.mul_(scale)


def sharpen_to_entropy(model: tf.ViTForImageClassification, pixels: torch.Tensor, target: float) -> float:
    low, high, applied = 1.0, 8.0, 1.0
    for _ in range(10):
        middle = math.sqrt(low * high)
        sharpen(model, middle / applied)
        applied = middle
        if attention_entropy(model, pixels) > target:
            low = middle
        else:
            high = middle
    return applied


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--crops", type=int, default=60)
    parser.add_argument("--entropy", type=float, default=0.7)
    parser.add_argument("--out", default="benchmarks/results/fidelity_vit")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_grad_enabled(False)

    pixels = (photo_crops(args.crops) - 0.5) / 0.5
    default = VisionMaMeConfig()
    methods = {
        "MaMe default (ranked)": VisionMaMeConfig(),
        "MaMe in blocks of 8": VisionMaMeConfig(block=8),
        "ToMe-style bipartite, same counts": None,
    }
    rows, settings = [], []
    for attention in ("random weights", "sharpened"):
        torch.manual_seed(0)
        config = tf.ViTConfig(**BASE, image_size=224, patch_size=16, num_labels=1000, attn_implementation="eager")
        model = tf.ViTForImageClassification(config).eval()
        scale = 1.0 if attention == "random weights" else sharpen_to_entropy(model, pixels[:8], args.entropy)
        entropy = attention_entropy(model, pixels[:8])
        settings.append({"attention": attention, "qk_scale": scale, "entropy": entropy})
        print(f"{attention}: q/k scale {scale:.3f}, attention entropy {entropy:.3f} log N", flush=True)
        reference = model(pixel_values=pixels, output_hidden_states=True)
        reference_cls = reference.hidden_states[-1][:, 0]
        reference_top1 = reference.logits.argmax(-1)
        for name, method_config in tqdm(methods.items(), desc=attention):
            if method_config is None:
                apply_mame_to_vision_model(model, default, token_merger=tome_token_merge)
            else:
                apply_mame_to_vision_model(model, method_config)
            try:
                out = model(pixel_values=pixels, output_hidden_states=True)
            finally:
                remove_mame_from_vision_model(model)
            cosines = F.cosine_similarity(out.hidden_states[-1][:, 0], reference_cls, dim=-1)
            rows.append(
                {
                    "attention": attention,
                    "entropy": entropy,
                    "method": name,
                    "cosine pooled": float(cosines.mean()),
                    "cosine pooled min": float(cosines.min()),
                    "top-1 agreement": float((out.logits.argmax(-1) == reference_top1).float().mean()),
                }
            )

    table = markdown_table(
        rows,
        ["attention", "entropy", "method", "cosine pooled", "cosine pooled min", "top-1 agreement"],
        {"entropy": ".3f", "cosine pooled": ".5f", "cosine pooled min": ".5f", "top-1 agreement": ".3f"},
    )
    print(table)
    setup = {"model": "ViT-B/16", "crops": args.crops, "schedule": "VisionMaMeConfig() defaults", "settings": settings}
    payload = {"environment": environment(), "setup": setup, "rows": rows}
    json_path, md_path = write_report(args.out, payload, table)
    print(f"\nwrote {json_path} and {md_path}")


if __name__ == "__main__":
    main()
