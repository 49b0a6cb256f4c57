"""The diffusers processor and apply/remove, on tiny random UNets built from configs."""

from __future__ import annotations

import logging
import warnings

import pytest
import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0

from mame_diffusers import MaMeConfig, MaMeProcessor, apply_mame, plan_merge, proportional_attention_bias, remove_mame
from mame_diffusers.diffusers_integration import patched_config, self_attention_modules
from mame_diffusers.offline import build_unet, unet_inputs

from .banned_ops import assert_no_banned_ops
from .graphs import assert_one_graph


@pytest.fixture(scope="module")
def tiny_unet():
    return build_unet("tiny-sd", seed=0)


@pytest.fixture(scope="module")
def tiny_sdxl_unet():
    return build_unet("tiny-sdxl", seed=0)


def run(unet, inputs):
    with torch.no_grad():
        return unet(**inputs).sample


def merged_calls(unet) -> dict[str, int]:
    """Count, per self-attention module, the calls that took the merged path."""
    counts: dict[str, int] = {}
    for name, _, attention in self_attention_modules(unet):
        processor = attention.processor
        original = processor._merged_attention

        def counting(*args, _name=name, _original=original, **kwargs):
            counts[_name] = counts.get(_name, 0) + 1
            return _original(*args, **kwargs)

        processor._merged_attention = counting
    return counts


# -- exactness where nothing should change -------------------------------------------------


def test_ratio_zero_is_bit_identical_to_the_stock_unet(tiny_unet):
    inputs = unet_inputs(tiny_unet, (16, 16))
    reference = run(tiny_unet, inputs)
    apply_mame(tiny_unet, ratio=0.0)
    try:
        assert torch.equal(run(tiny_unet, inputs), reference)
    finally:
        remove_mame(tiny_unet)


def test_remove_restores_processors_hooks_and_bit_identical_outputs(tiny_unet):
    inputs = unet_inputs(tiny_unet, (16, 16))
    before = dict(tiny_unet.attn_processors)
    reference = run(tiny_unet, inputs)
    apply_mame(tiny_unet, ratio=0.5)
    assert patched_config(tiny_unet).ratio == 0.5
    assert not torch.equal(run(tiny_unet, inputs), reference)
    remove_mame(tiny_unet)
    after = tiny_unet.attn_processors
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert all(not m._forward_pre_hooks for m in tiny_unet.modules())
    assert patched_config(tiny_unet) is None and not hasattr(tiny_unet, "_mame_patch")
    assert torch.equal(run(tiny_unet, inputs), reference)
    remove_mame(tiny_unet)  # removing twice is harmless


def test_applying_again_replaces_the_settings(tiny_unet):
    apply_mame(tiny_unet, ratio=0.5)
    apply_mame(tiny_unet, ratio=0.75, keys_values_only=True)
    try:
        assert patched_config(tiny_unet) == MaMeConfig(ratio=0.75, keys_values_only=True)
        hooks = sum(len(m._forward_pre_hooks) for m in tiny_unet.modules())
        assert hooks == 1 + len({id(t) for _, t, _ in self_attention_modules(tiny_unet)})
        assert all(isinstance(a.processor.fallback, AttnProcessor2_0) for _, _, a in self_attention_modules(tiny_unet))
    finally:
        remove_mame(tiny_unet)


def test_a_processor_set_after_apply_is_kept_by_remove(tiny_unet):
    apply_mame(tiny_unet, ratio=0.5)
    name, _, attention = self_attention_modules(tiny_unet)[0]
    mine = AttnProcessor()
    attention.set_processor(mine)
    remove_mame(tiny_unet)
    assert attention.processor is mine
    attention.set_processor(AttnProcessor2_0())


def test_cross_attention_runs_the_stock_processor_exactly():
    torch.manual_seed(0)
    attention = Attention(32, cross_attention_dim=24, heads=4, dim_head=8).eval()
    hidden, context = torch.randn(2, 64, 32), torch.randn(2, 7, 24)
    with torch.no_grad():
        expected = AttnProcessor2_0()(attention, hidden, encoder_hidden_states=context)
        got = MaMeProcessor(ratio=0.75)(attention, hidden, encoder_hidden_states=context)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("max_downsample,merging_levels", [(1, {16}), (2, {16, 8})])
