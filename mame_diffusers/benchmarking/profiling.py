"""Kernel counts and attention's share of GPU time, from one profiled call.

Eager PyTorch launches one or more kernels per operation, so on a fast GPU a model that
launches many small kernels can be bound by launching them rather than by arithmetic.
Counting the kernels of one call, and summing the time of those that compute attention,
says which of the two a method changes.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

import torch

from .ops import inside_aten
from .timing import synchronize

#: Substrings (lower case) of the names of kernels that compute attention: FlashAttention
#: (``flash_fwd``), the memory-efficient kernels (``fmha_cutlassF``), cuDNN's fused SDPA
#: (``cudnn_generated_fort_native_sdpa``), and the softmax of the unfused (math) path.
#: Inclusive on purpose; the names that matched are kept in the report to check against.
ATTENTION_KERNEL_PATTERNS = ("flash", "fmha", "attention", "attn", "sdpa", "mha", "softmax")


def is_attention_kernel(name: str) -> bool:
    lowered = name.lower()
    return any(pattern in lowered for pattern in ATTENTION_KERNEL_PATTERNS)


def summarize_kernels(kernels: Iterable[tuple[str, float]], *, top: int = 12) -> dict[str, Any]:
    """Count and total ``(name, microseconds)`` kernel records; ``Memcpy``/``Memset``
    records are counted apart, not as kernels."""
    count = copies = 0
    total_us = attention_us = 0.0
    by_name: dict[str, list[float]] = {}
    attention_names: set[str] = set()
    for name, us in kernels:
        if name.startswith(("Memcpy", "Memset")):
            copies += 1
            continue
        count += 1
        total_us += us
        entry = by_name.setdefault(name, [0, 0.0])
        entry[0] += 1
        entry[1] += us
        if is_attention_kernel(name):
            attention_us += us
            attention_names.add(name)
    heaviest = sorted(by_name.items(), key=lambda item: -item[1][1])[:top]
    return {
        "kernels": count,
        "memcpy_memset": copies,
        "kernel_ms": total_us / 1e3,
        "attention_ms": attention_us / 1e3,
        "attention_share": attention_us / total_us if total_us else None,
        "attention_kernel_names": sorted(attention_names),
        "top_kernels": [{"name": n[:160], "calls": c, "ms": us / 1e3} for n, (c, us) in heaviest],
    }


def profile_call(fn: Callable[[], object], device: torch.device | str) -> dict[str, Any]:
    """Run ``fn()`` once under ``torch.profiler`` and summarise what ran on ``device``.

    On CUDA the records are the profiler's events of device type CUDA (kernels and copies,
    not the user annotations that span them); elsewhere, the outermost ``aten::`` operators
    stand in for kernels, so that the code path runs on a CPU too (``kind`` says which).
    ``wall_ms`` is the profiled call's wall time (profiling adds some), ``kernel_ms`` the
    sum of the kernels' own times.
    """
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    device = torch.device(device)
    on_cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    synchronize(device)
    with torch.inference_mode(), profile(activities=activities) as prof:
        start = time.perf_counter()
        fn()
        synchronize(device)
        wall = time.perf_counter() - start
    events = prof.events()
    if on_cuda:
        # GPU-side user annotations (record_function ranges, compiled regions) carry the
        # device type too: they are spans over kernels, not kernels.
        records = [
            (e.name, e.time_range.elapsed_us())
            for e in events
            if e.device_type == DeviceType.CUDA and not getattr(e, "is_user_annotation", False)
        ]
    else:
        records = [
            (e.name, e.time_range.elapsed_us())
            for e in events
            if e.device_type == DeviceType.CPU and e.name.startswith("aten::") and not inside_aten(e)
        ]
    summary = summarize_kernels(records)
    summary.update(kind="CUDA kernels" if on_cuda else "CPU aten ops", wall_ms=wall * 1e3)
    return summary
