"""Fused Triton kernels for the UNet's default merge (``MaMeConfig(backend="triton")``).

On a GPU at batch 2 an SD forward is bound by kernel launches (README, "On a GPU"): the
torch path of :func:`~mame_diffusers.plan_merge` plus one merge is some 27 kernels, each a
few microseconds of host time, to move a tensor the GPU reads in microseconds. These
kernels compute the same plan and merge in two launches, and each further merge or restore
with a plan in one:

- ``_assign_kernel``: every token's slot. Per block of the layout, the dot products of its
  tokens with its candidate anchors (one ``tl.dot`` per channel chunk), the anchors' norms,
  the own anchor's tie-break and ``tau``'s floor, then the best candidate. Writes one
  ``int32`` slot index per token: the plan.
- ``_merge_kernel``: every slot's (size-weighted) mean. Per block, the slots of its own
  anchor cells; it reads the slot indices of its block and the neighbouring ones (a halo
  reaches at most one block over) and loads only the tokens that chose one of its slots,
  so each token is read once. Sums are a one-hot ``tl.dot`` with float32 accumulation, in
  a fixed order: no atomics, deterministic. The first merge also writes the slots' sizes.
- ``_restore_kernel``: every token receives its slot's value (MaRe's copy restore).

Same rule as the torch path (``merging.py`` stays the reference, and the path on CPUs):
strided anchors, hard assignment with any ``tau``, copy restore, optional token sizes, on
layouts whose blocks tile the grid without padding (every SD and SDXL latent at 512, 768,
1024 and 2048, at any ratio). The scores differ only in rounding (float32 accumulation
here, the input's dtype in the torch path), so a near-tie may go the other way. The tests
run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``) on a CPU against the torch
path, and compile them for real GPUs with :func:`compile_ahead`. Under ``torch.compile`` a
plan's calls are operators (``torch.ops.mame_diffusers``, at the end of this module) that
the compiled graph launches.

The kernels launch with the tokens' own ``(B, N, C)`` layout: no reshape, pad or copy
around them. Inside a kernel, loads and stores at computed addresses are the only indexing;
the torch path's contract (no sort, top-k, gather or scatter among ATen operations) is
about the torch path.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, field

import torch

from .merging import MergeLayout, PlanGrid, own_anchor_tie_break

try:  # triton ships with CUDA builds of torch on Linux; CPU builds need `pip install triton`
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None

__all__ = ["SlotPlan", "available", "compile_ahead", "interpreted", "plan_slots", "supports", "traceable"]

#: Candidates per block the assignment kernel holds in registers at once (its score tile is
#: ``BLOCK_T x next_pow2(K)``).
MAX_CANDIDATES = 256

# The clamp of empty slots' sizes, as the torch path's in float32 (``_slot_weights``).
_TINY = torch.finfo(torch.float32).tiny
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """Whether the triton package can be imported here."""
    return triton is not None


def interpreted() -> bool:
    """Whether Triton runs these kernels in its interpreter, on CPU tensors (for tests):
    ``TRITON_INTERPRET=1`` when this module was imported, which is when Triton decided."""
    return _INTERPRETED


def supports(layout: MergeLayout) -> bool:
    """Whether the kernels handle this layout: blocks that tile the grid exactly (no padding)
    and at most :data:`MAX_CANDIDATES` candidates per block (global layouts have too many)."""
    return not layout.padded and layout.num_candidates <= MAX_CANDIDATES


def _check_device(tensor: torch.Tensor) -> None:
    if triton is None:
        raise RuntimeError("backend='triton' needs the triton package: pip install triton")
    if tensor.device.type not in ("cuda", "meta") and not interpreted():
        raise RuntimeError(
            f"backend='triton' runs on CUDA tensors, got a tensor on {tensor.device}; "
            "use backend='torch' there (or TRITON_INTERPRET=1 to test the kernels on a CPU)"
        )
    if tensor.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(
            "backend='triton' has no backward pass: run inference under torch.no_grad() (as diffusers "
            "pipelines do), or use backend='torch' (differentiable) for training"
        )


# Plain integer arithmetic, not triton.next_power_of_2 / triton.cdiv: those are Triton
# functions, and each call costs microseconds of host time in a launch-bound forward.
def _pow2(value: int, at_least: int = 16) -> int:
    return max(at_least, 1 << (value - 1).bit_length())


def _cdiv(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _precision(dtype: torch.dtype) -> str:
    # float32 tokens keep float32 products (tl.dot would round them to tf32).
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=256)  # layouts are shared (merge_layout): one dict each
def _geometry(layout: MergeLayout) -> dict:
    """The layout's integers the kernels take (all static for a layout)."""
    return {
        "W": layout.width,
        "Hm": layout.merged_hw[0],
        "Wm": layout.merged_hw[1],
        "block_h": layout.block_h,
        "block_w": layout.block_w,
        "blocks_h": layout.blocks_h,
        "blocks_w": layout.blocks_w,
        "anchors_h": layout.anchors_h,
        "anchors_w": layout.anchors_w,
        "halo_h": layout.halo_h,
        "halo_w": layout.halo_w,
        "window_w": layout.window_w,
        "num_candidates": layout.num_candidates,
        "tokens_per_block": layout.tokens_per_block,
        # The most tokens one anchor cell holds.
        "cell_tokens": _cdiv(layout.block_h, layout.anchors_h) * _cdiv(layout.block_w, layout.anchors_w),
    }