def test_only_levels_within_max_downsample_merge(tiny_unet, max_downsample, merging_levels):
    inputs = unet_inputs(tiny_unet, (16, 16))
    apply_mame(tiny_unet, ratio=0.5, max_downsample=max_downsample)
    try:
        counts = merged_calls(tiny_unet)
        grids = {}
        for name, transformer, _ in self_attention_modules(tiny_unet):
            transformer.register_forward_pre_hook(lambda m, a, _n=name: grids.__setitem__(_n, a[0].shape[-1]))
        run(tiny_unet, inputs)
        assert {grids[name] for name in counts} == merging_levels
        assert all(grids[name] in merging_levels for name in counts)
        assert {name for name, side in grids.items() if side in merging_levels} == set(counts)
    finally:
        remove_mame(tiny_unet)
        for module in tiny_unet.modules():
            module._forward_pre_hooks.clear()


# -- the merged path computes what it says -------------------------------------------------


def manual_merged_attention(attention, hidden, hw, config):
    """MaMe attention written out from its definition, for an Attention with 4D input."""
    batch, channels, height, width = hidden.shape
    residual = hidden
    tokens = hidden.view(batch, channels, -1).transpose(1, 2)
    tokens = attention.group_norm(tokens.transpose(1, 2)).transpose(1, 2)
    query_plan = plan_merge(tokens, hw, ratio=config.query_ratio, block=config.block)
    context_plan = plan_merge(tokens, hw, ratio=config.kv_ratio, block=config.block)
    heads = attention.heads

    def split(t):
        return t.view(batch, -1, heads, t.shape[-1] // heads).transpose(1, 2)

    context = context_plan.merge(tokens)
    out = F.scaled_dot_product_attention(
        split(attention.to_q(query_plan.merge(tokens))),
        split(attention.to_k(context)),
        split(attention.to_v(context)),
        attn_mask=proportional_attention_bias(context_plan.sizes)[:, None, None, :],
        scale=attention.scale,
    )
    out = attention.to_out[0](out.transpose(1, 2).reshape(batch, -1, channels))
    out = query_plan.restore(out).transpose(1, 2).reshape(batch, channels, height, width)
    return (out + residual) / attention.rescale_output_factor


@pytest.mark.parametrize("keys_values_only", [False, True])
@pytest.mark.parametrize("block", [4, None])
def test_merged_path_matches_a_manual_reference(keys_values_only, block):
    torch.manual_seed(0)
    attention = Attention(
        32, heads=4, dim_head=8, norm_num_groups=8, residual_connection=True, rescale_output_factor=2.0
    ).eval()
    hidden = torch.randn(2, 32, 12, 10)
    config = MaMeConfig(ratio=0.75, keys_values_only=keys_values_only, block=block)
    with torch.no_grad():
        got = MaMeProcessor(config=config)(attention, hidden)
        expected = manual_merged_attention(attention, hidden, (12, 10), config)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_processor_merge_path_has_no_banned_ops():
    torch.manual_seed(0)
    attention = Attention(32, heads=4, dim_head=8).eval()
    hidden = torch.randn(2, 32, 13, 9, requires_grad=True)
    processor = MaMeProcessor(ratio=0.75)
    assert_no_banned_ops(lambda: processor(attention, hidden).sum().backward())


# -- shapes, batches, dtypes ---------------------------------------------------------------


def attention_lengths(text_tokens: int):
    """A stand-in for SDPA that records ``(queries, keys)`` of every self-attention call (all
    calls but cross-attention's, whose keys are the ``text_tokens``)."""
    seen = []
    original = F.scaled_dot_product_attention

    def recording(query, key, value, *args, **kwargs):
        if key.shape[-2] != text_tokens:
            seen.append((query.shape[-2], key.shape[-2]))
        return original(query, key, value, *args, **kwargs)

    return seen, recording


@pytest.mark.parametrize("keys_values_only", [False, True])
def test_the_default_merges_queries_and_restores_them(tiny_unet, monkeypatch, keys_values_only):
    # MaMe + MaRe: merged self-attention attends with fewer queries than tokens (and MaRe
    # gives every token its output back); keys_values_only keeps every query.
    from mame_diffusers.diffusers_integration import processor as processor_module

    inputs = unet_inputs(tiny_unet, (32, 32))
    reference = run(tiny_unet, inputs)
    seen, recording = attention_lengths(inputs["encoder_hidden_states"].shape[1])
    monkeypatch.setattr(processor_module.F, "scaled_dot_product_attention", recording)
    apply_mame(tiny_unet, ratio=0.75, keys_values_only=keys_values_only)
    try:
        out = run(tiny_unet, inputs)
    finally:
        remove_mame(tiny_unet)
    # tiny-sd merges at 32x32 (1024 tokens) and 16x16 (256). Ratio 0.75 with the default query
    # share 0.5: queries merge to half, keys and values to an eighth (the attention of a
    # quarter of the tokens); keys_values_only keeps every query and a sixteenth of the keys.
    if keys_values_only:
        assert sorted(set(seen)) == [(256, 16), (1024, 64)]
    else:
        assert sorted(set(seen)) == [(128, 32), (512, 128)]
    assert out.shape == reference.shape and 0 < (out - reference).norm() / reference.norm() < 0.5


@pytest.mark.parametrize("latent_hw", [(16, 16), (63, 47), (20, 12)])
@pytest.mark.parametrize("batch", [1, 3, 4])
def test_any_latent_size_and_batch(tiny_unet, latent_hw, batch):
    inputs = unet_inputs(tiny_unet, latent_hw, batch=batch)
    reference = run(tiny_unet, inputs)
    apply_mame(tiny_unet, ratio=0.75)
    try:
        counts = merged_calls(tiny_unet)
        out = run(tiny_unet, inputs)
    finally:
        remove_mame(tiny_unet)
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert counts, "nothing merged"
    relative = (out - reference).norm() / reference.norm()
    assert 0 < relative < 0.5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_output_dtype_is_input_dtype(dtype):
    torch.manual_seed(0)
    attention = Attention(32, heads=4, dim_head=8).to(dtype).eval()
    hidden = torch.randn(3, 20 * 12, 32).to(dtype)
    processor = MaMeProcessor(ratio=0.75)
    processor_grid = hidden.transpose(1, 2).reshape(3, 32, 20, 12)
    with torch.no_grad():
        out = processor(attention, processor_grid)
        reference = AttnProcessor2_0()(attention, processor_grid)
    assert out.dtype == dtype and out.shape == processor_grid.shape and torch.isfinite(out).all()
    assert ((out.float() - reference.float()).norm() / reference.float().norm()) < 0.5


def test_bf16_unet(tiny_unet):
    unet = build_unet("tiny-sd", dtype=torch.bfloat16)
    inputs = unet_inputs(unet, (16, 12))
    apply_mame(unet, ratio=0.5)
    out = run(unet, inputs)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# -- SDXL ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings,levels",
    [
        ({}, {"down_blocks.1", "up_blocks.1", "down_blocks.2", "mid_block.attentions", "up_blocks.0"}),
        ({"max_downsample": 1}, {"down_blocks.1", "up_blocks.1"}),
    ],
)
def test_sdxl_merges_from_its_first_attention_level(tiny_sdxl_unet, settings, levels):
    inputs = unet_inputs(tiny_sdxl_unet, (32, 32))
    reference = run(tiny_sdxl_unet, inputs)
    apply_mame(tiny_sdxl_unet, **settings)
    try:
        counts = merged_calls(tiny_sdxl_unet)
        out = run(tiny_sdxl_unet, inputs)
    finally:
        remove_mame(tiny_sdxl_unet)
    # SDXL's first attention is at 1/2 of the latent (16x16 here, blocks down 1 / up 1);
    # the defaults (max_downsample=2) also merge one level lower (8x8: down 2, mid, up 0).
    assert {".".join(name.split(".")[:2]) for name in counts} == levels
    assert not torch.equal(out, reference)


