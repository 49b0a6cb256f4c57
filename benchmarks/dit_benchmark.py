"""Speed and fidelity of MaMe on diffusion transformers (PixArt, SD3, Flux, Wan), on a CPU.

Models are built from their public architectures at their real widths with a few blocks and
random weights (no hub access; mame_diffusers/configs). Each transformer forward runs stock,
with ``apply_mame`` at its defaults, and with a ToMe-style peer at the same place and the same
merged token count: tomesd's ``bipartite_soft_matching_random2d`` (random destinations in 2 x 2
cells, sort-based matching, gather/scatter merging, "unmerge" by copying each slot's value),
merged before each block and unmerged after it in the same residual form as MaMe, with the
same merged rotary tables. Inputs have the statistics of photographs (latents projected from
scikit-image photos; videos: a slow pan across a photo), not noise.

Error: relative L2 distance of the transformer output from stock (random weights: a proxy that
ranks settings, not an image-quality measure). Speed: methods take turns round by round
(``interleaved_seconds``), after one untimed round; the speed-up is the median of the per-round
ratios to stock, with their min-max spread.

    python benchmarks/dit_benchmark.py                  # the four target configs (about 25 minutes)
    python benchmarks/dit_benchmark.py --quick          # tiny configs, seconds
    python benchmarks/dit_benchmark.py --study rotary   # a design study (see STUDIES)
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mame_diffusers.benchmarking.dit import (
    QUICK,
    SUBJECTS,
    PeerHooks,
    Subject,
    merged_tokens,
    panning_latents,
    swap_hooks,
    with_layers,
)
from mame_diffusers.benchmarking.dit import dit_forward as forward
from mame_diffusers.benchmarking.report import environment, markdown_table, write_report
from mame_diffusers.benchmarking.timing import interleaved_seconds
from mame_diffusers.dit_integration import DiTMaMeConfig, GridPlan, TokenGrid, apply_mame_to_dit
from mame_diffusers.dit_integration import blocks as dit_blocks
from mame_diffusers.dit_integration import grids as dit_grids
from mame_diffusers.dit_integration import rotary as dit_rotary
from mame_diffusers.dit_integration.state import ForwardState

RESULTS = Path(__file__).parent / "results"


# -- study hooks -------------------------------------------------------------------------------------


class SharedPlanHooks(dit_blocks.BlockHooks):
    """Study: one plan per forward, made by the first merged block and reused by the others."""

    def _plan(self, tokens, grid):
        state: ForwardState = self.tracker.current
        plan = getattr(state, "shared_plan", None)
        if plan is None:
            plan, merged = super()._plan(tokens, grid)
            state.shared_plan = plan
            return plan, merged
        return plan, plan.merge(tokens)


# -- measuring -----------------------------------------------------------------------------------------


def relative_error(output: torch.Tensor, reference: torch.Tensor) -> float:
    return ((output.double() - reference.double()).norm() / reference.double().norm()).item()


@dataclass
class Traced:
    """A forward's output, the image stream entering the first block and leaving the last."""

    output: torch.Tensor
    entering: torch.Tensor
    leaving: torch.Tensor

    def errors(self, stock: "Traced") -> dict:
        """``error vs stock``: the output's relative L2 distance from stock's. ``update error``:
        the distance of the stream leaving the blocks, relative to what stock's blocks added to
        it: with random weights blocks add little to the residual stream, so the output error is
        small for any merge; this one shows how well the blocks' own work survives."""
        update = (stock.leaving.double() - stock.entering.double()).norm()
        return {
            "error vs stock": relative_error(self.output, stock.output),
            "update error": ((self.leaving.double() - stock.leaving.double()).norm() / update).item(),
        }