@dataclass
class SlotPlan(PlanGrid):
    """A merge plan as one slot index per token, made by :func:`plan_slots`.

    It merges, restores and weighs keys as :class:`~mame_diffusers.MergePlan` does for the
    settings the kernels support (hard assignment, copy restore), with the kernels.
    """

    layout: MergeLayout
    #: ``(B, N)`` int32: the merged slot (row-major on ``merged_hw``) each token joins.
    slot_index: torch.Tensor
    #: ``(B, N)`` float32 weights of the tokens (how many tokens each stands for; 0: none),
    #: or ``None``: every token weighs 1.
    weights: torch.Tensor | None = None
    #: ``(B, M)`` float32: how many tokens each slot stands for (0 for an empty slot); set by
    #: the first merge.
    sizes: torch.Tensor | None = None
    _source: torch.Tensor | None = field(default=None, repr=False)
    _source_merged: torch.Tensor | None = field(default=None, repr=False)
    _log_sizes: torch.Tensor | None = field(default=None, repr=False)
    _biases: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.slot_index.shape[0]

    def merge(self, tokens: torch.Tensor) -> torch.Tensor:
        """MaMe: ``(B, N, C')`` -> ``(B, M, C')``, each slot's (size-weighted) mean, in one
        kernel."""
        self._check(tokens, self.layout.num_tokens, "merge")
        if tokens is self._source and self._source_merged is not None:
            return self._source_merged
        _check_device(tokens)
        if torch.compiler.is_compiling():  # the operator, which torch.compile traces
            merged, sizes, log_sizes = torch.ops.mame_diffusers.merge_slots(
                tokens, self.weights, self.slot_index, list(self.layout.init_fields())
            )
        else:  # the kernel itself: an operator's dispatch costs more host time than it does
            merged, sizes, log_sizes = _merge(
                tokens, self.weights, self.slot_index, self.layout, self.sizes is None, _launch
            )
        if self.sizes is None:  # the first merge writes the slots' sizes too
            self.sizes, self._log_sizes = sizes, log_sizes
        if self._source is tokens:
            self._source_merged = merged
        return merged

    def restore(self, merged: torch.Tensor) -> torch.Tensor:
        """MaRe: ``(B, M, C')`` -> ``(B, N, C')``, every token its slot's value, in one kernel."""
        self._check(merged, self.layout.num_merged, "restore")
        _check_device(merged)
        if torch.compiler.is_compiling():
            return torch.ops.mame_diffusers.restore_slots(merged, self.slot_index)
        return _restore(merged, self.slot_index, _launch)

    def attention_bias(self, dtype: torch.dtype, *, proportional: bool = True) -> torch.Tensor:
        if self.sizes is None:
            raise RuntimeError("a SlotPlan knows its slots' sizes after its first merge")
        return super().attention_bias(dtype, proportional=proportional)

    def _log_sizes_at_hand(self) -> torch.Tensor | None:
        return self._log_sizes  # written by the merge kernel with the sizes


