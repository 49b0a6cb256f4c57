"""apply_mame on the diffusers pipelines people use, on tiny random components built offline.

One test per pipeline (img2img, inpaint, ControlNet, SDXL, SDXL ControlNet), then the
runtime options people combine with it (torch.compile, bf16, channels_last, LoRA), the
processor interplay with attention slicing and IP-Adapter, and the accelerator recipe of
docs/accelerators.md (fewer-step schedulers, DeepCache-style feature caching).
"""

from __future__ import annotations

import warnings

import pytest
import torch
from diffusers import (
    ControlNetModel,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from diffusers.models.attention_processor import (
    AttnProcessor2_0,
    IPAdapterAttnProcessor2_0,
    SlicedAttnProcessor,
)
from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from mame_diffusers import MaMeProcessor, apply_mame, remove_mame
from mame_diffusers.accelerators import disable_feature_caching, enable_feature_caching, feature_cache_of
from mame_diffusers.diffusers_integration import diffusion_models_of, patched_config, self_attention_modules
from mame_diffusers.offline import build_clip_tokenizer, build_unet, offline_pipeline_components, unet_config, unet_inputs

PROMPT = "a photo of a cat"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These models are tiny: a second intra-op thread buys nothing, and on cores shared with
    # timing benchmarks OpenMP's waits for a busy core stretched single tests to 40 s.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- tiny components -----------------------------------------------------------------------


def sd_components(**unet_changes) -> dict:
    """The tiny SD 2.1-structured components; ``unet_changes`` edit the UNet config."""
    components = offline_pipeline_components("tiny", seed=0)
    if unet_changes:
        config = {**unet_config("tiny-sd"), **unet_changes}
        torch.manual_seed(0)
        components["unet"] = UNet2DConditionModel.from_config(config).eval()
    return components


def sdxl_components() -> dict:
    """A tiny SDXL set: two CLIP text encoders (the second with projection) whose hidden
    states concatenate to the UNet's ``cross_attention_dim``, and a UNet whose added
    conditioning takes the pooled projection plus six time ids."""
    tokenizer = build_clip_tokenizer()
    text = dict(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_size=32, intermediate_size=64, num_attention_heads=4,
        num_hidden_layers=2, projection_dim=32, hidden_act="gelu", max_position_embeddings=77,
    )
    torch.manual_seed(2)
    text_encoder = CLIPTextModel(CLIPTextConfig(**text)).eval()
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text)).eval()
    config = unet_config("tiny-sdxl")
    config["cross_attention_dim"] = 32 + 32
    config["projection_class_embeddings_input_dim"] = 6 * config["addition_time_embed_dim"] + 32
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).eval()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1, timestep_spacing="leading"
    )
    return dict(
        vae=offline_pipeline_components("tiny")["vae"], text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=tokenizer, tokenizer_2=tokenizer, unet=unet, scheduler=scheduler,
    )


def tiny_controlnet(unet: torch.nn.Module, seed: int = 3) -> ControlNetModel:
    """A ControlNet copied from ``unet``; its zero convolutions get random weights, as after
    training, so that its residuals (and merging inside it) reach the image."""
    torch.manual_seed(seed)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(4, 8, 8, 16)).eval()
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]:
            torch.nn.init.normal_(conv.weight, std=0.05)
    return controlnet


def ready(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, steps: int = 2, **kwargs) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, num_inference_steps=steps, generator=generator, output_type="pt", **kwargs).images


def image(size: int, seed: int = 5) -> torch.Tensor:
    return torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(seed))


def merged_calls(models: list[torch.nn.Module]) -> dict[int, int]:
    """Count, per model (by index), the self-attention calls that took the merged path."""
    counts = {index: 0 for index in range(len(models))}
    for index, model in enumerate(models):
        for _, _, attention in self_attention_modules(model):
            processor = attention.processor
            original = processor._merged_attention

            def counting(*args, _index=index, _original=original, **kwargs):
                counts[_index] += 1
                return _original(*args, **kwargs)

            processor._merged_attention = counting
    return counts


def processor_snapshot(models: list[torch.nn.Module]) -> list[dict]:
    return [dict(model.attn_processors) for model in models]


