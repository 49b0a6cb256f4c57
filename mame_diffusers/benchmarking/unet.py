"""Whole-UNet speed and fidelity: baseline vs MaMe vs tomesd, measured in one run.

Methods are timed round-robin (one call of each per round, repeated), so that a machine
whose speed drifts during the run (shared CPUs, thermal limits) affects them all alike;
each method's time is the median of its rounds. :func:`compare_unet` patches one model
before each call (cheap on a CPU); :func:`compare_unet_copies` times one patched copy per
method, as the GPU benchmark does.
"""

from __future__ import annotations

import copy
import statistics
import time
from typing import Any, Callable

import torch
from tqdm import tqdm

from ..methods import Method
from .timing import synchronize


def call_like_a_pipeline(unet: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
    """``unet(sample, timestep, **rest)``: positional like diffusers pipelines call it (tomesd's
    hook reads the latent size from the first positional argument)."""
    rest = {k: v for k, v in inputs.items() if k not in ("sample", "timestep")}
    return unet(inputs["sample"], inputs["timestep"], **rest).sample


def compare_unet(
    unet: torch.nn.Module,
    inputs: dict[str, Any],
    methods: list[Method],
    *,
    repeats: int = 3,
    warmup: int = 1,
    call: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor] | None = None,
    progress: bool = True,
    desc: str = "UNet benchmark",
) -> list[dict[str, Any]]:
    """Time and compare ``methods`` on ``unet(**inputs)`` (or on ``call(unet, inputs)``).

    Returns one row per method: median seconds, speed-up over the first method, and the
    relative error of its output against the first method's (the reference).
    """
    call = call or call_like_a_pipeline
    device = next(unet.parameters()).device
    outputs: dict[str, torch.Tensor] = {}
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    steps = len(methods) * (warmup + repeats)
    bar = tqdm(total=steps, desc=desc, disable=not progress)
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            for method in methods:
                method.patch(unet)
                try:
                    synchronize(device)
                    start = time.perf_counter()
                    out = call(unet, inputs)
                    synchronize(device)
                    elapsed = time.perf_counter() - start
                finally:
                    method.unpatch(unet)
                if round_index >= warmup:
                    times[method.name].append(elapsed)
                if method.name not in outputs:
                    outputs[method.name] = out.float().cpu()
                bar.update()
    bar.close()
    reference_name = methods[0].name
    reference = outputs[reference_name]
    reference_time = statistics.median(times[reference_name])
    rows = []
    for method in methods:
        seconds = statistics.median(times[method.name])
        error = torch.linalg.vector_norm(outputs[method.name] - reference) / torch.linalg.vector_norm(reference)
        rows.append(
            {
                "method": method.name,
                "attends": method.attends,
                "settings": method.settings,
                "seconds": seconds,
                "min_seconds": min(times[method.name]),
                "max_seconds": max(times[method.name]),
                "spread": (max(times[method.name]) - min(times[method.name])) / seconds,
                "speedup": reference_time / seconds,
                "error": float(error),
                "all_seconds": times[method.name],
            }
        )
    return rows


# -- one patched instance per method ------------------------------------------------------------


def patched_copies(unet: torch.nn.Module, methods: list[Method]) -> tuple[dict[str, torch.nn.Module], dict[str, str]]:
    """One ``copy.deepcopy`` of ``unet`` per method, each patched once with its method.

    Every copy has the same weights, and no method is ever patched or unpatched between
    timed calls (a patch that leaks state, or costs time to apply, cannot bias the others).
    Returns the copies by method name, and ``"Type: message"`` for each method whose patch
    raised (an unknown setting, say), which gets no copy.
    """
    models: dict[str, torch.nn.Module] = {}
    errors: dict[str, str] = {}
    for method in methods:
        model = copy.deepcopy(unet)
        try:
            method.patch(model)
        except Exception as error:  # recorded, and the other methods still run
            errors[method.name] = _describe(error)
            del model
            continue
        models[method.name] = model
    return models, errors


