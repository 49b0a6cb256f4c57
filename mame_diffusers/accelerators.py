"""Accelerators that compose with MaMe: DeepCache-style feature caching for diffusers UNets.

Between neighbouring denoising steps the deep (low-resolution) features of a UNet change
little, so DeepCache (Ma et al., 2023) computes the whole UNet only every ``interval``
steps and, on the steps in between, recomputes only the shallow branch: ``conv_in``, the
first ``depth`` down blocks, the last ``depth`` up blocks and ``conv_out``, feeding the last
up blocks with the deep features cached at the last full step.

This module does that with a forward pre-hook on the UNet (which decides, per call, full or
cached) and a stand-in ``forward`` on each deep block (``down_blocks[depth:]``,
``mid_block``, ``up_blocks[:-depth]``) that calls the block's own forward and records its
output on full steps, and returns the record on cached steps. No diffusers forward is
copied: ``UNet2DConditionModel.forward`` runs unchanged, and the deep blocks' outputs it
threads through (skip connections included) keep their shapes. Only blocks whose inputs
come from other deep blocks are skipped, so every block that does run sees fresh inputs
except ``up_blocks[-depth]``, which gets the cached deep features: exactly DeepCache's
approximation, at block granularity (DeepCache's own finest branch cuts inside the first
block, which needs a rewritten forward).

MaMe and the cache are independent: MaMe's processors merge whatever self-attention runs.
On SD 1.x/2.x with ``depth=1`` the cached steps still run the full-resolution attention,
where MaMe saves the most; on SDXL the first and last blocks have no attention, so cached
steps are convolution-only and MaMe acts on the full steps.

Assumes one UNet call per denoising step (the diffusers SD/SDXL pipelines batch
classifier-free guidance into one call). A call starts a new full step when the input's
shape, dtype or device changes, when the timestep is larger than the previous call's (a
new generation: schedulers count down), or ``interval`` calls after the last full step.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .diffusers_integration import uncompiled

__all__ = ["FeatureCache", "disable_feature_caching", "enable_feature_caching", "feature_cache_of"]

_CACHE_ATTRIBUTE = "_mame_feature_cache"


@dataclass
class FeatureCache:
    """DeepCache-style caching installed on one UNet (kept on it as ``_mame_feature_cache``).

    ``full_steps`` and ``cached_steps`` count the UNet calls of each kind since
    :func:`enable_feature_caching`.
    """

    interval: int
    depth: int
    full_steps: int = 0
    cached_steps: int = 0
    #: (module, the ``forward`` its instance dict held before, or None) for each deep block.
    _blocks: list = field(default_factory=list)
    #: index in ``_blocks`` -> that block's output at the last full step.
    _outputs: dict = field(default_factory=dict)
    _hooks: list = field(default_factory=list)
    _skipping: bool = False
    _calls_since_full: int = 0
    _last_input: tuple | None = None
    _last_timestep: float | None = None

    def reset(self) -> None:
        """Drop the cached features: the next call computes the whole UNet."""
        self._outputs.clear()
        self._last_input = None
        self._last_timestep = None
        self._skipping = False

    def _on_unet(self, module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        sample = args[0] if args else kwargs["sample"]
        timestep = args[1] if len(args) > 1 else kwargs.get("timestep")
        current = _first_value(timestep)
        signature = (tuple(sample.shape), sample.dtype, sample.device)
        full = (
            len(self._outputs) < len(self._blocks)
            or signature != self._last_input
            or self._last_timestep is None
            or current is None
            or current > self._last_timestep
            or self._calls_since_full >= self.interval
        )
        self._skipping = not full
        if full:
            self._calls_since_full = 1
            self.full_steps += 1
        else:
            self._calls_since_full += 1
            self.cached_steps += 1
        self._last_input = signature
        self._last_timestep = current


class _DeepBlockForward:
    """Stand-in ``forward`` of one deep block: the block's own forward on full steps
    (recording its output), the recorded output on cached steps."""

    def __init__(self, cache: FeatureCache, index: int, compute: Callable[..., Any]) -> None:
        self.cache = cache
        self.index = index
        self.compute = compute

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if self.cache._skipping:
            return self.cache._outputs[self.index]
        output = self.compute(*args, **kwargs)
        self.cache._outputs[self.index] = output
        return output


def _first_value(timestep: Any) -> float | None:
    # One host read per UNet call (a device sync on GPUs, negligible next to a UNet step).
    if isinstance(timestep, torch.Tensor):
        return float(timestep.reshape(-1)[0]) if timestep.numel() else None
    if isinstance(timestep, (int, float)):
        return float(timestep)
    return None


def _unet_of(target: Any) -> torch.nn.Module:
    unet = getattr(target, "unet", None)
    model = uncompiled(unet if isinstance(unet, torch.nn.Module) else target)
    if not all(isinstance(getattr(model, name, None), torch.nn.ModuleList) for name in ("down_blocks", "up_blocks")):
        raise TypeError(
            f"feature caching needs a diffusers UNet2DConditionModel (or a pipeline with one as `unet`), "
            f"got a {type(model).__name__}"
        )
    return model


def feature_cache_of(target: Any) -> FeatureCache | None:
    """The :class:`FeatureCache` installed on ``target`` (a pipeline or UNet), or ``None``."""
    return getattr(_unet_of(target), _CACHE_ATTRIBUTE, None)


def enable_feature_caching(target: Any, *, interval: int = 3, depth: int = 1) -> FeatureCache:
    """Install DeepCache-style feature caching on a pipeline's UNet (or a UNet), in place.

    Args:
        target: a diffusers pipeline with a ``unet``, or a ``UNet2DConditionModel``.
        interval: compute the whole UNet every ``interval`` calls and only the shallow branch
            on the calls in between (``1`` computes every call in full: exact, no saving).
        depth: how many levels at the top of the UNet are recomputed on cached steps (the
            first ``depth`` down blocks and the last ``depth`` up blocks); at least 1 and less
            than the number of down blocks, so that something is cached.

    Enabling again replaces the settings. Returns the cache state (also reachable with
    :func:`feature_cache_of`); :func:`disable_feature_caching` undoes it exactly.
    """
    unet = _unet_of(target)
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 1:
        raise ValueError(f"interval must be an integer >= 1, got {interval!r}")
    levels = len(unet.down_blocks)
    if isinstance(depth, bool) or not isinstance(depth, int) or not 1 <= depth < levels:
        raise ValueError(f"depth must be an integer in [1, {levels - 1}] for this {levels}-level UNet, got {depth!r}")
    if len(unet.up_blocks) != levels:
        raise ValueError("feature caching needs as many up blocks as down blocks")
    disable_feature_caching(unet)

    cache = FeatureCache(interval=interval, depth=depth)
    deep = list(unet.down_blocks[depth:]) + [unet.mid_block] + list(unet.up_blocks[: levels - depth])
    for index, block in enumerate(b for b in deep if b is not None):
        previous = block.__dict__.get("forward")
        cache._blocks.append((block, previous))
        block.forward = _DeepBlockForward(cache, index, block.forward)
    cache._hooks.append(unet.register_forward_pre_hook(cache._on_unet, with_kwargs=True))
    setattr(unet, _CACHE_ATTRIBUTE, cache)
    return cache


def disable_feature_caching(target: Any) -> Any:
    """Undo :func:`enable_feature_caching`: the blocks' own ``forward`` and no hook; a no-op
    when caching is not enabled. Returns ``target``."""
    unet = _unet_of(target)
    cache = getattr(unet, _CACHE_ATTRIBUTE, None)
    if cache is None:
        return target
    for hook in cache._hooks:
        hook.remove()
    for block, previous in cache._blocks:
        if previous is None:
            del block.forward
        else:
            block.forward = previous
    cache._blocks.clear()
    cache.reset()
    delattr(unet, _CACHE_ATTRIBUTE)
    return target
