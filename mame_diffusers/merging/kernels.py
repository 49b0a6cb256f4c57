"""Fused Triton kernels for the UNet's merges (``MaMeConfig(backend="triton")``).

On a GPU at batch 2 an SD forward is bound by kernel launches (README, "On a GPU"): the
torch path of :func:`~mame_diffusers.merging.plan_on_layout` is dozens of small ATen
operations per plan, and a few per merge and restore, each some microseconds of host time
for work the GPU does in microseconds. These kernels compute the same plan, merge, fit and
restore in one launch each:

- ``_plan_kernel``, one program per (batch, block): the ranked slots of
  :func:`~mame_diffusers.merging.ranked.ranked_block_slots`. (1) Each token's best cosine
  similarity to the block's fixed destinations (the middle tokens of the layout constant
  ``"destination"``'s cells, found by the same integer arithmetic), one ``tl.dot`` per
  channel chunk, norms in float32; destinations score ``-inf``, as in the torch path, so
  they rank behind every source. (2) Each token's rank by comparisons with every other
  score (ties: the earlier token first), the ``T - K`` best-ranked sources merge, and the
  staying tokens take slots ``0..K-1`` in token order (``tl.cumsum``). (3) Every merging
  token's most similar staying token (``tl.argmax`` over the staying tokens in slot order,
  which is their token order: ties go to the first, as ``torch.argmax``). Writes one
  ``int32`` block-local slot per token, and each slot's size and ``log`` size, the key
  bias (in the tokens' dtype, so that attention takes it as it is). Steps (1)-(2) and
  (2)-(3) hand each other per-token scores and the staying tokens through a scratch
  buffer in global memory, behind a barrier: the whole block's scores and its ``T x T``
  comparisons do not fit in registers at once.
- ``_merge_kernel``, one program per (batch, block, channel chunk): each slot's mean,
  ``MergePlan.merge``'s size-weighted mean, as a one-hot ``tl.dot`` over the block's
  tokens with float32 accumulation, divided by the slot's count, written to the slot's
  place on the merged grid. No atomics: deterministic.
- ``_fit_kernel``, one program per (batch, block), once per plan at its first restore, as
  ``MergePlan.restore_weights``: the affine restore weights ``W = A + D`` of
  :func:`~mame_diffusers.merging.plan.affine_restore_weights`, in float32. The Gram
  matrix ``G`` of the block's ``K`` slot means (read from the first merge of the planned
  tokens, which are the torch path's means too), the ridge system ``P = G + ridge s I``,
  its inverse by a symmetric sweep (Gauss-Jordan that keeps the matrix symmetric, no
  pivoting: ``P`` is positive definite) in registers, then per tile of tokens the
  residuals ``R = (X - A Z) Z^T`` (the torch path's ``X Z^T - A G``), ``F = R P^-1``
  and the constraint that each row of ``W`` sums to one. Writes ``(B, blocks, T, K)``.
- ``_restore_kernel``, one program per (batch, block, token tile, channel chunk):
  ``W @`` the block's slot values (``MergePlan.restore``), ``W`` cast to the values' dtype
  as the torch path casts it, float32 accumulation, written to the tokens' places.

A plan is one launch, its first restore two (fit + restore), every other merge or restore
one. Scores compare in float32 as the torch path's (it promotes to float32); the sums
differ in rounding only, so a near-tie may go the other way. They handle layouts in blocks
that tile the grid without padding, at most :data:`MAX_TOKENS_PER_BLOCK` tokens and
:data:`MAX_SLOTS` slots per block (:func:`supports`): every SD and SDXL latent at 512 to
2048 in blocks of 16, at ratios from 0.5 up. Global layouts (one block: bipartite rounds),
padded ones and larger ``K`` take the torch path. Tokens are float32, float16 or bfloat16
with any number of channels; plans take no token sizes.

The tests run the kernels in Triton's interpreter (``TRITON_INTERPRET=1``) on a CPU against
the torch path, and compile them for real GPUs with :func:`compile_ahead`. Under
``torch.compile`` a plan's calls are operators (``torch.ops.mame_diffusers``, at the end of
this module) that the compiled graph launches. Kernels take the tokens' own ``(B, N, C)``
layout: no reshape, pad or copy around them.
"""

from __future__ import annotations

import functools
import inspect
import os
from dataclasses import dataclass, field

import torch

from .layout import MergeLayout, fit_cell_grid
from .plan import AFFINE_RIDGE, PlanGrid, proportional_attention_bias

try:  # triton ships with CUDA builds of torch on Linux; CPU builds need `pip install triton`
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where triton is missing
    triton = None

__all__ = [
    "MAX_SLOTS",
    "MAX_TOKENS_PER_BLOCK",
    "SlotPlan",
    "available",
    "compile_ahead",
    "interpreted",
    "plan_slots",
    "supports",
    "traceable",
]

