"""Attention on merged blocks, for the families whose stock processor cannot take it as is.

A merged token stands for several image tokens: attention weighs its key by its size
(proportional attention, a ``log(size)`` key bias), and, with rotary positions, rotates it by
its own per-sample table. diffusers' processors take rotary tables shared by the batch (Flux),
or no key bias (SD3, Wan), so MaMe wraps them: calls that carry no merge (unmerged blocks, MaMe
off) go to the wrapped processor unchanged; merged calls run the same steps with per-sample
rotation and the key bias. Flux and Wan still attend through ``dispatch_attention_fn`` with the
wrapped processor's backend and parallel settings (``set_attention_backend`` sets them through
the wrapper, and they stay after ``remove_mame``); on a backend that takes no additive mask
(flash, sage, ...), the key bias is left out. PixArt's blocks take a self-attention mask of
their own, which carries the bias: its processors stay as they are.

The merge reaches the processor through the block's own arguments (stateless): Flux's and
Wan's rotary tables become ``(cos, sin, key_bias)``; SD3 gets ``key_bias`` in its
``joint_attention_kwargs``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import AttentionBackendName, _AttentionBackendRegistry, dispatch_attention_fn

__all__ = [
    "FluxMergedAttnProcessor",
    "SD3MergedAttnProcessor",
    "WanMergedAttnProcessor",
    "rotate_pairs",
    "takes_key_bias",
]

#: dispatch_attention_fn backends that add a float mask to the scores (torch's SDPA ones).
_MASKED_BACKENDS = frozenset({"native", "_native_math", "_native_efficient"})


def takes_key_bias(backend: Any) -> bool:
    """Whether the attention backend (``None``: diffusers' active one) adds a float mask."""
    if backend is None:
        backend = _AttentionBackendRegistry._active_backend
    return AttentionBackendName(backend).value in _MASKED_BACKENDS


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(B, S, H, D)`` by per-sample tables ``(B, S, D)``, channel pairs
    ``(2i, 2i+1)`` (Flux's and Wan's convention, tables repeated per pair), in float32."""
    real, imag = x.unflatten(-1, (-1, 2)).unbind(-1)
    turned = torch.stack([-imag, real], dim=-1).flatten(-2)
    cos, sin = cos[:, :, None], sin[:, :, None]
    return (x.float() * cos + turned.float() * sin).to(x.dtype)


def _mask(bias: torch.Tensor, dtype: torch.dtype, before: int = 0, after: int = 0) -> torch.Tensor:
    """``(B, M)`` key bias -> ``(B, 1, 1, before + M + after)``, 0 for the unmerged keys."""
    return F.pad(bias.to(dtype), (before, after))[:, None, None, :]


class _Wrapper:
    """A processor wrapping the one it replaced; the backend settings live on that one."""

    def __init__(self, wrapped: Any) -> None:
        self.wrapped = wrapped

    @property
    def _attention_backend(self) -> Any:
        return getattr(self.wrapped, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value: Any) -> None:
        self.wrapped._attention_backend = value

    @property
    def _parallel_config(self) -> Any:
        return getattr(self.wrapped, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value: Any) -> None:
        self.wrapped._parallel_config = value

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.wrapped!r})"

    def _dispatch(self, query, key, value, bias: torch.Tensor, before: int = 0, after: int = 0, parallel=True):
        mask = _mask(bias, query.dtype, before, after) if takes_key_bias(self._attention_backend) else None
        return dispatch_attention_fn(
            query, key, value, attn_mask=mask, backend=self._attention_backend,
            parallel_config=self._parallel_config if parallel else None,
        )


class FluxMergedAttnProcessor(_Wrapper):
    """Wraps diffusers' ``FluxAttnProcessor`` (double- and single-stream blocks)."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        image_rotary_emb: tuple[torch.Tensor, ...] | None = None,
    ) -> Any:
        if image_rotary_emb is None or len(image_rotary_emb) != 3:
            return self.wrapped(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        cos, sin, bias = image_rotary_emb
        query, key, value = _projections(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v, "to_qkv", attn.head_dim)
        query, key = attn.norm_q(query), attn.norm_k(key)
        text = 0
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
            text_q, text_k, text_v = _projections(
                attn, encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, "to_added_qkv",
                attn.head_dim,
            )
            query = torch.cat([attn.norm_added_q(text_q), query], dim=1)
            key = torch.cat([attn.norm_added_k(text_k), key], dim=1)
            value = torch.cat([text_v, value], dim=1)
            text = encoder_hidden_states.shape[1]
        else:  # single-stream blocks: the text tokens lead the sequence
            text = query.shape[1] - bias.shape[1]
        query, key = rotate_pairs(query, cos, sin), rotate_pairs(key, cos, sin)
        out = self._dispatch(query, key, value, bias, before=text).flatten(2, 3).to(query.dtype)
        if encoder_hidden_states is None:
            return out
        text_out, image_out = out.split_with_sizes([text, out.shape[1] - text], dim=1)
        image_out = attn.to_out[1](attn.to_out[0](image_out.contiguous()))
        return image_out, attn.to_add_out(text_out.contiguous())


class WanMergedAttnProcessor(_Wrapper):
    """Wraps diffusers' ``WanAttnProcessor`` on self-attention (``attn1``)."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, ...] | None = None,
    ) -> torch.Tensor:
        if rotary_emb is None or len(rotary_emb) != 3 or encoder_hidden_states is not None:
            return self.wrapped(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        cos, sin, bias = rotary_emb
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)  # across heads, before the split
        query, key, value = (t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))
        query, key = rotate_pairs(query, cos[:, :, 0], sin[:, :, 0]), rotate_pairs(key, cos[:, :, 0], sin[:, :, 0])
        out = self._dispatch(query, key, value, bias).flatten(2, 3).type_as(query)
        return attn.to_out[1](attn.to_out[0](out))


class SD3MergedAttnProcessor(_Wrapper):
    """Wraps diffusers' ``JointAttnProcessor2_0`` (SD3's joint attention and SD3.5's
    image-only ``attn2``); attends with torch's SDPA, as it does."""

    def __call__(
        self,
        attn: torch.nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        key_bias: torch.Tensor | None = None,
    ) -> Any:
        if key_bias is None:
            return self.wrapped(attn, hidden_states, encoder_hidden_states, attention_mask)
        batch, image = hidden_states.shape[:2]
        query, key, value = _projections(attn, hidden_states, attn.to_q, attn.to_k, attn.to_v, "to_qkv",
                                         attn.inner_dim // attn.heads)
        # q/k norms act on each head's channels: the same in (B, S, H, D) as in (B, H, S, D).
        if attn.norm_q is not None:
            query = attn.norm_q(query)
        if attn.norm_k is not None:
            key = attn.norm_k(key)
        text = 0
        if encoder_hidden_states is not None:
            text_q, text_k, text_v = _projections(
                attn, encoder_hidden_states, attn.add_q_proj, attn.add_k_proj, attn.add_v_proj, "to_added_qkv",
                attn.inner_dim // attn.heads,
            )
            if attn.norm_added_q is not None:
                text_q = attn.norm_added_q(text_q)
            if attn.norm_added_k is not None:
                text_k = attn.norm_added_k(text_k)
            query, key, value = (torch.cat(p, dim=1) for p in ((query, text_q), (key, text_k), (value, text_v)))
            text = encoder_hidden_states.shape[1]
        mask = _mask(key_bias, query.dtype, after=text)
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             attn_mask=mask)
        out = out.transpose(1, 2).reshape(batch, -1, attn.heads * query.shape[-1]).to(query.dtype)
        image_out = attn.to_out[1](attn.to_out[0](out[:, :image]))
        if encoder_hidden_states is None:
            return image_out
        text_out = out[:, image:]
        if not attn.context_pre_only:
            text_out = attn.to_add_out(text_out)
        return image_out, text_out


def _projections(attn, tokens, to_q, to_k, to_v, fused_name: str, head_dim: int):
    """Queries, keys and values ``(B, S, H, D)`` of ``tokens``, fused projections or not."""
    fused = getattr(attn, fused_name, None) if getattr(attn, "fused_projections", False) else None
    if fused is not None:
        query, key, value = fused(tokens).chunk(3, dim=-1)
    else:
        query, key, value = to_q(tokens), to_k(tokens), to_v(tokens)
    return tuple(t.unflatten(-1, (-1, head_dim)) for t in (query, key, value))
