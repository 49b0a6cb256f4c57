"""The command line on diffusion transformers: ``bench --arch pixart|sd3|flux|wan`` (tiny,
offline), ``bench``/``generate --model`` with a DiT pipeline saved to a folder (tiny, random
weights, loaded the way real ones are), and one-line errors for what does not go together."""

from __future__ import annotations

import json
import math

import pytest
import torch

from mame_diffusers.cli import ARCHS, main

from .cli_runs import exit_status_and_error


def _bench(tmp_path, *argv: str) -> dict:
    assert main(["bench", "--quick", "--repeats", "1", "--out", str(tmp_path), *argv]) == 0
    return json.loads((tmp_path / "bench.json").read_text())


@pytest.mark.parametrize("family", ["pixart", "sd3", "flux", "wan"])
def test_bench_arch_quick_times_stock_and_mame(family, tmp_path, capsys):
    report = _bench(tmp_path, "--arch", family)
    stock, mame = report["rows"]
    assert stock["method"] == "stock" and stock["error"] == 0.0 and stock["speedup"] == 1.0
    assert mame["method"] == "MaMe (defaults)"
    assert math.isfinite(mame["error"]) and 0.0 < mame["error"] < 0.2  # faster or not: tiny models
    assert mame["attends"] == "N/2" and mame["tokens_per_block"] * 2 == stock["tokens_per_block"]
    assert all(row["min_seconds"] <= row["seconds"] <= row["max_seconds"] for row in report["rows"])
    setup = report["setup"]
    assert setup["family"] == family and setup["batch"] == 1 and setup["image_tokens"] == stock["tokens_per_block"]
    assert (setup["frames"] == 17) == (family == "wan") and setup["resolution"] == 256
    assert any("tiny model" in note for note in report["warnings"])
    markdown = (tmp_path / "bench.md").read_text()
    assert "| stock |" in markdown and "| MaMe (defaults) |" in markdown
    assert (tmp_path / "bench.png").stat().st_size > 1000
    printed = capsys.readouterr().out
    assert "Transformer forward" in printed and "random weights" in printed


def test_bench_arch_takes_ratios_frames_and_resolution(tmp_path):
    report = _bench(tmp_path, "--arch", "wan", "--frames", "9", "--resolution", "128", "--ratios", "0.25", "0.75")
    names = [row["method"] for row in report["rows"]]
    assert names == ["stock", "MaMe (ratio=0.25)", "MaMe (ratio=0.75)"]
    assert report["setup"]["frames"] == 9 and (report["setup"]["height"], report["setup"]["width"]) == (128, 224)
    tokens = [row["tokens_per_block"] for row in report["rows"]]
    assert tokens[0] > tokens[1] > tokens[2] and report["rows"][2]["error"] > 0


def test_arch_names_match_the_dit_benchmark():
    from mame_diffusers.benchmarking.dit import DIT_ARCHS, SUBJECTS

    assert ARCHS == ("sd21", *DIT_ARCHS) and set(DIT_ARCHS) == set(SUBJECTS)


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--arch", "flux", "--model", "/some/folder"], "drop --arch"),
        (["bench", "--arch", "sd21", "--model", "/some/folder"], "drop --arch"),
        (["bench", "--arch", "pixart", "--quick", "--compile"], "--compile applies to UNets"),
        (["bench", "--arch", "flux", "--quick", "--steps", "3"], "--steps applies to UNets"),
        (
            ["bench", "--arch", "wan", "--quick", "--no-pipeline", "--pipeline-rounds", "2"],
            "--pipeline-rounds, --no-pipeline apply to UNets",
        ),
        (["bench", "--arch", "flux", "--quick", "--frames", "9"], "--frames applies to video models"),
        (["bench", "--quick", "--frames", "9"], "--frames applies to video models"),
        (["bench", "--arch", "wan", "--quick", "--frames", "8"], "frames must be 4k + 1"),
        (["bench", "--arch", "sd3", "--quick", "--resolution", "200"], "multiple of 16"),
        (["bench", "--arch", "sd3", "--quick", "--resolution", "1024"], "cannot run at 1024 pixels"),
        (["bench", "--arch", "pixart", "--dtype", "float16"], "float16"),
        (["bench", "--arch", "dit"], "invalid choice"),
        (["generate", "--arch", "flux"], "generate needs real weights for diffusion transformers"),
        (["generate", "--arch", "wan", "--prompts", "PROMPTS"], "generate needs real weights"),
    ],
)
def test_bad_dit_combinations_give_one_line_and_exit_2(argv, message, capsys, tmp_path):
    argv = [str(tmp_path / "p.txt") if a == "PROMPTS" else a for a in argv]
    (tmp_path / "p.txt").write_text("a cat\n")
    status, err = exit_status_and_error([*argv, "--out", str(tmp_path / "out")], capsys)
    assert status == 2
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("mame-diffusers")]) == 1