#: Most tokens per block: the plan's comparison tiles hold a whole block's scores (blocks
#: of 16 x 16).
MAX_TOKENS_PER_BLOCK = 256
#: Most slots per block: the fit inverts the ``K x K`` ridge system in registers.
MAX_SLOTS = 128

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Empty slots' sizes are clamped to this before a log or a division, as in the torch path.
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
    """Whether the kernels compute this layout's plan: blocks (at least two) that tile the
    grid exactly, at most :data:`MAX_TOKENS_PER_BLOCK` tokens and :data:`MAX_SLOTS` slots
    per block, and something to merge."""
    return (
        layout.merges
        and layout.num_blocks > 1  # one block: the torch path's bipartite rounds
        and not layout.padded
        and layout.tokens_per_block <= MAX_TOKENS_PER_BLOCK
        and layout.slots_per_block <= MAX_SLOTS
    )


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
    if tensor.dtype not in _DTYPES:
        raise ValueError(f"the triton kernels take float32, float16 or bfloat16 tensors, got {tensor.dtype}")


def _contiguous(tensor: torch.Tensor) -> torch.Tensor:
    # Checked first: even a contiguous() that copies nothing is a dispatcher call.
    return tensor if tensor.is_contiguous() else tensor.contiguous()


# Plain integer arithmetic, not triton.next_power_of_2 / triton.cdiv: those are Triton
# functions, and each call costs microseconds of host time in a launch-bound forward.
def _pow2(value: int, at_least: int = 16) -> int:
    return max(at_least, 1 << (value - 1).bit_length())


