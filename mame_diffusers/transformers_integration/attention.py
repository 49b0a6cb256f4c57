"""The attention wrapper registered with transformers' ``AttentionInterface``: log-size bias on the keys."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from transformers.masking_utils import (
    ALL_MASK_ATTENTION_FUNCTIONS,
    AttentionMaskInterface,
)
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from .config import _ATTENTION_ATTRIBUTE, _WRAPPED_PREFIX
from .state import _MergeState


@dataclass
class _AttentionLink:
    """Set on each attention module at apply time: how the registered wrapper finds the state."""

    state: _MergeState
    inner: Callable[..., Any]


def _original_attention(module: nn.Module, implementation: str) -> Callable[..., Any]:
    """The function ``module`` would call for ``implementation`` (eager lives in its model file)."""
    if implementation == "eager":
        function = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
        if function is None:
            raise TypeError(f"cannot find the eager attention of {type(module).__name__}")
        return function
    return ALL_ATTENTION_FUNCTIONS[implementation]


def _proportional_attention_for(implementation: str) -> Callable[..., Any]:
    def proportional_attention(
        module: nn.Module,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: torch.Tensor | None,
        **kwargs: Any,
    ) -> Any:
        link = getattr(module, _ATTENTION_ATTRIBUTE, None)
        if link is None:  # a module of an unpatched model that shares this config
            return _original_attention(module, implementation)(module, query, key, value, attention_mask, **kwargs)
        return link.state.attend(link.inner, module, query, key, value, attention_mask, **kwargs)

    proportional_attention.__name__ = f"mame_{implementation}_attention"
    return proportional_attention


def _register_attention(implementation: str) -> str:
    """Register MaMe's wrapper of ``implementation`` with transformers (once); returns its name.

    The mask interface gets the same entry as the wrapped implementation, so the masks the
    model builds before the first merge are exactly the original ones.
    """
    name = _WRAPPED_PREFIX + implementation
    if name not in ALL_ATTENTION_FUNCTIONS:
        AttentionInterface.register(name, _proportional_attention_for(implementation))
    if name not in ALL_MASK_ATTENTION_FUNCTIONS:
        AttentionMaskInterface.register(name, ALL_MASK_ATTENTION_FUNCTIONS[implementation])
    return name