def plan_slots(x: torch.Tensor, layout: MergeLayout, *, tau: float, sizes: torch.Tensor | None = None) -> SlotPlan:
    """The plan of :func:`~mame_diffusers.plan_merge` with strided anchors, hard assignment,
    ``tau`` and optional token ``sizes`` ``(B, N)`` on a layout the kernels :func:`supports`,
    as a :class:`SlotPlan`; one kernel.

    Under ``torch.compile``, ``tau`` must be a constant of the trace: the kernels branch on
    it (``MaMeConfig`` passes :meth:`~mame_diffusers.MaMeConfig.constant_tau`)."""
    if not supports(layout):
        raise ValueError(
            f"the triton kernels need blocks that tile the grid (no padding) and at most {MAX_CANDIDATES} "
            "candidates per block"
        )
    if x.ndim != 3 or x.shape[1] != layout.num_tokens:
        raise ValueError(f"x must have shape (batch, {layout.num_tokens}, channels), got {tuple(x.shape)}")
    _check_device(x)
    if sizes is not None:
        if tuple(sizes.shape) != tuple(x.shape[:2]):
            raise ValueError(f"sizes must have shape {tuple(x.shape[:2])}, got {tuple(sizes.shape)}")
        sizes = sizes.to(torch.float32).contiguous()
    if torch.compiler.is_compiling():
        slot_index = torch.ops.mame_diffusers.assign_slots(x, sizes, list(layout.init_fields()), float(tau))
    else:
        slot_index = _assign(x, sizes, layout, tau, _launch)
    return SlotPlan(layout, slot_index, sizes, _source=x)


def compile_ahead(
    layout: MergeLayout,
    channels: int,
    dtype: torch.dtype,
    *,
    tau: float = 0.0,
    weighted: bool = False,
    capability: int = 90,
) -> dict:
    """Compile the three kernels for CUDA compute capability ``capability`` (90: Hopper, 80:
    Ampere), as a merge on ``layout`` with ``channels`` and ``dtype`` launches them
    (``weighted``: with token sizes). No GPU needed.

    Returns ``{kernel name: triton CompiledKernel}`` (``.asm["ptx"]``, ``.asm["cubin"]``);
    raises what Triton's compiler raises. The tests use it to check on a CPU what the
    interpreter cannot: that the kernels compile for real GPUs.
    """
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    def meta(*shape: int, kind: torch.dtype = dtype) -> torch.Tensor:
        return torch.empty(*shape, device="meta", dtype=kind)

    batch, num_tokens, num_merged = 2, layout.num_tokens, layout.num_merged
    tokens, slots = meta(batch, num_tokens, channels), meta(batch, num_tokens, kind=torch.int32)
    merged, sizes = meta(batch, num_merged, channels), meta(batch, num_merged, kind=torch.float32)
    weights = meta(batch, num_tokens, kind=torch.float32) if weighted else None
    calls = {
        "assign": _assign_call(tokens, weights, slots, layout, tau),
        "merge": _merge_call(tokens, weights, slots, merged, sizes, sizes, layout),
        "restore": _restore_call(merged, slots, tokens),
    }
    target = GPUTarget("cuda", capability, 32)
    compiled = {}
    for name, (kernel, _, arguments, options) in calls.items():
        function = getattr(kernel, "fn", kernel)  # the Python function, even when interpreted
        function = function.fn if isinstance(function, JITFunction) else function
        parameters = inspect.signature(function).parameters
        constants = {k: v for k, v in arguments.items() if "constexpr" in str(parameters[k].annotation)}
        signature = {k: ("constexpr" if k in constants else _triton_type(v)) for k, v in arguments.items()}
        source = ASTSource(fn=JITFunction(function), signature=signature, constexprs=constants)
        compiled[name] = triton.compile(source, target=target, options=options)
    return compiled


