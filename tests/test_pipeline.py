"""StableDiffusionMaMePipeline and the offline components, on a tiny random pipeline."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline, StableDiffusionPipeline

from mame_diffusers import MaMeConfig, apply_mame, remove_mame
from mame_diffusers.diffusers_integration import patched_config
from mame_diffusers.offline import build_clip_tokenizer, offline_pipeline_components
from mame_diffusers.pipeline_stable_diffusion_mame import StableDiffusionMaMePipeline

PIPELINE_FILE = Path(__file__).resolve().parents[1] / "pipelines" / "pipeline_stable_diffusion_mame.py"


@pytest.fixture(scope="module")
def components():
    return offline_pipeline_components("tiny", seed=0)


@pytest.fixture()
def pipe(components):
    pipeline = StableDiffusionMaMePipeline(**components)
    pipeline.set_progress_bar_config(disable=True)
    yield pipeline
    remove_mame(pipeline)


def generate(pipeline, **kwargs):
    generator = torch.Generator().manual_seed(0)
    return pipeline(
        "a photo of an astronaut", height=64, width=64, num_inference_steps=2, generator=generator,
        output_type="pt", **kwargs,
    ).images


def processors(pipeline):
    return dict(pipeline.unet.attn_processors)


def test_without_mame_arguments_it_is_the_stock_pipeline(components, pipe):
    stock = StableDiffusionPipeline(**components)
    stock.set_progress_bar_config(disable=True)
    assert torch.equal(generate(pipe), generate(stock))


def test_mame_applies_for_one_call_only(pipe):
    before = processors(pipe)
    reference = generate(pipe)
    merged = generate(pipe, mame_ratio=0.75, mame_tau=0.2)
    assert not torch.equal(merged, reference)
    after = processors(pipe)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert patched_config(pipe.unet) is None
    assert torch.equal(generate(pipe), reference)


def test_the_call_sees_its_settings_and_earlier_ones_come_back(pipe):
    apply_mame(pipe, ratio=0.5, tau=0.1)
    seen = []

    def spy(pipeline, step, timestep, callback_kwargs):
        seen.append(patched_config(pipeline.unet))
        return callback_kwargs

    generate(pipe, mame_tau=0.4, callback_on_step_end=spy)
    assert seen and all(c == MaMeConfig(ratio=0.5, tau=0.4) for c in seen)
    assert patched_config(pipe.unet) == MaMeConfig(ratio=0.5, tau=0.1)


def test_the_unet_is_restored_when_the_call_raises(pipe):
    before = processors(pipe)
    with pytest.raises(ValueError, match="divisible by 8"):
        pipe("x", height=60, width=64, num_inference_steps=1, mame_ratio=0.5)
    after = processors(pipe)
    assert all(after[k] is before[k] for k in before) and patched_config(pipe.unet) is None
    assert all(not m._forward_pre_hooks for m in pipe.unet.modules())


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        ({"mame_rato": 0.5}, TypeError, "mame_rato"),
        ({"mame_ratio": 1.5}, ValueError, "ratio"),
        ({"mame_tau": -3}, ValueError, "tau"),
        ({"mame_max_downsample": 3}, ValueError, "max_downsample"),
    ],
)
def test_bad_mame_arguments_are_refused_before_anything_runs(pipe, kwargs, error, match):
    before = processors(pipe)
    with pytest.raises(error, match=match):
        pipe("x", height=64, width=64, num_inference_steps=1, **kwargs)
    assert all(processors(pipe)[k] is before[k] for k in before)


def test_the_package_exports_the_pipeline_lazily():
    import mame_diffusers

    assert mame_diffusers.StableDiffusionMaMePipeline is StableDiffusionMaMePipeline
    assert "StableDiffusionMaMePipeline" in mame_diffusers.__all__
    with pytest.raises(AttributeError, match="no attribute 'NoSuchThing'"):
        mame_diffusers.NoSuchThing


def test_from_pipe_shares_the_components(components):
    stock = StableDiffusionPipeline(**components)
    ours = StableDiffusionMaMePipeline.from_pipe(stock)
    assert isinstance(ours, StableDiffusionMaMePipeline) and ours.unet is stock.unet


def test_save_and_load_the_diffusers_ways(pipe, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    reference = generate(pipe, mame_ratio=0.75)
    pipe.save_pretrained(tmp_path / "saved")
    loaded = StableDiffusionMaMePipeline.from_pretrained(tmp_path / "saved")
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(generate(loaded, mame_ratio=0.75), reference)
    custom = DiffusionPipeline.from_pretrained(
        tmp_path / "saved", custom_pipeline=os.fspath(PIPELINE_FILE), trust_remote_code=True
    )
    assert type(custom).__name__ == "StableDiffusionMaMePipeline"
    custom.set_progress_bar_config(disable=True)
    torch.testing.assert_close(generate(custom, mame_ratio=0.75), reference)
    # Plain diffusers reopens the folder too (as the stock pipeline: same components).
    plain = DiffusionPipeline.from_pretrained(tmp_path / "saved")
    assert type(plain) is StableDiffusionPipeline
    plain.set_progress_bar_config(disable=True)
    torch.testing.assert_close(generate(StableDiffusionMaMePipeline.from_pipe(plain), mame_ratio=0.75), reference)


def test_offline_tokenizer_encodes_any_text_and_fits_the_text_encoder(components):
    tokenizer = components["tokenizer"]
    ids = tokenizer("Ünïcode, digits 42 and a photo!", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id
    assert max(ids) < components["text_encoder"].config.vocab_size
    assert components["text_encoder"].config.hidden_size == components["unet"].config.cross_attention_dim
    assert len(build_clip_tokenizer()) == len(tokenizer)
