"""MaMe on transformers vision models, on tiny random models built from configs."""

from __future__ import annotations

import warnings

import pytest
import torch
import transformers as tf
from hypothesis import given, settings
from hypothesis import strategies as st

from mame_diffusers import (
    VisionMaMeConfig,
    apply_mame,
    merge_history,
    merge_layout,
    plan_merge,
    remove_mame,
    visualize_merges,
)
from mame_diffusers.transformers_integration import (
    TokenMerge,
    apply_mame_to_vision_model,
    is_supported_vision_model,
    merge_membership,
    patched_vision_config,
)

from .banned_ops import BANNED_OPS, ops_run_by
from .graphs import assert_one_graph

TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=4, intermediate_size=64)
IMAGE = dict(image_size=32, patch_size=4)  # an 8 x 8 patch grid
TEXT = dict(**TINY, vocab_size=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)  # the towers MaMe leaves alone


def build(name: str, implementation: str = "sdpa", **overrides) -> torch.nn.Module:
    """A tiny random model of each supported class (same weights for the same name)."""
    torch.manual_seed(0)
    tiny = {**TINY, **overrides}
    if name == "vit":
        model = tf.ViTModel(tf.ViTConfig(**tiny, **IMAGE))
    elif name == "vit_classifier":
        model = tf.ViTForImageClassification(tf.ViTConfig(**tiny, **IMAGE, num_labels=3))
    elif name == "deit":
        model = tf.DeiTModel(tf.DeiTConfig(**tiny, **IMAGE))
    elif name == "deit_classifier":
        model = tf.DeiTForImageClassification(tf.DeiTConfig(**tiny, **IMAGE, num_labels=3))
    elif name == "deit_teacher":
        model = tf.DeiTForImageClassificationWithTeacher(tf.DeiTConfig(**tiny, **IMAGE, num_labels=3))
    elif name == "clip":
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(**tiny, **IMAGE))
    elif name == "clip_projection":
        model = tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**tiny, **IMAGE, projection_dim=8))
    elif name == "clip_model":
        model = tf.CLIPModel(tf.CLIPConfig(text_config=TEXT, vision_config={**tiny, **IMAGE}, projection_dim=8))
    elif name == "siglip":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**tiny, **IMAGE))
    elif name == "siglip_model":
        model = tf.SiglipModel(tf.SiglipConfig(text_config=TEXT, vision_config={**tiny, **IMAGE}))
    elif name == "siglip2":
        model = tf.Siglip2VisionModel(tf.Siglip2VisionConfig(**tiny, num_patches=64, patch_size=4))
    elif name == "siglip2_model":
        vision = {**tiny, "num_patches": 64, "patch_size": 4}
        model = tf.Siglip2Model(tf.Siglip2Config(text_config=TEXT, vision_config=vision))
    elif name == "videomae":
        model = tf.VideoMAEModel(tf.VideoMAEConfig(**tiny, image_size=32, patch_size=8, num_frames=4, tubelet_size=2))
    elif name == "videomae_classifier":
        config = tf.VideoMAEConfig(**tiny, image_size=32, patch_size=8, num_frames=4, tubelet_size=2, num_labels=3)
        model = tf.VideoMAEForVideoClassification(config)
    else:
        raise KeyError(name)
    model.set_attn_implementation(implementation)
    return model.eval()


MODELS = (
    "vit", "vit_classifier", "deit", "deit_classifier", "deit_teacher", "clip", "clip_projection",
    "clip_model", "siglip", "siglip_model", "siglip2", "siglip2_model", "videomae", "videomae_classifier",
)  # fmt: skip
#: Tokens in front of the patches that must never merge.
SPECIAL_TOKENS = {"vit": 1, "deit": 2, "clip": 1, "siglip": 0, "siglip2": 0, "videomae": 0}
#: Patch tokens of the inputs below: 8 x 8 images, (2 x 4 x 4) videos.
PATCHES = {"videomae": 32}


def family(name: str) -> str:
    return name.split("_")[0]