# -- several models, one process -----------------------------------------------------------


def test_two_patched_unets_do_not_interfere():
    first, second = build_unet("tiny-sd", seed=0), build_unet("tiny-sd", seed=0)
    inputs = unet_inputs(first, (16, 16))
    apply_mame(first, ratio=0.5)
    alone = run(first, inputs)
    apply_mame(second, ratio=0.75, keys_values_only=True)
    other = run(second, inputs)
    assert torch.equal(run(first, inputs), alone)
    assert not torch.equal(other, alone)
    remove_mame(first)
    assert torch.equal(run(second, inputs), other)


# -- bare set_attn_processor ---------------------------------------------------------------


@pytest.mark.parametrize("latent_hw", [(16, 16), (16, 12), (24, 32)])
def test_bare_processor_finds_the_grid_quietly_and_matches_apply(latent_hw):
    # unet.set_attn_processor(MaMeProcessor()) is the headline usage: no warning, and the
    # exact grid even where the token count has other factorisations (16 x 12 = 192 =
    # 12 x 16, and 768 tokens could be 32 x 24).
    unet = build_unet("tiny-sd", seed=0)
    inputs = unet_inputs(unet, latent_hw)
    apply_mame(unet, ratio=0.5, max_downsample=1)
    applied = run(unet, inputs)
    remove_mame(unet)
    unet.set_attn_processor(MaMeProcessor(ratio=0.5, max_downsample=1))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(run(unet, inputs), applied)


