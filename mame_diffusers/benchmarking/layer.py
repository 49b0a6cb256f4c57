"""One self-attention layer, run exactly or with a token-reduction method at a given M.

Every method takes ``(attn, tokens, hw, num_merged)`` and returns the layer output for all
``N`` tokens, so that outputs compare one to one with full attention.
"""

from __future__ import annotations

import functools
import math
import statistics
from typing import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention, AttnProcessor2_0

from ..diffusers_integration import MaMeConfig, MaMeProcessor
from ..merging import merge_layout
from .photos import PHOTOS, photo_tokens
from .sharpen import attention_entropy, sharpen_to_entropy
from .timing import interleaved_seconds

LayerMethod = Callable[[Attention, torch.Tensor, tuple[int, int], int], torch.Tensor]


def make_self_attention(channels: int = 320, heads: int = 5, seed: int = 0) -> Attention:
    """A diffusers self-attention module as in SD's full-resolution blocks, random weights."""
    torch.manual_seed(seed)
    attn = Attention(channels, heads=heads, dim_head=channels // heads)
    attn.set_processor(AttnProcessor2_0())
    return attn.eval()


def full_attention(attn: Attention, tokens: torch.Tensor, hw: tuple[int, int], num_merged: int) -> torch.Tensor:
    attn.set_processor(AttnProcessor2_0())
    return attn(tokens)


def mame_attention(config: MaMeConfig | None = None, **settings) -> LayerMethod:
    """MaMe through the real processor (``config``, or one made of ``settings``), on the grid as
    a ``(B, C, H, W)`` input tells it (a bare processor: no UNet tracker, and this call is its
    largest, so level 1)."""
    config = config or MaMeConfig(**{"min_latent_tokens": 0, **settings})

    def run(attn: Attention, tokens: torch.Tensor, hw: tuple[int, int], num_merged: int) -> torch.Tensor:
        processor = MaMeProcessor(config=config)
        attn.set_processor(processor)
        batch, _, channels = tokens.shape
        grid = tokens.transpose(1, 2).reshape(batch, channels, *hw)
        out = attn(grid).flatten(2).transpose(1, 2)
        attn.set_processor(AttnProcessor2_0())
        return out

    return run


def tomesd_strides(num_tokens: int, num_merged: int) -> int:
    """Smallest square destination stride that lets tomesd reach ``num_merged`` tokens."""
    return max(2, math.ceil(math.sqrt(num_tokens / num_merged) - 1e-9))


def tomesd_attention(seed: int = 0) -> LayerMethod:
    """tomesd's bipartite soft matching (random destination per cell), at the same M."""
    from tomesd.merge import bipartite_soft_matching_random2d

    def run(attn: Attention, tokens: torch.Tensor, hw: tuple[int, int], num_merged: int) -> torch.Tensor:
        attn.set_processor(AttnProcessor2_0())
        height, width = hw
        stride = tomesd_strides(height * width, num_merged)
        generator = torch.Generator(device=tokens.device).manual_seed(seed)
        merge, unmerge = bipartite_soft_matching_random2d(
            tokens, width, height, stride, stride, height * width - num_merged, generator=generator
        )
        return unmerge(attn(merge(tokens)))

    return run


def _pooled_grid(hw: tuple[int, int], num_merged: int) -> tuple[int, int]:
    height, width = hw
    scale = math.sqrt(num_merged / (height * width))
    return max(1, math.floor(height * scale + 1e-9)), max(1, math.floor(width * scale + 1e-9))


def pool_attention(attn: Attention, tokens: torch.Tensor, hw: tuple[int, int], num_merged: int) -> torch.Tensor:
    """Plain average pooling before attention and nearest upsampling after it."""
    attn.set_processor(AttnProcessor2_0())
    batch, _, channels = tokens.shape
    grid = tokens.transpose(1, 2).reshape(batch, channels, *hw)
    pooled = F.adaptive_avg_pool2d(grid, _pooled_grid(hw, num_merged))
    out = attn(pooled.flatten(2).transpose(1, 2))
    out = out.transpose(1, 2).reshape(batch, channels, *pooled.shape[-2:])
    return F.interpolate(out, size=hw, mode="nearest").flatten(2).transpose(1, 2)


def kv_pool_attention(attn: Attention, tokens: torch.Tensor, hw: tuple[int, int], num_merged: int) -> torch.Tensor:
    """ToDo-style: keys and values from pooled tokens, every query kept."""
    attn.set_processor(AttnProcessor2_0())
    batch, _, channels = tokens.shape
    grid = tokens.transpose(1, 2).reshape(batch, channels, *hw)
    pooled = F.adaptive_avg_pool2d(grid, _pooled_grid(hw, num_merged)).flatten(2).transpose(1, 2)
    return attn(tokens, encoder_hidden_states=pooled)


def mame_kv_length(ratio: float, hw: tuple[int, int] = (64, 64)) -> int:
    """How many keys/values MaMe merges to with ``keys_values_only=True`` at ``ratio``."""
    return merge_layout(hw, MaMeConfig(ratio=ratio, keys_values_only=True).kv_ratio).num_merged


def kv_pool_at_mame_length(ratio: float) -> LayerMethod:
    """ToDo-style keys/values pooling to the length MaMe's ``keys_values_only`` merge leaves
    at ``ratio``: its like-for-like peer (every query kept by both)."""

    def run(attn: Attention, tokens: torch.Tensor, hw: tuple[int, int], num_merged: int) -> torch.Tensor:
        return kv_pool_attention(attn, tokens, hw, mame_kv_length(ratio, hw))

    return run


def relative_error(estimate: torch.Tensor, reference: torch.Tensor) -> float:
    """``||estimate - reference|| / ||reference||`` over the whole tensor."""
    return float(torch.linalg.vector_norm(estimate - reference) / torch.linalg.vector_norm(reference))


class LayerBench:
    """The layer-fidelity setup of docs/operator.md (section 5), shared by the layer benchmark and the
    ablation study: one SD 2.1 full-resolution self-attention (random weights), tokens from
    ``photos`` on a 64 x 64 grid, full attention as the reference, batch 2 for timing."""

    def __init__(self, photos: tuple[str, ...] = PHOTOS, hw: tuple[int, int] = (64, 64)) -> None:
        self.hw = hw
        self.attn = make_self_attention()
        self.tokens = {name: photo_tokens(name, hw) for name in photos}
        self.references = {name: full_attention(self.attn, t, hw, 0) for name, t in self.tokens.items()}
        # Two photos, as a classifier-free-guidance pair would be.
        self.timing_batch = torch.cat([photo_tokens("astronaut", hw), photo_tokens("coffee", hw)])

    def attention_entropy(self) -> float:
        """Mean entropy of the layer's attention rows over ``log N`` (1: uniform), over the
        photos, heads and queries."""
        return attention_entropy(self.attn, torch.cat(list(self.tokens.values())))

    def sharpen_to_entropy(self, target: float) -> float:
        """Sharpen the layer until its attention entropy on the photos is ``target`` (see
        :func:`~mame_diffusers.benchmarking.sharpen.sharpen_to_entropy`), take new references;
        returns the scale applied."""
        scale = sharpen_to_entropy(self.attn, torch.cat(list(self.tokens.values())), target)
        self.references = {name: full_attention(self.attn, t, self.hw, 0) for name, t in self.tokens.items()}
        return scale

    def error(self, method: LayerMethod, num_merged: int) -> float:
        """Relative error against full attention, averaged over the photos."""
        errors = [
            relative_error(method(self.attn, t, self.hw, num_merged), self.references[name])
            for name, t in self.tokens.items()
        ]
        return sum(errors) / len(errors)

    def interleaved_milliseconds(
        self, calls: dict[str, tuple[LayerMethod, int]], rounds: int, warmup: int = 1
    ) -> dict[str, dict[str, float]]:
        """Time every ``name -> (method, merged length)`` on the timing batch, the methods
        taking turns call by call for ``rounds`` rounds (a machine whose speed drifts then
        slows them all alike); per name the median, min and max ms."""
        times = interleaved_seconds(
            {
                name: functools.partial(method, self.attn, self.timing_batch, self.hw, num_merged)
                for name, (method, num_merged) in calls.items()
            },
            rounds=rounds,
            warmup=warmup,
        )
        return {
            name: {"ms": 1e3 * statistics.median(values), "min ms": 1e3 * min(values), "max ms": 1e3 * max(values)}
            for name, values in times.items()
        }
