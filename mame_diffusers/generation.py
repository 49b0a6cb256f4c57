"""Batch generation from a prompt file, split across processes with ``accelerate``.

``mame-diffusers generate --prompts FILE`` writes one image per prompt, ``OUT/00000.png``,
``OUT/00001.png``, ... (the prompt's index among the file's non-blank lines), and records
each one in ``OUT/manifest.jsonl``. Under ``accelerate launch --num_processes N`` the
prompts still to do are split between the processes (``PartialState().split_between_processes``),
each on its own device; on one process without a launcher it runs the same way.

What makes a run safe to interrupt and start again:

* every image is written to a temporary file in ``OUT`` and moved into place with
  ``os.replace``, so an image file is either complete or absent;
* a manifest line is written only after its image is in place;
* an image counts as done when the manifest records it (same index, file, prompt and seed)
  *and* the file exists: :func:`pending_jobs` decides that, and everything else is redone;
* the work is split only after every process has read what is done, so no two processes
  take the same image;
* one run at a time per folder: the main process holds ``OUT/.mame-diffusers.lock`` for the
  whole run (:func:`lock_folder`), and a second run into the folder is refused, naming the
  run that holds it;
* the newest record of an image wins whatever the machines' clocks say: each record carries
  a ``sequence`` above every one the run read when it started (:func:`latest_records`).

The manifest is written per process: each process appends its lines to its own file in
``OUT/manifest.parts/`` (one ``os.write`` per line on an ``O_APPEND`` descriptor), and the
main process merges them into ``OUT/manifest.jsonl`` (rewritten with ``os.replace``) once
every process is done. One writer per file is correct on every file system; concurrent
``O_APPEND`` writes to one shared file are atomic on local Linux file systems but not on NFS,
which is what several nodes usually share. A run that is killed leaves its parts behind;
the next run reads them like the manifest and merges them at its end.

Seeds: the image of prompt ``i`` starts from a CPU ``torch.Generator`` seeded with
``seed + i``, so a prompt file gives the same images with any number of processes (and the
same initial noise on every device).

``accelerate``, torch and the pipeline are imported inside the functions that need them, never
with this module: the command line imports it to build ``--help``, which must answer at once.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Container, Iterable, Iterator, Sequence

__all__ = [
    "METHODS",
    "Job",
    "RunSpec",
    "LOCK",
    "append_record",
    "check_writable",
    "conflicting_setting",
    "image_name",
    "latest_records",
    "lock_folder",
    "merge_manifest",
    "next_sequence",
    "parse_prompts",
    "pending_jobs",
    "plan_jobs",
    "read_prompts",
    "read_records",
    "run_prompts",
    "well_formed",
    "write_image_atomically",
]

#: What ``--method`` chooses from.
METHODS = ("stock", "mame", "tomesd")
MANIFEST = "manifest.jsonl"
PARTS = "manifest.parts"
#: Record fields that must match for an earlier image to count for this run.
IDENTITY = ("method", "settings", "model", "resolution", "steps", "dtype")
#: The lock file a run holds in each folder it writes into (:func:`lock_folder`).
LOCK = ".mame-diffusers.lock"
_TEMPORARY = re.compile(r"^\..+\.tmp-(\d+)$")


def __getattr__(name: str) -> Any:
    """``UsageError`` and ``parse_mame_settings``, from the modules that define them: they
    import torch, so not with this module."""
    if name == "UsageError":
        from .loading import UsageError

        return UsageError
    if name == "parse_mame_settings":
        from .methods import parse_mame_settings

        return parse_mame_settings
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- prompts, settings and jobs (pure) ----------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One image to make: the prompt's index among non-blank lines, the prompt, its seed."""

    index: int
    prompt: str
    seed: int

    @property
    def file(self) -> str:
        return image_name(self.index)


def image_name(index: int) -> str:
    """``00007.png`` for index 7 (more digits past 99999)."""
    return f"{index:05d}.png"


