"""The per-forward state of one patched model: grids, sizes, attention biases (kept per thread)."""

from __future__ import annotations

import inspect
from typing import Any, Callable

import torch
from torch import nn
from transformers import PreTrainedModel

from ..merging import proportional_attention_bias
from ..per_thread import PerThread
from .config import VisionMaMeConfig
from .merge import MergeRecord, TokenMerger
from .models import _Family


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


class _PerForward:
    """An attribute of :class:`_MergeState` that each thread keeps for its own forward
    (a :class:`~mame_diffusers.per_thread.PerThread` per attribute)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, state: _MergeState | None, owner: type | None = None) -> Any:
        if state is None:
            return self
        return state._per_thread[self.name].get()

    def __set__(self, state: _MergeState, value: Any) -> None:
        state._per_thread[self.name].set(value)


class _MergeState:
    """What one patched model knows during a forward pass: the token grid, the sizes of the
    merged tokens, the attention bias for each merged length. Reset by every forward, and
    kept per thread (the :class:`_PerForward` attributes)."""

    grid = _PerForward()
    sizes = _PerForward()
    valid_tokens = _PerForward()
    key_bias = _PerForward()
    pooled_tokens = _PerForward()
    history = _PerForward()
    classifying = _PerForward()

    def __init__(
        self,
        config: VisionMaMeConfig,
        schedule: dict[int, float],
        family: _Family,
        tower: PreTrainedModel,
        merger: TokenMerger,
    ) -> None:
        self.config = config
        self.schedule = schedule
        self.family = family
        self.merger = merger
        per_forward = [name for name, value in vars(_MergeState).items() if isinstance(value, _PerForward)]
        self._per_thread = {name: PerThread() for name in per_forward}
        self.patch_size = _pair(tower.config.patch_size)
        self.tubelet_size = int(getattr(tower.config, "tubelet_size", 1))
        self.signature = inspect.signature(tower.forward)
        self.record_spreads = False
        #: Inside a VideoMAEForVideoClassification call, whose mean pooling needs the sizes.
        self.classifying = False
        self.history: list[MergeRecord] = []
        self._reset()

    def _reset(self) -> None:
        self.grid: tuple[int, ...] | None = None
        #: (B, M) sizes of the patch tokens after the latest merge; None before the first.
        self.sizes: torch.Tensor | None = None
        #: SigLIP2 padding: the real patches are the first ``valid_tokens``; the first merge drops the rest.
        self.valid_tokens: int | None = None
        #: key length -> (B, 1, 1, L) additive bias; lengths shrink with every merge, so each is unique.
        self.key_bias: dict[int, torch.Tensor] = {}
        self.pooled_tokens: torch.Tensor | None = None
        self.history = []

    @property
    def merged(self) -> bool:
        return self.sizes is not None

    # -- hooks ---------------------------------------------------------------------------------

    def begin(self, tower: nn.Module, args: tuple, kwargs: dict) -> None:
        """Forward pre-hook of the vision tower: read the token grid, check the inputs."""
        self._reset()
        bound = self.signature.bind_partial(*args, **kwargs).arguments
        pixels = bound.get("pixel_values")
        if not isinstance(pixels, torch.Tensor):
            raise ValueError("MaMe needs pixel_values to know the token grid")
        inputs = self.family.inputs
        if inputs == "image":
            self.grid = (pixels.shape[-2] // self.patch_size[0], pixels.shape[-1] // self.patch_size[1])
            _check_no_padding(bound.get("attention_mask"), "attention_mask")
        elif inputs == "video":
            if bound.get("bool_masked_pos") is not None:
                raise ValueError(
                    "MaMe merges tokens on VideoMAE's full (T, H, W) grid and cannot be combined with "
                    "bool_masked_pos (tube masking drops tokens); remove MaMe for masked pre-training"
                )
            self.grid = (
                pixels.shape[1] // self.tubelet_size,
                pixels.shape[-2] // self.patch_size[0],
                pixels.shape[-1] // self.patch_size[1],
            )
        else:
            self._begin_siglip2(pixels, bound.get("spatial_shapes"), bound.get("pixel_attention_mask"))

    def _begin_siglip2(
        self, pixels: torch.Tensor, spatial_shapes: torch.Tensor | None, mask: torch.Tensor | None
    ) -> None:
        if spatial_shapes is None:
            raise ValueError("Siglip2VisionModel needs spatial_shapes for MaMe to know the token grid")
        shapes = {tuple(int(v) for v in row) for row in spatial_shapes.tolist()}
        if len(shapes) != 1:
            raise ValueError(
                f"MaMe merges every image of a batch on one token grid, but this SigLIP2 batch mixes spatial "
                f"shapes {sorted(shapes)}; batch images with equal spatial shapes together (or run them one by one)"
            )
        self.grid = shapes.pop()
        valid, length = self.grid[0] * self.grid[1], pixels.shape[1]
        if valid > length:
            raise ValueError(f"spatial shape {self.grid} needs {valid} patches, the inputs hold {length}")
        if mask is not None:
            mask = mask.reshape(mask.shape[0], -1)
            # Checked once per forward pass (a host sync): MaMe needs the padding at the end,
            # as Siglip2's processor puts it, so that the real patches form the grid.
            if not bool(mask[:, :valid].all()) or bool(mask[:, valid:].any()):
                raise ValueError(
                    "MaMe supports SigLIP2 padding only at the end of each sequence, as the Siglip2 processor "
                    f"makes it: pixel_attention_mask must be 1 for the first {valid} patches (the spatial shape "
                    f"{self.grid}) and 0 after them"
                )
        elif valid != length:
            raise ValueError(f"{length - valid} padding patches but no pixel_attention_mask to mark them")
        self.valid_tokens = valid if valid < length else None

    def merge_entering(self, layer_index: int, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """Forward pre-hook of a merging layer: merge the hidden states entering it."""
        if self.grid is None:
            raise RuntimeError(
                "MaMe does not know the token grid: call the patched model itself, not its encoder or layers"
            )
        hidden = args[0] if args else kwargs["hidden_states"]
        specials = self.family.special_tokens
        patches = hidden[:, specials:] if specials else hidden
        if self.valid_tokens is not None:
            patches = patches[:, : self.valid_tokens]
        step = self.merger(patches, self.grid, self.sizes, self.schedule[layer_index], self.config)
        if step is None:
            return None
        tokens = torch.cat([hidden[:, :specials], step.tokens], dim=1) if specials else step.tokens
        self.grid, self.sizes, self.valid_tokens = tuple(step.grid), step.sizes, None
        self.key_bias[tokens.shape[1]] = self._key_bias(step.sizes, tokens.dtype)
        spread = step.spread if self.record_spreads else None
        self.history.append(MergeRecord(layer_index, self.grid, step.sizes.detach(), spread))
        if args:
            return (tokens, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": tokens}

    def _key_bias(self, sizes: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``(B, 1, 1, L)``: log-size per key (0 for special tokens); empty slots masked."""
        bias = proportional_attention_bias(sizes, dtype)
        if self.family.special_tokens:
            bias = torch.cat([bias.new_zeros(bias.shape[0], self.family.special_tokens), bias], dim=1)
        return bias[:, None, None, :]

    def attend(
        self,
        inner: Callable[..., Any],
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> Any:
        """The registered attention wrapper's body: the original implementation plus the size bias."""
        bias = self.key_bias.get(key.shape[-2])
        if bias is None:  # before the first merge: exactly the original call
            return inner(module, query, key, value, attention_mask, **kwargs)
        # The model built attention_mask for the unmerged tokens. begin() checked that it masks
        # only padding, which the first merge dropped, so the size bias replaces it.
        return inner(module, query, key, value, bias.to(query.dtype), **kwargs)

    def on_pooling_head(self, head: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        """SigLIP2's head builds a mask from the unmerged pixel_attention_mask: drop it once merged."""
        if not self.merged:
            return None
        if len(args) > 1:
            return (args[0], None, *args[2:]), kwargs
        if kwargs.get("attention_mask") is not None:
            return args, {**kwargs, "attention_mask": None}
        return None

    def on_pooling_attention(self, attention: nn.MultiheadAttention, args: tuple, kwargs: dict):
        """Proportional attention in SigLIP's attention-pooling head: the log-size bias on its keys."""
        if not self.merged:
            return None
        query, key = args[0], args[1]
        bias = self.key_bias[key.shape[1]][:, 0]  # (B, 1, L)
        heads = attention.num_heads
        # nn.MultiheadAttention takes a (B * heads, L_q, L) float mask, batch-major.
        bias = bias[:, None].expand(bias.shape[0], heads, query.shape[1], bias.shape[-1])
        bias = bias.reshape(-1, query.shape[1], bias.shape[-1]).to(query.dtype)
        return args, {**kwargs, "attn_mask": bias}

    def on_tower_output(self, tower: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        """Forward hook of the tower: keep the merged tokens for the classifier's mean pooling.

        The grid is forgotten, so that layers called on their own are refused. The attention
        biases stay until the next forward pass: gradient checkpointing recomputes layers
        during backward, after the forward pass has returned.
        """
        self.grid = None
        if self.classifying and self.merged:
            self.pooled_tokens = output[0] if isinstance(output, tuple) else output.last_hidden_state

    def on_classifier_call(self, model: nn.Module, args: tuple, kwargs: dict) -> None:
        self.classifying, self.pooled_tokens = True, None

    def on_classifier_done(self, model: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        self.classifying, self.pooled_tokens = False, None

    def on_mean_pooling(self, norm: nn.Module, args: tuple) -> tuple | None:
        """VideoMAE's classifier pools with a plain token mean; once merged, make it the
        size-weighted mean (what averaging the restored full-length tokens would give)."""
        tokens, self.pooled_tokens = self.pooled_tokens, None
        if not self.classifying or tokens is None or self.sizes is None:
            return None
        weights = (self.sizes / self.sizes.sum(dim=-1, keepdim=True)).to(tokens.dtype)
        return ((weights[:, None, :] @ tokens)[:, 0],)


def _check_no_padding(mask: torch.Tensor | None, name: str) -> None:
    if mask is None:
        return
    if mask.ndim != 2:
        raise ValueError(f"MaMe supports only a 2-D (batch, tokens) {name}, got shape {tuple(mask.shape)}")
    if not bool(mask.bool().all()):
        raise ValueError(
            f"MaMe merges all patch tokens and cannot honour a padding {name} with zeros; "
            "pass no mask (or all ones), or remove MaMe for this call"
        )


