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
  take the same image.

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

``accelerate`` is imported inside the functions that need it, never with the package.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Container, Iterable, Sequence

from .loading import UsageError
from .methods import parse_mame_settings

__all__ = [
    "METHODS",
    "Job",
    "RunSpec",
    "append_record",
    "conflicting_setting",
    "image_name",
    "latest_records",
    "merge_manifest",
    "parse_mame_settings",
    "parse_prompts",
    "pending_jobs",
    "plan_jobs",
    "read_prompts",
    "read_records",
    "run_prompts",
    "write_image_atomically",
]

#: What ``--method`` chooses from.
METHODS = ("stock", "mame", "tomesd")
MANIFEST = "manifest.jsonl"
PARTS = "manifest.parts"
#: Record fields that must match for an earlier image to count for this run.
IDENTITY = ("method", "settings", "model", "resolution", "steps", "dtype")
_TEMPORARY = re.compile(r"^\..+\.tmp-\d+$")


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
    """One prompt per line, surrounding whitespace stripped, blank lines ignored."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def read_prompts(path: str | Path) -> list[str]:
    """The prompts in the UTF-8 file ``path``; at least one."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise UsageError(f"cannot read prompts from {path}: {error.strerror or error}") from error
    prompts = parse_prompts(text)
    if not prompts:
        raise UsageError(f"{path} holds no prompts (one per line; blank lines are ignored)")
    return prompts


def plan_jobs(prompts: Sequence[str], seed: int) -> list[Job]:
    """One job per prompt; prompt ``i`` gets seed ``seed + i``."""
    return [Job(index, prompt, seed + index) for index, prompt in enumerate(prompts)]


# -- the manifest and what is done (pure) -------------------------------------------------------


def latest_records(records: Iterable[dict[str, Any]]) -> dict[int, dict[str, Any]]:
    """The latest record of each image index (by ``finished`` time; later lines win ties)."""
    ordered = sorted(enumerate(records), key=lambda pair: (pair[1].get("finished") or 0.0, pair[0]))
    return {record["index"]: record for _, record in ordered}


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
    dtype and base seed: anything else would mix images of two experiments in one folder.
    """
    for record in latest_records(records).values():
        for key in IDENTITY:
            if record.get(key) != identity[key]:
                return f"{key}={json.dumps(record.get(key))} (this run: {key}={json.dumps(identity[key])})"
        if record.get("seed") is not None and record["seed"] - record["index"] != seed:
            return f"seed={record['seed'] - record['index']} (this run: seed={seed})"
    return None


# -- writing -------------------------------------------------------------------------------------


def write_image_atomically(image: Any, path: str | Path) -> Path:
    """Save a PIL image as PNG at ``path`` so that the file is either complete or absent:
    a temporary file next to it (same file system), flushed to disk, then ``os.replace``."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
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
    records = []
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return records
    for line in lines:
        try:
            record = json.loads(line)
        except ValueError:
            continue  # a torn line from a killed process: that image is redone
        if isinstance(record, dict) and isinstance(record.get("index"), int) and isinstance(record.get("file"), str):
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
        temporary.write_text(text, encoding="utf-8")
        os.replace(temporary, manifest)
    for part in parts:
        part.unlink(missing_ok=True)
    try:
        (out / PARTS).rmdir()
    except OSError:
        pass
    return changed


def _remove_stale_temporaries(out: Path) -> None:
    """Temporary files a killed run left behind (main process, before any process writes)."""
    for path in out.iterdir():
        if _TEMPORARY.match(path.name) and path.is_file():
            path.unlink(missing_ok=True)


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

    def identity(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in IDENTITY}


