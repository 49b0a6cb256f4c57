"""Wall-clock timing: median of repeated runs after warm-up, or methods taking turns."""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def synchronize(device: torch.device | str | None) -> None:
    """Wait for ``device``'s queued kernels (CUDA runs asynchronously); a no-op elsewhere."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def median_seconds(
    fn: Callable[[], object], *, repeats: int = 5, warmup: int = 2, device: torch.device | str | None = None
) -> float:
    """Median wall time of ``fn()`` over ``repeats`` runs, after ``warmup`` untimed runs."""
    with torch.inference_mode():
        for _ in range(warmup):
            fn()
        synchronize(device)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def interleaved_seconds(
    calls: dict[str, Callable[[], object]],
    *,
    rounds: int,
    warmup: int = 1,
    device: torch.device | str | None = None,
) -> dict[str, list[float]]:
    """Wall times of every ``name -> fn``, the calls taking turns round by round (a machine
    whose speed drifts then slows them all alike): per name, one time per timed round."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    with torch.inference_mode():
        for round_index in range(warmup + rounds):
            for name, fn in calls.items():
                synchronize(device)
                start = time.perf_counter()
                fn()
                synchronize(device)
                if round_index >= warmup:
                    times[name].append(time.perf_counter() - start)
    return times