def same_processors(before: list[dict], after: list[dict]) -> bool:
    """The same processor objects, module by module."""
    return len(before) == len(after) and all(
        now.keys() == then.keys() and all(now[k] is then[k] for k in then) for then, now in zip(before, after)
    )


def check_mame_on(pipe, size: int, **call) -> None:
    """apply_mame merges in every patched model, changes the image (finite, right shape),
    and remove_mame restores the processors, the hooks and the exact image."""
    models = diffusion_models_of(pipe)
    before = processor_snapshot(models)
    reference = generate(pipe, **call)
    apply_mame(pipe, ratio=0.5)
    try:
        patched = [model for model in models if patched_config(model) is not None]
        assert pipe.unet in patched
        counts = merged_calls(patched)
        merged = generate(pipe, **call)
    finally:
        remove_mame(pipe)
    assert merged.shape == reference.shape == (1, 3, size, size)
    assert torch.isfinite(merged).all()
    assert all(counts.values()), f"a patched model never merged: {counts}"
    assert not torch.equal(merged, reference)
    assert same_processors(before, processor_snapshot(models))
    assert all(not m._forward_pre_hooks for model in models for m in model.modules())
    assert torch.equal(generate(pipe, **call), reference)


# -- one test per pipeline -----------------------------------------------------------------


def test_img2img():
    pipe = ready(StableDiffusionImg2ImgPipeline(**sd_components()))
    check_mame_on(pipe, 128, image=image(128), strength=0.9)


def test_inpaint_with_the_9_channel_inpainting_unet():
    pipe = ready(StableDiffusionInpaintPipeline(**sd_components(in_channels=9)))
    mask = torch.zeros(1, 1, 128, 128)
    mask[..., 32:96, 32:96] = 1.0
    check_mame_on(pipe, 128, image=image(128), mask_image=mask, height=128, width=128, strength=1.0)


def test_controlnet():
    components = sd_components()
    pipe = ready(StableDiffusionControlNetPipeline(**components, controlnet=tiny_controlnet(components["unet"])))
    check_mame_on(pipe, 128, image=image(128), height=128, width=128)


def test_sdxl():
    pipe = ready(StableDiffusionXLPipeline(**sdxl_components(), add_watermarker=False))
    check_mame_on(pipe, 128, height=128, width=128)


def test_sdxl_controlnet():
    components = sdxl_components()
    pipe = ready(StableDiffusionXLControlNetPipeline(
        **components, controlnet=tiny_controlnet(components["unet"]), add_watermarker=False
    ))
    check_mame_on(pipe, 128, image=image(128), height=128, width=128)


# -- ControlNets ---------------------------------------------------------------------------


def test_diffusion_models_of_lists_the_unet_and_every_controlnet():
    components = sd_components()
    unet = components["unet"]
    first, second = tiny_controlnet(unet, seed=3), tiny_controlnet(unet, seed=4)
    multi = MultiControlNetModel([first, second, first])
    pipe = StableDiffusionControlNetPipeline(**components, controlnet=multi)
    assert diffusion_models_of(pipe) == [unet, first, second]  # the repeated net once
    assert diffusion_models_of(pipe, include_controlnet=False) == [unet]
    assert diffusion_models_of(multi) == [first, second]
    assert diffusion_models_of(first) == [first] and diffusion_models_of(unet) == [unet]
    plain = StableDiffusionPipeline(**sd_components())
    assert diffusion_models_of(plain) == [plain.unet]
    with pytest.raises(TypeError, match="cannot patch"):
        diffusion_models_of("stabilityai/stable-diffusion-2-1")