def test_help_says_generate_needs_real_dit_weights(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "generate needs real weights for diffusion transformers" in text
    assert "--arch {sd21,pixart,sd3,flux,wan}" in text and "(default: None)" not in text


# -- real pipelines, in folders -----------------------------------------------------------------


def _index(folder, pipeline: str, transformer: str | None) -> str:
    folder.mkdir()
    index = {"_class_name": pipeline, "_diffusers_version": "0.42.1", "scheduler": ["diffusers", "X"]}
    if transformer is not None:
        index["transformer"] = ["diffusers", transformer]
    else:
        index["unet"] = ["diffusers", "UNet2DConditionModel"]
    (folder / "model_index.json").write_text(json.dumps(index))
    return str(folder)


def test_model_index_decides_unet_or_dit(tmp_path):
    from mame_diffusers.loading import denoiser_family

    cases = {
        ("PixArtSigmaPipeline", "PixArtTransformer2DModel"): "pixart",
        ("StableDiffusion3Pipeline", "SD3Transformer2DModel"): "sd3",
        ("FluxPipeline", "FluxTransformer2DModel"): "flux",
        ("WanPipeline", "WanTransformer3DModel"): "wan",
        ("StableDiffusionPipeline", None): "unet",
        ("HunyuanDiTPipeline", "HunyuanDiT2DModel"): "unet",  # not a DiT MaMe supports
    }
    for number, ((pipeline, transformer), family) in enumerate(cases.items()):
        assert denoiser_family(_index(tmp_path / str(number), pipeline, transformer), None) == family


def test_generate_refuses_dit_pipelines_it_cannot_call_before_loading(tmp_path, capsys):
    folder = _index(tmp_path / "img2img", "FluxImg2ImgPipeline", "FluxTransformer2DModel")
    status, err = exit_status_and_error(["generate", "--model", folder, "--out", str(tmp_path / "o")], capsys)
    assert status == 2 and "is a FluxImg2ImgPipeline, which needs other inputs" in err


def _tiny_tokenizer_and_t5(encoder_class, config_class, width: int):
    from mame_diffusers.offline import build_clip_tokenizer

    tokenizer = build_clip_tokenizer()
    config = config_class(
        vocab_size=len(tokenizer), d_model=width, d_kv=8, num_heads=2, num_layers=1, d_ff=32,
        pad_token_id=tokenizer.pad_token_id, decoder_start_token_id=0,
    )
    return tokenizer, encoder_class(config).eval()


@pytest.fixture(scope="module")
def pixart_folder(tmp_path_factory):
    """A PixArt-Σ pipeline of tiny parts with random weights, saved like a real one."""
    import diffusers
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtSigmaPipeline
    from transformers import T5Config, T5EncoderModel

    from mame_diffusers.dit_integration import transformer_config

    torch.manual_seed(0)
    tokenizer, text_encoder = _tiny_tokenizer_and_t5(T5EncoderModel, T5Config, 32)
    config = transformer_config("pixart", "tiny")
    config["sample_size"] = 32  # the pipeline's resolution binning knows 32 (256 pixels)
    transformer = getattr(diffusers, config.pop("_class_name")).from_config(config).eval()
    vae = AutoencoderKL(
        block_out_channels=[8, 8, 16, 16], down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, latent_channels=4, layers_per_block=1, norm_num_groups=4,
    ).eval()
    pipe = PixArtSigmaPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=DPMSolverMultistepScheduler(),
    )
    folder = tmp_path_factory.mktemp("pixart") / "pipeline"
    pipe.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def wan_folder(tmp_path_factory):
    """A Wan 2.1 pipeline of tiny parts with random weights, saved like a real one."""
    from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
    from transformers import UMT5Config, UMT5EncoderModel

    from mame_diffusers.dit_integration import build_transformer

    torch.manual_seed(0)
    tokenizer, text_encoder = _tiny_tokenizer_and_t5(UMT5EncoderModel, UMT5Config, 16)
    vae = AutoencoderKLWan(
        base_dim=8, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1, latents_mean=[0.0] * 4, latents_std=[1.0] * 4
    ).eval()
    pipe = WanPipeline(
        tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=build_transformer("wan", "tiny"),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )
    folder = tmp_path_factory.mktemp("wan") / "pipeline"
    pipe.save_pretrained(folder)
    return str(folder)


