"""``mame-diffusers generate --prompts``: prompt parsing, resuming, atomic writes, and two CPU
processes under ``accelerate launch`` on the tiny model (same images as one process)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mame_diffusers import generation
from mame_diffusers.cli import main
from mame_diffusers.generation import (
    Job,
    UsageError,
    append_record,
    conflicting_setting,
    latest_records,
    merge_manifest,
    parse_mame_settings,
    parse_prompts,
    pending_jobs,
    plan_jobs,
    read_prompts,
    read_records,
    write_image_atomically,
)

from .cli_runs import exit_status_and_error

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ["a photo of a cat", "a red city at night", "a blue sky", "a dog in the forest", "a mountain river"]
#: Small and quick: 64x64 (8x8 latents), 2 steps; on the CPU also where there is a GPU.
ARGS = ["generate", "--quick", "--resolution", "64", "--steps", "2", "--device", "cpu"]


# -- prompts and settings -------------------------------------------------------------------------


def test_prompts_one_per_line_blank_lines_ignored(tmp_path):
    assert parse_prompts("a cat\n\n   \n  a dog  \r\nthe sky") == ["a cat", "a dog", "the sky"]
    path = tmp_path / "p.txt"
    path.write_text("\n  \n", encoding="utf-8")
    with pytest.raises(UsageError, match="no prompts"):
        read_prompts(path)
    with pytest.raises(UsageError, match="cannot read"):
        read_prompts(tmp_path / "missing.txt")
    path.write_text("\nun chat\n\nein Hund ☀\n", encoding="utf-8")
    assert read_prompts(path) == ["un chat", "ein Hund ☀"]


def test_jobs_get_seed_plus_index():
    jobs = plan_jobs(["a", "b", "c"], seed=10)
    assert [(j.index, j.prompt, j.seed, j.file) for j in jobs] == [
        (0, "a", 10, "00000.png"),
        (1, "b", 11, "00001.png"),
        (2, "c", 12, "00002.png"),
    ]


def test_mame_settings_from_the_command_line():
    settings = parse_mame_settings(
        ["min_latent_tokens=0", "stack_ratio=0.5", "anchor=strided", "straight_through=true", "block=none"]
    )
    assert settings == {
        "min_latent_tokens": 0,
        "stack_ratio": 0.5,
        "anchor": "strided",
        "straight_through": True,
        "block": None,
    }
    assert type(settings["min_latent_tokens"]) is int
    with pytest.raises(UsageError, match="KEY=VALUE"):
        parse_mame_settings(["min_latent_tokens"])
    with pytest.raises(UsageError, match="--ratio"):
        parse_mame_settings(["ratio=0.5"])


# -- what is done, what is redone -----------------------------------------------------------------


def _record(job: Job, **extra):
    return {"index": job.index, "prompt": job.prompt, "seed": job.seed, "file": job.file, **extra}


def test_pending_skips_exactly_the_recorded_images_that_exist():
    jobs = plan_jobs(["a", "b", "c", "d", "e"], seed=0)
    records = [_record(jobs[0]), _record(jobs[1]), _record(jobs[2]), _record(jobs[4])]
    existing = {"00000.png", "00002.png", "00003.png", "00004.png", "manifest.jsonl"}
    # 1: recorded, image deleted by hand -> redo; 3: image without a line (killed between
    # the two writes) -> redo; 0, 2, 4: done.
    assert [j.index for j in pending_jobs(jobs, records, existing)] == [1, 3]
    assert pending_jobs(jobs, [], existing) == jobs
    assert pending_jobs(jobs, records + [_record(jobs[1]), _record(jobs[3])], existing | {"00001.png"}) == []


def test_pending_redoes_an_edited_prompt_and_reads_the_latest_record():
    old = plan_jobs(["a", "b"], seed=0)
    new = plan_jobs(["a", "B!"], seed=0)
    existing = {"00000.png", "00001.png"}
    assert [j.index for j in pending_jobs(new, [_record(j) for j in old], existing)] == [1]
    # The redo's record is later: it wins over the earlier one, whatever the line order.
    records = [_record(new[1], finished=2.0), _record(old[1], finished=1.0), _record(old[0])]
    assert latest_records(records)[1]["prompt"] == "B!"
    assert pending_jobs(new, records, existing) == []


def test_resuming_with_other_settings_is_refused():
    jobs = plan_jobs(["a"], seed=3)
    identity = {"method": "mame", "settings": {"ratio": 0.75}, "model": "m", "resolution": 64, "steps": 2, "dtype": "float32"}
    records = [_record(jobs[0], **identity)]
    assert conflicting_setting(records, identity, seed=3) is None
    assert "steps=2" in conflicting_setting(records, {**identity, "steps": 4}, seed=3)
    assert "settings" in conflicting_setting(records, {**identity, "settings": {"ratio": 0.5}}, seed=3)
    assert "seed=3" in conflicting_setting(records, identity, seed=4)


# -- writing --------------------------------------------------------------------------------------


def test_images_are_written_atomically(tmp_path):
    image = Image.new("RGB", (8, 8), "red")
    path = write_image_atomically(image, tmp_path / "00000.png")
    assert os.listdir(tmp_path) == ["00000.png"]
    assert np.array_equal(np.asarray(Image.open(path)), np.asarray(image))

    class Broken:
        def save(self, handle, format):
            handle.write(b"half a png")
            raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        write_image_atomically(Broken(), tmp_path / "00001.png")
    assert os.listdir(tmp_path) == ["00000.png"]  # no partial image, no temporary left


def test_manifest_parts_merge_and_torn_lines_are_redone(tmp_path):
    jobs = plan_jobs(["a", "b", "c"], seed=0)
    for job in jobs:
        Image.new("RGB", (8, 8)).save(tmp_path / job.file)
    parts = tmp_path / generation.PARTS
    parts.mkdir()
    append_record(parts / "process-000.jsonl", _record(jobs[0], finished=1.0))
    append_record(parts / "process-001.jsonl", _record(jobs[1], finished=1.0))
    with open(parts / "process-001.jsonl", "a") as handle:
        handle.write('{"index": 2, "prompt": "c", "se')  # a process killed mid-line
    records = read_records(tmp_path)
    assert [r["index"] for r in records] == [0, 1]
    assert [j.index for j in pending_jobs(jobs, records, set(os.listdir(tmp_path)))] == [2]

    (tmp_path / jobs[1].file).unlink()  # deleted by hand: no line for a missing image
    assert merge_manifest(tmp_path)
    lines = [json.loads(line) for line in (tmp_path / "manifest.jsonl").read_text().splitlines()]
    assert [line["index"] for line in lines] == [0]
    assert not parts.exists()
    assert not merge_manifest(tmp_path)  # nothing new: the manifest is left as it is
    assert [j.index for j in pending_jobs(jobs, read_records(tmp_path), set(os.listdir(tmp_path)))] == [1, 2]


# -- the command line -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv,message",
    [
        (["generate", "--prompt", "x", "--prompts", "p.txt"], "not allowed with argument"),
        (["generate", "--quick", "--prompts", "/no/such/prompts.txt"], "cannot read prompts"),
        (["generate", "--quick", "--compare"], "apply to --prompts"),
        (["generate", "--quick", "--prompts", "PROMPTS", "--mame", "nonsense"], "KEY=VALUE"),
        (["generate", "--quick", "--prompts", "PROMPTS", "--mame", "frobnicate=1"], "bad MaMe settings"),
        (["generate", "--quick", "--prompts", "PROMPTS", "--method", "stock", "--compare"], "--compare"),
        (["generate", "--quick", "--prompts", "PROMPTS", "--method", "stock", "--mame", "block=4"], "--method mame"),
    ],
)
def test_bad_generate_arguments_give_one_line_and_exit_2(argv, message, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    argv = [str(prompts) if a == "PROMPTS" else a for a in argv] + ["--out", str(tmp_path / "out")]
    status, err = exit_status_and_error(argv, capsys)
    assert status == 2
    assert message in err and "Traceback" not in err


def test_help_shows_the_batch_options(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = capsys.readouterr().out
    for option in ("--prompts", "--method", "--mame", "--compare", "--ratio", "--tau"):
        assert option in text


# -- one process, then two under accelerate launch -------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(tmp_path: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    """Two CPU processes started by accelerate's launcher (torchrun underneath)."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch",
        "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no",
        "--main_process_port", str(_free_port()),
        "-m", "mame_diffusers.cli",
        *ARGS, "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out), *extra,
    ]  # fmt: skip
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf"),  # no accelerate config from the user's home
        "HF_HUB_OFFLINE": "1",
        "ACCELERATE_USE_CPU": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path)