def _describe(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


def _model_bytes(model: torch.nn.Module) -> int:
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in {id(t): t for t in tensors}.values())


def compare_unet_copies(
    models: dict[str, torch.nn.Module],
    inputs: dict[str, Any],
    *,
    repeats: int = 10,
    warmup: int = 3,
    call: Callable[[torch.nn.Module, dict[str, Any]], torch.Tensor] | None = None,
    reference: torch.Tensor | None = None,
    on_call: Callable[[], None] | None = None,
) -> list[dict[str, Any]]:
    """Time ``models`` (one patched instance per method, e.g. from :func:`patched_copies`)
    round by round: each round calls every model once, in order.

    The first model is the baseline for the speed-up, and for the error unless ``reference``
    (an output to compare against) is given. Each row holds the median, min and max seconds
    of the timed rounds and every round's time; on CUDA also the peak memory of a call:
    ``activation_mib`` above what was allocated before it (the other copies' weights
    excluded), ``peak_mib``, that plus the model's own weights (the peak if it were the
    only model on the GPU), and the raw ``max_allocated_mib``. A model whose call raises is
    dropped from later rounds, its row keeping ``failed``. ``on_call`` runs before every
    call (for CUDA graphs' step marks).
    """
    call = call or call_like_a_pipeline
    names = list(models)
    first = models[names[0]]
    device = next(first.parameters()).device
    on_cuda = device.type == "cuda"
    times: dict[str, list[float]] = {name: [] for name in names}
    activation: dict[str, int] = {name: 0 for name in names}
    allocated: dict[str, int] = {name: 0 for name in names}
    errors: dict[str, float] = {}
    failed: dict[str, str] = {}
    with torch.inference_mode():
        for round_index in range(warmup + repeats):
            for name in names:
                if name in failed:
                    continue
                model = models[name]
                if on_call is not None:
                    on_call()
                synchronize(device)
                if on_cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                    before = torch.cuda.memory_allocated(device)
                try:
                    start = time.perf_counter()
                    out = call(model, inputs)
                    synchronize(device)
                    elapsed = time.perf_counter() - start
                except Exception as error:  # e.g. out of memory: keep the others going
                    failed[name] = _describe(error)
                    if on_cuda:
                        torch.cuda.empty_cache()
                    continue
                if on_cuda:
                    peak = torch.cuda.max_memory_allocated(device)
                    activation[name] = max(activation[name], peak - before)
                    allocated[name] = max(allocated[name], peak)
                if round_index >= warmup:
                    times[name].append(elapsed)
                if name not in errors:
                    # Norms in float32: a float16 sum of squares over a whole latent overflows.
                    out = out.float()
                    if reference is None and name == names[0]:
                        reference = out
                    errors[name] = (
                        float(torch.linalg.vector_norm(out - reference) / torch.linalg.vector_norm(reference))
                        if reference is not None
                        else None  # the baseline failed: nothing to compare with
                    )
                del out
    baseline_seconds = statistics.median(times[names[0]]) if times[names[0]] else None
    rows = []
    for name in names:
        row: dict[str, Any] = {"method": name, "error": errors.get(name), "all_seconds": times[name]}
        if times[name]:
            seconds = statistics.median(times[name])
            row.update(
                seconds=seconds,
                min_seconds=min(times[name]),
                max_seconds=max(times[name]),
                speedup=baseline_seconds / seconds if baseline_seconds else None,
            )
        if on_cuda and name not in failed:
            row["activation_mib"] = activation[name] / 2**20
            row["peak_mib"] = (activation[name] + _model_bytes(models[name])) / 2**20
            row["max_allocated_mib"] = allocated[name] / 2**20  # all models on the device included
        if name in failed:
            row["failed"] = failed[name]
        rows.append(row)
    return rows