def test_load_pipeline_takes_a_dit_pipeline_folder(pixart_folder):
    from mame_diffusers.loading import is_dit_pipeline, load_pipeline, patch_target

    pipe = load_pipeline(pixart_folder, quick=False, device=torch.device("cpu"), dtype=torch.bfloat16)
    assert type(pipe).__name__ == "PixArtSigmaPipeline" and is_dit_pipeline(pipe) and patch_target(pipe) is pipe
    assert pipe.transformer.dtype == torch.bfloat16


def test_bench_model_times_a_dit_pipelines_transformer(pixart_folder, tmp_path):
    argv = ["bench", "--model", pixart_folder, "--resolution", "256", "--repeats", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    report = json.loads((tmp_path / "bench.json").read_text())
    assert [row["method"] for row in report["rows"]] == ["stock", "MaMe (defaults)"]
    assert report["rows"][0]["error"] == 0.0 and report["rows"][1]["error"] > 0
    assert report["setup"]["family"] == "pixart" and pixart_folder in report["setup"]["model"]


def test_generate_grid_with_a_dit_pipeline(pixart_folder, tmp_path):
    from PIL import Image

    argv = ["generate", "--model", pixart_folder, "--resolution", "256", "--steps", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    grid = Image.open(tmp_path / "generate.png")
    assert grid.size == (2 * 256, 256 + 24)  # stock | MaMe: tomesd patches UNets only


def test_generate_prompts_with_a_dit_pipeline_merges_its_transformer(pixart_folder, tmp_path):
    from PIL import Image, ImageChops

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n")
    out = tmp_path / "out"
    argv = ["generate", "--model", pixart_folder, "--prompts", str(prompts), "--resolution", "256", "--steps", "2",
            "--compare", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    records = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert [r["file"] for r in records] == ["00000.png", "00001.png"]
    assert records[0]["settings"] == {"ratio": 0.5} and records[0]["model"] == pixart_folder  # the DiT default
    assert "frames" not in records[0]
    mame, stock = Image.open(out / "00000.png"), Image.open(out / "stock" / "00000.png")
    assert mame.size == stock.size == (256, 256)
    assert ImageChops.difference(mame.convert("RGB"), stock.convert("RGB")).getbbox() is not None  # merged


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--method", "tomesd"], "--method tomesd does not apply to diffusion transformers"),
        (["--mame", "min_latent_tokens=0"], "bad MaMe settings"),
        (["--frames", "9"], "--frames applies to video models"),
        (["--quick"], "cannot be combined with --model"),
    ],
)
def test_generate_with_a_dit_pipeline_refuses_unet_options(pixart_folder, tmp_path, capsys, extra, message):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    argv = ["generate", "--model", pixart_folder, "--prompts", str(prompts), "--out", str(tmp_path / "o"), *extra]
    status, err = exit_status_and_error(argv, capsys)
    assert status == 2 and message in err and "Traceback" not in err


def test_generate_prompts_with_wan_writes_animated_pngs(wan_folder, tmp_path, capsys):
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat walking\n")
    out = tmp_path / "out"
    argv = ["generate", "--model", wan_folder, "--prompts", str(prompts), "--resolution", "64", "--frames", "5",
            "--steps", "2", "--mame", "min_image_tokens=0", "--device", "cpu", "--out", str(out)]
    assert main(argv) == 0
    (record,) = [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]
    assert record["frames"] == 5 and record["settings"] == {"ratio": 0.5, "min_image_tokens": 0}
    video = Image.open(out / "00000.png")
    assert video.size == (112, 64) and getattr(video, "n_frames", 1) == 5  # Wan's 480p shape, 5 frames
    # Resuming with other frames would mix two experiments in one folder.
    status, err = exit_status_and_error([*argv, "--frames", "9"], capsys)
    assert status == 2 and "frames=5 (this run: frames=9)" in err