def test_bare_processor_outside_a_transformer_warns_once_and_does_not_merge():
    # A (B, N, C) self-attention called on its own has no grid to find: MaMe never guesses
    # one (9,216 tokens are 96 x 96 and 128 x 72).
    torch.manual_seed(0)
    attention = Attention(32, heads=2, dim_head=16).eval()
    x = torch.randn(1, 8 * 8, 32)
    attention.set_processor(MaMeProcessor(ratio=0.5))
    with torch.no_grad():
        with pytest.warns(UserWarning, match="cannot see the token grid") as caught:
            first = attention(x)
            second = attention(x)
        attention.set_processor(AttnProcessor2_0())
        expected = attention(x)
    assert len([w for w in caught if "token grid" in str(w.message)]) == 1
    assert torch.equal(first, expected) and torch.equal(second, expected)
    # A (B, C, H, W) input names its grid.
    grid = x.transpose(1, 2).reshape(1, 32, 8, 8)
    attention.set_processor(MaMeProcessor(ratio=0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        merged = attention(grid)
    assert not torch.equal(merged.flatten(2).transpose(1, 2), expected)


def test_bare_processor_gives_the_same_output_whatever_ran_before():
    # It once remembered the largest grid of any earlier call, so a 16x16 forward after a
    # 32x32 one merged other levels than on a fresh processor.
    unet = build_unet("tiny-sd", seed=0)
    small, large = unet_inputs(unet, (16, 16)), unet_inputs(unet, (32, 32))
    unet.set_attn_processor(MaMeProcessor(ratio=0.5, max_downsample=1))
    fresh = run(unet, small)
    processor = MaMeProcessor(ratio=0.5, max_downsample=1)
    unet.set_attn_processor(processor)
    run(unet, large)
    after_large = run(unet, small)
    again = run(unet, small)
    assert torch.equal(after_large, fresh)
    assert torch.equal(again, fresh)
    unet.set_attn_processor(AttnProcessor2_0())
    assert not torch.equal(run(unet, small), fresh)  # the processor did merge


def test_threads_sharing_one_bare_processor_get_their_own_outputs():
    # Issue 24 #1: the bare processor kept the current forward's modules and largest grid on
    # itself, so four threads with different batches and sizes read each other's.
    from concurrent.futures import ThreadPoolExecutor

    unet = build_unet("tiny-sd", seed=0)
    unet.set_attn_processor(MaMeProcessor(ratio=0.75))
    cases = [(2, (64, 64)), (2, (32, 32)), (1, (48, 48)), (3, (16, 16))]
    inputs = {case: unet_inputs(unet, case[1], batch=case[0]) for case in cases}
    expected = {case: run(unet, x) for case, x in inputs.items()}
    jobs = [case for _ in range(4) for case in cases]
    with ThreadPoolExecutor(max_workers=4) as pool:
        outputs = list(pool.map(lambda case: (case, run(unet, inputs[case])), jobs))
    assert all(torch.equal(out, expected[case]) for case, out in outputs)


@pytest.mark.parametrize("name,levels", [("tiny-sd", 2), ("tiny-sdxl", 2)])
def test_plans_per_level_per_forward(monkeypatch, name, levels):
    # The default query share 0.5 merges queries and keys/values to different lengths: two
    # plans per level, shared by the level's self-attentions; keys_values_only: one.
    unet = build_unet(name, seed=0)
    inputs = unet_inputs(unet, (16, 16))
    made = []
    plan_on = MaMeConfig.plan_on
    monkeypatch.setattr(MaMeConfig, "plan_on", lambda self, *args: made.append(args[1]) or plan_on(self, *args))
    apply_mame(unet, ratio=0.5, max_downsample=2, stack_ratio=0.0)
    run(unet, inputs)
    assert len(made) == 2 * levels, made
    made.clear()
    run(unet, inputs)
    assert len(made) == 2 * levels  # plans do not outlive their forward
    made.clear()
    apply_mame(unet, ratio=0.5, max_downsample=2, stack_ratio=0.0, keys_values_only=True)
    run(unet, inputs)
    assert len(made) == levels  # keys/values only: one plan per level


# -- torch.compile -------------------------------------------------------------------------


def test_compiles_into_one_graph(tiny_unet):
    inputs = unet_inputs(tiny_unet, (16, 16))
    apply_mame(tiny_unet, ratio=0.5, max_downsample=2)
    try:
        assert_one_graph(tiny_unet, **inputs)
    finally:
        remove_mame(tiny_unet)


def test_a_new_ratio_on_a_compiled_unet_recompiles_and_matches_eager(tiny_unet):
    # Dynamo turns a float that changed since the last compile into a symbolic value; the
    # merge layout is computed outside the trace, so a new ratio is a recompile, not an error.
    inputs = unet_inputs(tiny_unet, (16, 16))
    torch._dynamo.reset()
    compiled = torch.compile(tiny_unet, backend="eager", fullgraph=True)
    try:
        for ratio in (0.5, 0.75, 0.3):
            apply_mame(tiny_unet, ratio=ratio, max_downsample=2)
            with torch.no_grad():
                torch.testing.assert_close(compiled(**inputs).sample, tiny_unet(**inputs).sample)
    finally:
        remove_mame(tiny_unet)
        torch._dynamo.reset()


def test_small_calls_run_unmerged_below_min_latent_tokens(tiny_unet):
    inputs = unet_inputs(tiny_unet, (16, 16))  # batch 2 x 16 x 16 = 512 latent tokens
    reference = run(tiny_unet, inputs)
    apply_mame(tiny_unet, ratio=0.5, max_downsample=2, min_latent_tokens=513)
    try:
        assert torch.equal(run(tiny_unet, inputs), reference)
        apply_mame(tiny_unet, ratio=0.5, max_downsample=2, min_latent_tokens=512)
        merged = run(tiny_unet, inputs)
        apply_mame(tiny_unet, ratio=0.5, max_downsample=2)
        assert torch.equal(merged, run(tiny_unet, inputs))  # on a CPU the default merges
        assert not torch.equal(merged, reference)
    finally:
        remove_mame(tiny_unet)


def test_deep_stacks_run_unmerged_below_min_latent_tokens(tiny_sdxl_unet):
    inputs = unet_inputs(tiny_sdxl_unet, (16, 16))
    reference = run(tiny_sdxl_unet, inputs)
    apply_mame(tiny_sdxl_unet, ratio=0.5, min_latent_tokens=10**6)
    try:
        assert torch.equal(run(tiny_sdxl_unet, inputs), reference)
    finally:
        remove_mame(tiny_sdxl_unet)


def test_a_merged_self_attention_runs_few_operations():
    from diffusers.models.attention_processor import Attention

    from mame_diffusers.benchmarking.ops import work_ops

    # On the meta device: the path a GPU takes (see test_plan_merge_and_restore_run_few_operations).
    attention = Attention(320, heads=5, dim_head=64).to("meta")
    attention.set_processor(MaMeProcessor())
    x = torch.randn(2, 320, 64, 64, device="meta")
    with torch.inference_mode():
        attention(x)  # builds the layout's constants once
        counts = work_ops(lambda: attention(x))
    # Stock AttnProcessor2_0 runs 6 (four projections, attention, the output rescale) plus
    # the reshapes of a (B, C, H, W) input; two plans (queries, keys/values), the fit, two
    # merges and one restore come on top (104 when this was written).
    assert sum(counts.values()) <= 110, counts


def test_min_latent_tokens_default_depends_on_the_device():
    config = MaMeConfig()
    # Measured on an H200: batch 2 at 1024x1024 (2 x 128 x 128 latent tokens) is launch-bound.
    assert not config.merges_call(2 * 128 * 128, torch.device("cuda"))
    assert config.merges_call(8 * 128 * 128, torch.device("cuda"))
    assert config.merges_call(2 * 32 * 32, torch.device("cpu"))
    assert MaMeConfig(min_latent_tokens=0).merges_call(1, torch.device("cuda"))
    with pytest.raises(ValueError, match="min_latent_tokens"):
        MaMeConfig(min_latent_tokens=-1)


def test_the_cuda_default_says_once_per_process_that_it_left_calls_unmerged(monkeypatch, caplog):
    # Issue 24: SD 2.1 at batch 2 on CUDA runs unmerged by default, and a user who sees no
    # change concludes MaMe does nothing: one log line names the threshold and the setting.
    from mame_diffusers.diffusers_integration import config as config_module

    monkeypatch.setattr(config_module, "_SAID_UNMERGED", set())
    cuda, config = torch.device("cuda"), MaMeConfig()
    with caplog.at_level(logging.WARNING, logger="mame_diffusers"):
        assert not config.merges_call(2 * 96 * 96, cuda)
        assert not config.merges_call(2 * 64 * 64, cuda)
        assert not MaMeConfig(min_latent_tokens=10**6).merges_call(2 * 96 * 96, cuda)  # the user's own: silent
        assert config.merges_call(2 * 32 * 32, torch.device("cpu"))
    said = [record.getMessage() for record in caplog.records]
    assert len(said) == 1, said
    assert "65536" in said[0] and "18432" in said[0] and "min_latent_tokens=0" in said[0]


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": -0.5}, "ratio"),
        ({"max_downsample": 3}, "max_downsample"),
        ({"keys_values_only": 1}, "keys_values_only"),
        ({"block": -2}, "block"),
        ({"stack_ratio": 1.0}, "stack_ratio"),
        ({"backend": "cuda"}, "backend"),
    ],
)
def test_bad_settings_raise_before_touching_the_model(tiny_unet, kwargs, match):
    with pytest.raises(ValueError, match=match):
        apply_mame(tiny_unet, **kwargs)
    assert patched_config(tiny_unet) is None
    with pytest.raises(ValueError, match=match):
        MaMeProcessor(**kwargs)