def parse_prompts(text: str) -> list[str]:
    """One prompt per line, surrounding whitespace stripped, blank lines ignored.

    Lines end at ``"\\n"`` (``"\\r\\n"`` too: the ``"\\r"`` is stripped) and nowhere else:
    ``str.splitlines`` would also split at form feeds, U+0085 and U+2028, which editors
    show inside a line, and every later prompt would get another index.
    """
    return [line.strip() for line in text.split("\n") if line.strip()]


def read_prompts(path: str | Path) -> list[str]:
    """The prompts in the UTF-8 file ``path`` (a byte-order mark is skipped); at least one."""
    from .loading import UsageError

    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as error:
        raise UsageError(f"cannot read prompts from {path}: {error.strerror or error}") from error
    except UnicodeDecodeError as error:
        raise UsageError(
            f"{path} is not UTF-8 text (byte {error.start} is 0x{error.object[error.start]:02x}); "
            "save it with UTF-8 encoding"
        ) from error
    prompts = parse_prompts(text)
    if not prompts:
        raise UsageError(f"{path} holds no prompts (one per line; blank lines are ignored)")
    return prompts


def plan_jobs(prompts: Sequence[str], seed: int) -> list[Job]:
    """One job per prompt; prompt ``i`` gets seed ``seed + i``."""
    return [Job(index, prompt, seed + index) for index, prompt in enumerate(prompts)]


# -- the manifest and what is done (pure) -------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def well_formed(record: Any) -> bool:
    """Whether a manifest record has what deciding on its image needs, of the right types:
    ``index`` (an int >= 0), ``file`` and ``prompt`` (text), ``seed`` (an int) and, when
    present, ``sequence`` (an int >= 0). Any other record is skipped, and its image redone."""
    return (
        isinstance(record, dict)
        and _is_int(record.get("index"))
        and record["index"] >= 0
        and isinstance(record.get("file"), str)
        and isinstance(record.get("prompt"), str)
        and _is_int(record.get("seed"))
        and _is_int(record.get("sequence", 0))
        and record.get("sequence", 0) >= 0
    )