def _state(folder: Path, pattern: str = "*.png") -> dict[str, tuple[int, int, bytes]]:
    """Each file's inode, modification time and bytes: a rewrite changes at least one."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.glob(pattern))}


def _manifest(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "manifest.jsonl").read_text().splitlines()]


def _main_one_thread(argv: list[str]) -> int:
    """``main(argv)`` on one thread, as each of the launcher's CPU processes runs
    (OMP_NUM_THREADS=1): on a CPU the thread count changes the rounding of float sums (a
    pixel off by one here and there), so equal images need equal threads per process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main(argv)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same five prompts: once in this process, twice with two processes (the second a
    resume with nothing left to do)."""
    tmp_path = tmp_path_factory.mktemp("generate")
    (tmp_path / "prompts.txt").write_text("\n" + "\n\n".join(PROMPTS) + "\n\n")
    single = tmp_path / "single"
    assert _main_one_thread([*ARGS, "--prompts", str(tmp_path / "prompts.txt"), "--out", str(single)]) == 0
    two = tmp_path / "two"
    first = _launch(tmp_path, two, "--compare")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-5000:]
    before = {"mame": _state(two, "*.*"), "stock": _state(two / "stock", "*.*")}
    second = _launch(tmp_path, two, "--compare")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-5000:]
    return {"tmp": tmp_path, "single": single, "two": two, "first": first, "second": second, "before": before}


def test_two_processes_share_the_work(runs):
    two = runs["two"]
    for folder, method in ((two, "mame"), (two / "stock", "stock")):
        assert sorted(p.name for p in folder.glob("*.png")) == [f"{i:05d}.png" for i in range(5)]
        lines = _manifest(folder)
        assert [line["index"] for line in lines] == list(range(5))
        assert [line["prompt"] for line in lines] == PROMPTS
        assert [line["seed"] for line in lines] == list(range(5))
        assert {line["process_index"] for line in lines} == {0, 1}
        assert {line["num_processes"] for line in lines} == {2}
        assert all(line["method"] == method and line["seconds"] > 0 for line in lines)
        assert all(line["device"].startswith("cpu") and line["batch"] == 1 for line in lines)
        assert all(line["resolution"] == 64 and line["steps"] == 2 for line in lines)
        assert not (folder / generation.PARTS).exists()
        assert not [p for p in folder.iterdir() if ".tmp-" in p.name]
    assert _manifest(two)[0]["settings"] == {"ratio": 0.75, "tau": 0.0}


def test_only_the_main_process_reports(runs):
    out = runs["first"].stdout
    assert out.count("| method | processes |") == 1 and out.count("wrote ") == 4
    summary = json.loads((runs["two"] / "summary.json").read_text())
    mame, stock = summary["runs"]
    assert (mame["method"], stock["method"]) == ("MaMe", "stock")
    assert mame["images"] == stock["images"] == 5 and mame["processes"] == 2
    assert sorted(p["process_index"] for p in mame["per_process"]) == [0, 1]
    assert mame["images_per_second"] > 0 and mame["speedup"] > 0 and stock["speedup"] == pytest.approx(1.0)
    assert "| MaMe |" in (runs["two"] / "summary.md").read_text()


def test_a_second_run_rewrites_nothing(runs):
    two = runs["two"]
    # Images, manifests and the first run's summary: not one file written again.
    assert runs["before"] == {"mame": _state(two, "*.*"), "stock": _state(two / "stock", "*.*")}
    assert len(_manifest(two)) == len(_manifest(two / "stock")) == 5
    out = runs["second"].stdout
    assert "nothing left to do" in out and "wrote " not in out
    assert "| MaMe | 2 | 0 | 5 |" in out and "| stock | 2 | 0 | 5 |" in out


def test_one_and_two_processes_make_the_same_images(runs):
    single, two = runs["single"], runs["two"]
    assert {line["process_index"] for line in _manifest(single)} == {0}
    for index in range(5):
        name = f"{index:05d}.png"
        one = np.asarray(Image.open(single / name))
        other = np.asarray(Image.open(two / name))
        assert one.shape == (64, 64, 3)
        assert np.array_equal(one, other), f"{name} differs between 1 and 2 processes"


def test_a_deleted_image_is_redone_and_nothing_else(runs):
    single = runs["single"]
    before = _state(single)
    (single / "00002.png").unlink()
    assert _main_one_thread([*ARGS, "--prompts", str(runs["tmp"] / "prompts.txt"), "--out", str(single)]) == 0
    after = _state(single)
    assert after["00002.png"][2] == before["00002.png"][2]  # the same image again
    assert {k: v for k, v in after.items() if k != "00002.png"} == {k: v for k, v in before.items() if k != "00002.png"}
    lines = _manifest(single)
    assert [line["index"] for line in lines] == list(range(5))
    # Resuming into the same folder with other settings is refused instead of mixing them.
    assert main([*ARGS, "--prompts", str(runs["tmp"] / "prompts.txt"), "--out", str(single), "--ratio", "0.5"]) == 2


def test_batches_and_mame_settings_travel_into_the_manifest(tmp_path):
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS[:3]))
    out = tmp_path / "out"
    argv = [*ARGS, "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out), "--batch-size", "2"]
    assert _main_one_thread([*argv, "--ratio", "0.5", "--mame", "min_latent_tokens=0", "--mame", "query_share=1"]) == 0
    lines = _manifest(out)
    assert [(line["index"], line["batch"]) for line in lines] == [(0, 2), (1, 2), (2, 1)]
    assert all(line["method"] == "mame" for line in lines)
    assert lines[0]["settings"] == {"ratio": 0.5, "tau": 0.0, "min_latent_tokens": 0, "query_share": 1}
    assert len(list(out.glob("*.png"))) == 3