def test_apply_mame_patches_every_controlnet_with_its_own_tracker():
    # Needs mame_diffusers.api to dispatch through diffusion_models_of.
    components = sd_components()
    unet = components["unet"]
    nets = [tiny_controlnet(unet, seed=3), tiny_controlnet(unet, seed=4)]
    pipe = ready(StableDiffusionControlNetPipeline(**components, controlnet=MultiControlNetModel(nets)))
    apply_mame(pipe, ratio=0.5)
    try:
        models = [unet, *nets]
        assert all(patched_config(model) is not None for model in models), "apply_mame left a ControlNet unpatched"
        trackers = [model._mame_patch.tracker for model in models]
        assert len({id(tracker) for tracker in trackers}) == 3
        counts = merged_calls(models)
        generate(pipe, image=[image(128), image(128, seed=6)], height=128, width=128)
        assert all(counts.values()), counts
        # Every tracker saw the 16x16 latent itself and found attention at full resolution.
        assert all(t.current.latent_hw == (16, 16) and t.current.top_downsample == 1 for t in trackers)
    finally:
        remove_mame(pipe)
    assert all(patched_config(model) is None for model in [unet, *nets])


# -- runtime options people combine with it ------------------------------------------------


def test_compiles_with_fullgraph_and_matches_eager():
    # Dynamo captures the whole patched UNet as one graph (fullgraph=True refuses any graph
    # break); the "eager" backend runs that graph without Inductor's code generation, which
    # takes about a minute for this UNet on two CPU cores.
    unet = build_unet("tiny-sd", seed=0)
    inputs = unet_inputs(unet, (16, 16))
    with torch.no_grad():
        stock = unet(**inputs).sample
        apply_mame(unet, ratio=0.5)
        eager = unet(**inputs).sample
        torch._dynamo.reset()
        try:
            compiled = torch.compile(unet, fullgraph=True, backend="eager")
            assert diffusion_models_of(compiled) == [unet]  # patches live on the real model
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                out = compiled(**inputs).sample
        finally:
            torch._dynamo.reset()
            remove_mame(unet)
    assert not torch.equal(eager, stock)
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


def test_lora_adapters_run_inside_merged_self_attention():
    # LoRA through PEFT (pipe.load_lora_weights, unet.add_adapter) wraps the projections that
    # MaMe's processor calls, so the merged path runs the adapted weights; the LoRA scale of
    # cross_attention_kwargs reaches them, and fusing the adapter keeps the image.
    from peft import LoraConfig

    pipe = ready(StableDiffusionPipeline(**sd_components()))
    torch.manual_seed(1)
    self_attention_only = ["attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0"]
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=self_attention_only, init_lora_weights=False))
    reference = generate(pipe)
    apply_mame(pipe, ratio=0.5)
    try:
        counts = merged_calls([pipe.unet])
        adapted = generate(pipe)
        assert counts[0] == 2 * len(self_attention_modules(pipe.unet))  # two steps, every attn1
        pipe.unet.disable_adapters()
        plain = generate(pipe)
        pipe.unet.enable_adapters()
        assert (adapted - plain).abs().max() > 0.05  # the adapter changes what merged attention computes
        torch.testing.assert_close(generate(pipe, cross_attention_kwargs={"scale": 0.0}), plain)
        pipe.fuse_lora()
        torch.testing.assert_close(generate(pipe), adapted, rtol=1e-4, atol=1e-4)
        pipe.unfuse_lora()
    finally:
        remove_mame(pipe)
    torch.testing.assert_close(generate(pipe), reference, rtol=1e-4, atol=1e-4)  # unfusing rounds


def test_bf16_pipeline_on_cpu():
    # float16 matmuls are a GPU thing; on the CPU the half-precision path people use is bf16.
    pipe = ready(StableDiffusionPipeline(**sd_components())).to(torch.bfloat16)
    reference = generate(pipe, height=128, width=128)
    apply_mame(pipe, ratio=0.5)
    try:
        counts = merged_calls([pipe.unet])
        merged = generate(pipe, height=128, width=128)
    finally:
        remove_mame(pipe)
    assert merged.shape == (1, 3, 128, 128) and torch.isfinite(merged).all()
    assert counts[0] > 0 and not torch.equal(merged, reference)
    assert torch.equal(generate(pipe, height=128, width=128), reference)