def test_models_without_patchable_attention_are_refused():
    with pytest.raises(ValueError, match="no self-attention"):
        apply_mame(torch.nn.Linear(4, 4))
    with pytest.raises(TypeError, match="cannot patch"):
        apply_mame("stabilityai/stable-diffusion-2-1")


def test_attention_masks_on_merged_self_attention_are_refused():
    attention = Attention(32, heads=4, dim_head=8).eval()
    hidden = torch.randn(1, 32, 8, 8)
    with pytest.raises(ValueError, match="attention_mask"):
        MaMeProcessor(ratio=0.5)(attention, hidden, attention_mask=torch.zeros(1, 1, 64))


# -- deep stacks: MaMe before the whole stack, MaRe after it --------------------------------


def test_deep_stacks_run_on_merged_tokens_and_restore(tiny_sdxl_unet, monkeypatch):
    # tiny-sdxl's lowest level holds 2-block stacks; count them as deep for the test.
    monkeypatch.setattr("mame_diffusers.diffusers_integration.patching.STACK_MIN_LAYERS", 2)
    inputs = unet_inputs(tiny_sdxl_unet, (32, 32))
    reference = run(tiny_sdxl_unet, inputs)
    seen = {}

    def record(module, args, kwargs, output):
        seen.setdefault(module, []).append((args[0].shape[1], output.shape[1]))

    deep = [t for _, t, _ in self_attention_modules(tiny_sdxl_unet) if len(t.transformer_blocks) >= 2]
    handles = [block.register_forward_hook(record, with_kwargs=True) for t in deep for block in t.transformer_blocks]
    apply_mame(tiny_sdxl_unet, stack_ratio=0.75)
    try:
        counts = merged_calls(tiny_sdxl_unet)
        out = run(tiny_sdxl_unet, inputs)
    finally:
        remove_mame(tiny_sdxl_unet)
        for handle in handles:
            handle.remove()
    # 8x8 = 64 tokens enter each deep stack; both of its blocks see the 16 merged ones, and
    # MaRe gives the stack's output back its 64 tokens.
    assert seen and all(shapes == [(16, 16)] * (len(shapes)) for shapes in seen.values())
    assert out.shape == reference.shape and torch.isfinite(out).all()
    assert any("up_blocks.0" in name or "mid_block" in name for name in counts)
    assert 0 < ((out - reference).norm() / reference.norm()) < 0.5
    assert torch.equal(run(tiny_sdxl_unet, inputs), reference)