def _cdiv(numerator: int, denominator: int) -> int:
    return -(-numerator // denominator)


def _upcast(dtype: torch.dtype) -> bool:
    # Triton's interpreter (3.9) multiplies bfloat16 tiles as raw integers: there, products
    # of bfloat16 are taken in float32, which is exact (on GPUs the native bfloat16 dot is).
    return interpreted() and dtype == torch.bfloat16


def _precision(dtype: torch.dtype) -> str:
    # float32 tokens keep float32 products, as the torch path's matmuls (tf32 would round
    # them to 10 bits and flip rankings); half-precision products are exact anyway.
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.lru_cache(maxsize=256)  # layouts are shared (merge_layout): one dict each
def _geometry(layout: MergeLayout) -> dict:
    """The layout's integers every kernel takes."""
    return {
        "W": layout.width,
        "Wm": layout.merged_hw[1],
        "block_h": layout.block_h,
        "block_w": layout.block_w,
        "blocks_w": layout.blocks_w,
        "slots_h": layout.slots_h,
        "slots_w": layout.slots_w,
        "T": layout.tokens_per_block,
        "K": layout.slots_per_block,
    }


@dataclass
class SlotPlan(PlanGrid):
    """A merge plan as one slot per token, made by :func:`plan_slots`.

    It merges, restores and weighs keys as :class:`~mame_diffusers.merging.MergePlan` does,
    with the kernels: ``merge`` one launch, ``restore`` one (the first also fits the
    restore weights: one more).
    """

    layout: MergeLayout
    #: ``(B, N)`` int32: the slot of its block (``0..K-1``) each token joins.
    slot_index: torch.Tensor
    #: ``(B, M)`` float32: how many tokens each merged slot stands for.
    sizes: torch.Tensor
    #: ``(B, M)``: ``log`` of the sizes, in the planned tokens' dtype (the key bias).
    _log_sizes: torch.Tensor = field(repr=False)
    _source: torch.Tensor | None = field(default=None, repr=False)
    _source_merged: torch.Tensor | None = field(default=None, repr=False)
    _restore_weights: torch.Tensor | None = field(default=None, repr=False)
    _biases: dict = field(default_factory=dict, repr=False)

    @property
    def batch_size(self) -> int:
        return self.slot_index.shape[0]

    def merge(self, tokens: torch.Tensor) -> torch.Tensor:
        """MaMe: ``(B, N, C')`` -> ``(B, M, C')``, each slot's mean, in one kernel; the
        planned tokens merge once (again: the same tensor)."""
        self._check(tokens, self.layout.num_tokens, "merge")
        if tokens is self._source and self._source_merged is not None:
            return self._source_merged
        _check_device(tokens)
        if torch.compiler.is_compiling():  # the operator, which torch.compile traces
            merged = torch.ops.mame_diffusers.merge_slots(tokens, self.slot_index, list(self.layout.init_fields()))
        else:  # the kernel itself: an operator's dispatch costs more host time than it does
            merged = _merge(tokens, self.slot_index, self.layout, _launch)
        if tokens is self._source:
            self._source_merged = merged
        return merged

    def restore(self, merged: torch.Tensor) -> torch.Tensor:
        """MaRe: ``(B, M, C')`` -> ``(B, N, C')``, each token the fitted affine combination of
        its block's slots (:attr:`restore_weights`), in one kernel."""
        self._check(merged, self.layout.num_merged, "restore")
        _check_device(merged)
        weights = self.restore_weights
        if torch.compiler.is_compiling():
            return torch.ops.mame_diffusers.restore_slots(merged, weights, list(self.layout.init_fields()))
        return _restore(merged, weights, self.layout, _launch)

    @property
    def restore_weights(self) -> torch.Tensor:
        """``(B, blocks, T, K)`` float32: ``MergePlan.restore_weights``, fitted by one kernel
        on the first restore, from the planned tokens and their merge (merged first if no
        merge of them was asked for yet)."""
        if self._restore_weights is None:
            if self._source is None:
                raise ValueError("the restore needs the planned tokens: make the plan with plan_slots")
            means = self.merge(self._source)
            if torch.compiler.is_compiling():
                self._restore_weights = torch.ops.mame_diffusers.fit_slots(
                    self._source, means, self.slot_index, list(self.layout.init_fields())
                )
            else:
                self._restore_weights = _fit(self._source, means, self.slot_index, self.layout, _launch)
        return self._restore_weights

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """:func:`~mame_diffusers.merging.proportional_attention_bias` of the sizes, ``(B, M)``:
        the plan kernel's in the planned tokens' dtype, else from the sizes (once per dtype)."""
        bias = self._biases.get(dtype)
        if bias is None:
            bias = self._log_sizes if self._log_sizes.dtype == dtype else proportional_attention_bias(self.sizes, dtype)
            self._biases[dtype] = bias
        return bias


def plan_slots(tokens: torch.Tensor, layout: MergeLayout, *, sizes: torch.Tensor | None = None) -> SlotPlan:
    """:func:`~mame_diffusers.merging.plan_on_layout`'s plan of ``tokens`` ``(B, N, C)`` on a
    layout the kernels :func:`supports`, as a :class:`SlotPlan`; one kernel.

    ``sizes`` must be ``None``: the kernels plan tokens that each weigh 1 (the torch path
    takes token sizes)."""
    if sizes is not None:
        raise ValueError("the triton kernels plan unweighted tokens only (sizes=None); use the torch path for sizes")
    if not supports(layout):
        raise ValueError(
            f"the triton kernels need at least two blocks that tile the grid (no padding), at most "
            f"{MAX_TOKENS_PER_BLOCK} tokens and {MAX_SLOTS} slots per block; got {layout}"
        )
    if tokens.ndim != 3 or tokens.shape[1] != layout.num_tokens:
        raise ValueError(
            f"tokens must have shape (batch, {layout.num_tokens}, channels), got {tuple(tokens.shape)}"
        )
    _check_device(tokens)
    if torch.compiler.is_compiling():
        slot_index, slot_sizes, log_sizes = torch.ops.mame_diffusers.plan_slots(
            tokens, list(layout.init_fields())
        )
    else:
        slot_index, slot_sizes, log_sizes = _plan(tokens, layout, _launch)
    return SlotPlan(layout, slot_index, slot_sizes, log_sizes, _source=tokens)


def compile_ahead(layout: MergeLayout, channels: int, dtype: torch.dtype, *, capability: int = 90) -> dict:
    """Compile the four kernels for CUDA compute capability ``capability`` (90: Hopper, 80:
    Ampere), as a plan, merge, fit and restore on ``layout`` with ``channels`` and ``dtype``
    launch them. No GPU needed.

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
    tokens, merged = meta(batch, num_tokens, channels), meta(batch, num_merged, channels)
    slots = meta(batch, num_tokens, kind=torch.int32)
    sizes, log_sizes = meta(batch, num_merged, kind=torch.float32), meta(batch, num_merged)
    scratch = meta(batch, num_tokens + num_merged, kind=torch.float32)
    weights = meta(batch, layout.num_blocks, layout.tokens_per_block, layout.slots_per_block, kind=torch.float32)
    calls = {
        "plan": _plan_call(tokens, slots, sizes, log_sizes, scratch, layout),
        "merge": _merge_call(tokens, slots, merged, layout),
        "fit": _fit_call(tokens, merged, slots, weights, layout),
        "restore": _restore_call(merged, weights, tokens, layout),
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


# -- the four steps, shared by eager calls (``launch=_launch``: the kernel itself) and the
# operators torch.compile traces (``launch=_launch_traceable``)


def _plan(tokens: torch.Tensor, layout: MergeLayout, launch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    tokens = _contiguous(tokens)
    batch, num_tokens, _ = tokens.shape
    num_merged, device = layout.num_merged, tokens.device
    slot_index = torch.empty(batch, num_tokens, device=device, dtype=torch.int32)
    sizes = torch.empty(batch, num_merged, device=device, dtype=torch.float32)
    log_sizes = torch.empty(batch, num_merged, device=device, dtype=tokens.dtype)
    # Per-token scores, then each slot's staying token: what the plan's steps hand on.
    scratch = torch.empty(batch, num_tokens + num_merged, device=device, dtype=torch.float32)
    launch(*_plan_call(tokens, slot_index, sizes, log_sizes, scratch, layout))
    return slot_index, sizes, log_sizes


def _merge(tokens: torch.Tensor, slot_index: torch.Tensor, layout: MergeLayout, launch) -> torch.Tensor:
    tokens = _contiguous(tokens)
    batch, _, channels = tokens.shape
    merged = torch.empty(batch, layout.num_merged, channels, device=tokens.device, dtype=tokens.dtype)
    launch(*_merge_call(tokens, slot_index, merged, layout))
    return merged


def _fit(
    tokens: torch.Tensor, merged: torch.Tensor, slot_index: torch.Tensor, layout: MergeLayout, launch
) -> torch.Tensor:
    tokens, merged = _contiguous(tokens), _contiguous(merged)
    weights = torch.empty(
        tokens.shape[0], layout.num_blocks, layout.tokens_per_block, layout.slots_per_block,
        device=tokens.device, dtype=torch.float32,
    )
    launch(*_fit_call(tokens, merged, slot_index, weights, layout))
    return weights


def _restore(merged: torch.Tensor, weights: torch.Tensor, layout: MergeLayout, launch) -> torch.Tensor:
    merged = _contiguous(merged)
    batch, _, channels = merged.shape
    restored = torch.empty(batch, layout.num_tokens, channels, device=merged.device, dtype=merged.dtype)
    launch(*_restore_call(merged, weights, restored, layout))
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
    # dtype: built once per combination (a launch-bound forward cannot spare the host
    # time). The channels pick block sizes: a symbolic count (a trace with dynamic shapes)
    # is specialized by int().
    return settings(layout, int(channels), *key)


# Launch settings: read from the compiled register use (``cuobjdump --dump-resource-usage``
# on compile_ahead's cubins, triton 3.9). With them nothing spills in float16 or bfloat16 on
# sm_90 or sm_80 for SD 2.1 (96 x 96, 320 channels, K = 64 and 16; 64 x 64, 640 channels),
# nor on sm_90 for SDXL's deep stacks (32 x 32, 1,280 channels, K = 128), whose fit spills
# 200 bytes on sm_80 (once per plan). float32 products run on FMA units, whose operands take
# more registers: smaller tiles there; at K = 128 its plan and fit still spill on sm_80.


@functools.lru_cache(maxsize=512)
def _plan_settings(layout: MergeLayout, channels: int, dtype: torch.dtype) -> tuple:
    tokens, slots = layout.tokens_per_block, layout.slots_per_block
    # The destinations: as the layout's constant "destination", a grid of K // 2 cells.
    dest_rows, dest_cols = fit_cell_grid(max(1, slots // 2), layout.block_h, layout.block_w)
    arguments = {
        "N": layout.num_tokens, "C": channels, "M": layout.num_merged, **_geometry(layout),
        "D": dest_rows * dest_cols, "dest_rows": dest_rows, "dest_cols": dest_cols, "tiny": _TINY,
        # Similarity tiles of at most 64 tokens x 128 slots (32 in float32, whose products
        # take FMA units and registers), rank tiles of 256 x 32.
        "BLOCK_T": min(32 if dtype == torch.float32 else 64, _pow2(tokens)),
        "BLOCK_TT": _pow2(tokens),
        "BLOCK_J": 32,
        "BLOCK_D": _pow2(dest_rows * dest_cols),
        "BLOCK_K": _pow2(slots),
        "BLOCK_C": min(32, _pow2(channels)),
        "PRECISION": _precision(dtype),
        "UPCAST": _upcast(dtype),
    }
    return (layout.num_blocks,), arguments, {"num_warps": 8}


def _plan_call(
    tokens: torch.Tensor, slot_index: torch.Tensor, sizes: torch.Tensor, log_sizes: torch.Tensor,
    scratch: torch.Tensor, layout: MergeLayout,
) -> tuple:
    batch, _, channels = tokens.shape
    grid, settings, options = _static(_plan_settings, layout, channels, tokens.dtype)
    arguments = {
        "x_ptr": tokens, "slot_ptr": slot_index, "sizes_ptr": sizes, "log_sizes_ptr": log_sizes,
        "scratch_ptr": scratch, **settings,
    }
    return _plan_kernel, (*grid, batch), arguments, options


@functools.lru_cache(maxsize=512)
def _merge_settings(layout: MergeLayout, channels: int, dtype: torch.dtype) -> tuple:
    block_c = min(32 if dtype == torch.float32 else 64, _pow2(channels))
    block_k = _pow2(layout.slots_per_block)
    arguments = {
        "N": layout.num_tokens, "C": channels, "M": layout.num_merged, **_geometry(layout), "tiny": _TINY,
        "BLOCK_T": min(32 if dtype == torch.float32 else 64, _pow2(layout.tokens_per_block)),
        "BLOCK_K": block_k,
        "BLOCK_C": block_c,
        "PRECISION": _precision(dtype),
        "UPCAST": _upcast(dtype),
    }
    return (layout.num_blocks, _cdiv(channels, block_c)), arguments, {"num_warps": 8 if block_k > 64 else 4}


def _merge_call(tokens: torch.Tensor, slot_index: torch.Tensor, merged: torch.Tensor, layout: MergeLayout) -> tuple:
    batch, _, channels = tokens.shape
    grid, settings, options = _static(_merge_settings, layout, channels, tokens.dtype)
    arguments = {"x_ptr": tokens, "slot_ptr": slot_index, "out_ptr": merged, **settings}
    return _merge_kernel, (*grid, batch), arguments, options


@functools.lru_cache(maxsize=512)
def _fit_settings(layout: MergeLayout, channels: int, dtype: torch.dtype) -> tuple:
    block_k = _pow2(layout.slots_per_block)
    arguments = {
        "N": layout.num_tokens, "C": channels, "M": layout.num_merged, **_geometry(layout),
        "num_blocks": layout.num_blocks, "ridge": AFFINE_RIDGE, "tiny": _TINY,
        # The inverse (BLOCK_K x BLOCK_K) stays in registers while token tiles pass.
        "BLOCK_T": 16 if block_k > 64 else 32,
        "BLOCK_K": block_k,
        "BLOCK_C": 32,
    }
    return (layout.num_blocks,), arguments, {"num_warps": 16 if block_k > 64 else 8}


def _fit_call(
    tokens: torch.Tensor, merged: torch.Tensor, slot_index: torch.Tensor, weights: torch.Tensor, layout: MergeLayout
) -> tuple:
    batch, _, channels = tokens.shape
    grid, settings, options = _static(_fit_settings, layout, channels, tokens.dtype)
    arguments = {"x_ptr": tokens, "means_ptr": merged, "slot_ptr": slot_index, "w_ptr": weights, **settings}
    return _fit_kernel, (*grid, batch), arguments, options


@functools.lru_cache(maxsize=512)
def _restore_settings(layout: MergeLayout, channels: int, dtype: torch.dtype) -> tuple:
    block_t = min(64, _pow2(layout.tokens_per_block))
    block_c = min(32 if dtype == torch.float32 else 64, _pow2(channels))
    tiles = _cdiv(layout.tokens_per_block, block_t)
    arguments = {
        "N": layout.num_tokens, "C": channels, "M": layout.num_merged, **_geometry(layout),
        "num_blocks": layout.num_blocks, "tiles": tiles,
        "BLOCK_T": block_t,
        "BLOCK_K": min(32 if dtype == torch.float32 else 64, _pow2(layout.slots_per_block)),
        "BLOCK_C": block_c,
        "PRECISION": _precision(dtype),
        "UPCAST": _upcast(dtype),
    }
    return (layout.num_blocks * tiles, _cdiv(channels, block_c)), arguments, {"num_warps": 8}


def _restore_call(merged: torch.Tensor, weights: torch.Tensor, restored: torch.Tensor, layout: MergeLayout) -> tuple:
    batch, _, channels = merged.shape
    grid, settings, options = _static(_restore_settings, layout, channels, merged.dtype)
    arguments = {"merged_ptr": merged, "w_ptr": weights, "out_ptr": restored, **settings}
    return _restore_kernel, (*grid, batch), arguments, options


if triton is not None:
    # Index arithmetic is written out in each kernel, not in shared @triton.jit helpers:
    # Triton's interpreter (the tests) re-patches its builtins on every helper call, which
    # made the plan several times slower there. In every kernel, a token's grid index is
    # ``first + (t // block_w) * W + t % block_w`` (t row-major inside its block), and a
    # slot's merged index ``first_slot + (k // slots_w) * Wm + k % slots_w``
    # (``MergeLayout.slots_to_grid``). UPCAST: products of bfloat16 in float32, where
    # Triton's interpreter multiplies bfloat16 tiles as raw integers (exact either way).

    @triton.jit
    def _plan_kernel(
        x_ptr, slot_ptr, sizes_ptr, log_sizes_ptr, scratch_ptr, N, C, M,
        W, Wm, block_h, block_w, blocks_w, slots_h, slots_w, T, K, D, dest_rows, dest_cols, tiny,
        BLOCK_T: tl.constexpr, BLOCK_TT: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_D: tl.constexpr,
        BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        block = tl.program_id(0)
        batch = tl.program_id(1).to(tl.int64)
        block_row = block // blocks_w
        block_col = block % blocks_w
        first = block_row * block_h * W + block_col * block_w
        x_base = x_ptr + batch * N * C
        scores = scratch_ptr + batch * (N + M)  # indexed by grid token
        staying = scores + N + block * K  # indexed by slot

        # The destinations: the middle token of each of dest_rows x dest_cols cells.
        d = tl.arange(0, BLOCK_D)
        d_ok = d < D
        dest = ((2 * (d // dest_cols) + 1) * block_h // (2 * dest_rows)) * block_w + (
            (2 * (d % dest_cols) + 1) * block_w // (2 * dest_cols)
        )
        dest_token = first + (dest // block_w) * W + dest % block_w

        # (1) Each token's best cosine similarity to a destination; destinations: -inf.
        for start in range(0, T, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            t_ok = t < T
            token = first + (t // block_w) * W + t % block_w
            dots = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
            token_squares = tl.zeros((BLOCK_T,), dtype=tl.float32)
            dest_squares = tl.zeros((BLOCK_D,), dtype=tl.float32)
            for channel_start in range(0, C, BLOCK_C):
                channel = channel_start + tl.arange(0, BLOCK_C)
                c_ok = channel < C
                x = tl.load(
                    x_base + token[:, None] * C + channel[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0
                )
                y = tl.load(
                    x_base + dest_token[:, None] * C + channel[None, :], mask=d_ok[:, None] & c_ok[None, :], other=0.0
                )
                x32 = x.to(tl.float32)
                y32 = y.to(tl.float32)
                if UPCAST:
                    dots = tl.dot(x32, tl.trans(y32), dots, input_precision="ieee")
                else:
                    dots = tl.dot(x, tl.trans(y), dots, input_precision=PRECISION)
                token_squares += tl.sum(x32 * x32, axis=1)
                dest_squares += tl.sum(y32 * y32, axis=1)
            # F.normalize's floor on the norms.
            cosine = dots / tl.maximum(tl.sqrt(token_squares), 1e-12)[:, None]
            cosine = cosine / tl.maximum(tl.sqrt(dest_squares), 1e-12)[None, :]
            best = tl.max(tl.where(d_ok[None, :], cosine, float("-inf")), axis=1)
            is_dest = tl.max(((t[:, None] == dest[None, :]) & d_ok[None, :]).to(tl.int32), axis=1) > 0
            tl.store(scores + token, tl.where(is_dest, float("-inf"), best), mask=t_ok)
        tl.debug_barrier()  # every thread's scores in memory before any is read back

        # (2) Ranks by comparisons: how many scores come ahead (higher, or equal and
        # earlier). The T - K first sources merge; the others keep slots in token order.
        a = tl.arange(0, BLOCK_TT)
        a_ok = a < T
        a_score = tl.load(scores + first + (a // block_w) * W + a % block_w, mask=a_ok, other=0.0)
        rank = tl.zeros((BLOCK_TT,), dtype=tl.int32)
        for start in range(0, T, BLOCK_J):
            j = start + tl.arange(0, BLOCK_J)
            j_ok = j < T
            j_score = tl.load(scores + first + (j // block_w) * W + j % block_w, mask=j_ok, other=0.0)
            ahead = (j_score[None, :] > a_score[:, None]) | (
                (j_score[None, :] == a_score[:, None]) & (j[None, :] < a[:, None])
            )
            rank += tl.sum((ahead & j_ok[None, :]).to(tl.int32), axis=1)
        merges = (rank < T - K) & (a_score > float("-inf"))  # destinations never merge
        stays = a_ok & ~merges
        position = tl.cumsum(stays.to(tl.int32), axis=0) - 1
        # Each slot's staying token (block-local), for step 3 to read in slot order.
        tl.store(staying + position, a.to(tl.float32), mask=stays & (position < K))
        tl.debug_barrier()

        # (3) Every merging token joins its most similar staying token.
        k = tl.arange(0, BLOCK_K)
        k_ok = k < K
        stay = tl.load(staying + k, mask=k_ok, other=0.0).to(tl.int32)
        stay_token = first + (stay // block_w) * W + stay % block_w
        counts = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for start in range(0, T, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            t_ok = t < T
            token = first + (t // block_w) * W + t % block_w
            dots = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
            token_squares = tl.zeros((BLOCK_T,), dtype=tl.float32)
            stay_squares = tl.zeros((BLOCK_K,), dtype=tl.float32)
            for channel_start in range(0, C, BLOCK_C):
                channel = channel_start + tl.arange(0, BLOCK_C)
                c_ok = channel < C
                x = tl.load(
                    x_base + token[:, None] * C + channel[None, :], mask=t_ok[:, None] & c_ok[None, :], other=0.0
                )
                y = tl.load(
                    x_base + stay_token[:, None] * C + channel[None, :], mask=k_ok[:, None] & c_ok[None, :], other=0.0
                )
                x32 = x.to(tl.float32)
                y32 = y.to(tl.float32)
                if UPCAST:
                    dots = tl.dot(x32, tl.trans(y32), dots, input_precision="ieee")
                else:
                    dots = tl.dot(x, tl.trans(y), dots, input_precision=PRECISION)
                token_squares += tl.sum(x32 * x32, axis=1)
                stay_squares += tl.sum(y32 * y32, axis=1)
            cosine = dots / tl.maximum(tl.sqrt(token_squares), 1e-12)[:, None]
            cosine = cosine / tl.maximum(tl.sqrt(stay_squares), 1e-12)[None, :]
            choice = tl.argmax(tl.where(k_ok[None, :], cosine, float("-inf")), axis=1)  # ties: the first
            choice = tl.minimum(choice, K - 1)  # a slot of this block even for NaN tokens
            own = (t[:, None] == stay[None, :]) & k_ok[None, :]
            kept = tl.max(own.to(tl.int32), axis=1) > 0
            slot = tl.where(kept, tl.sum(tl.where(own, k[None, :], 0), axis=1), choice)
            tl.store(slot_ptr + batch * N + token, slot.to(tl.int32), mask=t_ok)
            counts += tl.sum(((slot[:, None] == k[None, :]) & t_ok[:, None]).to(tl.float32), axis=0)

        first_slot = block_row * slots_h * Wm + block_col * slots_w
        merged_index = batch * M + first_slot + (k // slots_w) * Wm + k % slots_w
        tl.store(sizes_ptr + merged_index, counts, mask=k_ok)
        log_sizes = tl.log(tl.maximum(counts, tiny))
        tl.store(log_sizes_ptr + merged_index, log_sizes.to(log_sizes_ptr.dtype.element_ty), mask=k_ok)

    @triton.jit
    def _merge_kernel(
        x_ptr, slot_ptr, out_ptr, N, C, M, W, Wm, block_h, block_w, blocks_w, slots_h, slots_w, T, K, tiny,
        BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, PRECISION: tl.constexpr,
        UPCAST: tl.constexpr,
    ):
        block = tl.program_id(0)
        batch = tl.program_id(2).to(tl.int64)
        block_row = block // blocks_w
        block_col = block % blocks_w
        first = block_row * block_h * W + block_col * block_w
        k = tl.arange(0, BLOCK_K)
        k_ok = k < K
        channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = channel < C
        sums = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
        counts = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for start in range(0, T, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            t_ok = t < T
            token = first + (t // block_w) * W + t % block_w
            slot = tl.load(slot_ptr + batch * N + token, mask=t_ok, other=-1)
            # The one-hot A^T, (BLOCK_K, BLOCK_T); through float32, as Triton's interpreter
            # turns booleans into bfloat16 zeros.
            hit = (slot[None, :] == k[:, None]).to(tl.float32)
            x = tl.load(
                x_ptr + batch * N * C + token[:, None] * C + channel[None, :],
                mask=t_ok[:, None] & c_ok[None, :], other=0.0,
            )
            if UPCAST:
                sums = tl.dot(hit, x.to(tl.float32), sums, input_precision="ieee")
            else:
                sums = tl.dot(hit.to(x.dtype), x, sums, input_precision=PRECISION)
            counts += tl.sum(hit, axis=1)
        means = sums / tl.maximum(counts, tiny)[:, None]
        merged = block_row * slots_h * Wm + block_col * slots_w + (k // slots_w) * Wm + k % slots_w
        tl.store(
            out_ptr + batch * M * C + merged[:, None] * C + channel[None, :],
            means.to(out_ptr.dtype.element_ty),
            mask=k_ok[:, None] & c_ok[None, :],
        )

    @triton.jit
    def _fit_kernel(
        x_ptr, means_ptr, slot_ptr, w_ptr, N, C, M, W, Wm, block_h, block_w, blocks_w, slots_h, slots_w, T, K,
        num_blocks, ridge, tiny, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        block = tl.program_id(0)
        batch = tl.program_id(1).to(tl.int64)
        block_row = block // blocks_w
        block_col = block % blocks_w
        first = block_row * block_h * W + block_col * block_w
        first_slot = block_row * slots_h * Wm + block_col * slots_w
        x_base = x_ptr + batch * N * C
        z_base = means_ptr + batch * M * C
        row = tl.arange(0, BLOCK_K)
        col = tl.arange(0, BLOCK_K)
        k_ok = row < K
        slot_merged = first_slot + (row // slots_w) * Wm + row % slots_w

        # The Gram matrix of the slot means, in float32 products as the torch path's.
        gram = tl.zeros((BLOCK_K, BLOCK_K), dtype=tl.float32)
        for channel_start in range(0, C, BLOCK_C):
            channel = channel_start + tl.arange(0, BLOCK_C)
            c_ok = channel < C
            z = tl.load(
                z_base + slot_merged[:, None] * C + channel[None, :], mask=k_ok[:, None] & c_ok[None, :], other=0.0
            ).to(tl.float32)
            gram = tl.dot(z, tl.trans(z), gram, input_precision="ieee")
        diagonal = row[:, None] == col[None, :]
        squares = tl.sum(tl.where(diagonal, gram, 0.0), axis=1)
        valid = (squares > 0) & k_ok  # empty means fit nothing
        # The system divided by s, P / s = G / s + ridge I: entries near 1 whatever the
        # tokens' scale, and a finite inverse where every mean is 0 (s: float32's tiny).
        # P^-1 = (P / s)^-1 / s; the constraint's multiplier does not see the 1 / s.
        inverse_scale = 1.0 / tl.maximum(tl.sum(squares, axis=0) / K, tiny)
        # Padding past K: the identity, which the sweep below never touches.
        system = gram * inverse_scale + tl.where(diagonal, tl.where(k_ok[:, None], ridge, 1.0), 0.0)

        # The inverse by sweeping every pivot: the matrix stays symmetric, so the pivot's
        # row is its column too (one reduction per pivot); products r_i * r_j are
        # commutative, which keeps it exactly symmetric. The result is -(P / s)^-1.
        for p in range(K):
            pivot_row = tl.sum(tl.where(row[:, None] == p, system, 0.0), axis=0)
            inverse = 1.0 / tl.sum(tl.where(col == p, pivot_row, 0.0), axis=0)
            scaled = pivot_row * inverse
            update = system - (pivot_row[:, None] * pivot_row[None, :]) * inverse
            system = tl.where(
                row[:, None] == p,
                tl.where(col[None, :] == p, -inverse, scaled[None, :]),
                tl.where(col[None, :] == p, scaled[:, None], update),
            )
        solve = -system  # (P / s)^-1
        constraint = tl.sum(solve * valid.to(tl.float32)[None, :], axis=1)  # s P^-1 v
        total = tl.sum(constraint, axis=0)
        # A block without a non-empty slot has nothing to fit (and would divide 0 by 0).
        denominator = tl.where(total > 0, total, 1.0)

        for start in range(0, T, BLOCK_T):
            t = start + tl.arange(0, BLOCK_T)
            t_ok = t < T
            token = first + (t // block_w) * W + t % block_w
            slot = tl.load(slot_ptr + batch * N + token, mask=t_ok, other=0)
            own = first_slot + (slot // slots_w) * Wm + slot % slots_w
            # R = (X - A Z) Z^T: the torch path's X Z^T - A G, without its cancellation.
            residual = tl.zeros((BLOCK_T, BLOCK_K), dtype=tl.float32)
            for channel_start in range(0, C, BLOCK_C):
                channel = channel_start + tl.arange(0, BLOCK_C)
                c_ok = channel < C
                mask = t_ok[:, None] & c_ok[None, :]
                x = tl.load(x_base + token[:, None] * C + channel[None, :], mask=mask, other=0.0).to(tl.float32)
                mean = tl.load(z_base + own[:, None] * C + channel[None, :], mask=mask, other=0.0).to(tl.float32)
                z = tl.load(
                    z_base + slot_merged[:, None] * C + channel[None, :], mask=k_ok[:, None] & c_ok[None, :], other=0.0
                ).to(tl.float32)
                residual = tl.dot(x - mean, tl.trans(z), residual, input_precision="ieee")
            fitted = tl.dot(residual * inverse_scale, solve, input_precision="ieee")  # R P^-1
            multiplier = tl.sum(fitted, axis=1) / denominator
            hard = (slot[:, None] == col[None, :]).to(tl.float32)
            weights = hard + fitted - multiplier[:, None] * constraint[None, :]
            tl.store(
                w_ptr + ((batch * num_blocks + block) * T + t)[:, None] * K + col[None, :],
                weights,
                mask=t_ok[:, None] & (col < K)[None, :],
            )

    @triton.jit
    def _restore_kernel(
        merged_ptr, w_ptr, out_ptr, N, C, M, W, Wm, block_h, block_w, blocks_w, slots_h, slots_w, T, K,
        num_blocks, tiles, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
        PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    ):
        block = tl.program_id(0) // tiles
        batch = tl.program_id(2).to(tl.int64)
        block_row = block // blocks_w
        block_col = block % blocks_w
        first_slot = block_row * slots_h * Wm + block_col * slots_w
        t = (tl.program_id(0) % tiles) * BLOCK_T + tl.arange(0, BLOCK_T)
        t_ok = t < T
        token = block_row * block_h * W + block_col * block_w + (t // block_w) * W + t % block_w
        channel = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        c_ok = channel < C
        restored = tl.zeros((BLOCK_T, BLOCK_C), dtype=tl.float32)
        for start in range(0, K, BLOCK_K):  # chunks of slots: registers bounded for any K
            k = start + tl.arange(0, BLOCK_K)
            k_ok = k < K
            weights = tl.load(
                w_ptr + ((batch * num_blocks + block) * T + t)[:, None] * K + k[None, :],
                mask=t_ok[:, None] & k_ok[None, :], other=0.0,
            )
            merged = first_slot + (k // slots_w) * Wm + k % slots_w
            values = tl.load(
                merged_ptr + batch * M * C + merged[:, None] * C + channel[None, :],
                mask=k_ok[:, None] & c_ok[None, :], other=0.0,
            )
            # The weights in the values' dtype, as the torch path's W.to(dtype) @ slots.
            if UPCAST:
                weights = weights.to(values.dtype).to(tl.float32)
                restored = tl.dot(weights, values.to(tl.float32), restored, input_precision="ieee")
            else:
                restored = tl.dot(weights.to(values.dtype), values, restored, input_precision=PRECISION)
        tl.store(
            out_ptr + batch * N * C + token[:, None] * C + channel[None, :],
            restored.to(out_ptr.dtype.element_ty),
            mask=t_ok[:, None] & c_ok[None, :],
        )


# -- the kernels as torch operators, for torch.compile: ``mame_diffusers::plan_slots``,
# ``merge_slots``, ``fit_slots`` and ``restore_slots``. Traced, a SlotPlan's calls are these
# operators, and on a GPU inductor sees the Triton kernels inside them
# (``torch.library.triton_op``) and launches them from its compiled graph (and its CUDA
# graphs). Triton's interpreter cannot be traced: there they are opaque operators that run
# the kernels, with shape-only fakes.


@functools.lru_cache(maxsize=256)
def _layout_of(fields: tuple[int, ...]) -> MergeLayout:
    return MergeLayout(*fields)


def _launch_traceable(kernel, grid: tuple[int, ...], arguments: dict, options: dict) -> None:
    # wrap_triton: a call torch.compile records in its graph; run eagerly, the kernel itself.
    first = next(iter(arguments.values()))
    if first.device.type == "meta" or (interpreted() and torch._subclasses.fake_tensor.is_fake(first)):
        return  # shapes only (the interpreted kernels' fakes)
    torch.library.wrap_triton(kernel)[grid](**arguments, **options)


def _plan_op(tokens: torch.Tensor, layout: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _plan(tokens, _layout_of(tuple(layout)), _launch_traceable)


def _merge_op(tokens: torch.Tensor, slot_index: torch.Tensor, layout: list[int]) -> torch.Tensor:
    return _merge(tokens, slot_index, _layout_of(tuple(layout)), _launch_traceable)


def _fit_op(tokens: torch.Tensor, merged: torch.Tensor, slot_index: torch.Tensor, layout: list[int]) -> torch.Tensor:
    return _fit(tokens, merged, slot_index, _layout_of(tuple(layout)), _launch_traceable)


def _restore_op(merged: torch.Tensor, weights: torch.Tensor, layout: list[int]) -> torch.Tensor:
    return _restore(merged, weights, _layout_of(tuple(layout)), _launch_traceable)


def traceable() -> bool:
    """Whether ``torch.compile`` can trace the kernels: the operators are registered (triton,
    and torch 2.6 or newer for ``torch.library.triton_op``)."""
    return hasattr(torch.ops.mame_diffusers, "plan_slots")


def _register_operators() -> None:
    if triton is None or not hasattr(torch.library, "triton_op"):
        return
    for name, function in (
        ("plan_slots", _plan_op), ("merge_slots", _merge_op), ("fit_slots", _fit_op), ("restore_slots", _restore_op)
    ):
        if interpreted():
            operator = torch.library.custom_op(f"mame_diffusers::{name}", function, mutates_args=())
            operator.register_fake(function)
        else:
            torch.library.triton_op(f"mame_diffusers::{name}", function, mutates_args=())


_register_operators()