@pytest.mark.parametrize("linear_projection", [True, False], ids=["linear-proj", "conv-proj"])
def test_channels_last_matches_contiguous(linear_projection):
    config = {**unet_config("tiny-sd"), "use_linear_projection": linear_projection}
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(config).eval()
    inputs = unet_inputs(unet, (16, 12))
    apply_mame(unet, ratio=0.5)
    try:
        with torch.no_grad():
            contiguous = unet(**inputs).sample
            unet.to(memory_format=torch.channels_last)
            inputs["sample"] = inputs["sample"].to(memory_format=torch.channels_last)
            channels_last = unet(**inputs).sample
    finally:
        remove_mame(unet)
    torch.testing.assert_close(channels_last, contiguous, rtol=1e-4, atol=1e-5)


# -- attention slicing ---------------------------------------------------------------------


def attn1_processors(unet) -> list:
    return [attention.processor for _, _, attention in self_attention_modules(unet)]


def test_mame_after_slicing_wraps_the_sliced_processors():
    pipe = ready(StableDiffusionPipeline(**sd_components()))
    apply_mame(pipe, ratio=0.5, max_downsample=1)
    unsliced_mame = generate(pipe)
    remove_mame(pipe)

    pipe.enable_attention_slicing(1)
    sliced = processor_snapshot([pipe.unet])
    assert all(isinstance(p, SlicedAttnProcessor) for p in sliced[0].values())
    reference = generate(pipe)
    apply_mame(pipe, ratio=0.5, max_downsample=1)
    try:
        wrapped = attn1_processors(pipe.unet)
        assert all(isinstance(p, MaMeProcessor) and isinstance(p.fallback, SlicedAttnProcessor) for p in wrapped)
        counts = merged_calls([pipe.unet])
        merged = generate(pipe)
    finally:
        remove_mame(pipe)
    assert counts[0] > 0 and not torch.equal(merged, reference)
    # Merged self-attention runs unsliced (it is M-sized); the rest stays sliced, which
    # differs from unsliced attention only by rounding.
    torch.testing.assert_close(merged, unsliced_mame, rtol=1e-4, atol=1e-5)
    assert same_processors(sliced, processor_snapshot([pipe.unet]))
    assert torch.equal(generate(pipe), reference)


def _slice(pipe):
    pipe.enable_attention_slicing(1)


def _fuse(pipe):
    pipe.unet.fuse_qkv_projections()


def _set_stock(pipe):
    pipe.unet.set_attn_processor(AttnProcessor2_0())


@pytest.mark.parametrize("replace", [_slice, _fuse, _set_stock], ids=["slicing", "fuse_qkv", "set_attn_processor"])
def test_replacing_processors_after_mame_warns_once_and_apply_again_restores_merging(replace):
    pipe = ready(StableDiffusionPipeline(**sd_components()))
    apply_mame(pipe, ratio=0.5)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the normal path warns about nothing
        merged = generate(pipe)
    replace(pipe)
    replaced = processor_snapshot([pipe.unet])
    with pytest.warns(UserWarning, match="apply_mame again"):
        without_mame = generate(pipe)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per patch
        assert torch.equal(generate(pipe), without_mame)
    assert not torch.allclose(without_mame, merged)

    apply_mame(pipe, ratio=0.5)  # on top of the new processors, silently
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            counts = merged_calls([pipe.unet])
            again = generate(pipe)
    finally:
        remove_mame(pipe)
    assert counts[0] > 0
    torch.testing.assert_close(again, merged, rtol=1e-4, atol=1e-5)
    # remove_mame keeps what the user installed.
    assert same_processors(replaced, processor_snapshot([pipe.unet]))


def test_apply_over_bare_mame_processors_never_wraps_mame_in_mame():
    unet = build_unet("tiny-sd", seed=0)
    unet.set_attn_processor(MaMeProcessor(ratio=0.25))
    bare = processor_snapshot([unet])
    apply_mame(unet, ratio=0.5)
    try:
        assert all(type(p.fallback) is AttnProcessor2_0 for p in attn1_processors(unet))
    finally:
        remove_mame(unet)
    assert same_processors(bare, processor_snapshot([unet]))  # what was there comes back


# -- IP-Adapter ----------------------------------------------------------------------------

IMAGE_EMBED_DIM = 16