def test_stack_merging_is_off_for_shallow_stacks_and_at_zero(tiny_unet, monkeypatch):
    apply_mame(tiny_unet)
    hooks = sum(len(m._forward_hooks) for m in tiny_unet.modules())
    remove_mame(tiny_unet)
    assert hooks == 0  # SD's stacks hold one block
    monkeypatch.setattr("mame_diffusers.diffusers_integration.patching.STACK_MIN_LAYERS", 1)
    apply_mame(tiny_unet, stack_ratio=0.0)
    hooks = sum(len(m._forward_hooks) for m in tiny_unet.modules())
    remove_mame(tiny_unet)
    assert hooks == 0
    apply_mame(tiny_unet, stack_ratio=0.5)
    try:
        assert sum(len(m._forward_hooks) for m in tiny_unet.modules()) > 0
    finally:
        remove_mame(tiny_unet)


def test_deep_stack_merging_compiles_into_one_graph(tiny_sdxl_unet, monkeypatch):
    monkeypatch.setattr("mame_diffusers.diffusers_integration.patching.STACK_MIN_LAYERS", 2)
    inputs = unet_inputs(tiny_sdxl_unet, (32, 32))
    apply_mame(tiny_sdxl_unet, stack_ratio=0.5)
    try:
        assert_one_graph(tiny_sdxl_unet, **inputs)
    finally:
        remove_mame(tiny_sdxl_unet)


