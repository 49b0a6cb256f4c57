"""The command line: the main job on a tiny model, and one-line errors for bad input."""

from __future__ import annotations

import json

import pytest
import torch

from mame_diffusers.cli import main

from .cli_runs import exit_status_and_error


def test_bench_quick_writes_table_json_and_plot(tmp_path, capsys):
    assert main(["bench", "--quick", "--repeats", "1", "--steps", "1", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "| method |" in printed and "baseline (SDPA)" in printed and "MaMe" in printed
    report = json.loads((tmp_path / "bench.json").read_text())
    names = [row["method"] for row in report["rows"]]
    assert names[0] == "baseline (SDPA)" and any(n.startswith("MaMe") for n in names)
    assert all(row["seconds"] > 0 and row["pipeline_seconds"] > 0 for row in report["rows"])
    assert report["environment"]["torch"] == torch.__version__ and report["setup"]["batch"] == 2
    assert (tmp_path / "bench.md").read_text().count("|") > 10
    assert (tmp_path / "bench.png").stat().st_size > 1000
    # MaMe's row has its peer at the same attention cost: tomesd (at MaMe's max_downsample)
    # attends N/4 x N/4, MaMe N/2 queries x N/8 keys; both merge + restore; and the tiny model
    # is flagged.
    attends = {row["method"]: row["attends"] for row in report["rows"]}
    assert attends["tomesd (ratio=0.75, max_downsample=2)"] == "Q/K/V N/4"
    assert attends["MaMe (ratio=0.75)"] == "Q N/2, K/V N/8"
    assert any("tiny model" in note for note in report["warnings"]) and "warning: tiny model" in printed
    assert all(row["min_seconds"] <= row["seconds"] <= row["max_seconds"] for row in report["rows"])


def test_bench_flags_noisy_rounds_and_a_missing_peer():
    from mame_diffusers.benchmarking.runs import bench_warnings

    rows = [{"method": "baseline (SDPA)", "spread": 0.04}, {"method": "MaMe (ratio=0.75)", "spread": 0.25}]
    notes = bench_warnings(rows, tiny=False, tomesd_installed=False)
    assert len(notes) == 2
    assert "MaMe (ratio=0.75) 25%" in notes[0] and "baseline" not in notes[0]
    assert "tomesd is not installed" in notes[1]
    assert bench_warnings(rows[:1], tiny=False, tomesd_installed=True) == []


def test_bench_flags_noisy_pipeline_rounds_too():
    # Issue 24: only the UNet column's spread was checked; the pipeline rounds (the
    # seconds people compare) could spread any amount without a warning.
    from mame_diffusers.benchmarking.runs import bench_warnings

    rows = [
        {"method": "baseline (SDPA)", "spread": 0.02, "pipeline_all_seconds": [1.0, 1.05]},
        {"method": "MaMe (ratio=0.75)", "spread": 0.03, "pipeline_all_seconds": [1.0, 1.4, 1.1]},
    ]
    (note,) = bench_warnings(rows, tiny=False, tomesd_installed=True)
    assert "MaMe (ratio=0.75) pipeline 36%" in note and "baseline" not in note and "--pipeline-rounds" in note
    rows[1]["pipeline_all_seconds"] = [1.0, 1.05]
    assert bench_warnings(rows, tiny=False, tomesd_installed=True) == []
    assert bench_warnings([{"method": "x", "pipeline_all_seconds": [2.0]}], tiny=False, tomesd_installed=True) == []


def test_bench_without_scikit_image_is_an_error_not_noise(monkeypatch):
    import sys
    import types

    from mame_diffusers.benchmarking import runs

    monkeypatch.setitem(sys.modules, "skimage.data", None)  # import skimage.data raises ImportError
    with pytest.raises(runs.UsageError, match="scikit-image"):
        runs._latents(types.SimpleNamespace(vae_scale_factor=8), 64, 2, 0)


def test_generate_quick_writes_a_grid(tmp_path):
    assert main(["generate", "--quick", "--steps", "1", "--out", str(tmp_path)]) == 0
    from PIL import Image

    grid = Image.open(tmp_path / "generate.png")
    assert grid.width >= 2 * 128 and grid.height == 128 + 24


@pytest.mark.parametrize(
    "argv,message",
    [
        (["bench", "--ratios", "1.5"], "ratio must be in [0, 1)"),
        (["bench", "--tau", "0.1"], "unrecognized arguments: --tau"),  # left the command line
        (["bench", "--repeats", "0"], "expected a positive integer"),
        (["bench", "--resolution", "100"], "multiple of 8"),
        (["bench", "--model", "/no/such/model/folder"], "cannot load model"),
        (["bench", "--quick", "--dtype", "float16"], "float16"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(argv, message, capsys):
    status, err = exit_status_and_error(argv, capsys)
    assert status == 2
    assert message in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.startswith("mame-diffusers")]) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu_is_one_clear_line(capsys):
    assert main(["bench", "--quick", "--device", "cuda"]) == 2
    assert "no GPU" in capsys.readouterr().err


def test_help_and_version_import_no_model_library():
    # `mame-diffusers --help` must answer at once: torch, diffusers and transformers take
    # seconds to import; the defaults it shows come from a light module.
    code = (
        "import sys; from mame_diffusers.cli import main\n"
        "for argv in (['--version'], ['--help'], ['bench', '--help'], ['generate', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules))"
    )
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip().endswith("[]"), result.stdout
    assert "mame-diffusers 0." in result.stdout


def test_building_the_offline_pipeline_prints_no_warnings():
    # Issue 10: diffusers' "modules should be kept in float32: []" on every dtype cast, and
    # transformers' torchvision notices on importing the Stable Diffusion pipeline.
    import subprocess
    import sys

    code = (
        "import torch; from mame_diffusers.benchmarking.runs import load_pipeline; "
        "load_pipeline(None, quick=True, device=torch.device('cpu'), dtype=torch.bfloat16)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""


def _option_help(text: str, option: str) -> str:
    """The help of ``option`` in ``--help`` output, its wrapped lines joined."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"  {option} "))
    block = [lines[start]]
    for line in lines[start + 1 :]:
        if line.startswith("  -"):  # the next option (help lines are indented further)
            break
        block.append(line)
    return " ".join(" ".join(block).split())


@pytest.mark.parametrize(
    "command,option,default",
    [
        ("generate", "--resolution", "(default: 512; 128 with --quick)"),
        ("generate", "--steps", "(default: 25)"),
        ("generate", "--ratio", "(default: 0.75)"),
        ("generate", "--batch-size", "(default: 1)"),
        ("generate", "--seed", "(default: 0)"),
        ("generate", "--dtype", "(default: float32)"),
        ("generate", "--out", "(default: outputs)"),
        ("bench", "--resolution", "(default: 512; 128 with --quick)"),
        ("bench", "--steps", "(default: 2)"),
        ("bench", "--repeats", "(default: 3)"),
        ("bench", "--pipeline-rounds", "(default: 2)"),
        ("bench", "--ratios", "(default: 0.75)"),
        ("bench", "--device", "(default: cpu)"),
    ],
)
def test_help_shows_every_default(command, option, default, capsys):
    # Issue 24: --help listed the options without their defaults.
    with pytest.raises(SystemExit):
        main([command, "--help"])
    assert default in _option_help(capsys.readouterr().out, option)


def test_help_shows_no_empty_defaults(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: False)" not in text
