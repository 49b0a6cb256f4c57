"""Counting the ATen operations that do work: a device-free proxy for GPU kernel launches.

On a GPU at batch 2, a Stable Diffusion UNet is bound by kernel launches, so every
operation the merge adds is added wall time. The profiler on a CPU sees the same operator
calls a GPU run launches kernels for; views, reshapes, empties, dtype queries and no-op
dropout launch nothing and are not counted. Only top-level calls count (an ``aten::linear``
is one, not its ``addmm`` inside). MaMe's Triton kernels (``backend="triton"``) count as
``triton::<kernel>``, one per launch; on the meta device they launch nothing but are still
counted, so a whole UNet can be counted there in seconds.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Callable

from torch.profiler import ProfilerActivity, profile

#: Operators that launch no kernel of their own (metadata only, or no-ops at inference).
NO_WORK = frozenset(
    f"aten::{name}"
    for name in (
        "view",
        "reshape",
        "_reshape_alias",
        "_unsafe_view",
        "transpose",
        "permute",
        "unsqueeze",
        "squeeze",
        "expand",
        "expand_as",
        "slice",
        "select",
        "narrow",
        "unfold",
        "flatten",
        "unflatten",
        "as_strided",
        "t",
        "alias",
        "detach",
        "lift_fresh",
        "resolve_conj",
        "resolve_neg",
        "result_type",
        "promote_types",
        "empty",
        "empty_like",
        "empty_strided",
        "dropout",
    )
)


_COPIES = frozenset({"aten::clone", "aten::_to_copy", "aten::copy_"})


def work_ops(fn: Callable[[], object]) -> Counter:
    """``{op name: calls}`` of the top-level ATen operations ``fn()`` runs that do work.

    ``aten::contiguous`` and ``aten::to`` count only when they copy (then they call
    ``aten::clone``/``aten::_to_copy`` below them).
    """
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    counts: Counter = Counter()
    for event in prof.events():
        if event.name.startswith("triton::"):
            counts[event.name] += 1
            continue
        if not event.name.startswith("aten::") or inside_aten(event):
            continue
        if event.name in ("aten::contiguous", "aten::to", "aten::reshape"):
            if not any(child.name in _COPIES for child in event.cpu_children):
                continue  # a view of its input
            counts["aten::copy (" + event.name[6:] + ")"] += 1
        elif event.name not in NO_WORK:
            counts[event.name] += 1
    return counts


def unet_forward_ops(unet: Any, inputs: dict[str, Any], settings: dict[str, Any] | None = None) -> Counter:
    """:func:`work_ops` of one ``unet(**inputs)`` under ``inference_mode``, stock
    (``settings=None``) or with MaMe merging every call (``apply_mame(unet,
    min_latent_tokens=0, **settings)``, removed afterwards). On the meta device it takes
    seconds even for SDXL.

    The forward counted is the second: the first also builds the merge layouts' constant
    matrices, once per shape, device and dtype, which every later step of a sampling run
    finds ready."""
    import torch

    from ..api import apply_mame, remove_mame

    if settings is not None:
        apply_mame(unet, min_latent_tokens=0, **settings)
    try:
        with torch.inference_mode():
            unet(**inputs)
            return work_ops(lambda: unet(**inputs))
    finally:
        if settings is not None:
            remove_mame(unet)


def inside_aten(event: Any) -> bool:
    """Whether a profiler event ran inside another ATen operator (not at the top level)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False