# -- regressions from trying it as a user would ------------------------------------------------


@pytest.mark.parametrize("scale_qk", [True, False])
def test_merged_path_matches_the_processor_it_falls_back_to(scale_qk):
    # A ratio so small that nothing merges still takes MaMe's own attention path: it must
    # compute what the fallback (AttnProcessor2_0) computes, scale included.
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(0)
    attention = Attention(32, heads=2, dim_head=16, scale_qk=scale_qk)
    x = torch.randn(2, 8 * 8, 32)
    with torch.no_grad():
        attention.set_processor(AttnProcessor2_0())
        expected = attention(x)
        attention.set_processor(MaMeProcessor(ratio=0.001, max_downsample=8))
        grid = x.transpose(1, 2).reshape(2, 32, 8, 8)
        merged = attention(grid).flatten(2).transpose(1, 2)
    torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)


def test_fused_qkv_then_remove_leaves_no_mame_behind(tiny_unet):
    inputs = unet_inputs(tiny_unet, (16, 16))
    reference = run(tiny_unet, inputs)
    apply_mame(tiny_unet, ratio=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_unet.fuse_qkv_projections()
        remove_mame(tiny_unet)
        tiny_unet.unfuse_qkv_projections()
    assert not any(isinstance(p, MaMeProcessor) for p in tiny_unet.attn_processors.values())
    torch.testing.assert_close(run(tiny_unet, inputs), reference)


def test_patch_embedded_transformers_are_refused_at_apply():
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    pixart_like = Transformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, num_layers=1, patch_size=2,
        sample_size=16, norm_type="ada_norm_single", cross_attention_dim=16,
    )
    with pytest.raises(ValueError, match="supported"):
        apply_mame(pixart_like)


