"""StableDiffusionMaMePipeline and the offline components, on a tiny random pipeline."""

from __future__ import annotations

import os
import threading
import time
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
    merged = generate(pipe, mame_ratio=0.75, mame_max_downsample=1)
    assert not torch.equal(merged, reference)
    after = processors(pipe)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    assert patched_config(pipe.unet) is None
    assert torch.equal(generate(pipe), reference)


def test_the_call_sees_its_settings_and_earlier_ones_come_back(pipe):
    apply_mame(pipe, ratio=0.5, max_downsample=1)
    seen = []

    def spy(pipeline, step, timestep, callback_kwargs):
        seen.append(patched_config(pipeline.unet))
        return callback_kwargs

    generate(pipe, mame_max_downsample=2, callback_on_step_end=spy)
    assert seen and all(c == MaMeConfig(ratio=0.5, max_downsample=2) for c in seen)
    assert patched_config(pipe.unet) == MaMeConfig(ratio=0.5, max_downsample=1)


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
        ({"mame_tau": 0.2}, TypeError, "mame_tau"),  # a setting that no longer exists
        ({"mame_keys_values_only": "yes"}, ValueError, "keys_values_only"),
        ({"mame_max_downsample": 3}, ValueError, "max_downsample"),
    ],
)
def test_bad_mame_arguments_are_refused_before_anything_runs(pipe, kwargs, error, match):
    before = processors(pipe)
    with pytest.raises(error, match=match):
        pipe("x", height=64, width=64, num_inference_steps=1, **kwargs)
    assert all(processors(pipe)[k] is before[k] for k in before)


@pytest.fixture()
def one_thread():
    """One torch thread while the test runs: a call's float sums then round the same way
    whether it runs alone or next to another thread's call, so images compare bit for bit."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("earlier", [None, 0.3], ids=["stock", "after-apply_mame"])
def test_threads_with_other_settings_each_get_their_own(pipe, one_thread, earlier):
    # Issue 24: two threads calling with mame_ratio 0.5 and 0.9 made images of the other
    # thread's settings, and left the UNet patched. Here three threads share one UNet (one
    # through its own pipeline made with from_pipe, as servers give each request one), and
    # each call sleeps at every step so that the calls overlap.
    if earlier is not None:
        apply_mame(pipe, ratio=earlier)
    other = StableDiffusionMaMePipeline.from_pipe(pipe)
    other.set_progress_bar_config(disable=True)
    before, config = processors(pipe), patched_config(pipe.unet)
    settings = {"0.5": (pipe, {"mame_ratio": 0.5}), "0.9": (pipe, {"mame_ratio": 0.9}), "plain": (other, {})}
    references = {name: generate(pipeline, **kwargs) for name, (pipeline, kwargs) in settings.items()}
    assert not torch.equal(references["0.5"], references["0.9"])
    assert not torch.equal(references["0.5"], references["plain"])

    def slowly(pipeline, step, timestep, callback_kwargs):
        time.sleep(0.05)
        return callback_kwargs

    start = threading.Barrier(len(settings))
    images, errors = {name: [] for name in settings}, []

    def work(name):
        pipeline, kwargs = settings[name]
        try:
            start.wait()
            for _ in range(2):
                images[name].append(generate(pipeline, callback_on_step_end=slowly, **kwargs))
        except Exception as error:  # noqa: BLE001 - reported below, with the thread's name
            errors.append(f"{name}: {error!r}")

    workers = [threading.Thread(target=work, args=(name,)) for name in settings]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    assert not errors and not any(worker.is_alive() for worker in workers), errors
    differing = [name for name, made in images.items() for image in made if not torch.equal(image, references[name])]
    assert not differing, f"images not made with their own call's settings: {differing}"
    # The UNet ends as it was: stock, with the same processor objects and no hooks; or with
    # the earlier apply_mame's settings back on (applied again: new processors, same settings).
    after = processors(pipe)
    assert patched_config(pipe.unet) == config and after.keys() == before.keys()
    if earlier is None:
        assert all(after[k] is before[k] for k in before)
        assert all(not m._forward_pre_hooks and not m._forward_hooks for m in pipe.unet.modules())
    else:
        assert all(type(after[k]) is type(before[k]) for k in before)
    assert torch.equal(generate(other), references["plain"])


def test_a_call_with_other_settings_inside_a_call_is_refused_not_a_deadlock(pipe):
    def nested(pipeline, step, timestep, callback_kwargs):
        generate(pipeline, mame_ratio=0.9)
        return callback_kwargs

    with pytest.raises(RuntimeError, match="wait for itself"):
        generate(pipe, mame_ratio=0.5, callback_on_step_end=nested)
    assert patched_config(pipe.unet) is None


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


def test_custom_pipeline_loads_from_any_folder(pipe, tmp_path, monkeypatch):
    # Issue 24: custom_pipeline="pipelines/pipeline_stable_diffusion_mame.py" resolves from
    # the working folder, so it worked from the repository's root only. The package carries
    # its own entry point, and says where it is.
    import mame_diffusers

    path = mame_diffusers.CUSTOM_PIPELINE
    assert isinstance(path, str) and os.path.isabs(path) and path.endswith(".py")
    assert Path(path).parent == Path(mame_diffusers.__file__).resolve().parent  # installed with the package
    monkeypatch.setenv("HF_MODULES_CACHE", str(tmp_path / "modules"))
    reference = generate(pipe, mame_ratio=0.75)
    pipe.save_pretrained(tmp_path / "saved")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # no pipelines/ folder here
    custom = DiffusionPipeline.from_pretrained(tmp_path / "saved", custom_pipeline=path, trust_remote_code=True)
    assert type(custom) is StableDiffusionMaMePipeline
    custom.set_progress_bar_config(disable=True)
    torch.testing.assert_close(generate(custom, mame_ratio=0.75), reference)


def test_the_custom_pipeline_path_is_exported_without_importing_diffusers():
    import subprocess
    import sys

    code = (
        "import sys, mame_diffusers\n"
        "assert 'CUSTOM_PIPELINE' in mame_diffusers.__all__ and 'CUSTOM_PIPELINE' in dir(mame_diffusers)\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]", result.stdout + result.stderr


def test_offline_tokenizer_encodes_any_text_and_fits_the_text_encoder(components):
    tokenizer = components["tokenizer"]
    ids = tokenizer("Ünïcode, digits 42 and a photo!", padding="max_length", max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == tokenizer.bos_token_id
    assert max(ids) < components["text_encoder"].config.vocab_size
    assert components["text_encoder"].config.hidden_size == components["unet"].config.cross_attention_dim
    assert len(build_clip_tokenizer()) == len(tokenizer)
