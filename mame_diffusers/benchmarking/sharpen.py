"""Attention as trained models have it: sharpening a randomly initialised self-attention.

With random weights attention is almost uniform (entropy about 0.99 of ``log N`` on SD 2.1's
layers): every query reads nearly the mean of the values, merging looks almost free, and
methods differ little. Trained diffusion and vision models sit around 0.6-0.8 of ``log N``.
:func:`sharpen_to_entropy` scales a layer's query and key projections (its logits by the
square of the scale) until its mean attention entropy on given tokens reaches a target;
:func:`sharpen_self_attention` does it for every self-attention of a model, each on the
tokens it sees in one forward.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
from diffusers.models.attention_processor import Attention

__all__ = ["attention_entropy", "sharpen_self_attention", "sharpen_to_entropy"]


@torch.no_grad()
def attention_entropy(attn: Attention, tokens: torch.Tensor, queries: int | None = 512) -> float:
    """Mean entropy of ``attn``'s rows over ``log N`` (1: uniform) on ``(B, N, C)`` tokens,
    over batch, heads and (``queries`` evenly spaced, or all) query rows."""
    batch, num_tokens, _ = tokens.shape
    stride = 1 if queries is None else max(1, num_tokens // queries)
    query, key = attn.to_q(tokens[:, ::stride]), attn.to_k(tokens)
    head_dim = query.shape[-1] // attn.heads
    query = query.view(batch, -1, attn.heads, head_dim).transpose(1, 2)
    key = key.view(batch, num_tokens, attn.heads, head_dim).transpose(1, 2)
    log_p = torch.log_softmax((query @ key.transpose(-1, -2)).float() * attn.scale, dim=-1)
    return float(-(log_p.exp() * log_p).sum(-1).mean()) / math.log(num_tokens)


@torch.no_grad()
def _scale_query_key(attn: Attention, factor: float) -> None:
    for projection in (attn.to_q, attn.to_k):
        projection.weight.mul_(factor)
        if projection.bias is not None:
            projection.bias.mul_(factor)


def sharpen_to_entropy(attn: Attention, tokens: torch.Tensor, target: float, steps: int = 12) -> float:
    """Scale ``attn``'s query and key projections (bisection on the scale, from the layer as
    it is) until its attention entropy on ``tokens`` is ``target`` (a fraction of ``log N``);
    returns the scale applied."""
    low, high, applied = 1.0, 16.0, 1.0
    for _ in range(steps):
        middle = math.sqrt(low * high)
        _scale_query_key(attn, middle / applied)
        applied = middle
        if attention_entropy(attn, tokens) > target:
            low = middle
        else:
            high = middle
    return applied


def self_attention_inputs(model: torch.nn.Module, forward: Callable[[], Any]) -> dict[Attention, torch.Tensor]:
    """The ``(B, N, C)`` tokens each self-attention module of ``model`` sees in ``forward()``
    (its first call)."""
    seen: dict[Attention, torch.Tensor] = {}

    def record(module: Attention, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        if kwargs.get("encoder_hidden_states") is None and module not in seen and hidden.ndim == 3:
            seen[module] = hidden.detach()

    modules = [m for m in model.modules() if isinstance(m, Attention) and not m.is_cross_attention]
    handles = [m.register_forward_pre_hook(record, with_kwargs=True) for m in modules]
    try:
        with torch.no_grad():
            forward()
    finally:
        for handle in handles:
            handle.remove()
    return seen


def sharpen_self_attention(model: torch.nn.Module, forward: Callable[[], Any], target: float = 0.7) -> list[dict]:
    """Sharpen every self-attention of ``model`` to ``target`` entropy on what it sees in
    ``forward()`` (inputs captured in one unmerged forward; each layer sharpened on its own,
    so a later layer's inputs move a little once the earlier ones are sharpened: the
    returned rows give each layer's entropy measured again after all are sharpened)."""
    inputs = self_attention_inputs(model, forward)
    scales = {attn: sharpen_to_entropy(attn, tokens, target) for attn, tokens in inputs.items()}
    after = self_attention_inputs(model, forward)
    return [
        {"tokens": int(tokens.shape[1]), "scale": scales[attn], "entropy": attention_entropy(attn, after[attn])}
        for attn, tokens in inputs.items()
    ]
