"""Whole-UNet speed and fidelity: baseline vs MaMe vs tomesd, measured in one run.

Methods are timed round-robin (one call of each per round, repeated), so that a machine
whose speed drifts during the run (shared CPUs, thermal limits) affects them all alike;
each method's time is the median of its rounds.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from tqdm import tqdm

from ..api import apply_mame, remove_mame
from .timing import synchronize


@dataclass
class Method:
    """A way to run the UNet: ``patch`` before the calls, ``unpatch`` after."""

    name: str
    patch: Callable[[torch.nn.Module], Any]
    unpatch: Callable[[torch.nn.Module], Any]
    settings: dict[str, Any] = field(default_factory=dict)


def baseline() -> Method:
    return Method("baseline (SDPA)", lambda unet: None, lambda unet: None)


def mame(**settings: Any) -> Method:
    label = ", ".join(f"{k}={v}" for k, v in settings.items())
    return Method(
        f"MaMe ({label})" if label else "MaMe (defaults)",
        lambda unet: apply_mame(unet, **settings),
        remove_mame,
        settings,
    )


def tomesd_method(ratio: float, **settings: Any) -> Method | None:
    """tomesd at ``ratio`` (its defaults otherwise), or ``None`` when it is not installed."""
    try:
        import tomesd
    except ImportError:
        return None
    extra = "".join(f", {k}={v}" for k, v in settings.items())
    return Method(
        f"tomesd (ratio={ratio}{extra})",
        lambda unet: tomesd.apply_patch(unet, ratio=ratio, **settings),
        tomesd.remove_patch,
        {"ratio": ratio, **settings},
    )


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
) -> list[dict[str, Any]]:
    """Time and compare ``methods`` on ``unet(**inputs)``.

    Returns one row per method: median seconds, speed-up over the first method, and the
    relative error of its output against the first method's (the reference).
    """
    call = call or call_like_a_pipeline
    device = next(unet.parameters()).device
    outputs: dict[str, torch.Tensor] = {}
    times: dict[str, list[float]] = {m.name: [] for m in methods}
    steps = len(methods) * (warmup + repeats)
    bar = tqdm(total=steps, desc="UNet benchmark", disable=not progress)
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
                "settings": method.settings,
                "seconds": seconds,
                "speedup": reference_time / seconds,
                "error": float(error),
                "all_seconds": times[method.name],
            }
        )
    return rows
