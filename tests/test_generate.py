"""``mame-diffusers generate --prompts``: prompt parsing, resuming, atomic writes, and two CPU
processes under ``accelerate launch`` on the tiny model (same images as one process)."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time
import types
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
    next_sequence,
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


def test_prompts_split_at_newlines_only(tmp_path):
    # Issue 24: str.splitlines also split at U+2028, U+0085 and form feeds, which editors
    # show inside a line: one prompt became two and every later index moved.
    text = "a cat\u2028on a mat\nform\x0cfeed\r\nnext\x85line\n\u2028\nlast"
    assert parse_prompts(text) == ["a cat\u2028on a mat", "form\x0cfeed", "next\x85line", "last"]
    path = tmp_path / "p.txt"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # with a byte-order mark
    assert read_prompts(path)[0] == "a cat\u2028on a mat"
    # The manifest too: json.dumps leaves U+2028 and U+0085 as they are, inside one line.
    jobs = plan_jobs(parse_prompts(text), seed=0)
    for job in jobs:
        append_record(tmp_path / "manifest.jsonl", _record(job))
    assert [r["prompt"] for r in read_records(tmp_path)] == [j.prompt for j in jobs]


def test_a_prompts_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes("un café\n".encode("latin-1"))
    with pytest.raises(UsageError, match="not UTF-8"):
        read_prompts(prompts)
    status, err = exit_status_and_error([*ARGS, "--prompts", str(prompts), "--out", str(tmp_path / "out")], capsys)
    assert status == 2 and "not UTF-8" in err and "Traceback" not in err


def test_jobs_get_seed_plus_index():
    jobs = plan_jobs(["a", "b", "c"], seed=10)
    assert [(j.index, j.prompt, j.seed, j.file) for j in jobs] == [
        (0, "a", 10, "00000.png"),
        (1, "b", 11, "00001.png"),
        (2, "c", 12, "00002.png"),
    ]


def test_mame_settings_from_the_command_line():
    settings = parse_mame_settings(
        ["min_latent_tokens=0", "stack_ratio=0.5", "backend=torch", "keys_values_only=true", "block=none"]
    )
    assert settings == {
        "min_latent_tokens": 0,
        "stack_ratio": 0.5,
        "backend": "torch",
        "keys_values_only": True,
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
    records = [_record(new[1], sequence=1), _record(old[1], sequence=0), _record(old[0])]
    assert latest_records(records)[1]["prompt"] == "B!"
    assert pending_jobs(new, records, existing) == []


def test_the_newest_record_wins_whatever_the_clocks_say():
    # Issue 24: records were ordered by `finished` (wall clock): one written by a clock that
    # was ahead won over every newer record of its image.
    old, new = plan_jobs(["a", "b"], seed=0), plan_jobs(["a", "B!"], seed=0)
    ahead = _record(old[1], sequence=0, finished=4_000_000_000.0)  # a clock years ahead
    redone = _record(new[1], sequence=1, finished=1_700_000_000.0)
    for records in ([ahead, redone], [redone, ahead]):
        assert latest_records(records)[1]["prompt"] == "B!"
        assert pending_jobs(new, records, {"00000.png", "00001.png"}) == [new[0]]
    # A run's records come after everything it read; records from before sequences existed
    # count as older than any with one, and among themselves the later line wins.
    assert next_sequence([]) == 0 and next_sequence([ahead, redone, _record(old[0])]) == 2
    legacy = [_record(old[1], finished=9e9), _record(new[1], finished=1.0)]
    assert latest_records(legacy)[1]["prompt"] == "B!"
    assert latest_records([*legacy[::-1], _record(old[1], sequence=0)])[1]["prompt"] == "b"


def test_malformed_records_are_skipped_and_their_images_redone(tmp_path):
    # Issue 24: a manifest field of the wrong type (by hand, or another tool) was a traceback.
    jobs = plan_jobs(["a", "b", "c", "d", "e", "f"], seed=0)
    identity = {"method": "mame", "settings": {"ratio": 0.75}, "model": "m", "resolution": 64, "steps": 2, "dtype": "float32"}
    good = _record(jobs[0], **identity)
    bad = [
        {**_record(jobs[1], **identity), "seed": "1"},
        {**_record(jobs[2], **identity), "index": "2"},
        {**_record(jobs[3], **identity), "index": True},
        {**_record(jobs[4], **identity), "prompt": 5},
        {**_record(jobs[5], **identity), "sequence": "x"},
        {**_record(jobs[5], **identity), "index": -5},
        {**_record(jobs[5], **identity), "file": None},
    ]
    lines = [json.dumps(r) for r in [good, *bad]] + ["[1, 2]", "7", "null", "[" * 100_000]
    (tmp_path / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    for job in jobs:
        Image.new("RGB", (8, 8)).save(tmp_path / job.file)
    records = read_records(tmp_path)
    assert records == [good]
    assert conflicting_setting(bad, identity, seed=0) is None
    assert [j.index for j in pending_jobs(jobs, [good, *bad], set(os.listdir(tmp_path)))] == [1, 2, 3, 4, 5]
    assert merge_manifest(tmp_path) and read_records(tmp_path) == [good]


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
    for option in ("--prompts", "--method", "--mame", "--compare", "--ratio"):
        assert option in text
    assert "--tau" not in text


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
        assert not (folder / generation.PARTS).exists() and not (folder / generation.LOCK).exists()
        assert not [p for p in folder.iterdir() if ".tmp-" in p.name or ".write-probe" in p.name]
    assert _manifest(two)[0]["settings"] == {"ratio": 0.75}


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
    assert _main_one_thread([*argv, "--ratio", "0.5", "--mame", "min_latent_tokens=0", "--mame", "keys_values_only=true"]) == 0
    lines = _manifest(out)
    assert [(line["index"], line["batch"]) for line in lines] == [(0, 2), (1, 2), (2, 1)]
    assert all(line["method"] == "mame" for line in lines)
    assert lines[0]["settings"] == {"ratio": 0.5, "min_latent_tokens": 0, "keys_values_only": True}
    assert len(list(out.glob("*.png"))) == 3


# -- one run per folder, clocks and failing writes (issue 24) -------------------------------------


def _generate_into(tmp_path: Path, out: Path, prompts: list[str], *extra: str) -> int:
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return _main_one_thread([*ARGS, "--steps", "1", "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out), *extra])


def _argv(tmp_path: Path, out: Path, prompts: list[str]) -> list[str]:
    (tmp_path / "prompts.txt").write_text("\n".join(prompts) + "\n")
    return [*ARGS, "--steps", "1", "--prompts", str(tmp_path / "prompts.txt"), "--out", str(out)]


def _must_not_load(*args, **kwargs):
    raise AssertionError("the model was loaded before the output folder was checked")


_HOLD_LOCK = (
    "import sys\n"
    "from mame_diffusers.generation import lock_folder\n"
    "with lock_folder(sys.argv[1]):\n"
    "    print('locked', flush=True)\n"
    "    sys.stdin.read()\n"
)


def test_a_second_run_into_a_folder_is_refused_while_the_first_runs(tmp_path, monkeypatch, capsys):
    # Issue 24: of two runs into one folder, the first to finish merged the manifest and
    # deleted manifest.parts/ under the other, which died with a FileNotFoundError traceback.
    from mame_diffusers import loading

    out = tmp_path / "out"
    out.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    first = subprocess.Popen(
        [sys.executable, "-c", _HOLD_LOCK, str(out)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env
    )
    try:
        assert first.stdout.readline().strip() == "locked"
        with monkeypatch.context() as patched:
            patched.setattr(loading, "load_pipeline", _must_not_load)
            status, err = exit_status_and_error(_argv(tmp_path, out, ["a cat"]), capsys)
        assert status == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
        assert str(out / generation.LOCK) in err and f"pid {first.pid} on {socket.gethostname()}" in err
        assert not list(out.glob("*.png"))
    finally:
        first.send_signal(signal.SIGKILL)  # no clean-up: the lock file stays behind
        first.wait()
    # The system dropped the killed run's lock with its process: the next run goes ahead.
    assert (out / generation.LOCK).exists()
    assert _generate_into(tmp_path, out, ["a cat"]) == 0
    assert [p.name for p in out.glob("*.png")] == ["00000.png"] and not (out / generation.LOCK).exists()


@pytest.mark.parametrize("file_locks", [True, False], ids=["flock", "no-file-locks"])
def test_the_folder_lock_names_its_holder_and_a_gone_holder_is_taken_over(tmp_path, monkeypatch, file_locks):
    if not file_locks:  # a file system without flock (or Windows): the file itself is the lock
        monkeypatch.setattr(generation, "_flock", lambda descriptor: None)
    lock = tmp_path / generation.LOCK
    with generation.lock_folder(tmp_path) as held:
        assert held == lock and json.loads(lock.read_text())["pid"] == os.getpid()
        with pytest.raises(UsageError, match=f"held by pid {os.getpid()} on {socket.gethostname()}") as refused:
            with generation.lock_folder(tmp_path):
                pass
        assert str(lock) in str(refused.value) and ("delete" in str(refused.value)) is not file_locks
    assert not lock.exists()
    # Left behind by a process that is gone from this host: taken over.
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    lock.write_text(json.dumps({"pid": gone.pid, "host": socket.gethostname(), "started": "then"}))
    with generation.lock_folder(tmp_path):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert not lock.exists()


def test_temporaries_of_a_live_writer_are_kept(tmp_path):
    # Issue 24: a starting run removed every temporary file, also those a live process was
    # still writing.
    live = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    try:
        (tmp_path / f".00000.png.tmp-{live.pid}").write_bytes(b"being written")
        (tmp_path / f".00001.png.tmp-{gone.pid}").write_bytes(b"left by a killed run")
        (tmp_path / "00002.png").write_bytes(b"an image")
        generation._remove_stale_temporaries(tmp_path)
        assert sorted(os.listdir(tmp_path)) == [f".00000.png.tmp-{live.pid}", "00002.png"]
    finally:
        live.kill()
        live.wait()


def test_a_record_from_a_clock_that_is_ahead_does_not_win(tmp_path, monkeypatch):
    # Issue 24: a record written while the clock was ahead (another node's, or one stepped
    # back since) won over the newer ones: the manifest named the wrong prompt for the image,
    # and the image was redone on every run.
    out = tmp_path / "out"
    years_ahead = types.SimpleNamespace(
        time=lambda: time.time() + 10 * 365 * 86400, perf_counter=time.perf_counter, strftime=time.strftime
    )
    with monkeypatch.context() as patched:
        patched.setattr(generation, "time", years_ahead)
        assert _generate_into(tmp_path, out, ["a cat", "a dog"]) == 0
    assert _generate_into(tmp_path, out, ["a cat", "a red dog"]) == 0  # the image of the new prompt
    assert [line["prompt"] for line in _manifest(out)] == ["a cat", "a red dog"]
    before = _state(out)
    assert _generate_into(tmp_path, out, ["a cat", "a red dog"]) == 0
    assert _state(out) == before  # nothing redone


def test_a_full_disk_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real = generation.write_image_atomically

    def disk_fills_up(image, path):
        if Path(path).name == "00001.png":
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real(image, path)

    with monkeypatch.context() as patched:
        patched.setattr(generation, "write_image_atomically", disk_fills_up)
        status, err = exit_status_and_error(_argv(tmp_path, out, ["a cat", "a dog", "the sky"]), capsys)
    assert status == 2 and "Traceback" not in err, err
    assert len([line for line in err.splitlines() if line.startswith("mame-diffusers")]) == 1, err
    assert "00001.png: the disk is full" in err and "run the same command again" in err
    assert [p.name for p in out.glob("*.png")] == ["00000.png"] and not (out / generation.LOCK).exists()
    assert _generate_into(tmp_path, out, ["a cat", "a dog", "the sky"]) == 0
    assert [line["index"] for line in _manifest(out)] == [0, 1, 2]


def test_an_output_folder_that_cannot_be_written_is_one_line_before_the_model_loads(tmp_path, monkeypatch, capsys):
    from mame_diffusers import loading

    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    real_open = os.open

    def read_only(path, flags, *args, **kwargs):
        if ".write-probe" in os.fspath(path):
            raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    with monkeypatch.context() as patched:
        patched.setattr(loading, "load_pipeline", _must_not_load)
        status, err = exit_status_and_error(_argv(tmp_path, blocker / "out", ["a cat"]), capsys)
        assert status == 2 and "cannot write" in err and "Traceback" not in err, err
        patched.setattr(os, "open", read_only)
        status, err = exit_status_and_error(_argv(tmp_path, tmp_path / "read-only", ["a cat"]), capsys)
        assert status == 2 and "the file system is read-only" in err and "Traceback" not in err, err
        if os.geteuid() != 0:  # root writes into any folder
            locked = tmp_path / "locked"
            locked.mkdir(mode=0o555)
            status, err = exit_status_and_error(_argv(tmp_path, locked, ["a cat"]), capsys)
            assert status == 2 and "permission denied" in err, err
    assert not [p for p in (tmp_path / "read-only").iterdir()]  # no probe left behind