def traced(model: torch.nn.Module, inputs: dict) -> Traced:
    """Run ``model`` once, capturing the image stream around its blocks (``norm_out``'s input)."""
    held = {}
    blocks = model.transformer_blocks if hasattr(model, "transformer_blocks") else model.blocks

    def first(module, args, kwargs):
        held.setdefault("entering", (args[0] if args else kwargs["hidden_states"]).clone())

    def last(module, args, kwargs):
        held["leaving"] = (args[0] if args else kwargs["hidden_states"]).clone()

    handles = [
        # Before any hook apply_mame added: the unmerged stream.
        blocks[0].register_forward_pre_hook(first, with_kwargs=True, prepend=True),
        model.norm_out.register_forward_pre_hook(last, with_kwargs=True),
    ]
    try:
        output = forward(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return Traced(output, held["entering"], held["leaving"])


def errors_of(models: dict, inputs: dict, stock: str = "stock") -> dict[str, dict]:
    runs = {name: traced(model, inputs) for name, model in models.items()}
    return {name: run.errors(runs[stock]) for name, run in runs.items()}


def time_methods(calls: dict[str, Callable], rounds: int, desc: str) -> dict[str, list[float]]:
    """Interleaved wall times, one round at a time (with a progress bar)."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for index in tqdm(range(rounds + 1), desc=desc, leave=False):
        got = interleaved_seconds(calls, rounds=1, warmup=0)
        if index > 0:  # the first round warms up
            for name, values in got.items():
                times[name] += values
    return times


def speed_rows(times: dict[str, list[float]], baseline: str) -> dict[str, dict]:
    """Per method: median seconds, per-round speed-up median and min-max."""
    rows = {}
    for name, values in times.items():
        ratios = [b / t for b, t in zip(times[baseline], values)]
        rows[name] = {
            "seconds": statistics.median(values),
            "seconds_min": min(values),
            "seconds_max": max(values),
            "speedup": statistics.median(ratios),
            "speedup_min": min(ratios),
            "speedup_max": max(ratios),
        }
    return rows


def spread(row: dict) -> str:
    return f"{row['speedup']:.2f}x [{row['speedup_min']:.2f}-{row['speedup_max']:.2f}]"


def secs(row: dict) -> str:
    return f"{row['seconds']:.2f} [{row['seconds_min']:.2f}-{row['seconds_max']:.2f}]"


# -- the main benchmark: defaults vs stock vs the peer -------------------------------------------------


def benchmark(subject: Subject, rounds: int) -> list[dict]:
    """Stock, MaMe at its defaults and the peer, each on its own copy of the model."""
    stock, mame, peer = (subject.build() for _ in range(3))
    inputs = subject.inputs(stock)
    apply_mame_to_dit(mame, DiTMaMeConfig())
    apply_mame_to_dit(peer, DiTMaMeConfig())
    swap_hooks(peer, PeerHooks)
    models = {"stock": stock, "MaMe (defaults)": mame, "ToMe bipartite (same place, same count)": peer}
    errors = errors_of(models, inputs)
    tokens = {name: merged_tokens(model, inputs) for name, model in models.items()}
    calls = {name: (lambda m=model: forward(m, inputs)) for name, model in models.items()}
    speed = speed_rows(time_methods(calls, rounds, subject.name), "stock")
    rows = []
    for name in models:
        rows.append({
            "config": subject.label, "method": name, "tokens per block": tokens[name],
            "seconds": secs(speed[name]), "speed-up": spread(speed[name]), **errors[name],
            "target": f">= {subject.target}x" if subject.target and name.startswith("MaMe") else None,
            **{f"raw_{k}": v for k, v in speed[name].items()},
        })
    return rows


MAIN_COLUMNS = [
    "config", "method", "tokens per block", "seconds", "speed-up", "error vs stock", "update error", "target"
]


# -- design studies -------------------------------------------------------------------------------------


def study_ratio(quick: bool, rounds: int) -> tuple[list[dict], list[str]]:
    """Speed and error of MaMe against the ratio (PixArt width, 2 blocks at 1024²)."""
    subject = with_layers((QUICK if quick else SUBJECTS)["pixart"], 2)
    stock = subject.build()
    inputs = subject.inputs(stock)
    ratios = (0.4, 0.5, 0.6, 0.75)
    models = {"stock": stock}
    for ratio in ratios:
        models[f"ratio {ratio}"] = apply_mame_to_dit(subject.build(), DiTMaMeConfig(ratio=ratio))
    errors = errors_of(models, inputs)
    speed = speed_rows(time_methods({n: (lambda m=m: forward(m, inputs)) for n, m in models.items()}, rounds,
                                    "ratio"), "stock")
    rows = [{"setting": name, "speed-up": spread(speed[name]), **errors[name]} for name in models]
    return rows, ["setting", "speed-up", "error vs stock", "update error"]


def study_plans(quick: bool, rounds: int) -> tuple[list[dict], list[str]]:
    """Per-block plans vs one plan shared by consecutive blocks vs one merge around the whole
    stack, and leaving the first and last blocks unmerged (PixArt width, 4 blocks, 1024²)."""
    subject = (QUICK if quick else SUBJECTS)["pixart"]
    stock = subject.build()
    inputs = subject.inputs(stock)
    count = subject.layers
    variants = {
        "stock": stock,
        "per-block plans (default)": apply_mame_to_dit(subject.build(), DiTMaMeConfig()),
        "first and last blocks unmerged": apply_mame_to_dit(subject.build(), DiTMaMeConfig(blocks=range(1, count - 1))),
    }
    shared = apply_mame_to_dit(subject.build(), DiTMaMeConfig())
    swap_hooks(shared, SharedPlanHooks)
    variants["one plan shared by the blocks"] = shared
    variants["one merge around the stack"] = stack_merged(subject.build())
    errors = errors_of(variants, inputs)
    speed = speed_rows(time_methods({n: (lambda m=m: forward(m, inputs)) for n, m in variants.items()}, rounds,
                                    "plans"), "stock")
    rows = [{"variant": n, "speed-up": spread(speed[n]), **errors[n]} for n in variants]
    return rows, ["variant", "speed-up", "error vs stock", "update error"]


def stack_merged(model: torch.nn.Module, ratio: float = 0.5) -> torch.nn.Module:
    """Study (PixArt): merge before the first block, restore after the last, one plan."""
    config = DiTMaMeConfig(ratio=ratio)
    blocks = model.transformer_blocks
    held = {}

    def grid_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        held["grid"] = TokenGrid(1, hidden.shape[-2] // 2, hidden.shape[-1] // 2)

    def before(block, args, kwargs):
        tokens = args[0] if args else kwargs["hidden_states"]
        plan, merged = GridPlan.plan(config, tokens, held["grid"])
        held.update(plan=plan, tokens=tokens, merged=merged)
        return ((merged, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": merged})

    def after(block, args, kwargs, output):
        return held["tokens"] + held["plan"].restore(output - held["merged"])

    model.register_forward_pre_hook(grid_hook, with_kwargs=True)
    blocks[0].register_forward_pre_hook(before, with_kwargs=True)
    blocks[-1].register_forward_hook(after, with_kwargs=True)
    return model


def study_level(quick: bool, rounds: int) -> tuple[list[dict], list[str]]:
    """Block-level merging (MaMe before the block, MaRe in residual form after it) against
    attention-level merging (MaMe on self-attention's input, MaRe on its output), at ratios
    giving about equal speed, on PixArt (1024², 4 blocks) and Wan (33 frames 480p, 2 blocks)."""
    rows = []
    for key in ("pixart", "wan"):
        subject = (QUICK if quick else SUBJECTS)[key]
        if key == "wan" and not quick:  # 17 frames: the study's many variants in reasonable time
            subject = Subject(**{**subject.__dict__, "latent": (5, 60, 104),
                                 "label": subject.label.replace("33 frames", "17 frames")})
        stock = subject.build()
        inputs = subject.inputs(stock)
        variants = {"stock": stock}
        for ratio in (0.5, 0.75):
            variants[f"block level, ratio {ratio}"] = apply_mame_to_dit(subject.build(), DiTMaMeConfig(ratio=ratio))
        for ratio in (0.5, 0.75, 0.9):
            variants[f"attention level, ratio {ratio}"] = attention_merged(subject.build(), ratio)
        errors = errors_of(variants, inputs)
        speed = speed_rows(time_methods({n: (lambda m=m: forward(m, inputs)) for n, m in variants.items()}, rounds,
                                        f"level {key}"), "stock")
        rows += [{"config": subject.label, "variant": n, "speed-up": spread(speed[n]), **errors[n]} for n in variants]
    return rows, ["config", "variant", "speed-up", "error vs stock", "update error"]


def attention_merged(model: torch.nn.Module, ratio: float) -> torch.nn.Module:
    """Study: MaMe on each self-attention's input tokens (and rotary tables), proportional
    attention over the merged keys, MaRe on its output; the rest of the block unmerged
    (PixArt's and Wan's ``attn1``)."""
    from mame_diffusers.dit_integration.processors import WanMergedAttnProcessor

    config = DiTMaMeConfig(ratio=ratio)
    held = {}
    wan = hasattr(model, "rope")

    def grid_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if wan:
            held["grid"] = TokenGrid(hidden.shape[2], hidden.shape[3] // 2, hidden.shape[4] // 2)
        else:
            held["grid"] = TokenGrid(1, hidden.shape[-2] // 2, hidden.shape[-1] // 2)

    def before(attn, args, kwargs):
        tokens = args[0] if args else kwargs["hidden_states"]
        plan, merged = GridPlan.plan(config, tokens, held["grid"])
        held["plan"] = plan
        bias = plan.key_bias(merged.dtype)
        args = (merged, *args[1:])
        if wan:  # Wan's attn1(hidden, None, None, rotary): tables and bias for MaMe's processor
            tables = dit_rotary.merge_rotary("video", plan, args[3], tokens.shape[0])
            return (*args[:3], (*tables, bias)), kwargs
        return args, {**kwargs, "attention_mask": bias[:, None, :]}  # PixArt's self-attention mask

    def after(attn, args, kwargs, output):
        return held["plan"].restore(output)

    model.register_forward_pre_hook(grid_hook, with_kwargs=True)
    for block in (model.blocks if wan else model.transformer_blocks):
        if wan:
            block.attn1.set_processor(WanMergedAttnProcessor(block.attn1.processor))
        block.attn1.register_forward_pre_hook(before, with_kwargs=True)
        block.attn1.register_forward_hook(after, with_kwargs=True)
    return model


def study_rotary(quick: bool, rounds: int) -> tuple[list[dict], list[str]]:
    """Positions of merged tokens, on one Flux attention at full width (4,096 image tokens of
    a photo, 512 text tokens), ratio 0.5: the error of the restored attention output of the
    image tokens, and how far a merged token's rotation lies from its members' rotations."""
    from diffusers.models.embeddings import apply_rotary_emb
    from mame_diffusers.dit_integration.processors import rotate_pairs

    subject = (QUICK if quick else SUBJECTS)["flux"]
    model = subject.build()
    inputs = subject.inputs(model)
    attn = model.transformer_blocks[0].attn
    with torch.inference_mode():
        image = F.layer_norm(model.x_embedder(inputs["hidden_states"]), (model.inner_dim,))
        text = F.layer_norm(model.context_embedder(inputs["encoder_hidden_states"]), (model.inner_dim,))
        cos, sin = model.pos_embed(torch.cat([inputs["txt_ids"], inputs["img_ids"]]))
        grid = TokenGrid(1, subject.latent[0] // 2, subject.latent[1] // 2)
        config = DiTMaMeConfig(ratio=0.5)
        text_count = text.shape[1]

        def attend(img_q, img_k, img_v, tables, shared: bool, bias=None):
            tq, tk, tv = (t.unflatten(-1, (-1, attn.head_dim)) for t in
                          (attn.add_q_proj(text), attn.add_k_proj(text), attn.add_v_proj(text)))
            q = torch.cat([attn.norm_added_q(tq), img_q], dim=1)
            k = torch.cat([attn.norm_added_k(tk), img_k], dim=1)
            v = torch.cat([tv, img_v], dim=1)
            if tables is not None:
                if shared:
                    q, k = (apply_rotary_emb(t, tables, sequence_dim=1) for t in (q, k))
                else:
                    q, k = (rotate_pairs(t, *tables) for t in (q, k))
            mask = None if bias is None else F.pad(bias, (text_count, 0))[:, None, None, :]
            q, k, v = (t.transpose(1, 2) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
            return attn.to_out[0](out.transpose(1, 2).flatten(2)[:, text_count:])

        def qkv(tokens):
            q, k, v = (t.unflatten(-1, (-1, attn.head_dim)) for t in
                       (attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens)))
            return attn.norm_q(q), attn.norm_k(k), v

        reference = attend(*qkv(image), (cos, sin), shared=True)
        plan, merged = GridPlan.plan(config, image, grid)
        bias = plan.key_bias(image.dtype)  # proportional attention, as merged blocks attend
        rows = []
        for name, normalize in (("merged tables, plain means", False), ("merged tables, rescaled to rotations", True)):
            dit_rotary.NORMALIZE = normalize
            try:
                tables = dit_rotary.merge_rotary("joint", plan, (cos, sin), image.shape[0], text_count)
            finally:
                dit_rotary.NORMALIZE = True
            out = plan.restore(attend(*qkv(merged), tables, shared=False, bias=bias))
            rows.append({"positions": name, "attention output error": relative_error(out, reference),
                         "rotation gap": rotation_gap(plan, cos[text_count:], sin[text_count:], tables, text_count)})
        # Merging after the rotation: queries, keys and values of every token, rotated, then merged.
        q, k, v = qkv(image)
        q = apply_rotary_emb(q, (cos[text_count:], sin[text_count:]), sequence_dim=1)
        k = apply_rotary_emb(k, (cos[text_count:], sin[text_count:]), sequence_dim=1)
        mq, mk, mv = (plan.merge(t.flatten(2)).unflatten(-1, (-1, attn.head_dim)) for t in (q, k, v))
        text_tables = (cos[:text_count], sin[:text_count])
        out = plan.restore(attend_rotated(attn, text, mq, mk, mv, text_tables, text_count, bias))
        rows.append({"positions": "merged after the rotation (full-token q/k/v projections)",
                     "attention output error": relative_error(out, reference), "rotation gap": None})
        # No rotation at all (text ids are 0: text is never rotated): what positions are worth.
        out = plan.restore(attend(*qkv(merged), None, shared=False, bias=bias))
        rows.append({"positions": "no rotation for image tokens (lower bound on what positions do)",
                     "attention output error": relative_error(out, reference), "rotation gap": None})
    return rows, ["positions", "attention output error", "rotation gap"]


def attend_rotated(attn, text, q, k, v, text_tables, text_count, bias):
    """Study helper: joint attention where the image queries and keys come rotated already."""
    from diffusers.models.embeddings import apply_rotary_emb

    tq, tk, tv = (t.unflatten(-1, (-1, attn.head_dim)) for t in
                  (attn.add_q_proj(text), attn.add_k_proj(text), attn.add_v_proj(text)))
    tq = apply_rotary_emb(attn.norm_added_q(tq), text_tables, sequence_dim=1)
    tk = apply_rotary_emb(attn.norm_added_k(tk), text_tables, sequence_dim=1)
    q, k, v = torch.cat([tq, q], 1), torch.cat([tk, k], 1), torch.cat([tv, v], 1)
    mask = F.pad(bias, (text_count, 0))[:, None, None, :]
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask)
    return attn.to_out[0](out.transpose(1, 2).flatten(2)[:, text_count:])


def rotation_gap(plan, cos, sin, tables, text_count) -> float:
    """Mean over tokens and frequencies of ``|e^{i a_merged} - e^{i a_member}|``: how far the
    rotation a merged token gets lies from its members' own."""
    merged_cos, merged_sin = (t[:, text_count:] for t in tables)
    spread_cos, spread_sin = plan.plans[0].spread(merged_cos), plan.plans[0].spread(merged_sin)
    return torch.hypot(spread_cos - cos, spread_sin - sin).mean().item()


def study_video(quick: bool, rounds: int) -> tuple[list[dict], list[str]]:
    """Space-time merging (groups of at most 2, 4, 8 or all frames, interleaved row by row)
    against merging each frame alone, on Wan at full width (33 frames 480p, 2 blocks), ratio 0.5, on
    pans of 1, 2 and 4 latent pixels per latent frame (8, 16, 32 pixels per 4 video frames)."""
    subject = (QUICK if quick else SUBJECTS)["wan"]
    stock = subject.build()
    model = apply_mame_to_dit(subject.build(), DiTMaMeConfig())
    rows = []
    for photo, step in (("astronaut", 1), ("coffee", 2), ("rocket", 4)):
        inputs = subject.inputs(stock, photo)
        inputs["hidden_states"] = panning_latents(photo, subject.latent, stock.config.in_channels, step)
        reference = traced(stock, inputs)
        frames = subject.latent[0]
        for most in (1, 2, 4, 8, frames):
            dit_grids.MAX_FRAMES_PER_GROUP = most
            try:
                errors = traced(model, inputs).errors(reference)
            finally:
                dit_grids.MAX_FRAMES_PER_GROUP = 9
            groups = " + ".join(f"{count} x {size}" if count > 1 else f"{size}"
                                for count, size in TokenGrid(frames, 1, 1).groups(most))
            rows.append({"video": f"{photo}, pan of {step} latent px per latent frame",
                         "frames per group": "each frame alone" if most == 1 else
                         (f"all {frames} frames" if most == frames else f"at most {most} ({groups})"), **errors})
    return rows, ["video", "frames per group", "error vs stock", "update error"]


def study_proportional(quick: bool, rounds: int) -> tuple[list[dict], list[str]]:
    """Proportional attention (each merged key weighted by its size: a log-size key bias) in
    merged blocks, against plain attention over the merged tokens, on PixArt (1024², 2 blocks)
    and Flux (1 double + 1 single block) at full width."""
    rows = []
    for key in ("pixart", "flux"):
        subject = (QUICK if quick else SUBJECTS)[key]
        if key == "pixart":
            subject = with_layers(subject, 2)
        stock = subject.build()
        inputs = subject.inputs(stock)
        reference = traced(stock, inputs)
        model = subject.build()
        for ratio in (0.5, 0.75):
            apply_mame_to_dit(model, DiTMaMeConfig(ratio=ratio))
            rows.append({"config": subject.label, "ratio": ratio, "proportional attention": "with (default)",
                         **traced(model, inputs).errors(reference)})
            swap_hooks(model, NoBiasHooks)
            rows.append({"config": subject.label, "ratio": ratio, "proportional attention": "without",
                         **traced(model, inputs).errors(reference)})
        del model, stock
    return rows, ["config", "ratio", "proportional attention", "error vs stock", "update error"]


class NoBiasHooks(dit_blocks.BlockHooks):
    """Study: merged blocks attend to their merged keys without the log-size bias."""

    def _key_bias(self, plan, dtype):
        return torch.zeros_like(plan.key_bias(dtype))


def study_cache(quick: bool, rounds: int) -> tuple[list[dict], list[str]]:
    """diffusers' FirstBlockCache, MaMe, and both, over a short denoising loop (PixArt width,
    6 blocks, 512², 12 flow-matching Euler steps): wall time of the loop, steps the cache let
    run in full, and the error of the final latents against the stock loop. The cache's
    threshold is set between the first block's relative residual changes from step to step
    (measured on the stock loop), so that it skips about half of the steps."""
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    subject = with_layers((QUICK if quick else SUBJECTS)["pixart"], 6)
    if not quick:
        subject = Subject(**{**subject.__dict__, "latent": (64, 64), "label": subject.label.replace("1024²", "512²")})
    steps = 12
    start = subject.inputs(subject.build())
    changes = residual_changes(subject.build(), start, steps)
    threshold = float(sorted(changes)[len(changes) // 2])
    variants = {}
    for name in ("stock", "FirstBlockCache", "MaMe", "MaMe + FirstBlockCache"):
        model = subject.build()
        if "MaMe" in name:
            apply_mame_to_dit(model, DiTMaMeConfig())
        if "Cache" in name:
            apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold))
        variants[name] = model
    reference, _ = denoise(variants["stock"], start, steps)
    results = {name: denoise(m, start, steps) for name, m in variants.items()}
    speed = speed_rows(time_methods({n: (lambda m=m: denoise(m, start, steps)) for n, m in variants.items()},
                                    rounds, "cache"), "stock")
    rows = [{"variant": n, "threshold": threshold if "Cache" in n else None,
             "steps computed": f"{results[n][1]}/{steps}", "loop seconds": secs(speed[n]), "speed-up": spread(speed[n]),
             "final latents error vs stock": relative_error(results[n][0], reference)} for n in variants]
    return rows, ["variant", "threshold", "steps computed", "loop seconds", "speed-up", "final latents error vs stock"]


def denoise(model: torch.nn.Module, start: dict, steps: int) -> tuple[torch.Tensor, int]:
    """A flow-matching Euler loop from ``start``'s latents; returns the final latents and how
    many steps ran every block (FirstBlockCache's leader decides)."""
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    latents = start["hidden_states"].clone()
    HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()  # a fresh cache per loop
    _set_cache_context(model, CacheContext("cond"))
    head = getattr(model.transformer_blocks[0], "_diffusers_hook", None)
    leader = head.get_hook("fbc_leader_block_hook") if head is not None else None
    computed = 0
    try:
        for step in range(steps):
            inputs = {**start, "hidden_states": latents, "timestep": torch.full((1,), int(999 * (1 - step / steps)))}
            velocity = forward(model, inputs)[:, : latents.shape[1]]
            latents = latents - velocity / steps
            computed += leader is None or leader.state_manager.get_state().should_compute
    finally:
        _set_cache_context(model, None)
    return latents, computed


def residual_changes(model: torch.nn.Module, start: dict, steps: int) -> list[float]:
    """FirstBlockCache's measure, step to step, on a stock loop: the mean absolute change of
    the first block's residual relative to its previous mean absolute value."""
    residuals = []
    block = model.transformer_blocks[0]
    handle = block.register_forward_hook(
        lambda m, a, k, out: residuals.append(out - (a[0] if a else k["hidden_states"])), with_kwargs=True
    )
    try:
        denoise(model, start, steps)
    finally:
        handle.remove()
    return [((r - p).abs().mean() / p.abs().mean()).item() for p, r in zip(residuals, residuals[1:])]


def study_features(quick: bool, rounds: int) -> tuple[list[dict], list[str]]:
    """What the plan compares: the layer-normed tokens (what the block's attention and MLP
    see, the default) against the raw residual stream, on PixArt (1024², 2 blocks), Flux (1
    double + 1 single block) and Wan (17 frames 480p, 2 blocks) at full width, ratio 0.5."""
    rows = []
    for key in ("pixart", "flux", "wan"):
        subject = (QUICK if quick else SUBJECTS)[key]
        if key == "pixart":
            subject = with_layers(subject, 2)
        if key == "wan" and not quick:
            subject = Subject(**{**subject.__dict__, "latent": (5, 60, 104),
                                 "label": subject.label.replace("33 frames", "17 frames")})
        stock = subject.build()
        inputs = subject.inputs(stock)
        reference = traced(stock, inputs)
        del stock
        model = apply_mame_to_dit(subject.build(), DiTMaMeConfig())
        rows.append({"config": subject.label, "plan compares": "layer-normed tokens (default)",
                     **traced(model, inputs).errors(reference)})
        swap_hooks(model, RawPlanHooks)
        rows.append({"config": subject.label, "plan compares": "raw residual stream",
                     **traced(model, inputs).errors(reference)})
        swap_hooks(model, PeerHooks)
        rows.append({"config": subject.label, "plan compares": "peer (bipartite) on layer-normed tokens",
                     **traced(model, inputs).errors(reference)})
    return rows, ["config", "plan compares", "error vs stock", "update error"]


class RawPlanHooks(dit_blocks.BlockHooks):
    """Study: plans compare the raw tokens entering the block."""

    def _plan(self, tokens, grid):
        return GridPlan.plan(self.config, tokens, grid)


STUDIES = {
    "features": study_features,
    "ratio": study_ratio,
    "plans": study_plans,
    "level": study_level,
    "rotary": study_rotary,
    "video": study_video,
    "proportional": study_proportional,
    "cache": study_cache,
}


# -- main ----------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny configs, seconds (CI)")
    parser.add_argument("--only", nargs="*", choices=sorted(SUBJECTS), help="subjects of the main benchmark")
    parser.add_argument("--study", choices=sorted(STUDIES), help="run one design study instead")
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one untimed round)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="report path without suffix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    suffix = "_quick" if args.quick else ""
    env = environment("cpu")
    started = time.perf_counter()
    if args.study:
        rows, columns = STUDIES[args.study](args.quick, args.rounds)
        out = args.out or RESULTS / f"dit_study_{args.study}{suffix}"
        doc = (STUDIES[args.study].__doc__ or "").strip().replace("\n   ", "\n")
    else:
        subjects = QUICK if args.quick else SUBJECTS
        rows = []
        for key in tqdm(args.only or list(subjects), desc="configs"):
            rows += benchmark(subjects[key], args.rounds)
        columns = MAIN_COLUMNS
        out = args.out or RESULTS / f"dit_cpu{suffix}"
        doc = ("Transformer forward at batch 1, random weights, photo latents; speed-up: median [min-max] of "
               "per-round ratios.")
    formats = {name: ".4f" for name in ("error vs stock", "update error", "attention output error", "rotation gap",
                                        "final latents error vs stock", "threshold")}
    table = markdown_table(rows, columns, formats)
    print(table)
    payload = {"environment": env, "rounds": args.rounds, "wall_seconds": time.perf_counter() - started, "rows": rows}
    write_report(out, payload, doc + "\n\n" + table)


if __name__ == "__main__":
    main()
