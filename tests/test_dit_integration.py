"""MaMe on diffusion transformers (PixArt, SD3/SD3.5, Flux, Wan), on tiny random models."""

from __future__ import annotations

import warnings

import pytest
import torch

from mame_diffusers import apply_mame, remove_mame
from mame_diffusers.dit_integration import (
    DiTMaMeConfig,
    GridPlan,
    TokenGrid,
    build_transformer,
    family_of,
    patched_dit_config,
    transformer_inputs,
)
from mame_diffusers.dit_integration.processors import takes_key_bias
from mame_diffusers.dit_integration.rotary import merge_rotary

from .banned_ops import BANNED_OPS, ops_run_by
from .graphs import assert_one_graph

FAMILIES = ("pixart", "sd3", "flux", "wan")
#: Latent sizes: non-square images (24 x 16 latents: a 12 x 8 token grid), odd-frame video.
LATENT = {"pixart": (24, 16), "sd3": (24, 16), "flux": (24, 16), "wan": (5, 24, 16)}
GRID = {"pixart": TokenGrid(1, 12, 8), "sd3": TokenGrid(1, 12, 8), "flux": TokenGrid(1, 12, 8),
        "wan": TokenGrid(5, 12, 8)}


def build(family: str, **layers) -> torch.nn.Module:
    return build_transformer(family, "tiny", seed=0, **layers)


def inputs_for(model: torch.nn.Module, family: str, batch: int = 2, seed: int = 0, latent=None) -> dict:
    return transformer_inputs(model, latent or LATENT[family], batch=batch, seed=seed, text_length=8)


def run(model: torch.nn.Module, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).sample


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def blocks_of(model: torch.nn.Module) -> list[torch.nn.Module]:
    return family_of(model).blocks(model)


def image_tokens(args: tuple, kwargs: dict) -> torch.Tensor:
    """A block's image tokens, however the model passes them."""
    return args[0] if args else kwargs["hidden_states"]


