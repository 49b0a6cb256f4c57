"""Peers that the benchmarks measure MaMe against, where no package ships them.

tomesd ships as a package (:func:`mame_diffusers.methods.tomesd_method`); ToDo's token
downsampling does not. :func:`keys_values_pooling` is its rule, written for the
benchmarks: every query kept, keys and values average-pooled on the token grid.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ..diffusers_integration import self_attention_modules
from ..merging import merge_layout
from ..methods import Method

__all__ = ["keys_values_pooling"]


class _KeyValuePooling:
    """Self-attention processor: keys and values from the tokens average-pooled to ``kept``
    of their number, on the grid a UNet pre-hook recorded; queries untouched."""

    def __init__(self, latent: dict, kept: float, max_downsample: int) -> None:
        self.latent, self.kept, self.max_downsample = latent, kept, max_downsample
        self.stock = AttnProcessor2_0()

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        height, width = self.latent["hw"]
        tokens = hidden_states.shape[1]
        downsample = 2 ** round(math.log2(math.sqrt(height * width / tokens)))
        if downsample > self.max_downsample or kwargs.get("encoder_hidden_states") is not None:
            return self.stock(attn, hidden_states, *args, **kwargs)
        grid = (math.ceil(height / downsample), math.ceil(width / downsample))
        side = math.sqrt(self.kept)
        pooled_hw = (max(1, round(grid[0] * side)), max(1, round(grid[1] * side)))
        batch, _, channels = hidden_states.shape
        image = hidden_states.transpose(1, 2).reshape(batch, channels, *grid)
        pooled = F.adaptive_avg_pool2d(image, pooled_hw).flatten(2).transpose(1, 2)
        return self.stock(attn, hidden_states, encoder_hidden_states=pooled)


def keys_values_pooling(ratio: float, max_downsample: int = 2) -> Method:
    """ToDo-style downsampling of keys and values at the key/value length MaMe's
    ``keys_values_only`` merge leaves at ``ratio`` (``N (1 - ratio)**2`` on a 64 x 64 grid),
    at the levels ``max_downsample`` covers (SD 1.x/2.x: from the full latent resolution)."""
    kept = merge_layout((64, 64), 1.0 - (1.0 - ratio) ** 2).num_merged / 4096
    latent: dict = {}
    saved: dict = {}

    def patch(unet: torch.nn.Module) -> None:
        def record(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            sample = args[0] if args else kwargs["sample"]
            latent["hw"] = tuple(sample.shape[-2:])

        saved["hook"] = unet.register_forward_pre_hook(record, with_kwargs=True)
        processor = _KeyValuePooling(latent, kept, max_downsample)
        saved["processors"] = {attention: attention.processor for _, _, attention in self_attention_modules(unet)}
        for attention in saved["processors"]:
            attention.set_processor(processor)

    def unpatch(unet: torch.nn.Module) -> None:
        saved.pop("hook").remove()
        for attention, processor in saved.pop("processors").items():
            attention.set_processor(processor)

    return Method(f"ToDo K/V pooling (ratio={ratio})", patch, unpatch, {"ratio": ratio}, f"Q N, K/V {kept:.3f}N")