def test_processor_takes_a_config_or_settings_not_both():
    with pytest.raises(TypeError, match="either config"):
        MaMeProcessor(config=MaMeConfig(), ratio=0.5)
    with pytest.raises(TypeError, match="either config"):
        MaMeProcessor(config=MaMeConfig(), keys_values_only=True)
    assert MaMeProcessor(keys_values_only=True).config.query_share == 0.0
    with pytest.raises(TypeError):
        MaMeProcessor(not_a_setting=1)
    with pytest.raises(TypeError):
        MaMeProcessor(tau=0.5)  # a setting of an earlier release


def test_numpy_numbers_are_numbers():
    np = pytest.importorskip("numpy")
    config = MaMeConfig(ratio=np.float32(0.5), stack_ratio=np.float64(0.25), block=np.int64(8))
    assert isinstance(config.ratio, float) and config.ratio == 0.5
    assert isinstance(config.block, int) and config.block == 8


@pytest.mark.parametrize("name,settings", [("tiny-sd", {"keys_values_only": True}), ("tiny-sd", {}), ("tiny-sdxl", {})])
def test_gradient_checkpointing_gives_the_same_gradients(name, settings):
    # The usual LoRA fine-tuning setup: blocks are recomputed in the backward pass, after
    # the forward has moved on to other levels; MaMe must merge them as it did.
    def gradients(checkpointing: bool) -> dict:
        unet = build_unet(name, seed=0)
        if checkpointing:
            unet.enable_gradient_checkpointing()
        unet.train()
        apply_mame(unet, ratio=0.75, max_downsample=2, **settings)
        unet(**unet_inputs(unet, (16, 16))).sample.square().mean().backward()
        return {n: p.grad for n, p in unet.named_parameters() if p.grad is not None}

    plain, recomputed = gradients(False), gradients(True)
    assert plain.keys() == recomputed.keys()
    for name_ in plain:
        torch.testing.assert_close(recomputed[name_], plain[name_], rtol=1e-4, atol=1e-6)


def test_a_patched_unet_deep_copies_and_pickles(tiny_sdxl_unet):
    import copy
    import io

    inputs = unet_inputs(tiny_sdxl_unet, (16, 16))
    apply_mame(tiny_sdxl_unet, ratio=0.5)
    try:
        expected = run(tiny_sdxl_unet, inputs)
        copied = copy.deepcopy(tiny_sdxl_unet)
        torch.testing.assert_close(run(copied, inputs), expected)
        buffer = io.BytesIO()
        torch.save(tiny_sdxl_unet, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(run(loaded, inputs), expected)
        # The copy has its own hooks and records: removing MaMe from it leaves the original.
        remove_mame(copied)
        torch.testing.assert_close(run(tiny_sdxl_unet, inputs), expected)
    finally:
        remove_mame(tiny_sdxl_unet)


# -- threads -------------------------------------------------------------------------------


def test_threads_sharing_one_patched_unet_get_their_own_outputs():
    # Issue 10 #2: each forward's grids and plans lived on the model, so a thread's blocks
    # could read another thread's grid (wrong outputs or "expected ... token grid" errors).
    from concurrent.futures import ThreadPoolExecutor

    unet = build_unet("tiny-sdxl", seed=0)  # deep stacks: stack merges kept per forward too
    apply_mame(unet, ratio=0.5)
    inputs = {hw: unet_inputs(unet, hw) for hw in [(16, 16), (24, 16), (16, 24)]}
    expected = {hw: run(unet, x) for hw, x in inputs.items()}
    jobs = [hw for _ in range(6) for hw in inputs]
    with ThreadPoolExecutor(max_workers=3) as pool:
        outputs = list(pool.map(lambda hw: (hw, run(unet, inputs[hw])), jobs))
    assert all(torch.equal(out, expected[hw]) for hw, out in outputs)