def latest_records(records: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The latest record of each image index; malformed records (:func:`well_formed`) are
    skipped.

    The latest is the one with the highest ``sequence``, and among equal ones the later in
    ``records`` (records from before sequences count as older than any with one). Never by
    the ``finished`` time: a clock that is ahead (another node's, or one stepped back since)
    would make an old record win over every newer one.
    """
    ordered = sorted(enumerate(r for r in records if well_formed(r)), key=lambda pair: (_sequence(pair[1]), pair[0]))
    return {record["index"]: record for _, record in ordered}


def _sequence(record: dict[str, Any]) -> int:
    return record.get("sequence", -1)


def next_sequence(records: Iterable[dict[str, Any]]) -> int:
    """The ``sequence`` of this run's first record: above every one in ``records`` (what the
    run read when it started, with every earlier run's records), so this run's records win."""
    return 1 + max((_sequence(r) for r in records if well_formed(r)), default=-1)


def pending_jobs(
    jobs: Sequence[Job], records: Iterable[dict[str, Any]], existing_files: Container[str]
) -> list[Job]:
    """The jobs still to do, in order.

    A job is done when the latest manifest record of its index names the same file, prompt
    and seed *and* that file exists; a record whose image is missing (deleted by hand, or a
    run killed at the wrong moment) or whose prompt changed is redone.
    """
    latest = latest_records(records)

    def done(job: Job) -> bool:
        record = latest.get(job.index)
        return (
            record is not None
            and record.get("file") == job.file
            and record.get("prompt") == job.prompt
            and record.get("seed") == job.seed
            and job.file in existing_files
        )

    return [job for job in jobs if not done(job)]


def conflicting_setting(records: Iterable[dict[str, Any]], identity: dict[str, Any], seed: int) -> str | None:
    """Why the images already recorded cannot be resumed by this run, or ``None``.

    Resuming only makes sense with the same method, MaMe settings, model, resolution, steps,
    dtype (videos: frames) and base seed: anything else would mix images of two experiments in
    one folder. ``identity`` holds :data:`IDENTITY`'s keys, and ``frames`` for videos.
    """
    for record in latest_records(records).values():
        for key in identity:
            if record.get(key) != identity[key]:
                return f"{key}={json.dumps(record.get(key))} (this run: {key}={json.dumps(identity[key])})"
        if record.get("seed") is not None and record["seed"] - record["index"] != seed:
            return f"seed={record['seed'] - record['index']} (this run: seed={seed})"
    return None


# -- writing -------------------------------------------------------------------------------------


#: Frames per second of the animated PNGs that videos are written as (Wan's 16).
VIDEO_FPS = 16


def write_image_atomically(image: Any, path: str | Path) -> Path:
    """Save a PIL image as PNG at ``path`` so that the file is either complete or absent:
    a temporary file next to it (same file system), flushed to disk, then ``os.replace``.
    A video (a list of PIL frames) becomes an animated PNG at :data:`VIDEO_FPS`."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            if isinstance(image, (list, tuple)):
                first, *rest = image
                first.save(handle, format="PNG", save_all=True, append_images=rest, duration=1000 / VIDEO_FPS, loop=0)
            else:
                image.save(handle, format="PNG")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise
    return path


def append_record(path: str | Path, record: dict[str, Any]) -> None:
    """Append ``record`` as one JSON line with a single ``os.write`` on an ``O_APPEND``
    descriptor (a whole line or, if the process dies mid-write, a torn last line that
    :func:`read_records` skips)."""
    data = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(descriptor, data)
        if written != len(data):
            raise OSError(f"short write to {path}: {written} of {len(data)} bytes")
    finally:
        os.close(descriptor)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The well-formed records of one JSON-lines file, in file order (lines end at ``"\\n"``
    only: a prompt may hold U+2028 or U+0085, which ``json.dumps`` leaves as they are)."""
    from .loading import UsageError

    records = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    except FileNotFoundError:
        return records
    except OSError as error:
        raise UsageError(f"cannot read {path}: {error.strerror or error}") from error
    for line in lines:
        try:
            record = json.loads(line)
        except (ValueError, RecursionError):
            continue  # a torn line from a killed process: that image is redone
        if well_formed(record):
            records.append(record)
    return records


def _part_files(out: Path) -> list[Path]:
    parts = out / PARTS
    return sorted(parts.glob("*.jsonl")) if parts.is_dir() else []


def read_records(out: str | Path) -> list[dict[str, Any]]:
    """Every record in ``OUT/manifest.jsonl`` and in the per-process parts not merged yet."""
    out = Path(out)
    records = _read_jsonl(out / MANIFEST)
    for part in _part_files(out):
        records += _read_jsonl(part)
    return records


def merge_manifest(out: str | Path) -> bool:
    """Fold the per-process parts into ``OUT/manifest.jsonl`` (main process, after all are done).

    Keeps the latest record of each index whose image exists, sorted by index; the new
    manifest replaces the old one with ``os.replace`` (left untouched when nothing changed),
    and only then are the parts removed (a crash in between merges them again next time, to
    the same result). Returns whether the manifest was rewritten.
    """
    out = Path(out)
    parts = _part_files(out)
    latest = latest_records(read_records(out))
    text = "".join(
        json.dumps(latest[index], ensure_ascii=False) + "\n"
        for index in sorted(latest)
        if (out / latest[index]["file"]).is_file()
    )
    manifest = out / MANIFEST
    try:
        changed = manifest.read_text(encoding="utf-8") != text
    except FileNotFoundError:
        changed = True
    if changed:
        temporary = out / f".{MANIFEST}.tmp-{os.getpid()}"
        try:
            temporary.write_text(text, encoding="utf-8")
            os.replace(temporary, manifest)
        except BaseException:
            temporary.unlink(missing_ok=True)
            raise
    for part in parts:
        part.unlink(missing_ok=True)
    try:
        (out / PARTS).rmdir()
    except OSError:
        pass
    return changed


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files a killed run left behind: by the main process, while it holds ``OUT``'s
    lock (so no other run is writing them) and before any of its processes writes.

    A temporary's name ends in its writer's pid: one whose writer is still alive on this host
    is kept all the same (a writer that took no lock, such as an older version).
    """
    for path in out.iterdir():
        match = _TEMPORARY.match(path.name)
        if match and not _alive(int(match.group(1))) and path.is_file():
            path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` runs on this host (assumed where that cannot be told)."""
    if os.name == "nt":
        return True  # os.kill(pid, 0) would send it a Ctrl-C there
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # it exists, as another user's process
        return True
    return True


# -- one run per folder, and folders that can be written ---------------------------------------


@contextlib.contextmanager
def lock_folder(out: str | Path) -> Iterator[Path]:
    """Hold ``OUT``'s lock for a whole run; raise :class:`UsageError` naming the run that
    holds it.

    Two runs into one folder would both make the images neither has finished, and the first
    to end would merge and delete the manifest's parts under the other. The lock is
    ``flock`` on ``OUT/.mame-diffusers.lock`` (NFS passes it to the server), and the file
    names its holder (pid, host, start). The system drops the lock when its process ends,
    however it ends, so a killed run never blocks the next one. On a file system without
    locks the file's existence is the lock: one whose holder is gone from this host is taken
    over, one from another host must be deleted by hand (the error says so).
    """
    path = Path(out) / LOCK
    descriptor = _acquire(path)
    try:
        yield path
    finally:
        try:
            path.unlink(missing_ok=True)  # while still holding it: a run that opened it retries
        except OSError:  # Windows removes no open file: close it first
            os.close(descriptor)
            descriptor = None
            path.unlink(missing_ok=True)
        finally:
            if descriptor is not None:
                os.close(descriptor)


def _acquire(path: Path) -> int:
    from .loading import UsageError

    while True:
        try:
            descriptor, created = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644), True
        except FileExistsError:
            try:
                descriptor, created = os.open(path, os.O_RDWR), False
            except FileNotFoundError:
                continue  # its holder removed it in between
        try:
            held = _flock(descriptor)
            locks = held is not None
            if not locks:  # no file locks here: the file itself is the lock
                held = created or _holder_gone(path)
            if not held:
                advice = "" if locks else f"; if that run is gone, delete {path}"
                raise UsageError(
                    f"another run is writing into {path.parent}: {path} is held by {_describe_holder(path)}; "
                    f"wait for it to end, or use another --out{advice}"
                )
            if not _same_file(descriptor, path):
                os.close(descriptor)  # the run before removed it after we opened it: lock the new one
                continue
            os.ftruncate(descriptor, 0)
            holder = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
            os.write(descriptor, (json.dumps(holder) + "\n").encode("utf-8"))
            return descriptor
        except BaseException:
            os.close(descriptor)
            raise


def _flock(descriptor: int) -> bool | None:
    """Lock ``descriptor`` without waiting: whether it is ours, or ``None`` where the
    system or file system has no such locks."""
    try:
        import fcntl
    except ImportError:  # Windows
        return None
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError as error:
        if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            return None
        raise
    return True


def _same_file(descriptor: int, path: Path) -> bool:
    try:
        named = os.stat(path)
    except FileNotFoundError:
        return False
    opened = os.fstat(descriptor)
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _holder(path: Path) -> dict[str, Any]:
    try:
        holder = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe_holder(path: Path) -> str:
    holder = _holder(path)
    if not holder:
        return "a run that has not written its name yet"
    return f"pid {holder.get('pid')} on {holder.get('host')} (started {holder.get('started')})"


def _holder_gone(path: Path) -> bool:
    """Whether the lock file names a process of this host that is no longer alive."""
    holder = _holder(path)
    return holder.get("host") == socket.gethostname() and _is_int(holder.get("pid")) and not _alive(holder["pid"])


#: What a failed write means, for the failures a user can act on.
_WRITE_FAILURES = {
    errno.ENOSPC: "the disk is full (free some space, or use another --out)",
    errno.EDQUOT: "the disk quota is used up (free some space, or use another --out)",
    errno.EROFS: "the file system is read-only (use another --out)",
    errno.EACCES: "permission denied (use a folder you can write to with --out)",
    errno.EPERM: "permission denied (use a folder you can write to with --out)",
}


def write_failure(path: str | Path, error: OSError) -> str:
    """One line saying why writing ``path`` failed and what to do."""
    reason = _WRITE_FAILURES.get(error.errno) or f"{error.strerror or error}"
    return f"cannot write {path}: {reason}"


def check_writable(out: str | Path) -> None:
    """Create ``out`` and a probe file in it, then remove the probe: a read-only or full
    folder is a one-line error before the model loads, not a traceback after it."""
    from .loading import UsageError

    out = Path(out)
    probe = out / f".write-probe-{socket.gethostname()}-{os.getpid()}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        descriptor = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.write(descriptor, b"mame-diffusers write probe\n")
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError as error:
        raise UsageError(write_failure(error.filename or out, error)) from error
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)


@contextlib.contextmanager
def _reporting_write_failures(out: Path) -> Iterator[None]:
    """A write that fails during the run (a disk that filled up) becomes a one-line error
    that says so, and that the images written so far count when the command runs again."""
    try:
        yield
    except OSError as error:
        from .loading import UsageError

        raise UsageError(
            f"{write_failure(error.filename or out, error)}; the images written so far are kept: "
            "run the same command again to make the rest"
        ) from error


# -- running -----------------------------------------------------------------------------------


@dataclass
class RunSpec:
    """One method over the prompt file, into one folder."""

    method: str
    settings: dict[str, Any]
    out: Path
    model: str
    resolution: int
    steps: int
    dtype: str
    seed: int = 0
    batch_size: int = 1
    label: str = ""
    #: Frames per video (Wan), ``None`` for images.
    frames: int | None = None

    def identity(self) -> dict[str, Any]:
        identity = {key: getattr(self, key) for key in IDENTITY}
        return identity if self.frames is None else {**identity, "frames": self.frames}


def _method(spec: RunSpec):
    """The :class:`~mame_diffusers.methods.Method` that patches the UNet for ``spec``."""
    from .loading import UsageError
    from .methods import baseline, mame, tomesd_method

    if spec.method == "stock":
        return baseline()
    if spec.method == "mame":
        return mame(**spec.settings)
    method = tomesd_method(spec.settings["ratio"])
    if method is None:
        raise UsageError("--method tomesd needs tomesd (pip install tomesd)")
    return method


def _accelerator_available() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    if accelerator is not None and hasattr(accelerator, "is_available"):
        return bool(accelerator.is_available())
    return torch.cuda.is_available()


def process_state(device: str | None):
    """accelerate's ``PartialState``: the launcher's processes, or this one process alone.

    CPU processes (``ACCELERATE_USE_CPU=1``, which ``accelerate launch --cpu`` sets;
    ``--device cpu``; or a machine without an accelerator) get accelerate's CPU backend
    (gloo) when a launcher started several.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    cpu = device == "cpu" or parse_flag_from_env("ACCELERATE_USE_CPU") or not _accelerator_available()
    state = PartialState(cpu=cpu)
    if state.num_processes == 1 and parse_flag_from_env("ACCELERATE_USE_CPU") and "MASTER_ADDR" in os.environ:
        # `accelerate launch --cpu --num_processes N` without MPI starts one process only.
        print(
            "mame-diffusers: note: accelerate started one CPU process; for several without MPI use "
            "`ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes N ...` (docs/scale_out.md)",
            file=sys.stderr,
        )
    return state


def _process_device(requested: str | None, state):
    """The device this process runs on: accelerate's (its GPU, or the CPU) unless
    ``--device`` names another kind, or a device by index on a single process."""
    from .loading import resolve_device

    if requested is None:
        return state.device
    device = resolve_device(requested)
    if device.type == state.device.type and (device.index is None or state.num_processes > 1):
        return state.device
    return device


def _generate(pipe, jobs: Sequence[Job], spec: RunSpec, steps: int | None = None) -> list:
    """One pipeline call for ``jobs``: each image from its own CPU generator seeded with its
    job's seed (diffusers draws each image's noise with its own generator, so an image's
    noise does not depend on the batch it is in). Videos come as lists of frames."""
    import torch

    from .loading import call_arguments, pictures

    generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
    with torch.inference_mode():
        return pictures(pipe(
            [job.prompt for job in jobs],
            num_inference_steps=steps or spec.steps,
            generator=generators,
            **call_arguments(pipe, spec.resolution, spec.frames),
        ))


def run_method(pipe, jobs: Sequence[Job], spec: RunSpec, state, device) -> dict[str, Any]:
    """Make this process's share of the images of ``jobs`` not done yet in ``spec.out``.

    Returns this process's numbers: images made, seconds (wall, first call to last line
    written), the pipeline seconds of its images.
    """
    from tqdm import tqdm

    from .benchmarking.timing import synchronize
    from .loading import UsageError, patch_target

    out = spec.out
    out.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        _remove_stale_temporaries(out)  # run_prompts holds the folder's lock
    records = read_records(out)
    conflict = conflicting_setting(records, spec.identity(), spec.seed)
    if conflict is not None:
        raise UsageError(
            f"{out} already holds images made with {conflict}; use another --out, "
            f"or delete {out / MANIFEST} to start over"
        )
    todo = pending_jobs(jobs, records, set(os.listdir(out)))
    sequence = next_sequence(records)
    # Everyone has read what is done before anyone writes: the split is the same everywhere.
    state.wait_for_everyone()

    host = socket.gethostname()
    part = out / PARTS / f"process-{state.process_index:03d}-{host}-{os.getpid()}.jsonl"
    made, image_seconds, wall = 0, 0.0, 0.0
    with state.split_between_processes(todo) as mine:
        mine = list(mine)
        if mine:
            with _reporting_write_failures(out):
                part.parent.mkdir(exist_ok=True)
            batches = [mine[i : i + spec.batch_size] for i in range(0, len(mine), spec.batch_size)]
            method = _method(spec)
            target = patch_target(pipe)
            method.patch(target)
            try:
                # Untimed warm-up (one step): first-call costs are no image's.
                _generate(pipe, batches[0], spec, steps=1)
                synchronize(device)
                progress = tqdm(
                    total=len(mine), desc=f"{spec.label}, process {state.process_index}", disable=not state.is_main_process
                )
                with progress as bar:  # closed before an error is printed
                    start = time.perf_counter()
                    for batch in batches:
                        began = time.perf_counter()
                        images = _generate(pipe, batch, spec)
                        synchronize(device)
                        seconds = (time.perf_counter() - began) / len(batch)
                        for job, image in zip(batch, images):
                            with _reporting_write_failures(out):
                                write_image_atomically(image, out / job.file)
                            record = _record(job, spec, seconds, len(batch), state, device, sequence + made)
                            with _reporting_write_failures(out):
                                append_record(part, record)
                            made += 1
                            image_seconds += seconds
                        bar.update(len(batch))
                    wall = time.perf_counter() - start
            finally:
                method.unpatch(target)
    return {
        "method": spec.label,
        "process_index": state.process_index,
        "device": str(device),
        "host": host,
        "images": made,
        "seconds": wall,
        "image_seconds": image_seconds,
        "skipped": len(jobs) - len(todo),
    }


def _record(job: Job, spec: RunSpec, seconds: float, batch: int, state, device, sequence: int) -> dict[str, Any]:
    """The manifest line of ``job``'s image, once the image is in place."""
    return {
        "index": job.index,
        "prompt": job.prompt,
        "seed": job.seed,
        "file": job.file,
        **spec.identity(),
        "seconds": round(seconds, 4),
        "batch": batch,
        "process_index": state.process_index,
        "num_processes": state.num_processes,
        "device": str(device),
        "host": socket.gethostname(),
        # Above every record read at the start of the run: the latest of its index whatever
        # the clocks say (``finished`` is for people).
        "sequence": sequence,
        "finished": time.time(),
    }


def summarize(spec: RunSpec, processes: list[dict[str, Any]], prompts: int) -> dict[str, Any]:
    """One method's totals from every process's numbers: the processes run side by side, so
    the total rate is all images over the slowest process's seconds."""
    images = sum(p["images"] for p in processes)
    wall = max((p["seconds"] for p in processes), default=0.0)
    for p in processes:
        p["images_per_second"] = p["images"] / p["seconds"] if p["images"] and p["seconds"] > 0 else None
    return {
        "method": spec.label,
        "settings": spec.settings,
        "out": str(spec.out),
        "prompts": prompts,
        "skipped": processes[0]["skipped"] if processes else 0,
        "images": images,
        "processes": len(processes),
        "wall_seconds": wall,
        "images_per_second": images / wall if images and wall > 0 else None,
        "seconds_per_image": sum(p["image_seconds"] for p in processes) / images if images else None,
        "per_process": processes,
    }


def summary_tables(runs: list[dict[str, Any]]) -> str:
    """Markdown: totals per method (with the speed-up over stock when both ran), then each
    process's share."""
    from .benchmarking.report import markdown_table

    totals = markdown_table(
        runs,
        ["method", "processes", "images", "skipped", "wall_seconds", "images_per_second", "seconds_per_image", "speedup"],
        {"wall_seconds": ".2f", "images_per_second": ".3f", "seconds_per_image": ".3f", "speedup": ".2f"},
    )
    rows = [{**p, "method": run["method"]} for run in runs for p in run["per_process"]]
    per_process = markdown_table(
        rows,
        ["method", "process_index", "device", "host", "images", "seconds", "images_per_second"],
        {"seconds": ".2f", "images_per_second": ".3f"},
    )
    return totals + "\n\n" + per_process


def _model_label(args) -> str:
    if args.model is not None:
        return args.model
    return f"offline {'tiny' if args.quick else 'sd21'} (random weights, seed {args.seed})"


def _specs(args, resolution: int, family: str = "unet", frames: int | None = None) -> list[RunSpec]:
    from .loading import UsageError, resolve_ratio
    from .methods import check_settings, parse_mame_settings

    method = args.method or "mame"
    extra = parse_mame_settings(args.mame or [])
    if method != "mame" and extra:
        raise UsageError("--mame settings apply to --method mame only")
    if args.compare and method == "stock":
        raise UsageError("--compare runs --method stock next to another method; choose --method mame or tomesd")
    if method == "tomesd" and family != "unet":
        raise UsageError("tomesd patches UNets; --method tomesd does not apply to diffusion transformers")
    ratio = resolve_ratio(args.ratio, family)
    if method == "mame":
        settings = {"ratio": ratio, **extra}
        check_settings(settings, dit=family != "unet")
        label = "MaMe"
    elif method == "tomesd":
        settings, label = {"ratio": ratio}, "tomesd"
    else:
        settings, label = {}, "stock"
    common = dict(
        model=_model_label(args),
        resolution=resolution,
        steps=args.steps,
        dtype=args.dtype,
        seed=args.seed,
        batch_size=args.batch_size,
        frames=frames,
    )
    specs = [RunSpec(method, settings, Path(args.out), label=label, **common)]
    if args.compare:
        specs.append(RunSpec("stock", {}, Path(args.out) / "stock", label="stock", **common))
    return specs


def run_prompts(args) -> list[Path]:
    """``mame-diffusers generate --prompts FILE``: every process's share, then (main process)
    the merged manifests and the summary. Returns the files written (main process only)."""
    from .loading import generate_family, resolve_dtype, resolve_frames, resolve_resolution

    prompts = read_prompts(args.prompts)
    family = generate_family(args)
    resolution = resolve_resolution(args.resolution, family, args.quick)
    specs = _specs(args, resolution, family, resolve_frames(getattr(args, "frames", None), family, 81))
    if specs[0].method == "tomesd":
        _method(specs[0])  # tomesd installed?
    jobs = plan_jobs(prompts, args.seed)

    state = process_state(args.device)
    device = _process_device(args.device, state)
    dtype = resolve_dtype(args.dtype, device)
    with contextlib.ExitStack() as locks:
        _claim_folders(specs, state, locks)
        return _run_specs(args, specs, jobs, state, device, dtype)


def _claim_folders(specs: Sequence[RunSpec], state, locks: contextlib.ExitStack) -> None:
    """Before the model loads: every process checks that it can write into every folder,
    and the main process takes their locks (held until ``locks`` closes, at the end of the
    run). A problem on any process stops them all, each with the same one-line error."""
    from accelerate.utils import gather_object

    from .loading import UsageError

    problem = None
    try:
        for spec in specs:
            check_writable(spec.out)
        if state.is_main_process:
            for spec in specs:
                locks.enter_context(lock_folder(spec.out))
    except UsageError as error:
        problem = str(error)
    problems = [p for p in gather_object([problem]) if p is not None]
    if problems:
        raise UsageError(problems[0])


def _run_specs(args, specs: Sequence[RunSpec], jobs: Sequence[Job], state, device, dtype) -> list[Path]:
    """Load the pipeline, make every spec's images, then (main process) merge the manifests
    and write the summary."""
    import torch
    from accelerate.utils import gather_object

    from .benchmarking.report import environment, write_report
    from .loading import frame_size, load_pipeline

    frames = specs[0].frames
    height, width = frame_size("wan", specs[0].resolution) if frames else (specs[0].resolution,) * 2
    size = f"{height}x{width}" + (f", {frames} frames" if frames else "")
    pipe = load_pipeline(args.model, quick=args.quick, device=device, dtype=dtype, seed=args.seed)

    runs = []
    for spec in specs:
        mine = run_method(pipe, jobs, spec, state, device)
        # A collective: when it returns, every process has written all its images and lines.
        runs.append(summarize(spec, gather_object([mine]), len(jobs)))
    if not state.is_main_process:
        return []

    with _reporting_write_failures(Path(args.out)):
        written = [spec.out / MANIFEST for spec in specs if merge_manifest(spec.out)]
    stock = next((run for run in runs if run["method"] == "stock"), None)
    for run in runs:
        fast, slow = run["images_per_second"], stock["images_per_second"] if stock else None
        run["speedup"] = fast / slow if fast and slow else None
    table = summary_tables(runs)
    settings = ", ".join(f"{key}={value}" for key, value in specs[0].settings.items())
    print(
        f"\n{len(jobs)} prompts, {size}, {args.steps} steps, batch {args.batch_size}, "
        f"{args.dtype}, {state.num_processes} process(es); {specs[0].label}"
        f"{f' ({settings})' if settings else ''}; images/s = images made by this run / its wall seconds "
        "(processes side by side); skipped = already done\n"
    )
    print(table)
    if not any(run["images"] for run in runs):
        # A resume with nothing left to do: keep the report of the run that made the images.
        print(f"\nnothing left to do: every image is in {args.out}; its summary.md and summary.json are kept")
        return written
    payload = {
        "environment": environment(device, getattr(torch, args.dtype)),
        "setup": {
            "prompts": len(jobs),
            "model": specs[0].model,
            "resolution": specs[0].resolution,
            "frames": specs[0].frames,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "num_processes": state.num_processes,
        },
        "runs": runs,
    }
    with _reporting_write_failures(Path(args.out)):
        json_path, md_path = write_report(Path(args.out) / "summary", payload, table)
    return [*written, json_path, md_path]
