"""Throughput and feature agreement of MaMe on transformers vision models (random weights).

Models are built from their public architectures with random weights (no hub access):
ViT-B/16, CLIP ViT-B/16 and SigLIP-B/16 at 224 x 224, batch 32, and VideoMAE-B (16 frames,
224 x 224) at batch 2. Each runs as is (baseline), with MaMe at the default settings, and
(images) with a ToMe-style bipartite soft matching peer, written below, that merges to
exactly the same token counts at the same layers, compares tokens on the same features, and
gets the same size tracking and proportional attention. VideoMAE compares MaMe's per-frame
default with space-time merging at about the same final token count.

Throughput: images (videos) per second. This machine's speed drifts and is shared, so methods
are timed in interleaved rounds (each once per round, the baseline first), a call is timed
again when other processes used the CPU meanwhile, and the speedup is the median of the
per-round ratios.

Quality proxies (no pretrained weights can be loaded here), against the unmerged model, on
real photographs from scikit-image (videos: a slow pan across each photo):
``cosine pooled``, the cosine of the final pooled features (CLS, projection, attention-pooling
head, or mean pooling); ``cosine tokens``, the mean cosine of every patch's final token
(its merged token, restored) with the unmerged one, which shows lost per-patch detail. With
random weights attention is close to uniform, so these proxies are lenient: they rank
settings, they do not predict top-1 accuracy.

    python benchmarks/vit_benchmark.py                 # the full CPU run (about 15 minutes)
    python benchmarks/vit_benchmark.py --quick         # tiny models, seconds
    python benchmarks/vit_benchmark.py --sweep         # setting candidates on ViT-B/16
    python benchmarks/vit_benchmark.py --device cuda --dtype float16 --out benchmarks/results/vit_cuda
"""

from __future__ import annotations

import argparse
import functools
import math
import os
import statistics
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
import transformers as tf
from tqdm import tqdm

from mame_diffusers import VisionMaMeConfig, merge_layout, visualize_merges
from mame_diffusers.benchmarking.photos import PHOTOS, load_photo, photo_tokens
from mame_diffusers.benchmarking.report import environment, markdown_table, write_report
from mame_diffusers.benchmarking.timing import interleaved_seconds, median_seconds
from mame_diffusers.transformers_integration import (
    TokenMerge,
    apply_mame_to_vision_model,
    merge_history,
    mame_token_merge,
    merge_membership,
    remove_mame_from_vision_model,
    similarity_features,
)

BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
TINY = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, intermediate_size=128)


# -- the ToMe-style peer ----------------------------------------------------------------------------


