"""Block-level MaMe + MaRe: a forward pre-hook merges a block's image tokens, a forward hook
restores them: ``x + restore(block(merge(x)) - merge(x))``.

The block itself runs unchanged on fewer image tokens (its attention, cross-attention, joint
attention with the text, MLP and norms): its class, processors and attention backend stay the
user's. Only what the block adds is restored; each token keeps its own input (the residual
form). Rotary tables and per-token modulation merge with the tokens' plan; text tokens pass
through untouched.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .config import DiTMaMeConfig
from .families import BlockKind
from .grids import GridPlan
from .rotary import merge_rotary
from .state import BlockMerge, ForwardTracker

__all__ = ["BlockHooks", "runs_cache_boundary"]

#: Hooks of diffusers' block caches whose block compares or adds residuals on every token:
#: FirstBlockCache's and MagCache's first block (the one deciding whether to skip the rest).
_CACHE_LEADER_HOOKS = ("fbc_leader_block_hook", "mag_cache_leader_block_hook")


def runs_cache_boundary(block: torch.nn.Module) -> bool:
    """Whether a diffusers cache (FirstBlockCache, MagCache) uses ``block`` as its first or last
    block. Such a block runs unmerged: diffusers' hooks sit inside MaMe's, and would otherwise
    compare and add residuals of merged and unmerged tokens."""
    registry = getattr(block, "_diffusers_hook", None)
    if registry is None:
        return False
    hooks = registry.hooks.items()
    return any(name in _CACHE_LEADER_HOOKS or getattr(hook, "is_tail", False) for name, hook in hooks)


@dataclass(eq=False)
class BlockHooks:
    """The pre-hook (:meth:`before`) and hook (:meth:`after`) of one merged block."""

    index: int
    kind: BlockKind
    tracker: ForwardTracker
    config: DiTMaMeConfig
    #: ``(attention module, MaMe's processor)`` pairs of the block: it runs merged only while
    #: every one of them still has MaMe's processor.
    processors: tuple = ()
    _warned: bool = field(default=False, repr=False)

    def before(self, block: torch.nn.Module, args: tuple, kwargs: dict):
        state = self.tracker.current
        if not state.merging or runs_cache_boundary(block) or not self._ready(block):
            return None
        tokens = self.kind.argument(args, kwargs, "hidden_states")
        grid = state.grid
        if tokens.ndim != 3 or tokens.shape[1] != grid.tokens:
            raise RuntimeError(
                f"MaMe expected the {grid.frames}x{grid.height}x{grid.width} grid's {grid.tokens} image tokens "
                f"entering {type(block).__name__} {self.index}, got a tensor of shape {tuple(tokens.shape)}"
            )
        self._check_masks(args, kwargs)
        plan, merged = self._plan(tokens, grid)
        state.blocks[self.index] = BlockMerge(plan, tokens, merged)
        args, kwargs = self.kind.with_argument(args, kwargs, "hidden_states", merged)
        return self._merge_conditions(args, kwargs, plan, merged)

    def _merge_conditions(self, args: tuple, kwargs: dict, plan: GridPlan, merged: torch.Tensor):
        """What else the block needs for merged tokens: the key bias of proportional attention
        (a merged token's key weighs as many tokens as it stands for), merged rotary tables and
        per-token modulation."""
        kind, batch = self.kind, merged.shape[0]
        bias = self._key_bias(plan, merged.dtype)
        if kind.key_bias == "image_mask":
            args, kwargs = kind.with_argument(args, kwargs, kind.image_mask, bias[:, None, :])
        elif kind.key_bias == "attention_kwargs":
            extra = kind.argument(args, kwargs, kind.attention_kwargs) or {}
            args, kwargs = kind.with_argument(args, kwargs, kind.attention_kwargs, {**extra, "key_bias": bias})
        tables = kind.argument(args, kwargs, kind.rotary) if kind.rotary is not None else None
        if tables is not None:
            text = kind.argument(args, kwargs, kind.text).shape[1] if kind.text is not None else 0
            tables = (*merge_rotary(kind.rotary_layout, plan, tables, batch, text), bias)
            args, kwargs = kind.with_argument(args, kwargs, kind.rotary, tables)
        modulation = kind.argument(args, kwargs, kind.modulation) if kind.modulation is not None else None
        if modulation is not None and modulation.ndim == kind.per_token_ndim:
            # Per-token timesteps (Wan 2.2): each merged token gets its members' mean modulation.
            merged_modulation = plan.merge(modulation.flatten(2)).unflatten(2, modulation.shape[2:])
            args, kwargs = kind.with_argument(args, kwargs, kind.modulation, merged_modulation)
        return args, kwargs

    def _key_bias(self, plan: GridPlan, dtype: torch.dtype) -> torch.Tensor:
        """``(B, M)``: ``log`` of each merged token's size (proportional attention)."""
        return plan.key_bias(dtype)

    def _plan(self, tokens: torch.Tensor, grid) -> tuple[GridPlan, torch.Tensor]:
        """This block's own plan, made from the tokens entering it, and the merged tokens.

        The plan compares the tokens as the block's attention and MLP see them: layer-normed
        (every supported block starts both with a LayerNorm, then a modulation shared by the
        sample's tokens), not the raw residual stream, whose shared offsets and large channels
        make every token look alike. Measured more faithful on every family (docs/dits.md).
        """
        return GridPlan.plan(self.config, tokens, grid, features=F.layer_norm(tokens, tokens.shape[-1:]))

    def after(self, block: torch.nn.Module, args: tuple, kwargs: dict, output: Any):
        merge = self.tracker.current.blocks.pop(self.index, None)
        if merge is None:
            return None
        out = self.kind.image_tokens_out(output)
        restored = merge.tokens + merge.plan.restore(out - merge.merged)
        return self.kind.with_image_tokens_out(output, restored)

    def _check_masks(self, args: tuple, kwargs: dict) -> None:
        """No attention mask over the image tokens: merged tokens cannot keep one."""
        kind = self.kind
        mask = kind.argument(args, kwargs, kind.image_mask) if kind.image_mask else None
        if mask is None and kind.attention_kwargs is not None:
            mask = (kind.argument(args, kwargs, kind.attention_kwargs) or {}).get("attention_mask")
        if mask is not None:
            raise ValueError(
                "MaMe merges the image tokens, and cannot merge an attention mask over them (attention_mask); "
                "call without the mask, or remove MaMe (mame_diffusers.remove_mame) for masked calls"
            )

    def _ready(self, block: torch.nn.Module) -> bool:
        # One identity test per wrapped processor: cheap, and only guards under torch.compile.
        if all(attention.processor is ours for attention, ours in self.processors):
            return True
        if not self._warned:
            self._warned = True
            warnings.warn(
                f"{type(block).__name__} {self.index} runs unmerged: its attention does not run MaMe's processor "
                "(another one was set: load_ip_adapter, set_attn_processor, fuse_qkv_projections, ...). MaMe merges "
                "blocks whose attention runs diffusers' default processor; call apply_mame again after changing "
                "processors.",
                stacklevel=3,
            )
        return False