def inputs(name: str, batch: int = 2, seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    kind = family(name)
    if kind == "siglip2":
        return {
            "pixel_values": torch.randn(batch, 64, 48, generator=generator),
            "pixel_attention_mask": torch.ones(batch, 64, dtype=torch.long),
            "spatial_shapes": torch.tensor([[8, 8]] * batch),
        }
    if kind == "videomae":
        return {"pixel_values": torch.randn(batch, 4, 3, 32, 32, generator=generator)}
    return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=generator)}


def features(model: torch.nn.Module, name: str, batch: dict, **kwargs) -> torch.Tensor:
    """The model's final output: logits, projected or pooled features."""
    if name.endswith("_model"):  # a two-tower model: its image features
        return model.get_image_features(**batch, **kwargs).pooler_output
    output = model(**batch, **kwargs)
    for key in ("logits", "image_embeds", "pooler_output"):
        if getattr(output, key, None) is not None:
            return output[key]
    return output.last_hidden_state


def run(model, name, batch, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return features(model, name, batch, **kwargs)


def hooks_of(model: torch.nn.Module) -> dict:
    return {
        name: (tuple(m._forward_pre_hooks), tuple(m._forward_hooks), tuple(m._forward_hooks_always_called))
        for name, m in model.named_modules()
    }


def tower(model):
    """The vision model MaMe patches: the model itself or the one it wraps."""
    return model.vision_model if hasattr(model, "vision_model") else model.base_model


# -- exactness where nothing should change -------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_ratio_zero_is_bit_identical(name):
    model, batch = build(name), inputs(name)
    reference = run(model, name, batch)
    apply_mame(model, ratio=0.0)
    assert torch.equal(run(model, name, batch), reference)
    assert merge_history(model) == []


@pytest.mark.parametrize("name", MODELS)
def test_remove_restores_hooks_attention_and_bit_identical_outputs(name):
    model, batch = build(name), inputs(name)
    reference = run(model, name, batch, output_hidden_states=True)  # installs transformers' capture hooks first
    hooks = hooks_of(model)
    implementation = tower(model).config._attn_implementation
    apply_mame(model, ratio=0.3)
    assert tower(model).config._attn_implementation == "mame_sdpa"
    assert patched_vision_config(model).ratio == 0.3
    merged = run(model, name, batch)
    assert merged.shape != reference.shape or not torch.allclose(merged, reference)
    remove_mame(model)
    assert hooks_of(model) == hooks
    assert tower(model).config._attn_implementation == implementation
    assert not any(hasattr(m, "_mame_attention") or hasattr(m, "_mame_vision_patch") for m in model.modules())
    assert patched_vision_config(model) is None
    assert torch.equal(run(model, name, batch, output_hidden_states=True), reference)
    remove_mame(model)  # removing twice is harmless


def test_apply_mame_uses_the_vision_defaults():
    model = build("vit")
    apply_mame(model)
    assert patched_vision_config(model) == VisionMaMeConfig()
    assert VisionMaMeConfig().block is None and VisionMaMeConfig().ratio == 0.1
    apply_mame(model, block=4, ratio=[0.2, 0.1], layers=[2, 0])
    assert patched_vision_config(model).schedule(4) == {0: 0.1, 2: 0.2}


def test_two_tower_models_merge_only_their_images():
    model = build("clip_model")
    text = {"input_ids": torch.tensor([[0, 5, 9, 1], [0, 7, 1, 1]])}
    with torch.no_grad():
        reference = model.get_text_features(**text).pooler_output
    apply_mame(model, ratio=0.3)
    assert model.config.text_config._attn_implementation == "sdpa"
    assert model.config.vision_config._attn_implementation == "mame_sdpa"
    with torch.no_grad():
        assert torch.equal(model.get_text_features(**text).pooler_output, reference)
        model(**text, **inputs("clip_model"))  # the full model runs, its image side merged
    assert len(merge_history(model)) == 3


def test_applying_again_replaces_the_settings():
    model, batch = build("vit"), inputs("vit")
    hooks = hooks_of(model)
    apply_mame(model, ratio=0.5)
    apply_mame(model, ratio=0.2, layers=[1])
    run(model, "vit", batch)
    assert [record.layer for record in merge_history(model)] == [1]
    remove_mame(model)
    assert hooks_of(model) == hooks


# -- what merging does -------------------------------------------------------------------------------


@pytest.mark.parametrize("name", MODELS)
def test_shapes_and_sizes_after_every_merge(name):
    model, batch = build(name), inputs(name)
    reference = run(model, name, batch)
    apply_mame(model, ratio=0.3)
    output = run(model, name, batch)
    assert torch.isfinite(output).all()
    if name != "videomae":  # VideoMAEModel has no pooled output: its tokens are merged
        assert output.shape == reference.shape
    history = merge_history(model)
    assert [record.layer for record in history] == [0, 1, 2]  # the first 2/3 of 4 layers
    patches = PATCHES.get(family(name), 64)
    lengths = [patches]
    for record in history:
        assert record.sizes.shape == (2, torch.Size(record.grid).numel())
        assert (record.sizes >= 0).all()
        assert torch.equal(record.sizes.sum(dim=-1), torch.full((2,), float(patches)))
        lengths.append(record.sizes.shape[1])
    assert lengths == sorted(lengths, reverse=True) and lengths[-1] < patches
    with torch.no_grad():
        hidden = tower(model)(**batch).last_hidden_state
    assert hidden.shape[1] == SPECIAL_TOKENS[family(name)] + lengths[-1]


@pytest.mark.parametrize("name", ["vit", "deit_teacher", "clip"])
def test_special_tokens_are_never_merged(name):
    """The CLS (and distillation) tokens pass the merge untouched, and the merged patches are
    exactly MaMe of the patch tokens alone: nothing of the special tokens mixes in."""
    model, batch = build(name), inputs(name)
    specials = SPECIAL_TOKENS[family(name)]
    first_layer = tower(model).encoder.layers[0] if family(name) == "clip" else model.base_model.layers[0]
    seen = {}
    first_layer.register_forward_pre_hook(lambda m, args: seen.update(before=args[0]))
    config = VisionMaMeConfig(ratio=0.3, similarity_channels=8)  # compared on 8 sums of 4 channels
    apply_mame_to_vision_model(model, config)
    first_layer.register_forward_pre_hook(lambda m, args: seen.update(after=args[0]))
    run(model, name, batch)
    before, after = seen["before"], seen["after"]
    assert torch.equal(after[:, :specials], before[:, :specials])
    patches = before[:, specials:]
    metric = patches.reshape(2, 64, 8, 4).sum(-1)
    plan = plan_merge(metric, (8, 8), ratio=0.3, block=config.block)
    assert torch.equal(after[:, specials:], plan.merge(patches))
    assert torch.equal(merge_history(model)[0].sizes, plan.sizes)


@pytest.mark.parametrize("name", MODELS)
def test_eager_and_sdpa_agree(name):
    batch = inputs(name)
    results = []
    for implementation in ("eager", "sdpa"):
        model = build(name, implementation)
        apply_mame(model, ratio=0.3)
        results.append(run(model, name, batch))
        assert tower(model).config._attn_implementation == f"mame_{implementation}"
    torch.testing.assert_close(results[0], results[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["siglip", "siglip2"])
def test_siglip_pooling_weighs_each_token_by_its_size(name):
    """Proportional attention in the pooling head equals the stock head on the restored
    (full-length) tokens, where a token of size k appears k times."""
    model, batch = build(name), inputs(name)
    apply_mame(model, ratio=0.4)
    memberships = merge_membership(model, **batch)
    with torch.no_grad():
        output = model(**batch)
    remove_mame(model)
    restored = memberships[-1][1] @ output.last_hidden_state
    with torch.no_grad():
        expected = model.head(restored)
    torch.testing.assert_close(output.pooler_output, expected, rtol=1e-4, atol=1e-5)


def test_videomae_mean_pooling_is_size_weighted():
    model, batch = build("videomae_classifier"), inputs("videomae_classifier")
    apply_mame(model, ratio=0.4)
    logits = run(model, "videomae_classifier", batch)
    memberships = merge_membership(model.videomae, **batch)
    with torch.no_grad():
        tokens = model.videomae(**batch).last_hidden_state
    remove_mame(model)
    restored = memberships[-1][1] @ tokens
    with torch.no_grad():
        expected = model.classifier(model.fc_norm(restored.mean(dim=1)))
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("video_grid", ["per_frame", "spacetime"])
def test_videomae_grids(video_grid):
    model, batch = build("videomae"), inputs("videomae")
    apply_mame(model, ratio=0.3, video_grid=video_grid)
    memberships = merge_membership(model, **batch)
    frame_of_patch = torch.arange(32) // 16  # (t, h, w) order, 2 frames of 4 x 4 patches
    for _, membership in memberships:
        frames_per_token = (membership[0].T @ torch.nn.functional.one_hot(frame_of_patch).float() > 0).sum(-1)
        if video_grid == "per_frame":
            assert (frames_per_token <= 1).all()
            assert len(merge_history(model)[0].grid) == 3
    if video_grid == "spacetime":
        assert (frames_per_token > 1).any(), "static content should merge across time"


def test_siglip2_padding_at_the_end_is_dropped_by_the_first_merge():
    """A padded batch (the processor's layout) gives what the unpadded one gives."""
    model = build("siglip2")
    generator = torch.Generator().manual_seed(1)
    real = torch.randn(2, 48, 48, generator=generator)
    unpadded = {
        "pixel_values": real,
        "pixel_attention_mask": torch.ones(2, 48, dtype=torch.long),
        "spatial_shapes": torch.tensor([[6, 8]] * 2),
    }
    padded = {
        "pixel_values": torch.cat([real, torch.randn(2, 16, 48, generator=generator)], dim=1),
        "pixel_attention_mask": torch.cat([torch.ones(2, 48), torch.zeros(2, 16)], dim=1).long(),
        "spatial_shapes": torch.tensor([[6, 8]] * 2),
    }
    for layers in ([0, 1, 2], [1, 2]):  # merging from the first layer, or after an unmerged one
        apply_mame(model, ratio=0.3, layers=layers)
        with torch.no_grad():
            expected, output = model(**unpadded), model(**padded)
        torch.testing.assert_close(output.pooler_output, expected.pooler_output, rtol=1e-4, atol=1e-5)
        assert merge_history(model)[0].sizes.sum(-1).tolist() == [48.0, 48.0]


@settings(max_examples=8, deadline=None)
@given(
    ratios=st.lists(st.sampled_from([0.0, 0.05, 0.2, 0.5, 0.8]), min_size=1, max_size=4),
    block=st.sampled_from([None, 2, 4, 8]),
    data=st.data(),
)
def test_any_schedule_keeps_sizes_consistent(ratios, block, data):
    layers = sorted(data.draw(st.permutations(range(4)))[: len(ratios)])
    model, batch = build("deit_classifier"), inputs("deit_classifier")
    apply_mame(model, ratio=ratios, layers=layers, block=block)
    output = run(model, "deit_classifier", batch, output_hidden_states=True)
    assert output.shape == (2, 3) and torch.isfinite(output).all()
    # Exactly the layers whose ratio removes at least a row or column of the grid merge.
    expected, grid = [], (8, 8)
    for layer, ratio in zip(layers, ratios):
        layout = merge_layout(grid, ratio, block=block)
        if layout.num_merged < grid[0] * grid[1]:
            expected.append((layer, layout.merged_hw))
            grid = layout.merged_hw
    history = merge_history(model)
    assert [(record.layer, record.grid) for record in history] == expected
    for record in history:
        assert torch.equal(record.sizes.sum(-1), torch.full((2,), 64.0))
    # hidden_states[0]: the first layer's input as it saw it; [i + 1]: layer i's output.
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states
    lengths, length = [], 64
    merged_into = {record.layer: record.sizes.shape[1] for record in history}
    for index in range(4):
        length = merged_into.get(index, length)
        lengths.append(2 + length)
    assert [h.shape[1] for h in hidden] == lengths[:1] + lengths


def test_attentions_are_over_the_merged_tokens():
    model, batch = build("vit", "eager"), inputs("vit")
    apply_mame(model, ratio=0.3)
    with torch.no_grad():
        output = model(**batch, output_attentions=True)
    lengths = [1 + record.sizes.shape[1] for record in merge_history(model)]
    assert [a.shape[-1] for a in output.attentions] == lengths + lengths[-1:]
    for attention in output.attentions:
        torch.testing.assert_close(attention.sum(-1), torch.ones(attention.shape[:-1]))


# -- matrix-only, gradients -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["deit_teacher", "siglip", "siglip2", "videomae_classifier"])
def test_merge_path_runs_no_banned_ops(name):
    """Forward and backward with MaMe run no banned op that the stock model does not run
    itself (ViT, DeiT and VideoMAE run none at all, so there the check is complete)."""
    batch = inputs(name)

    def forward_backward(model):
        def step():
            features(model, name, batch).sum().backward()

        return step

    stock = ops_run_by(forward_backward(build(name))) & BANNED_OPS
    if family(name) in ("vit", "deit", "videomae"):
        assert not stock
    model = build(name)
    apply_mame(model, ratio=0.3)
    banned = ops_run_by(forward_backward(model)) & BANNED_OPS
    assert banned <= stock, f"MaMe ran banned ops: {sorted(banned - stock)}"


def test_gradients_reach_the_input_and_every_weight():
    model = build("vit_classifier").train()
    apply_mame(model, ratio=0.3)
    pixels = inputs("vit_classifier")["pixel_values"].requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(pixel_values=pixels).logits, torch.tensor([0, 2]))
    loss.backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0
    for name, parameter in model.named_parameters():
        if name.endswith("mask_token"):
            continue
        assert parameter.grad is not None and torch.isfinite(parameter.grad).all(), name
    torch.optim.SGD(model.parameters(), lr=0.1).step()  # a fine-tuning step runs


def test_gradient_checkpointing_gives_the_same_gradients():
    batch = inputs("vit_classifier")
    grads = []
    for checkpointing in (False, True):
        model = build("vit_classifier").train()
        if checkpointing:
            # transformers 5.23 renamed gradient_checkpointing_enable; both spellings work there.
            enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
            enable()
        apply_mame(model, ratio=0.3)
        model(**batch).logits.sum().backward()
        grads.append(model.vit.layers[3].mlp.fc1.weight.grad)
    torch.testing.assert_close(grads[0], grads[1])


# -- clear errors ------------------------------------------------------------------------------------------


def test_unsupported_models_are_named():
    bert = tf.BertModel(tf.BertConfig(**TINY, vocab_size=32))
    assert not is_supported_vision_model(bert) and is_supported_vision_model(build("vit"))
    with pytest.raises(TypeError, match="ViTModel.*VideoMAEForVideoClassification"):
        apply_mame(bert)
    with pytest.raises(TypeError, match="supported"):
        apply_mame_to_vision_model(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="use_mean_pooling"):
        apply_mame(build("videomae_classifier", use_mean_pooling=False))


@pytest.mark.parametrize(
    "settings_, message",
    [
        (dict(ratio=1.0), "ratio"),
        (dict(ratio=-0.1), "ratio"),
        (dict(ratio="0.5"), "ratio"),
        (dict(ratio=[]), "ratio"),
        (dict(ratio=[0.1, 1.5]), "ratio"),
        (dict(ratio=[0.1, 0.2], layers=[0]), "one ratio per merging layer"),
        (dict(layers=[]), "at least one"),
        (dict(layers=[-1]), "layer indices"),
        (dict(layers=[1, 1]), "repeat"),
        (dict(layers="01"), "sequence"),
        (dict(block=0), "block"),
        (dict(block=2.5), "block"),
        (dict(video_grid="frames"), "video_grid"),
        (dict(similarity_channels=0), "similarity_channels"),
    ],
)
def test_bad_settings_raise_clear_errors(settings_, message):
    with pytest.raises(ValueError, match=message):
        VisionMaMeConfig(**settings_)


def test_layers_must_exist_in_the_model():
    model = build("vit")
    with pytest.raises(ValueError, match="layer 4 does not exist.*4 encoder layers"):
        apply_mame(model, layers=[0, 4])
    with pytest.raises(ValueError, match="layer 4 does not exist"):
        apply_mame(model, ratio=[0.1] * 6)
    assert patched_vision_config(model) is None


def test_options_of_the_other_kind_of_model_are_rejected():
    model = build("vit")
    with pytest.raises(ValueError, match="max_downsample applies to diffusers UNets only"):
        apply_mame(model, max_downsample=2)
    with pytest.raises(ValueError, match="keys_values_only"):
        apply_mame(model, keys_values_only=True)
    with pytest.raises(TypeError, match="unknown MaMe setting.*tau"):
        apply_mame(model, tau=0.5)  # a setting of an earlier release
    unet = torch.nn.Module()  # rejected before the UNet is looked at
    with pytest.raises(ValueError, match="layers applies to transformers vision models only"):
        apply_mame(unet, layers=[0])
    with pytest.raises(ValueError, match="schedule"):
        apply_mame(unet, ratio=[0.5, 0.5])


def test_attention_implementations_without_a_bias_are_refused():
    model = build("vit")
    model.config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(ValueError, match="eager or sdpa"):
        apply_mame(model)


def test_padding_masks_and_masked_inputs_are_refused():
    model = build("vit")
    apply_mame(model)
    batch = inputs("vit")
    mask = torch.ones(2, 65, dtype=torch.long)
    run(model, "vit", batch, attention_mask=mask)  # all ones: fine
    mask[0, -3:] = 0
    with pytest.raises(ValueError, match="padding attention_mask"):
        run(model, "vit", batch, attention_mask=mask)

    siglip2 = build("siglip2")
    apply_mame(siglip2)
    holes = inputs("siglip2")
    holes["pixel_attention_mask"][0, 10] = 0
    with pytest.raises(ValueError, match="padding only at the end"):
        run(siglip2, "siglip2", holes)
    mixed = inputs("siglip2")
    mixed["spatial_shapes"] = torch.tensor([[8, 8], [4, 8]])
    with pytest.raises(ValueError, match="mixes spatial shapes"):
        run(siglip2, "siglip2", mixed)

    video = build("videomae")
    apply_mame(video)
    with pytest.raises(ValueError, match="bool_masked_pos"):
        run(video, "videomae", inputs("videomae"), bool_masked_pos=torch.zeros(2, 32, dtype=torch.bool))


def test_layers_called_outside_the_model_are_refused():
    model = build("vit")
    apply_mame(model)
    with pytest.raises(RuntimeError, match="call the patched model"):
        model.layers[0](torch.randn(1, 65, 32))


# -- the custom merge rule hook and the figure ----------------------------------------------------------


def test_a_custom_token_merger_gets_sizes_and_attention_for_free():
    """Benchmarks plug peers in through token_merger: here, plain 2x2 pooling."""

    def pool_2x2(patches, grid, sizes, ratio, config):
        batch, _, channels = patches.shape
        height, width = grid
        weights = torch.ones_like(patches[..., 0]) if sizes is None else sizes
        pooled = torch.nn.functional.avg_pool2d(
            (patches * weights[..., None]).reshape(batch, height, width, channels).permute(0, 3, 1, 2), 2
        )
        new_sizes = torch.nn.functional.avg_pool2d(weights.reshape(batch, 1, height, width), 2) * 4
        tokens = (pooled * 4 / new_sizes).flatten(2).transpose(1, 2)
        return TokenMerge(tokens, new_sizes.flatten(1), (height // 2, width // 2), spread=lambda t: t)

    model = build("vit")
    apply_mame_to_vision_model(model, VisionMaMeConfig(ratio=0.75, layers=(0, 2)), token_merger=pool_2x2)
    output = run(model, "vit", inputs("vit"))
    assert output.shape == (2, 32)
    history = merge_history(model)
    assert [r.grid for r in history] == [(4, 4), (2, 2)]
    assert torch.equal(history[1].sizes, torch.full((2, 4), 16.0))


def test_membership_matches_sizes_and_figure_is_written(tmp_path):
    skimage_data = pytest.importorskip("skimage.data")
    pytest.importorskip("matplotlib")
    model = build("deit_classifier")
    apply_mame(model, ratio=0.3)
    batch = inputs("deit_classifier")
    for (layer, membership), record in zip(merge_membership(model, **batch), merge_history(model)):
        assert layer == record.layer
        assert torch.equal(membership.sum(dim=-1), torch.ones(2, 64))  # each patch in one token
        assert torch.equal(membership.sum(dim=1), record.sizes)  # each token holds `size` patches
    assert all(record.spread is None for record in merge_history(model))  # plans let go

    unpatched = build("clip")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no pyplot, no backend switch warnings
        path = visualize_merges(unpatched, skimage_data.astronaut(), tmp_path / "merges.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert patched_vision_config(unpatched) is None  # patched only for the figure

    siglip2 = build("siglip2")
    assert visualize_merges(siglip2, skimage_data.coffee(), tmp_path / "siglip2.png").exists()
    with pytest.raises(ValueError, match="VideoMAE"):
        visualize_merges(build("videomae"), skimage_data.coffee(), tmp_path / "video.png")


@pytest.mark.parametrize("name", ["vit_classifier", "deit_teacher", "clip", "siglip", "videomae_classifier"])
def test_patched_models_trace_into_one_graph_and_match_eager(name):
    model = build(name)
    batch = inputs(name)
    apply_mame(model, ratio=0.3)
    with torch.no_grad():
        eager = features(model, name, batch)
        assert_one_graph(model, **batch)
        compiled = torch.compile(model, backend="eager", fullgraph=True)
        torch.testing.assert_close(features(compiled, name, batch), eager)
    torch._dynamo.reset()


def test_a_patched_vision_model_deep_copies_and_pickles():
    import copy
    import io

    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(0)
    config = ViTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=64, patch_size=8
    )
    vit = ViTForImageClassification(config).eval()
    pixels = torch.randn(2, 3, 64, 64)
    apply_mame(vit, ratio=0.2)
    with torch.no_grad():
        expected = vit(pixel_values=pixels).logits
        copied = copy.deepcopy(vit)
        torch.testing.assert_close(copied(pixel_values=pixels).logits, expected)
        buffer = io.BytesIO()
        torch.save(vit, buffer)
        buffer.seek(0)
        loaded = torch.load(buffer, weights_only=False)
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, expected)
        remove_mame(copied)  # the copy's patch is its own
        torch.testing.assert_close(vit(pixel_values=pixels).logits, expected)


@pytest.mark.parametrize("name", ["vit_classifier", "videomae_classifier"])
def test_threads_sharing_one_patched_model_get_their_own_outputs(name):
    # Issue 10 #2: a shared ViT raised "sizes must have shape (2, 42), got (3, 42)" when two
    # threads ran batches of different sizes: each forward's state now belongs to its thread
    # (VideoMAE's classifier also keeps its pooled tokens per forward).
    from concurrent.futures import ThreadPoolExecutor

    model = build(name)
    apply_mame(model)
    shape = (4, 3, 32, 32) if name.startswith("videomae") else (3, 32, 32)
    pixels = {b: torch.randn(b, *shape, generator=torch.Generator().manual_seed(b)) for b in (1, 2, 3)}
    with torch.no_grad():
        expected = {b: model(pixel_values=x).logits for b, x in pixels.items()}
        with ThreadPoolExecutor(max_workers=3) as pool:
            outputs = list(pool.map(lambda b: (b, model(pixel_values=pixels[b]).logits), [1, 2, 3] * 8))
    assert all(torch.equal(out, expected[b]) for b, out in outputs)