def random_ip_adapter(unet: torch.nn.Module, seed: int = 7) -> dict:
    """An IP-Adapter state dict with random weights, shaped like a real one for ``unet``.

    No weights can be downloaded here, so this feeds diffusers' own ``load_ip_adapter``
    (which takes a state dict) a random one: the loader then replaces every processor
    exactly as with real weights (IPAdapterAttnProcessor2_0 on the cross-attentions, fresh
    processors of the current class on the self-attentions).
    """
    generator = torch.Generator().manual_seed(seed)
    cross = unet.config.cross_attention_dim
    state = {
        "image_proj": {
            "proj.weight": torch.randn(4 * cross, IMAGE_EMBED_DIM, generator=generator) * 0.1,
            "proj.bias": torch.zeros(4 * cross),
            "norm.weight": torch.ones(cross),
            "norm.bias": torch.zeros(cross),
        },
        "ip_adapter": {},
    }
    key_id = 1  # the loader numbers cross-attention processors 1, 3, 5, ...
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        hidden = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
        for projection in ("to_k_ip", "to_v_ip"):
            weight = torch.randn(hidden, cross, generator=generator) * 0.1
            state["ip_adapter"][f"{key_id}.{projection}.weight"] = weight
        key_id += 2
    return state


def ip_pipeline() -> StableDiffusionPipeline:
    return ready(StableDiffusionPipeline(**sd_components()))


def load_ip_adapter(pipe) -> None:
    pipe.load_ip_adapter(random_ip_adapter(pipe.unet), subfolder="", weight_name="", image_encoder_folder=None)


def generate_with_image_prompt(pipe) -> torch.Tensor:
    # Precomputed image embeddings (negative, positive) stand in for an image encoder.
    embeds = torch.randn(2, 1, IMAGE_EMBED_DIM, generator=torch.Generator().manual_seed(8))
    return generate(pipe, ip_adapter_image_embeds=[embeds])


def test_mame_after_ip_adapter_keeps_its_processors():
    pipe = ip_pipeline()
    load_ip_adapter(pipe)
    before = processor_snapshot([pipe.unet])
    assert sum(isinstance(p, IPAdapterAttnProcessor2_0) for p in before[0].values()) == 7
    reference = generate_with_image_prompt(pipe)
    apply_mame(pipe, ratio=0.5)
    try:
        after_apply = pipe.unet.attn_processors
        # Cross-attention keeps the IP-Adapter processors; self-attention wraps what it had.
        assert all(after_apply[k] is p for k, p in before[0].items() if isinstance(p, IPAdapterAttnProcessor2_0))
        assert all(p.fallback is before[0][k] for k, p in after_apply.items() if isinstance(p, MaMeProcessor))
        counts = merged_calls([pipe.unet])
        merged = generate_with_image_prompt(pipe)
    finally:
        remove_mame(pipe)
    assert counts[0] > 0 and torch.isfinite(merged).all() and not torch.equal(merged, reference)
    assert same_processors(before, processor_snapshot([pipe.unet]))
    assert torch.equal(generate_with_image_prompt(pipe), reference)


def test_ip_adapter_after_mame_warns_and_remove_leaves_no_mame_behind():
    stock = ip_pipeline()
    load_ip_adapter(stock)
    reference = generate_with_image_prompt(stock)

    pipe = ip_pipeline()
    apply_mame(pipe, ratio=0.5)
    load_ip_adapter(pipe)
    # The loader rebuilt each self-attention processor as type(processor)(): default,
    # untracked MaMeProcessors that are not apply_mame's.
    assert all(isinstance(p, MaMeProcessor) and p._tracker is None for p in attn1_processors(pipe.unet))
    with pytest.warns(UserWarning, match="apply_mame again"):
        generate_with_image_prompt(pipe)

    apply_mame(pipe, ratio=0.5)
    try:
        wrapped = attn1_processors(pipe.unet)
        assert all(type(p.fallback) is AttnProcessor2_0 for p in wrapped), "MaMe wrapped MaMe"
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            counts = merged_calls([pipe.unet])
            merged = generate_with_image_prompt(pipe)
    finally:
        remove_mame(pipe)
    assert counts[0] > 0 and not torch.equal(merged, reference)
    assert not any(isinstance(p, MaMeProcessor) for p in pipe.unet.attn_processors.values())
    assert torch.equal(generate_with_image_prompt(pipe), reference)