def _triton_type(value: object) -> str:
    if isinstance(value, torch.Tensor):
        names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.int32: "i32"}
        return "*" + names[value.dtype]
    if isinstance(value, bool):
        return "i1"
    return "i32" if isinstance(value, int) else "fp32"


# -- the three steps, shared by eager calls (``launch=_launch``: the kernel itself) and the
# operators torch.compile traces (``launch=_launch_traceable``)


def _assign(x: torch.Tensor, weights: torch.Tensor | None, layout: MergeLayout, tau: float, launch) -> torch.Tensor:
    x = x.contiguous()
    weights = None if weights is None else weights.contiguous()
    slot_index = torch.empty(x.shape[0], x.shape[1], device=x.device, dtype=torch.int32)
    launch(*_assign_call(x, weights, slot_index, layout, tau))
    return slot_index


def _merge(
    tokens: torch.Tensor, weights: torch.Tensor | None, slot_index: torch.Tensor, layout: MergeLayout,
    write_sizes: bool, launch,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    tokens, slot_index = tokens.contiguous(), slot_index.contiguous()
    weights = None if weights is None else weights.contiguous()
    batch, _, channels = tokens.shape
    merged = torch.empty(batch, layout.num_merged, channels, device=tokens.device, dtype=tokens.dtype)
    sizes = log_sizes = None
    if write_sizes:
        sizes = torch.empty(batch, layout.num_merged, device=tokens.device, dtype=torch.float32)
        log_sizes = torch.empty(batch, layout.num_merged, device=tokens.device, dtype=torch.float32)
    launch(*_merge_call(tokens, weights, slot_index, merged, sizes, log_sizes, layout))
    return merged, sizes, log_sizes


def _restore(merged: torch.Tensor, slot_index: torch.Tensor, launch) -> torch.Tensor:
    merged, slot_index = merged.contiguous(), slot_index.contiguous()
    batch, _, channels = merged.shape
    restored = torch.empty(batch, slot_index.shape[1], channels, device=merged.device, dtype=merged.dtype)
    launch(*_restore_call(merged, slot_index, restored))
    return restored


# -- launches: each kernel's grid, arguments and options, shared by the launch and
# ahead-of-time compiling


def _launch(kernel, grid: tuple[int, ...], arguments: dict, options: dict) -> None:
    # Under the profiler each launch is an event of its own, "triton::<kernel>", which
    # mame_diffusers.benchmarking.ops.work_ops counts with the ATen operations. (The check
    # first: a record_function costs microseconds even with the profiler off.)
    if torch.autograd.profiler._is_profiler_enabled:
        name = getattr(kernel, "__name__", "kernel").strip("_")
        with torch.profiler.record_function(f"triton::{name}"):
            _run(kernel, grid, arguments, options)
    else:
        _run(kernel, grid, arguments, options)


def _run(kernel, grid: tuple[int, ...], arguments: dict, options: dict) -> None:
    # On the meta device (shapes only, as torch's own operators there) nothing runs. One
    # call's tensors share a device; the first argument is always one.
    if next(iter(arguments.values())).device.type != "meta":
        kernel[grid](**arguments, **options)


def _static(settings, layout: MergeLayout, channels, *key):
    # A kernel's grid and non-tensor arguments follow from the layout, the channels and the
    # settings: built once per combination (a launch-bound forward cannot spare the host
    # time). The channels pick block sizes: a symbolic count (a trace with dynamic shapes)
    # is specialized by int().
    return settings(layout, int(channels), *key)


@functools.lru_cache(maxsize=512)
def _assign_settings(layout: MergeLayout, channels: int, dtype: torch.dtype, weighted: bool, tau: float) -> tuple:
    if tau >= 1.0:
        tau_mode = 2  # every token keeps its own anchor
    elif tau > -1.0:
        tau_mode = 1  # the own anchor's score is raised to tau times the token's norm
    else:
        tau_mode = 0  # the best candidate, whatever its similarity
    block_k = _pow2(layout.num_candidates)
    # Score tiles (tokens x candidates) of at most 4096 entries, 64 x 64 or 16 x 256: larger
    # ones spill registers.
    block_t = max(16, min(64, 4096 // block_k, _pow2(layout.tokens_per_block)))
    arguments = {
        "N": layout.num_tokens, "C": channels, "tau": tau, "own_bonus": own_anchor_tie_break(torch.float32),
        **_geometry(layout),
        "TAU_MODE": tau_mode,
        "NEEDS_NORMS": tau_mode == 1 and tau != 0.0,
        "WEIGHTED": weighted,
        "BLOCK_T": block_t,
        "BLOCK_K": block_k,
        # Chunks of 32 channels: with 64, the pipelined loads of the anchors spill registers.
        "BLOCK_C": min(32, _pow2(channels)),
        "PRECISION": _precision(dtype),
    }
    return (layout.num_blocks, _cdiv(layout.tokens_per_block, block_t)), arguments


def _assign_call(
    x: torch.Tensor, weights: torch.Tensor | None, slot_index: torch.Tensor, layout: MergeLayout, tau: float
) -> tuple:
    batch, _, channels = x.shape
    grid, settings = _static(_assign_settings, layout, channels, x.dtype, weights is not None, float(tau))
    arguments = {
        # Never read without WEIGHTED: any pointer will do.
        "x_ptr": x, "weights_ptr": x if weights is None else weights, "slot_ptr": slot_index, **settings,
    }
    # Eight warps: with four, the score tile and the pipelined loads spill registers (sm_90,
    # triton 3.9; docs/operator.md, section 3).
    return _assign_kernel, (*grid, batch), arguments, {"num_warps": 8}


@functools.lru_cache(maxsize=512)
def _merge_settings(layout: MergeLayout, channels: int, dtype: torch.dtype, weighted: bool, write_sizes: bool) -> tuple:
    block_c = min(64, _pow2(channels))
    arguments = {
        "N": layout.num_tokens, "C": channels, "M": layout.num_merged, "tiny": _TINY, **_geometry(layout),
        "WRITE_SIZES": write_sizes,
        "WEIGHTED": weighted,
        "BLOCK_S": _pow2(layout.anchors_per_block),
        # Weighted sums are float32 products, whose operands take twice the registers.
        "BLOCK_T": min(32 if weighted else 64, _pow2(layout.tokens_per_block)),
        "BLOCK_C": block_c,
        "PRECISION": _precision(dtype),
    }
    return (layout.num_blocks, _cdiv(channels, block_c)), arguments


def _merge_call(
    tokens: torch.Tensor, weights: torch.Tensor | None, slot_index: torch.Tensor, merged: torch.Tensor,
    sizes: torch.Tensor | None, log_sizes: torch.Tensor | None, layout: MergeLayout,
) -> tuple:
    batch, _, channels = tokens.shape
    write_sizes = sizes is not None
    grid, settings = _static(_merge_settings, layout, channels, tokens.dtype, weights is not None, write_sizes)
    arguments = {
        # Pointers the kernel never touches (without WEIGHTED, or WRITE_SIZES) may be any.
        "x_ptr": tokens, "weights_ptr": tokens if weights is None else weights, "slot_ptr": slot_index,
        "out_ptr": merged,
        "sizes_ptr": sizes if write_sizes else merged, "log_sizes_ptr": log_sizes if write_sizes else merged,
        **settings,
    }
    return _merge_kernel, (*grid, batch), arguments, {"num_warps": 4}


def _restore_call(merged: torch.Tensor, slot_index: torch.Tensor, restored: torch.Tensor) -> tuple:
    batch, num_tokens, channels = restored.shape
    block_t, block_c = 32, min(64, _pow2(channels))
    grid = (_cdiv(num_tokens, block_t), _cdiv(channels, block_c), batch)
    arguments = {
        "merged_ptr": merged, "slot_ptr": slot_index, "out_ptr": restored,
        "N": num_tokens, "C": channels, "M": merged.shape[1], "BLOCK_T": block_t, "BLOCK_C": block_c,
    }
    return _restore_kernel, grid, arguments, {"num_warps": 4}


if triton is not None:

    @triton.jit
    def _assign_kernel(
        x_ptr, weights_ptr, slot_ptr, N, C, tau, own_bonus,
        W, Hm, Wm, block_h, block_w, blocks_h, blocks_w, anchors_h, anchors_w,
        halo_h, halo_w, window_w, num_candidates, tokens_per_block, cell_tokens,
        TAU_MODE: tl.constexpr, NEEDS_NORMS: tl.constexpr, WEIGHTED: tl.constexpr,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
    ):
        block = tl.program_id(0)
        batch = tl.program_id(2).to(tl.int64)
        block_row = block // blocks_w
        block_col = block % blocks_w
        # This program's tokens: a tile of one block, row-major inside the block.
        t = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < tokens_per_block
        row, col = t // block_w, t % block_w
        token = (block_row * block_h + row) * W + block_col * block_w + col
        # Its candidates: the window of anchor cells around the block, row-major.
        k = tl.arange(0, BLOCK_K)
        cell_row = block_row * anchors_h - halo_h + k // window_w
        cell_col = block_col * anchors_w - halo_w + k % window_w
        valid = (k < num_candidates) & (cell_row >= 0) & (cell_row < Hm) & (cell_col >= 0) & (cell_col < Wm)
        # Each candidate cell's anchor: its middle token (row-major), as the torch path's
        # strided anchors; cells may differ in size by one row or column.
        # (Candidates past the grid's edge take the nearest cell: no division by zero.)
        top, height = _cell_span(tl.minimum(tl.maximum(cell_row, 0), Hm - 1), block_h, anchors_h)
        left, width = _cell_span(tl.minimum(tl.maximum(cell_col, 0), Wm - 1), block_w, anchors_w)
        middle = (height * width + 1) // 2 - 1
        anchor = (top + middle // width) * W + left + middle % width
        if WEIGHTED:
            # The middle one of the cell's tokens that weigh something; a cell without any
            # has no anchor.
            present_count = tl.zeros((BLOCK_K,), dtype=tl.int32)
            for position in range(0, cell_tokens):
                member = (top + position // width) * W + left + position % width
                inside = valid & (position < height * width)
                weight = tl.load(weights_ptr + batch * N + member, mask=inside, other=0.0)
                present_count += (weight > 0).to(tl.int32)
            target = (present_count + 1) // 2
            rank = tl.zeros((BLOCK_K,), dtype=tl.int32)
            for position in range(0, cell_tokens):
                member = (top + position // width) * W + left + position % width
                inside = valid & (position < height * width)
                weight = tl.load(weights_ptr + batch * N + member, mask=inside, other=0.0)
                present = weight > 0
                rank += present.to(tl.int32)
                anchor = tl.where(present & (rank == target), member, anchor)
            valid = valid & (present_count > 0)

        base = x_ptr + batch * N * C
        dots = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
        anchor_squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
        token_squares = tl.zeros((BLOCK_T,), dtype=tl.float32)
        for start in range(0, C, BLOCK_C):
            channel = start + tl.arange(0, BLOCK_C)
            c_ok = channel < C
            tokens = tl.load(base + token[:, None] * C + channel[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0)
            anchors = tl.load(base + anchor[:, None] * C + channel[None, :], mask=valid[:, None] & c_ok[None, :], other=0.0)
            dots = tl.dot(tokens, tl.trans(anchors), dots, input_precision=PRECISION)
            anchors32 = anchors.to(tl.float32)
            anchor_squares += tl.sum(anchors32 * anchors32, axis=1)
            if NEEDS_NORMS:
                tokens32 = tokens.to(tl.float32)
                token_squares += tl.sum(tokens32 * tokens32, axis=1)

        # Cosine times the token's norm (F.normalize on the anchors, as the torch path).
        score = dots / tl.maximum(tl.sqrt(anchor_squares), 1e-12)[None, :]
        own_k = (row * anchors_h // block_h + halo_h) * window_w + col * anchors_w // block_w + halo_w
        own = k[None, :] == own_k[:, None]
        score = tl.where(own, score + own_bonus, score)
        # Before tau's floor, as in the torch path: the floor may lift an own cell that has
        # no anchor (its tokens all weigh 0), so that its weightless tokens stay there.
        score = tl.where(valid[None, :], score, float("-inf"))
        if TAU_MODE == 1:
            floor = tl.zeros((BLOCK_T,), dtype=tl.float32)
            if NEEDS_NORMS:
                floor = tau * tl.sqrt(token_squares)
            score = tl.where(own, tl.maximum(score, floor[:, None]), score)
        if TAU_MODE == 2:
            score = tl.where(own, 0.0, float("-inf"))
        best = tl.argmax(score, axis=1)  # ties: the first candidate, as torch.argmax
        slot = (block_row * anchors_h - halo_h + best // window_w) * Wm + block_col * anchors_w - halo_w + best % window_w
        tl.store(slot_ptr + batch * N + token, slot.to(tl.int32), mask=t_ok)

    @triton.jit
    def _cell_span(cell, block, anchors):
        """First grid row (or column) and size of the anchor cells ``cell`` (counted on the
        merged grid): token ``i`` of a block lies in cell ``i * anchors // block``."""
        local = cell % anchors
        start = (local * block + anchors - 1) // anchors
        end = ((local + 1) * block + anchors - 1) // anchors
        return (cell // anchors) * block + start, end - start

    @triton.jit
    def _merge_kernel(
        x_ptr, weights_ptr, slot_ptr, out_ptr, sizes_ptr, log_sizes_ptr, N, C, M, tiny,
        W, Hm, Wm, block_h, block_w, blocks_h, blocks_w, anchors_h, anchors_w,
        halo_h, halo_w, window_w, num_candidates, tokens_per_block, cell_tokens,
        WRITE_SIZES: tl.constexpr, WEIGHTED: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_T: tl.constexpr,
        BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
    ):
        block = tl.program_id(0)
        batch = tl.program_id(2).to(tl.int64)
        block_row = block // blocks_w
        block_col = block % blocks_w
        # This program's slots: the anchor cells of one block.
        s = tl.arange(0, BLOCK_S)
        s_ok = s < anchors_h * anchors_w
        slot = (block_row * anchors_h + s // anchors_w) * Wm + block_col * anchors_w + s % anchors_w
        slot = tl.where(s_ok, slot, -2)  # matches no slot index
        channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = channel < C

        sums = tl.zeros((BLOCK_S, BLOCK_C), dtype=tl.float32)
        counts = tl.zeros((BLOCK_S,), dtype=tl.float32)
        # Tokens that may have chosen these slots lie in this block or a neighbouring one.
        for neighbour in range(9):
            other_row = block_row + neighbour // 3 - 1
            other_col = block_col + neighbour % 3 - 1
            inside = (other_row >= 0) & (other_row < blocks_h) & (other_col >= 0) & (other_col < blocks_w)
            # No tokens past the grid's edge (one comparison: Triton's interpreter cannot
            # combine a scalar mask with a vector one).
            present = tl.where(inside, tokens_per_block, 0)
            for start in range(0, tokens_per_block, BLOCK_T):
                t = start + tl.arange(0, BLOCK_T)
                t_ok = t < present
                token = (other_row * block_h + t // block_w) * W + other_col * block_w + t % block_w
                chosen = tl.load(slot_ptr + batch * N + token, mask=t_ok, other=-1)
                hit = chosen[None, :] == slot[:, None]  # (BLOCK_S, BLOCK_T)
                wanted = tl.max(hit.to(tl.int32), axis=0) > 0
                if WEIGHTED:
                    weight = tl.load(weights_ptr + batch * N + token, mask=t_ok, other=0.0)
                    wanted = wanted & (weight > 0)
                # Only the tokens that chose one of these slots are read.
                tokens = tl.load(
                    x_ptr + batch * N * C + token[:, None] * C + channel[None, :],
                    mask=(t_ok & wanted)[:, None] & c_ok[None, :],
                    other=0.0,
                )
                if WEIGHTED:
                    # Sizes need not fit the tokens' precision: float32 products.
                    shares = hit.to(tl.float32) * weight[None, :]
                    sums = tl.dot(shares, tokens.to(tl.float32), sums, input_precision="ieee")
                    counts += tl.sum(shares, axis=1)
                else:
                    sums = tl.dot(hit.to(tokens.dtype), tokens, sums, input_precision=PRECISION)
                    counts += tl.sum(hit.to(tl.float32), axis=1)

        clamped = tl.maximum(counts, tiny)
        means = sums / clamped[:, None]
        tl.store(
            out_ptr + batch * M * C + slot[:, None] * C + channel[None, :],
            means.to(out_ptr.dtype.element_ty),
            mask=s_ok[:, None] & c_ok[None, :],
        )
        if WRITE_SIZES:
            if tl.program_id(1) == 0:  # the first channel chunk writes the sizes
                tl.store(sizes_ptr + batch * M + slot, counts, mask=s_ok)
                tl.store(log_sizes_ptr + batch * M + slot, tl.log(clamped), mask=s_ok)

    @triton.jit
    def _restore_kernel(merged_ptr, slot_ptr, out_ptr, N, C, M, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
        batch = tl.program_id(2).to(tl.int64)
        t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < N
        channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = t_ok[:, None] & (channel < C)[None, :]
        slot = tl.load(slot_ptr + batch * N + t, mask=t_ok, other=0)
        values = tl.load(merged_ptr + batch * M * C + slot[:, None] * C + channel[None, :], mask=mask, other=0.0)
        tl.store(out_ptr + batch * N * C + t[:, None] * C + channel[None, :], values, mask=mask)


# -- the kernels as torch operators, for torch.compile: ``mame_diffusers::assign_slots``,
# ``merge_slots`` and ``restore_slots``. Traced, a SlotPlan's calls are these operators, and on
# a GPU inductor sees the Triton kernels inside them (``torch.library.triton_op``) and
# launches them from its compiled graph (and its CUDA graphs). Triton's interpreter cannot be
# traced: there they are opaque operators that run the kernels, with shape-only fakes.


@functools.lru_cache(maxsize=256)
def _layout_of(fields: tuple[int, ...]) -> MergeLayout:
    return MergeLayout(*fields)


def _launch_traceable(kernel, grid: tuple[int, ...], arguments: dict, options: dict) -> None:
    # wrap_triton: a call torch.compile records in its graph; run eagerly, the kernel itself.
    first = next(iter(arguments.values()))
    if first.device.type == "meta" or (interpreted() and torch._subclasses.fake_tensor.is_fake(first)):
        return  # shapes only (the interpreted kernels' fakes)
    torch.library.wrap_triton(kernel)[grid](**arguments, **options)


def _assign_slots(x: torch.Tensor, weights: torch.Tensor | None, layout: list[int], tau: float) -> torch.Tensor:
    return _assign(x, weights, _layout_of(tuple(layout)), tau, _launch_traceable)


def _merge_slots(
    tokens: torch.Tensor, weights: torch.Tensor | None, slot_index: torch.Tensor, layout: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Always with the sizes: in a traced graph no pointer the kernel writes may alias another
    # argument (eager merges after the first pass the merged tokens for the sizes instead).
    return _merge(tokens, weights, slot_index, _layout_of(tuple(layout)), True, _launch_traceable)


def _restore_slots(merged: torch.Tensor, slot_index: torch.Tensor) -> torch.Tensor:
    return _restore(merged, slot_index, _launch_traceable)


def traceable() -> bool:
    """Whether ``torch.compile`` can trace the kernels: the operators are registered (triton,
    and torch 2.6 or newer for ``torch.library.triton_op``)."""
    return hasattr(torch.ops.mame_diffusers, "assign_slots")


def _register_operators() -> None:
    if triton is None or not hasattr(torch.library, "triton_op"):
        return
    for name, function in (
        ("assign_slots", _assign_slots), ("merge_slots", _merge_slots), ("restore_slots", _restore_slots)
    ):
        if interpreted():
            operator = torch.library.custom_op(f"mame_diffusers::{name}", function, mutates_args=())
            operator.register_fake(function)
        else:
            torch.library.triton_op(f"mame_diffusers::{name}", function, mutates_args=())


_register_operators()
