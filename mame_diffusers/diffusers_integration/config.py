"""Settings of MaMe on diffusers UNets: :class:`MaMeConfig`, validated in one place."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..defaults import (
    BACKENDS,
    DEFAULT_BACKEND,
    DEFAULT_BLOCK,
    DEFAULT_MAX_DOWNSAMPLE,
    DEFAULT_MIN_LATENT_TOKENS,
    DEFAULT_RATIO,
    DEFAULT_STACK_RATIO,
    QUERY_SHARE,
)
from ..merging import MergeLayout, MergePlan, OperatorSettings, check_block, check_ratio, cuda_graph_recording

if TYPE_CHECKING:  # the kernels import triton: only where a backend asks for them
    from ..merging.kernels import SlotPlan

__all__ = ["MaMeConfig"]

_ALLOWED_DOWNSAMPLE = (1, 2, 4, 8)
logger = logging.getLogger(__name__)
#: Device kinds whose default threshold left a call unmerged and said so: once per process,
#: or a user who sees no change would conclude that MaMe does nothing.
_SAID_UNMERGED: set[str] = set()


@dataclass(frozen=True)
class MaMeConfig(OperatorSettings):
    """Settings of MaMe on a UNet (and its ControlNets); validated when built.

    Each merged self-attention merges its tokens before attention (MaMe), attends over the
    merged tokens with proportional attention, and restores every token after it (MaRe),
    before the residual add. Measured reasons for every default: ``docs/frontier.md``.

    Important:
        ratio: the attention budget, as tomesd's ratio: attention costs as much as over
            ``M = N (1 - ratio)`` tokens, ``M x M``. Queries merge to ``N (1 - ratio)**0.5``
            and keys and values to ``N (1 - ratio)**1.5`` (query share 0.5: more faithful
            than merging all three to ``M`` at the same cost). Higher is faster and less
            faithful.
        max_downsample: which attention levels merge, counted from the highest-resolution
            level that has attention: ``1`` only that one (SD 1.x/2.x: the full latent
            resolution, as tomesd; SDXL: half of it), ``2`` also one level lower, ...
        min_latent_tokens: a UNet call merges only when its batch holds at least this many
            latent tokens (batch x latent height x width); smaller calls run exactly as
            without MaMe. ``None`` chooses per device from measurements: on CUDA 65,536 eager
            and 16,384 while a CUDA graph records (smaller calls are bound by kernel
            launches), 0 elsewhere.

    To tinker with:
        keys_values_only: merge only keys and values, to ``N (1 - ratio)**2`` tokens, and keep
            every query (then nothing needs restoring; ToDo's method). Faster on a CPU at the
            same ratio, less faithful where attention is sharp.
        stack_ratio: in deep transformer stacks (SDXL's 10-layer ones; SD 1.x/2.x have none),
            within ``max_downsample``, merge this fraction of the tokens before the whole
            stack and restore after it, so every layer of the stack (self-attention,
            cross-attention, MLP) runs on the merged tokens. ``0`` turns it off.
        block: side of the blocks in which tokens choose their slots (see
            :func:`mame_diffusers.plan_merge`).
        backend: ``"torch"`` (every device, differentiable), ``"triton"`` (fused kernels on
            CUDA: one launch per plan, merge or restore, and one fit per plan at its first
            restore; inference only; ``mame_diffusers/merging/kernels.py``) or ``"auto"``
            (the kernels where they can run, the torch path elsewhere). Under
            ``torch.compile`` the kernels are operators that the compiled graph launches
            (torch 2.6 or newer).
    """

    ratio: float = DEFAULT_RATIO
    max_downsample: int = DEFAULT_MAX_DOWNSAMPLE
    min_latent_tokens: int | None = None
    keys_values_only: bool = False
    stack_ratio: float = DEFAULT_STACK_RATIO
    block: int | None = DEFAULT_BLOCK
    backend: str = DEFAULT_BACKEND

    def __post_init__(self) -> None:
        object.__setattr__(self, "ratio", check_ratio(self.ratio))
        object.__setattr__(self, "stack_ratio", check_ratio(self.stack_ratio, "stack_ratio"))
        object.__setattr__(self, "block", check_block(self.block))
        if self.max_downsample not in _ALLOWED_DOWNSAMPLE or isinstance(self.max_downsample, bool):
            raise ValueError(f"max_downsample must be one of {_ALLOWED_DOWNSAMPLE}, got {self.max_downsample!r}")
        tokens = self.min_latent_tokens
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 0):
            raise ValueError(
                f"min_latent_tokens must be a non-negative int or None (chosen per device), got {tokens!r}"
            )
        if not isinstance(self.keys_values_only, bool):
            raise ValueError(f"keys_values_only must be True or False, got {self.keys_values_only!r}")
        self._check_backend()
        self.remember_layout_settings("query_ratio", "kv_ratio", "stack_ratio")

    def _check_backend(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        # Whether the kernels may plan this config's merges (decided once; per call only the
        # tensors' device and the layout).
        kernels_usable = False
        if self.backend != "torch":
            from ..merging import kernels

            kernels_usable = kernels.available()
            if self.backend == "triton" and not kernels_usable:
                raise ValueError("backend='triton' needs the triton package (pip install triton)")
        object.__setattr__(self, "_kernels", kernels_usable)

    @property
    def query_share(self) -> float:
        """Share of the merging, in log terms, that falls on the queries."""
        return 0.0 if self.keys_values_only else QUERY_SHARE

    @property
    def query_ratio(self) -> float:
        """Fraction of queries merged (and restored after attention)."""
        return 1.0 - (1.0 - self.ratio) ** self.query_share

    @property
    def kv_ratio(self) -> float:
        """Fraction of keys and values merged."""
        return 1.0 - (1.0 - self.ratio) ** (2.0 - self.query_share)

    def plan_on(
        self, tokens: torch.Tensor, layout: MergeLayout, sizes: torch.Tensor | None = None
    ) -> MergePlan | SlotPlan:
        """The plan of ``tokens`` on ``layout``: the Triton kernels' where ``backend`` asks
        for them and they apply, else the torch path's."""
        if self._kernels:
            from ..merging import kernels

            if (
                kernels.supports(layout)
                and (not torch.compiler.is_compiling() or kernels.traceable())
                and (self.backend == "triton" or _kernels_can_take(tokens))
            ):
                return kernels.plan_slots(tokens, layout, sizes=sizes)
        return super().plan_on(tokens, layout, sizes)

    def merges_call(self, latent_tokens: int, device: torch.device) -> bool:
        """Whether a UNet call with ``latent_tokens`` (batch x latent height x width) on
        ``device`` merges at all."""
        if self.ratio == 0.0 and self.stack_ratio == 0.0:
            return False
        threshold = self.latent_threshold(device)
        if latent_tokens >= threshold:
            return True
        if self.min_latent_tokens is None and not torch.compiler.is_compiling():
            _say_unmerged(device, latent_tokens, threshold)
        return False

    def latent_threshold(self, device: torch.device) -> int:
        """``min_latent_tokens``, or the measured default for ``device`` when it is ``None``."""
        if self.min_latent_tokens is not None:
            return self.min_latent_tokens
        kind = device.type
        if kind == "cuda" and not torch.compiler.is_compiling() and cuda_graph_recording(device):
            kind = "cuda-graph"  # replays launch nothing: merging pays at smaller sizes
        return DEFAULT_MIN_LATENT_TOKENS.get(kind, 0)


def _say_unmerged(device: torch.device, latent_tokens: int, threshold: int) -> None:
    if device.type in _SAID_UNMERGED:
        return
    _SAID_UNMERGED.add(device.type)
    logger.warning(
        "MaMe leaves UNet calls on %s with fewer than %d latent tokens (batch x latent height x width; this "
        "call has %d) unmerged: measured on an H200, such calls are bound by kernel launches, which merging "
        "adds to. Pass min_latent_tokens=0 to apply_mame (or MaMeProcessor) to merge every call, or your own "
        "threshold (mame-diffusers bench --device %s measures yours). Said once per process.",
        device.type, threshold, latent_tokens, device.type,
    )


_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _kernels_can_take(tokens: torch.Tensor) -> bool:
    """Whether ``backend="auto"`` plans ``tokens`` with the kernels: CUDA tensors of a dtype
    they take whose merge needs no gradient (the kernels have no backward pass)."""
    return tokens.is_cuda and tokens.dtype in _KERNEL_DTYPES and not (tokens.requires_grad and torch.is_grad_enabled())