# -- accelerators: fewer-step schedulers and feature caching -------------------------------


def test_mame_with_a_fewer_step_scheduler_and_feature_caching():
    components = sd_components()
    components["scheduler"] = DPMSolverMultistepScheduler.from_config(components["scheduler"].config)
    pipe = ready(StableDiffusionPipeline(**components))
    reference = generate(pipe, steps=4)
    apply_mame(pipe, ratio=0.5)
    cache = enable_feature_caching(pipe, interval=2, depth=1)
    try:
        counts = merged_calls([pipe.unet])
        out = generate(pipe, steps=4)
    finally:
        disable_feature_caching(pipe)
        remove_mame(pipe)
    assert out.shape == reference.shape and torch.isfinite(out).all() and not torch.equal(out, reference)
    assert (cache.full_steps, cache.cached_steps) == (2, 2)
    # Full steps merge in all 7 self-attentions, cached steps in the 3 of the first down
    # block and the last up block (max_downsample=2 reaches both levels of this UNet).
    assert counts[0] == 2 * 7 + 2 * 3
    assert feature_cache_of(pipe) is None and torch.equal(generate(pipe, steps=4), reference)


def _deep_features_hook(store: dict, replay: bool):
    """Forward hook on the block whose output feeds the last up block: record it, or
    replace it with the record (a reference for caching that still runs every block)."""

    def hook(module, args, output):
        if replay:
            return store["features"]
        store["features"] = output

    return hook


def test_feature_caching_reuses_exactly_the_deep_features():
    unet = build_unet("tiny-sd", seed=0)
    calls = [unet_inputs(unet, (16, 16), seed=seed) for seed in range(3)]
    for inputs, timestep in zip(calls, (900, 800, 700)):
        inputs["timestep"] = torch.full((2,), timestep)

    store: dict = {}
    expected = []
    with torch.no_grad():
        for index, inputs in enumerate(calls):
            handle = unet.up_blocks[-2].register_forward_hook(_deep_features_hook(store, replay=index > 0))
            expected.append(unet(**inputs).sample)
            handle.remove()
        stock_last = unet(**calls[-1]).sample

        cache = enable_feature_caching(unet, interval=3)
        mid_calls = []
        handle = unet.mid_block.resnets[0].register_forward_pre_hook(lambda *a: mid_calls.append(1))
        got = [unet(**inputs).sample for inputs in calls]
        handle.remove()
        assert (cache.full_steps, cache.cached_steps, len(mid_calls)) == (1, 2, 1)
        for out, reference in zip(got, expected):
            assert torch.equal(out, reference)
        assert not torch.equal(got[-1], stock_last)

        unet(**calls[0])  # the timestep went up: a new generation starts with a full step
        unet(**unet_inputs(unet, (16, 12)))  # a new shape: full step
        assert (cache.full_steps, cache.cached_steps) == (3, 2)

        disable_feature_caching(unet)
        assert all("forward" not in block.__dict__ for block in unet.modules())
        assert not unet._forward_pre_hooks and feature_cache_of(unet) is None
        assert torch.equal(unet(**calls[-1]).sample, stock_last)


def test_feature_caching_with_interval_1_is_exact_and_settings_are_checked():
    unet = build_unet("tiny-sdxl", seed=0)
    inputs = unet_inputs(unet, (16, 16))
    with torch.no_grad():
        reference = unet(**inputs).sample
        enable_feature_caching(unet, interval=1, depth=2)
        try:
            assert torch.equal(unet(**inputs).sample, reference)
            inputs["timestep"] = inputs["timestep"] - 100
            unet(**inputs)
            assert feature_cache_of(unet).cached_steps == 0
        finally:
            disable_feature_caching(unet)
    for bad in ({"interval": 0}, {"depth": 0}, {"depth": 3}, {"interval": 2.5}):
        with pytest.raises(ValueError):
            enable_feature_caching(unet, **bad)
    with pytest.raises(TypeError, match="UNet2DConditionModel"):
        enable_feature_caching(torch.nn.Linear(2, 2))