def _bipartite_round(
    tokens: torch.Tensor, metric: torch.Tensor, sizes: torch.Tensor, remove: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One round of ToMe's bipartite soft matching: alternate tokens form sets A and B; the
    ``remove`` A tokens most similar to their best B token are averaged into it (size-weighted).

    Returns the merged tokens, metric and sizes, and ``slot`` (B, n): where each input token went.
    """
    size_a, size_b = sizes[:, ::2], sizes[:, 1::2]
    scores = F.normalize(metric[:, ::2], dim=-1) @ F.normalize(metric[:, 1::2], dim=-1).transpose(-1, -2)
    best, best_b = scores.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    merged_a, kept_a = order[:, :remove], order[:, remove:]
    target = best_b.gather(1, merged_a)

    def merge(values: torch.Tensor) -> torch.Tensor:
        """Size-weighted sums of A into B; kept A tokens first, then B (as ToMe orders them)."""
        width = values.shape[-1]
        va, vb = values[:, ::2] * size_a[..., None], values[:, 1::2] * size_b[..., None]
        moved = va.gather(1, merged_a[..., None].expand(-1, -1, width))
        vb = vb.scatter_add(1, target[..., None].expand(-1, -1, width), moved)
        return torch.cat([va.gather(1, kept_a[..., None].expand(-1, -1, width)), vb], dim=1)

    new_sizes = torch.cat(
        [size_a.gather(1, kept_a), size_b.scatter_add(1, target, size_a.gather(1, merged_a))], dim=1
    )
    divisor = new_sizes.clamp_min(1e-6)[..., None]
    kept = kept_a.shape[1]
    slot_a = torch.empty_like(best_b)
    slot_a.scatter_(1, kept_a, torch.arange(kept, device=tokens.device).expand_as(kept_a).contiguous())
    slot_a.scatter_(1, merged_a, kept + target)
    slot = torch.empty(tokens.shape[:2], dtype=torch.long, device=tokens.device)
    slot[:, ::2] = slot_a
    slot[:, 1::2] = kept + torch.arange(size_b.shape[1], device=tokens.device)
    return merge(tokens) / divisor, merge(metric) / divisor, new_sizes, slot


def tome_token_merge(
    patches: torch.Tensor, grid: tuple, sizes: torch.Tensor | None, ratio: float, config: VisionMaMeConfig
) -> TokenMerge | None:
    """A ToMe-style peer that merges to exactly MaMe's token count, comparing tokens on the
    same similarity features (argsort/gather/scatter: fine here, it is a comparison, not our
    merge path). Its tokens have no grid; it reports MaMe's merged grid only so that the next
    layer gets the same token count."""
    if len(grid) != 2:
        raise NotImplementedError("the ToMe-style peer is benchmarked on images only")
    layout = merge_layout(grid, ratio, block=config.block)
    if layout.num_merged == patches.shape[1]:
        return None
    tokens, metric = patches, similarity_features(patches, config.similarity_channels)
    sizes = torch.ones_like(patches[..., 0]) if sizes is None else sizes
    where = torch.arange(patches.shape[1], device=patches.device).expand(patches.shape[:2])
    while tokens.shape[1] > layout.num_merged:  # one round removes at most half
        remove = min(tokens.shape[1] - layout.num_merged, tokens.shape[1] // 2)
        tokens, metric, sizes, slot = _bipartite_round(tokens, metric, sizes, remove)
        where = slot.gather(1, where)

    def restore(merged: torch.Tensor) -> torch.Tensor:
        return merged.gather(1, where[..., None].expand(-1, -1, merged.shape[-1]))

    return TokenMerge(tokens, sizes, layout.merged_hw, restore)


# -- models, inputs, features ---------------------------------------------------------------------------


@dataclass
class Subject:
    name: str
    build: Callable[[], torch.nn.Module]
    #: one photo (3, H, W) in [0, 1] -> the model's inputs for a batch of such photos
    inputs: Callable[[torch.Tensor], dict]
    features: Callable[[torch.nn.Module, dict], torch.Tensor]
    batch: int
    size: int
    patch: int
    #: tokens in front of the patches (CLS)
    specials: int
    layers: int = 12
    frames: int = 0

    @property
    def tokens(self) -> int:
        return self.specials + (self.size // self.patch) ** 2 * max(1, self.frames // 2)


def _image_inputs(photos: torch.Tensor) -> dict:
    return {"pixel_values": (photos - 0.5) / 0.5}


def _video_inputs(videos: torch.Tensor) -> dict:
    return {"pixel_values": (videos - 0.5) / 0.5}


def subjects(quick: bool) -> list[Subject]:
    arch, size, patch, batch = (TINY, 64, 8, 4) if quick else (BASE, 224, 16, 32)
    image = dict(**arch, image_size=size, patch_size=patch)
    video_arch = dict(**arch, image_size=size, patch_size=patch, num_frames=4 if quick else 16, tubelet_size=2)
    return [
        Subject(
            "ViT-B/16" if not quick else "ViT-tiny",
            lambda: tf.ViTForImageClassification(tf.ViTConfig(**image, num_labels=1000)),
            _image_inputs,
            lambda m, x: m.vit(**x).last_hidden_state[:, 0],
            batch,
            size,
            patch,
            specials=1,
            layers=arch["num_hidden_layers"],
        ),
        Subject(
            "CLIP ViT-B/16" if not quick else "CLIP-tiny",
            lambda: tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**image, projection_dim=512)),
            _image_inputs,
            lambda m, x: m(**x).image_embeds,
            batch,
            size,
            patch,
            specials=1,
            layers=arch["num_hidden_layers"],
        ),
        Subject(
            "SigLIP-B/16" if not quick else "SigLIP-tiny",
            lambda: tf.SiglipVisionModel(tf.SiglipVisionConfig(**image)),
            _image_inputs,
            lambda m, x: m(**x).pooler_output,
            batch,
            size,
            patch,
            specials=0,
            layers=arch["num_hidden_layers"],
        ),
        Subject(
            "VideoMAE-B (16 frames)" if not quick else "VideoMAE-tiny",
            lambda: tf.VideoMAEForVideoClassification(tf.VideoMAEConfig(**video_arch, num_labels=400)),
            _video_inputs,
            _videomae_features,
            2,
            size,
            patch,
            specials=0,
            layers=arch["num_hidden_layers"],
            frames=video_arch["num_frames"],
        ),
    ]


def _videomae_features(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    """The classifier's input: fc_norm of the (size-weighted, under MaMe) token mean."""
    captured = {}
    handle = model.fc_norm.register_forward_hook(lambda m, args, out: captured.setdefault("x", out))
    try:
        model(**inputs)
    finally:
        handle.remove()
    return captured["x"]


def photo_batch(size: int) -> torch.Tensor:
    return torch.stack([load_photo(name, (size, size)) for name in PHOTOS])


def panning_videos(size: int, frames: int) -> torch.Tensor:
    """A slow horizontal pan across each photo: (videos, frames, 3, size, size)."""
    videos = []
    for name in PHOTOS:
        wide = load_photo(name, (size, size + 2 * frames))
        videos.append(torch.stack([wide[:, :, 2 * t : 2 * t + size] for t in range(frames)]))
    return torch.stack(videos)


def repeat_to(batch: torch.Tensor, count: int) -> torch.Tensor:
    reps = -(-count // batch.shape[0])
    return batch.repeat(reps, *([1] * (batch.ndim - 1)))[:count]


# -- the measurement --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    name: str
    config: VisionMaMeConfig | None = None
    token_merger: Callable | None = None


def methods_for(subject: Subject, sweep: bool) -> list[Method]:
    default = VisionMaMeConfig()
    if subject.frames:
        # ratio 0.13 on the space-time grid ends at about the per-frame default's token count.
        return [
            Method("baseline"),
            Method("MaMe default (per-frame grid)", replace(default, video_grid="per_frame")),
            Method("MaMe space-time grid, ratio=0.13", replace(default, video_grid="spacetime", ratio=0.13)),
        ]
    methods = [
        Method("baseline"),
        Method("MaMe default", default),
        Method("ToMe-style bipartite, same counts", default, tome_token_merge),
    ]
    if sweep:
        variants = {
            "in blocks (block=8)": dict(block=8),
            "all channels compared": dict(similarity_channels=None),
            "in blocks, all channels": dict(block=8, similarity_channels=None),
            "ratio=0.08": dict(ratio=0.08),
            "ratio=0.12": dict(ratio=0.12),
            "ratio=0.15": dict(ratio=0.15),
            "from layer 1 (not the embeddings)": dict(layers=tuple(range(1, round(subject.layers * 2 / 3) + 1))),
        }
        methods += [Method(f"MaMe {name}", replace(default, **change)) for name, change in variants.items()]
    return methods


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(a.float(), b.float(), dim=-1)


def token_counts(model: torch.nn.Module, specials: int, first: int) -> str:
    counts = [first] + [specials + record.sizes.shape[1] for record in merge_history(model)]
    return "→".join(str(c) for c in counts)


def vision_tower(model: torch.nn.Module) -> torch.nn.Module:
    return model.vision_model if hasattr(model, "vision_model") else model.base_model


def token_agreement(subject: Subject, model: torch.nn.Module, inputs: dict, reference: torch.Tensor) -> float:
    """Mean cosine between every patch's final token (its merged token, restored) and the
    unmerged model's: how much per-patch detail survives, beyond the pooled feature."""
    tower = vision_tower(model)
    memberships = merge_membership(tower, **inputs)
    with torch.inference_mode():
        merged = tower(**inputs).last_hidden_state[:, subject.specials :]
    if not memberships:
        return cosine(merged, reference).mean().item()
    restored = memberships[-1][1].to(merged.dtype) @ merged
    return cosine(restored, reference).mean().item()


def _foreign_cpu_seconds() -> float | None:
    """CPU time spent on this machine by everything but this process (Linux), or None."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
    except OSError:
        return None
    busy = sum(int(v) for i, v in enumerate(fields) if i not in (3, 4))  # all but idle and iowait
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK") - (own.user + own.system)


def quiet_seconds(fn: Callable[[], object], device: torch.device, attempts: int = 6) -> tuple[float, int]:
    """Wall time of one ``fn()`` during which other processes used under 5% of a core;
    retried (up to ``attempts`` times) when the shared machine was busy. Returns the time and
    the attempts made."""
    seconds = math.inf
    for attempt in range(1, attempts + 1):
        before = _foreign_cpu_seconds()
        seconds = median_seconds(fn, repeats=1, warmup=0, device=device)
        after = _foreign_cpu_seconds()
        # /proc/stat counts in ticks (10 ms): two of them are noise, not a busy machine.
        if before is None or after - before <= max(0.05 * seconds, 0.02):
            return seconds, attempt
        time.sleep(10)  # someone else is running: let them finish
    return seconds, attempts


def measure(subject: Subject, methods: list[Method], args, device, dtype) -> list[dict]:
    """Quality per method, then throughput timed in interleaved rounds (every method once per
    round, the baseline first): this machine's speed drifts, and per-round ratios cancel it."""
    torch.manual_seed(0)
    model = subject.build().to(device=device, dtype=dtype).eval()
    photos = panning_videos(subject.size, subject.frames) if subject.frames else photo_batch(subject.size)
    quality_inputs = {k: v.to(device, dtype) for k, v in subject.inputs(photos).items()}
    timing_inputs = {k: v.to(device, dtype) for k, v in subject.inputs(repeat_to(photos, subject.batch)).items()}
    with torch.inference_mode():
        reference = subject.features(model, quality_inputs)
        reference_tokens = vision_tower(model)(**quality_inputs).last_hidden_state[:, subject.specials :]

    def patched(method: Method):
        if method.config is not None:
            apply_mame_to_vision_model(model, method.config, token_merger=method.token_merger)

    rows = []
    for method in tqdm(methods, desc=f"{subject.name} quality", leave=False):
        patched(method)
        try:
            with torch.inference_mode():
                agreement = cosine(subject.features(model, quality_inputs), reference)
            tokens = token_agreement(subject, model, quality_inputs, reference_tokens) if method.config else 1.0
            counts = token_counts(model, subject.specials, subject.tokens) if method.config else str(subject.tokens)
            with torch.inference_mode():
                for _ in range(args.warmup):
                    subject.features(model, timing_inputs)
        finally:
            remove_mame_from_vision_model(model)
        rows.append(
            {
                "model": subject.name,
                "method": method.name,
                "tokens per layer": counts,
                "batch": subject.batch,
                "cosine pooled": agreement.mean().item(),
                "cosine pooled min": agreement.min().item(),
                "cosine tokens": tokens,
            }
        )

    times: list[list[float]] = [[] for _ in methods]
    retried = 0
    for _ in tqdm(range(args.repeats), desc=f"{subject.name} timing rounds", leave=False):
        for index, method in enumerate(methods):
            patched(method)
            try:
                seconds, attempts = quiet_seconds(lambda: subject.features(model, timing_inputs), device)
            finally:
                remove_mame_from_vision_model(model)
            times[index].append(seconds)
            retried += attempts - 1
    for row, seconds in zip(rows, times):
        row["timings retried (machine busy)"] = retried
        row["throughput"] = subject.batch / statistics.median(seconds)
        row["speedup"] = statistics.median(base / own for base, own in zip(times[0], seconds))
        row["seconds"] = seconds
    return rows


def merge_step_rows(device: torch.device, dtype: torch.dtype, repeats: int) -> list[dict]:
    """Time one merge step alone (no model around it): ViT-B's first merge, B=32, 196 patch
    tokens of 768 channels on 14 x 14, the default ratio, MaMe vs the ToMe-style peer at the
    same count, the methods taking turns for ``repeats`` rounds. End-to-end throughput hides
    this step (a few % of a forward); here it is the whole measurement."""
    config = VisionMaMeConfig()
    ratio = config.ratio if isinstance(config.ratio, float) else config.ratio[0]
    torch.manual_seed(0)
    photos = torch.cat([photo_tokens(name, (14, 14), channels=768, patch=16) for name in PHOTOS])
    patches = repeat_to(photos, 32).to(device, dtype)
    methods = {
        "MaMe default (ranked)": (mame_token_merge, config),
        "MaMe in blocks of 8": (mame_token_merge, replace(config, block=8)),
        "ToMe-style bipartite": (tome_token_merge, config),
    }
    calls = {
        name: functools.partial(merger, patches, (14, 14), None, ratio, settings)
        for name, (merger, settings) in methods.items()
    }
    times = interleaved_seconds(calls, rounds=repeats, warmup=3, device=device)
    tome_ms = 1e3 * statistics.median(times["ToMe-style bipartite"])
    rows = []
    for name, seconds in times.items():
        with torch.inference_mode():
            tokens = calls[name]().tokens.shape[1]
        ms = [1e3 * value for value in seconds]
        rows.append(
            {
                "method": name,
                "tokens": f"196->{tokens}",
                "batch": 32,
                "ms": statistics.median(ms),
                "ms min": min(ms),
                "ms max": max(ms),
                "time vs ToMe-style": statistics.median(ms) / tome_ms,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and batches: a smoke run in seconds")
    parser.add_argument(
        "--sweep", action="store_true", help="schedule candidates on ViT only (how the defaults were chosen)"
    )
    parser.add_argument("--models", nargs="+", default=None, help="subset of models by name prefix (e.g. ViT CLIP)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--out", default=None)
    parser.add_argument(
        "--merge-step", action="store_true", help="time one merge step alone, MaMe vs the ToMe-style peer"
    )
    args = parser.parse_args()
    if args.merge_step:
        device, dtype = torch.device(args.device), getattr(torch, args.dtype)
        rows = merge_step_rows(device, dtype, args.repeats or 50)
        columns = ["method", "tokens", "batch", "ms", "ms min", "ms max", "time vs ToMe-style"]
        formats = {"ms": ".2f", "ms min": ".2f", "ms max": ".2f", "time vs ToMe-style": ".2f"}
        table = markdown_table(rows, columns, formats)
        print(table)
        payload = {"environment": environment(device, dtype), "rows": rows}
        paths = write_report(args.out or "benchmarks/results/vit_merge_step", payload, table)
        print("wrote", *paths)
        return
    args.repeats = args.repeats or (2 if args.quick else 5)
    args.warmup = args.warmup or 1
    out = args.out or ("benchmarks/results/vit_cpu_quick" if args.quick else "benchmarks/results/vit_cpu")
    if args.sweep and args.out is None:
        out += "_sweep"
    warnings.filterwarnings("ignore", category=UserWarning)
    tf.logging.set_verbosity_error()
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)

    chosen = subjects(args.quick)
    if args.sweep:
        chosen = chosen[:1]
    if args.models:
        chosen = [s for s in chosen if any(s.name.startswith(prefix) for prefix in args.models)]
    rows = []
    for subject in tqdm(chosen, desc="models"):
        rows += measure(subject, methods_for(subject, args.sweep), args, device, dtype)

    columns = ["model", "method", "tokens per layer", "batch", "throughput", "speedup"]
    columns += ["cosine pooled", "cosine pooled min", "cosine tokens"]
    table = markdown_table(
        rows,
        columns,
        {"throughput": ".2f", "speedup": ".2f", **{key: ".4f" for key in columns if key.startswith("cosine")}},
    )
    print(table)
    payload = {
        "environment": environment(device, dtype),
        "setup": {
            "weights": "random (built from configs)",
            "quality": (
                f"cosine of final pooled features ('cosine pooled') and of every patch's final token, "
                f"restored ('cosine tokens'), vs the unmerged model, on {', '.join(PHOTOS)}"
            ),
            "timing": (
                "interleaved rounds, one call per method per round, a call retried while other processes "
                "used the CPU; speedup = median of per-round ratios"
            ),
            "repeats": args.repeats,
            "warmup": args.warmup,
            "default_config": repr(VisionMaMeConfig()),
        },
        "rows": rows,
    }
    json_path, md_path = write_report(out, payload, table)
    print(f"\nwrote {json_path} and {md_path}")
    if not args.sweep:
        # Which patches share a token after each merging layer, on a photograph (ViT, random weights).
        torch.manual_seed(0)
        vit = chosen[0].build().to(device=device, dtype=dtype).eval() if chosen else None
        if vit is not None and not chosen[0].frames:
            figure = visualize_merges(vit, load_photo("astronaut", (512, 512)), f"{out}_merges.png")
            print(f"wrote {figure}")


if __name__ == "__main__":
    main()