def _method(spec: RunSpec):
    """The :class:`~mame_diffusers.benchmarking.unet.Method` that patches the UNet for ``spec``."""
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
    noise does not depend on the batch it is in)."""
    import torch

    generators = [torch.Generator("cpu").manual_seed(job.seed) for job in jobs]
    with torch.inference_mode():
        return pipe(
            [job.prompt for job in jobs],
            height=spec.resolution,
            width=spec.resolution,
            num_inference_steps=steps or spec.steps,
            generator=generators,
        ).images


def run_method(pipe, jobs: Sequence[Job], spec: RunSpec, state, device) -> dict[str, Any]:
    """Make this process's share of the images of ``jobs`` not done yet in ``spec.out``.

    Returns this process's numbers: images made, seconds (wall, first call to last line
    written), the pipeline seconds of its images.
    """
    from tqdm import tqdm

    from .benchmarking.timing import synchronize

    out = spec.out
    out.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        _remove_stale_temporaries(out)
    records = read_records(out)
    conflict = conflicting_setting(records, spec.identity(), spec.seed)
    if conflict is not None:
        raise UsageError(
            f"{out} already holds images made with {conflict}; use another --out, "
            f"or delete {out / MANIFEST} to start over"
        )
    todo = pending_jobs(jobs, records, set(os.listdir(out)))
    # Everyone has read what is done before anyone writes: the split is the same everywhere.
    state.wait_for_everyone()

    host = socket.gethostname()
    part = out / PARTS / f"process-{state.process_index:03d}-{host}-{os.getpid()}.jsonl"
    made, image_seconds, wall = 0, 0.0, 0.0
    with state.split_between_processes(todo) as mine:
        mine = list(mine)
        if mine:
            part.parent.mkdir(exist_ok=True)
            batches = [mine[i : i + spec.batch_size] for i in range(0, len(mine), spec.batch_size)]
            method = _method(spec)
            method.patch(pipe.unet)
            try:
                # Untimed warm-up (one step): first-call costs are no image's.
                _generate(pipe, batches[0], spec, steps=1)
                synchronize(device)
                bar = tqdm(
                    total=len(mine), desc=f"{spec.label}, process {state.process_index}", disable=not state.is_main_process
                )
                start = time.perf_counter()
                for batch in batches:
                    began = time.perf_counter()
                    images = _generate(pipe, batch, spec)
                    synchronize(device)
                    seconds = (time.perf_counter() - began) / len(batch)
                    for job, image in zip(batch, images):
                        write_image_atomically(image, out / job.file)
                        record = {
                            "index": job.index,
                            "prompt": job.prompt,
                            "seed": job.seed,
                            "file": job.file,
                            **spec.identity(),
                            "seconds": round(seconds, 4),
                            "batch": len(batch),
                            "process_index": state.process_index,
                            "num_processes": state.num_processes,
                            "device": str(device),
                            "host": host,
                            "finished": time.time(),
                        }
                        append_record(part, record)
                        made += 1
                        image_seconds += seconds
                    bar.update(len(batch))
                wall = time.perf_counter() - start
                bar.close()
            finally:
                method.unpatch(pipe.unet)
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


def _specs(args, resolution: int) -> list[RunSpec]:
    method = args.method or "mame"
    extra = parse_mame_settings(args.mame or [])
    if method != "mame" and extra:
        raise UsageError("--mame settings apply to --method mame only")
    if args.compare and method == "stock":
        raise UsageError("--compare runs --method stock next to another method; choose --method mame or tomesd")
    if method == "mame":
        from .diffusers_integration import MaMeConfig

        settings = {"ratio": args.ratio, **extra}
        try:
            MaMeConfig(**settings)
        except (TypeError, ValueError) as error:
            raise UsageError(f"bad MaMe settings: {error}") from error
        label = "MaMe"
    elif method == "tomesd":
        settings, label = {"ratio": args.ratio}, "tomesd"
    else:
        settings, label = {}, "stock"
    common = dict(
        model=_model_label(args),
        resolution=resolution,
        steps=args.steps,
        dtype=args.dtype,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    specs = [RunSpec(method, settings, Path(args.out), label=label, **common)]
    if args.compare:
        specs.append(RunSpec("stock", {}, Path(args.out) / "stock", label="stock", **common))
    return specs


def run_prompts(args) -> list[Path]:
    """``mame-diffusers generate --prompts FILE``: every process's share, then (main process)
    the merged manifests and the summary. Returns the files written (main process only)."""
    import torch
    from accelerate.utils import gather_object

    from .benchmarking.report import environment, write_report
    from .loading import load_pipeline, resolve_dtype

    prompts = read_prompts(args.prompts)
    resolution = 128 if args.quick and args.resolution == 512 else args.resolution
    specs = _specs(args, resolution)
    if specs[0].method == "tomesd":
        _method(specs[0])  # tomesd installed?
    jobs = plan_jobs(prompts, args.seed)

    state = process_state(args.device)
    device = _process_device(args.device, state)
    dtype = resolve_dtype(args.dtype, device)
    pipe = load_pipeline(args.model, quick=args.quick, device=device, dtype=dtype, seed=args.seed)

    runs = []
    for spec in specs:
        mine = run_method(pipe, jobs, spec, state, device)
        # A collective: when it returns, every process has written all its images and lines.
        runs.append(summarize(spec, gather_object([mine]), len(jobs)))
    if not state.is_main_process:
        return []

    written = [spec.out / MANIFEST for spec in specs if merge_manifest(spec.out)]
    stock = next((run for run in runs if run["method"] == "stock"), None)
    for run in runs:
        fast, slow = run["images_per_second"], stock["images_per_second"] if stock else None
        run["speedup"] = fast / slow if fast and slow else None
    table = summary_tables(runs)
    settings = ", ".join(f"{key}={value}" for key, value in specs[0].settings.items())
    print(
        f"\n{len(jobs)} prompts, {resolution}x{resolution}, {args.steps} steps, batch {args.batch_size}, "
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
            "resolution": resolution,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seed": args.seed,
            "num_processes": state.num_processes,
        },
        "runs": runs,
    }
    json_path, md_path = write_report(Path(args.out) / "summary", payload, table)
    return [*written, json_path, md_path]