def tokens_seen(model: torch.nn.Module, inputs: dict) -> list[int]:
    """Image tokens each block's forward gets (after MaMe's pre-hook)."""
    seen, handles = [], []
    for block in blocks_of(model):
        hook = lambda m, a, k: seen.append(image_tokens(a, k).shape[1])  # noqa: E731
        handles.append(block.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        run(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.fixture(scope="module", params=FAMILIES)
def family(request) -> str:
    return request.param


# -- merging happens, close to stock, and removal is exact -----------------------------------------


def test_blocks_run_on_fewer_image_tokens_and_stay_close_to_stock(family):
    model = build(family)
    inputs = inputs_for(model, family)
    reference = run(model, inputs)
    apply_mame(model, ratio=0.5)
    grid = GRID[family]
    seen = tokens_seen(model, inputs)
    assert len(seen) == len(blocks_of(model)) and all(n <= grid.tokens // 2 for n in seen), seen
    assert relative_error(run(model, inputs), reference) < 0.1
    remove_mame(model)


def test_remove_mame_is_bit_identical(family):
    model = build(family)
    inputs = inputs_for(model, family)
    processors = dict(model.attn_processors)
    reference = run(model, inputs)
    apply_mame(model, ratio=0.5)
    assert patched_dit_config(model).ratio == 0.5
    assert not torch.equal(run(model, inputs), reference)
    remove_mame(model)
    assert all(model.attn_processors[name] is processor for name, processor in processors.items())
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    assert patched_dit_config(model) is None
    assert torch.equal(run(model, inputs), reference)
    remove_mame(model)  # removing twice is harmless


def test_ratio_zero_patches_nothing_and_is_bit_identical():
    model = build("flux")
    inputs = inputs_for(model, "flux")
    reference = run(model, inputs)
    apply_mame(model, ratio=0.0)
    assert torch.equal(run(model, inputs), reference)


def test_unmerged_calls_through_mames_processors_match_stock(family):
    # A ratio that keeps every token makes each slot one token: MaMe's processors (SD3, Flux,
    # Wan) and the block hooks then compute what stock computes, up to float rounding.
    model = build(family)
    inputs = inputs_for(model, family)
    reference = run(model, inputs)
    apply_mame(model, ratio=1e-4)
    assert relative_error(run(model, inputs), reference) < 1e-5


def test_applying_again_replaces_the_settings():
    model = build("wan")
    apply_mame(model, ratio=0.5)
    apply_mame(model, ratio=0.75, blocks=[1])
    assert patched_dit_config(model) == DiTMaMeConfig(ratio=0.75, blocks=(1,))
    seen = tokens_seen(model, inputs_for(model, "wan"))
    assert seen[0] == GRID["wan"].tokens and seen[1] < GRID["wan"].tokens / 2


# -- text tokens, grids, positions ------------------------------------------------------------------


@pytest.mark.parametrize("family,projection", [("flux", "add_k_proj"), ("sd3", "add_k_proj")])
def test_text_tokens_are_never_merged(family, projection):
    """The text stream enters the first block, and its keys are computed, from unmerged text."""
    model = build(family)
    inputs = inputs_for(model, family)

    def capture():
        got = {}

        def keep(name, value):
            got.setdefault(name, value)  # the first call's; hooks return None: nothing changes

        block = blocks_of(model)[0]
        handles = [
            block.register_forward_pre_hook(
                lambda m, a, k: keep("text", k["encoder_hidden_states"].clone()), with_kwargs=True),
            getattr(block.attn, projection).register_forward_pre_hook(lambda m, a: keep("keys_in", a[0].clone())),
            block.register_forward_hook(lambda m, a, k, out: keep("out", out), with_kwargs=True),
        ]
        run(model, inputs)
        for handle in handles:
            handle.remove()
        return got

    stock = capture()
    apply_mame(model, ratio=0.5)
    merged = capture()
    remove_mame(model)
    assert torch.equal(merged["text"], stock["text"]) and torch.equal(merged["keys_in"], stock["keys_in"])
    text_out, image_out = merged["out"]
    assert text_out.shape == stock["out"][0].shape and image_out.shape == stock["out"][1].shape


def test_pixart_cross_attention_reads_unmerged_text():
    model = build("pixart")
    inputs = inputs_for(model, "pixart")
    got = []
    model.transformer_blocks[0].attn2.to_k.register_forward_pre_hook(lambda m, a: got.append(a[0].clone()))
    run(model, inputs)
    apply_mame(model, ratio=0.5)
    run(model, inputs)
    assert torch.equal(got[0], got[1])


def test_grid_comes_from_the_models_inputs(family):
    """Non-square images and odd frame counts: the grid each call records, and the merged count
    the operator's layout gives for it."""
    model = build(family)
    apply_mame(model, ratio=0.5)
    patch = model._mame_dit_patch
    for latent in ([(5, 24, 16), (3, 16, 32)] if family == "wan" else [(24, 16), (16, 40)]):
        inputs = inputs_for(model, family, latent=latent)
        seen = tokens_seen(model, inputs)
        grid = patch.tracker.current.grid
        expected = TokenGrid(*(latent if family == "wan" else (1, *latent)))
        expected = TokenGrid(expected.frames, expected.height // 2, expected.width // 2)
        assert grid == expected
        tokens = torch.randn(2, grid.tokens, 4)
        assert seen[0] == GridPlan.plan(DiTMaMeConfig(ratio=0.5), tokens, grid)[0].num_merged


def test_flux_grid_is_read_from_img_ids_and_checked():
    model = build("flux")
    apply_mame(model, ratio=0.5)
    inputs = inputs_for(model, "flux")
    run(model, inputs)
    assert model._mame_dit_patch.tracker.current.grid == TokenGrid(1, 12, 8)
    shuffled = {**inputs, "img_ids": inputs["img_ids"].flip(0)}  # not one row-major grid
    with pytest.raises(ValueError, match="row-major grid"):
        run(model, shuffled)


def test_merged_rotary_tables_are_close_to_their_members():
    grid = TokenGrid(1, 12, 8)
    row, col = torch.meshgrid(torch.arange(12.0), torch.arange(8.0), indexing="ij")
    angles = torch.stack([row.flatten(), col.flatten()], dim=-1).repeat_interleave(2, dim=-1) * 0.3  # (N, 4)
    cos, sin = angles.cos(), angles.sin()
    text = torch.zeros(3, 4)
    # Tokens like an image's: similar where they lie close (bumps around a few centres).
    position = torch.stack([row.flatten(), col.flatten()], dim=-1)
    centres = torch.tensor([[r, c] for r in (1.0, 5.0, 9.0) for c in (1.0, 6.0)])
    tokens = torch.exp(-torch.cdist(position, centres) ** 2 / 8).expand(2, -1, -1)
    plan, _ = GridPlan.plan(DiTMaMeConfig(ratio=0.5), tokens, grid)
    merged_cos, merged_sin = merge_rotary("joint", plan, (torch.cat([text + 1, cos]), torch.cat([text, sin])), 2, 3)
    assert merged_cos.shape == (2, 3 + plan.num_merged, 4)
    assert (torch.hypot(merged_cos, merged_sin) <= 1 + 1e-6).all()  # means of rotations
    assert torch.equal(merged_cos[:, :3], torch.ones(2, 3, 4))  # text positions untouched
    # Each token's slot rotation against its own: closer than to a random other token's.
    gap = torch.hypot(plan.plans[0].spread(merged_cos[:, 3:]) - cos, plan.plans[0].spread(merged_sin[:, 3:]) - sin)
    shuffled = torch.randperm(grid.tokens, generator=torch.Generator().manual_seed(0))
    random_gap = torch.hypot(cos[shuffled] - cos, sin[shuffled] - sin)
    assert gap.mean() < 0.3 * random_gap.mean()


def test_video_merges_across_neighbouring_frames():
    """A merged token's members span two frames (space-time), each frame alone when asked."""
    grid = TokenGrid(5, 6, 8)
    frame = torch.arange(5.0).repeat_interleave(48)[None, :, None]
    smooth = torch.ones(1, grid.tokens, 4) + 0.01 * torch.randn(1, grid.tokens, 4)  # merges freely
    plan, _ = GridPlan.plan(DiTMaMeConfig(ratio=0.5), smooth, grid, max_frames=2)
    assert plan.groups == ((2, 2), (1, 1))  # odd frame count: two pairs and the last frame
    assert TokenGrid(9, 1, 1).groups(8) == ((1, 5), (1, 4)) and TokenGrid(21, 1, 1).groups() == ((3, 7),)
    mean_frame = plan.merge(frame)
    assert (mean_frame - mean_frame.round()).abs().max() > 0.1  # some slots hold two frames
    assert torch.allclose(plan.restore(plan.merge(smooth)), smooth, atol=0.05)
    plan, _ = GridPlan.plan(DiTMaMeConfig(ratio=0.5), smooth, grid, max_frames=1)
    mean_frame = plan.merge(frame)
    assert torch.equal(mean_frame, mean_frame.round())


def test_wan22_per_token_timesteps_merge_with_the_tokens():
    model = build("wan")
    inputs = inputs_for(model, "wan")
    inputs["timestep"] = torch.full((2, GRID["wan"].tokens), 500, dtype=torch.long)  # Wan 2.2 TI2V
    reference = run(model, inputs)
    apply_mame(model, ratio=0.5)
    assert relative_error(run(model, inputs), reference) < 0.1


def test_sd35_image_only_attention_runs_merged_with_proportional_attention():
    model = build("sd3")
    attn2 = model.transformer_blocks[0].attn2  # the tiny SD3 has SD3.5's image-only attn2
    apply_mame(model, ratio=0.5)
    got = []
    attn2.register_forward_pre_hook(
        lambda m, a, k: got.append((k["hidden_states"].shape[1], k["key_bias"].shape)), with_kwargs=True
    )
    run(model, inputs_for(model, "sd3"))
    tokens, bias_shape = got[0]
    assert tokens < GRID["sd3"].tokens and bias_shape == (2, tokens)


# -- the contract: compile, matrix-only, threads, errors, gating -------------------------------------


def test_one_graph_under_torch_compile(family):
    model = build(family)
    apply_mame(model, ratio=0.5)
    inputs = inputs_for(model, family)
    run(model, inputs)  # eager first: Flux reads its grid from img_ids, which a trace cannot
    with torch.no_grad():
        assert_one_graph(model, **inputs)


@pytest.mark.parametrize("family", ["flux", "wan"])
def test_compile_repeated_blocks(family):
    model = build(family)
    apply_mame(model, ratio=0.5)
    inputs = inputs_for(model, family)
    expected = run(model, inputs)
    torch._dynamo.reset()
    try:
        model.compile_repeated_blocks(fullgraph=True, backend="eager")
        assert torch.allclose(run(model, inputs), expected, atol=1e-5)
    finally:
        torch._dynamo.reset()


def test_merge_path_runs_no_banned_ops(family):
    model = build(family)
    inputs = inputs_for(model, family)
    stock_ops = ops_run_by(lambda: run(model, inputs))
    apply_mame(model, ratio=0.5)
    ops = ops_run_by(lambda: run(model, inputs))
    assert ops & BANNED_OPS <= stock_ops & BANNED_OPS, sorted((ops - stock_ops) & BANNED_OPS)
    assert any("solve" in op for op in ops)  # the merge path ran: the restore was fitted


def test_threads_sharing_one_patched_model_get_their_own_outputs():
    from concurrent.futures import ThreadPoolExecutor

    model = build("wan")
    apply_mame(model, ratio=0.5)
    cases = [(5, 24, 16), (3, 16, 32), (2, 8, 8)]
    inputs = {case: inputs_for(model, "wan", latent=case, seed=i) for i, case in enumerate(cases)}
    expected = {case: run(model, x) for case, x in inputs.items()}
    jobs = [case for _ in range(4) for case in cases]
    with ThreadPoolExecutor(max_workers=3) as pool:
        outputs = list(pool.map(lambda case: (case, run(model, inputs[case])), jobs))
    assert all(torch.equal(out, expected[case]) for case, out in outputs)


def test_gradient_checkpointing_recomputes_the_same_merge():
    model = build("pixart").train()
    model.enable_gradient_checkpointing()
    apply_mame(model, ratio=0.5)
    inputs = inputs_for(model, "pixart")
    model(**inputs).sample.square().mean().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_unsupported_transformers_are_named_and_refused():
    from diffusers import DiTTransformer2DModel

    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1,
                                sample_size=8, patch_size=2, num_embeds_ada_norm=10)
    with pytest.raises(TypeError, match="PixArtTransformer2DModel, SD3Transformer2DModel, FluxTransformer2DModel"):
        apply_mame(dit)

    class Pipeline:  # a pipeline with an unsupported DiT
        transformer = dit

    with pytest.raises(TypeError, match="WanTransformer3DModel"):
        apply_mame(Pipeline())


def test_attention_masks_over_image_tokens_are_refused():
    pixart = build("pixart")
    apply_mame(pixart, ratio=0.5)
    inputs = inputs_for(pixart, "pixart")
    with pytest.raises(ValueError, match="attention mask"):
        run(pixart, {**inputs, "attention_mask": torch.ones(2, GRID["pixart"].tokens)})
    # A mask over the text tokens (cross-attention) is fine: text is never merged.
    run(pixart, {**inputs, "encoder_attention_mask": torch.ones(2, 8)})
    flux = build("flux")
    apply_mame(flux, ratio=0.5)
    inputs = inputs_for(flux, "flux")
    with pytest.raises(ValueError, match="attention mask"):
        run(flux, {**inputs, "joint_attention_kwargs": {"attention_mask": torch.ones(2, 1, 1, 8 + 96)}})


@pytest.mark.parametrize(
    "settings,error,match",
    [
        ({"ratio": 1.0}, ValueError, "ratio"),
        ({"blocks": [-1]}, ValueError, "blocks"),
        ({"blocks": "all"}, ValueError, "blocks"),
        ({"blocks": [7]}, ValueError, "beyond the 3"),
        ({"min_image_tokens": -1}, ValueError, "min_image_tokens"),
        ({"max_downsample": 2}, ValueError, "diffusers UNets only"),
        ({"bogus": 1}, TypeError, "unknown MaMe setting"),
    ],
)
def test_settings_are_validated(settings, error, match):
    model = build("flux")
    with pytest.raises(error, match=match):
        apply_mame(model, **settings)
    assert patched_dit_config(model) is None


def test_small_calls_run_unmerged_on_cuda_and_every_call_merges_on_cpu():
    config = DiTMaMeConfig()
    assert config.token_threshold(torch.device("cpu")) == 0
    assert config.token_threshold(torch.device("cuda")) == 4096  # no CUDA needed to ask
    model = build("pixart")
    inputs = inputs_for(model, "pixart")
    reference = run(model, inputs)
    apply_mame(model, ratio=0.5, min_image_tokens=2 * GRID["pixart"].tokens + 1)  # just above this call
    assert torch.equal(run(model, inputs), reference)
    apply_mame(model, ratio=0.5, min_image_tokens=2 * GRID["pixart"].tokens)
    assert not torch.equal(run(model, inputs), reference)


# -- diffusers as it is: caches, attention backends, pipelines -----------------------------------------


def _cache(model, threshold=0.05):
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    if hasattr(model, "enable_cache"):
        model.enable_cache(FirstBlockCacheConfig(threshold=threshold))
    else:  # PixArt and SD3 have no CacheMixin in diffusers 0.42
        apply_first_block_cache(model, FirstBlockCacheConfig(threshold=threshold))


def _cached_calls(model, inputs, count=2):
    from diffusers.hooks.hooks import CacheContext, HookRegistry, _set_cache_context

    HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks()
    _set_cache_context(model, CacheContext("cond"))
    try:
        return [run(model, inputs) for _ in range(count)]
    finally:
        _set_cache_context(model, None)


@pytest.mark.parametrize("family,layers", [("flux", {"num_single_layers": 2}), ("pixart", {"num_layers": 4}),
                                           ("wan", {"num_layers": 3})])
@pytest.mark.parametrize("cache_first", [True, False])
def test_first_block_cache_composes_with_mame(family, layers, cache_first):
    model = build(family, **layers)
    inputs = inputs_for(model, family)
    mame_only = build(family, **layers)
    count = len(blocks_of(mame_only))
    apply_mame(mame_only, ratio=0.5, blocks=range(1, count - 1))  # what runs merged beside the cache
    expected = run(mame_only, inputs)
    if cache_first:
        _cache(model)
        apply_mame(model, ratio=0.5)
    else:
        apply_mame(model, ratio=0.5)
        _cache(model)
    seen, calls = [], []
    for block in blocks_of(model):
        block.register_forward_pre_hook(lambda m, a, k: seen.append(image_tokens(a, k).shape[1]), with_kwargs=True)
    middle = blocks_of(model)[1]
    inner = middle.attn if hasattr(middle, "attn") else middle.attn1
    inner.register_forward_pre_hook(lambda m, a, k: calls.append(1), with_kwargs=True)
    first, second = _cached_calls(model, inputs)
    tokens = GRID[family].tokens
    # The cache's first and last blocks run unmerged; the blocks between merge.
    assert seen[0] == tokens and seen[count - 1] == tokens and all(n < tokens for n in seen[1: count - 1])
    assert len(calls) == 1  # the second call skipped the middle blocks
    assert torch.allclose(first, expected, atol=1e-5)
    assert torch.allclose(second, first, atol=1e-4)  # the cached residual, added back
    remove_mame(model)  # the cache stays, and runs as without MaMe
    cache_only = build(family, **layers)
    _cache(cache_only)
    assert torch.allclose(_cached_calls(model, inputs)[0], _cached_calls(cache_only, inputs)[0], atol=1e-6)


def test_attention_backend_is_kept_through_mame():
    from diffusers.models.attention_dispatch import AttentionBackendName

    model = build("flux")
    inputs = inputs_for(model, "flux")
    apply_mame(model, ratio=0.5)
    expected = run(model, inputs)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.set_attention_backend("_native_math")
    assert torch.allclose(run(model, inputs), expected, atol=1e-5)
    remove_mame(model)
    backends = {p._attention_backend for p in model.attn_processors.values()}
    assert backends == {AttentionBackendName("_native_math")}  # set on the processors MaMe wrapped
    assert takes_key_bias("native") and takes_key_bias("_native_math") and not takes_key_bias("flash")


def test_replaced_processors_leave_their_blocks_unmerged_with_a_warning():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model = build("flux")
    apply_mame(model, ratio=0.5)
    model.single_transformer_blocks[0].attn.set_processor(FluxAttnProcessor())
    with pytest.warns(UserWarning, match="runs unmerged"):
        seen = tokens_seen(model, inputs_for(model, "flux"))
    assert seen[1] == GRID["flux"].tokens and seen[0] < GRID["flux"].tokens


def test_pipelines_patch_their_transformers():
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    transformer = build("flux")
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=transformer)
    embeds = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(0))

    def call():
        return pipe(prompt_embeds=embeds, pooled_prompt_embeds=torch.zeros(1, 16), height=96, width=64,
                    num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0)).images

    reference = call()
    assert apply_mame(pipe, ratio=0.5) is pipe and patched_dit_config(transformer) is not None
    latents = call()
    assert transformer._mame_dit_patch.tracker.current.grid == TokenGrid(1, 6, 4)  # 96 x 64 pixels, 16 per token
    assert relative_error(latents, reference) < 0.2
    remove_mame(pipe)
    assert torch.equal(call(), reference)

    class TwoExperts:  # Wan 2.2's pipelines hold two transformers
        transformer, transformer_2 = build("wan"), build("wan")

    pipe = TwoExperts()
    apply_mame(pipe, ratio=0.5)
    assert patched_dit_config(pipe.transformer) and patched_dit_config(pipe.transformer_2)
    remove_mame(pipe)
    assert patched_dit_config(pipe.transformer) is None and patched_dit_config(pipe.transformer_2) is None


def test_copies_and_pickles_start_without_a_forward():
    import copy

    model = build("flux")
    apply_mame(model, ratio=0.5)
    inputs = inputs_for(model, "flux")
    expected = run(model, inputs)
    clone = copy.deepcopy(model)
    assert torch.equal(run(clone, inputs), expected)


def test_quick_benchmark_runs(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "dit_benchmark.py"
    out = tmp_path / "dit_quick"
    done = subprocess.run([sys.executable, str(script), "--quick", "--rounds", "1", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "MaMe (defaults)" in out.with_suffix(".md").read_text() and out.with_suffix(".json").exists()
