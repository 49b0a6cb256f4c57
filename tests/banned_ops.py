"""The matrix-only contract (docs/operator.md, section 2): ops the merge path must never run."""

from __future__ import annotations

from typing import Callable

from torch.profiler import ProfilerActivity, profile

BANNED_OPS = frozenset(
    f"aten::{name}"
    for name in (
        "sort",
        "argsort",
        "topk",
        "kthvalue",
        "gather",
        "scatter",
        "scatter_",
        "scatter_add",
        "scatter_add_",
        "scatter_reduce",
        "scatter_reduce_",
        "index_select",
        "index_add",
        "index_add_",
        "index_put",
        "index_put_",
        "_index_put_impl_",
        "index",
        "nonzero",
        "masked_select",
        "masked_scatter",
        "masked_scatter_",
        "unique",
        "_unique",
        "_unique2",
        "unique_consecutive",
        "unique_dim",
        "one_hot",
    )
)


def ops_run_by(fn: Callable[[], object]) -> set[str]:
    """Names of the ATen ops ``fn`` runs (forward and backward), seen by the profiler."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    return {event.name for event in prof.events()}


def assert_no_banned_ops(fn: Callable[[], object]) -> set[str]:
    ops = ops_run_by(fn)
    assert any(op.startswith("aten::") for op in ops), "the profiler saw no ATen ops: nothing was checked"
    banned = sorted(ops & BANNED_OPS)
    assert not banned, f"the merge path ran banned ops: {banned}"
    return ops
