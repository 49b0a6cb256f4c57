"""MaMe for Hugging Face transformers vision models: ViT, DeiT, CLIP, SigLIP, SigLIP2, VideoMAE.

Every transformers concept MaMe touches lives in this package, one module each (``config``,
``merge``, ``models``, ``state``, ``attention``, ``patching``, ``visualize``):

* **Where tokens merge.** Between encoder layers: a forward pre-hook on each merging layer
  merges the hidden states entering it (MaMe). Nothing is restored (no MaRe): classification
  and pooled features need only the merged tokens. Special tokens (CLS; DeiT's CLS and
  distillation tokens) are split off by slicing, never merged, and put back in front.
* **Later merges.** Merged tokens keep the slot-grid layout (``MergePlan.merged_hw``): the
  ``M`` tokens of one merge lie row-major on an ``Hm x Wm`` grid, so the next merging layer
  merges them again on that smaller grid, weighting each by its size. Shapes stay static and
  the path stays matrix-only.
* **What is compared.** Tokens are compared on a cheap 64-channel view of themselves (sums of
  channel groups, :func:`similarity_features`) and merged at full width.
* **Video.** VideoMAE's ``(T, H, W)`` tokens merge per frame by default (each frame's grid on
  its own, frames folded into the batch) or, with ``video_grid="spacetime"``, on one
  ``H x (W*T)`` grid with time innermost, so that static content merges across frames.
* **Sizes.** A per-model state object, created by :func:`apply_mame_to_vision_model` and
  reached only through the hooks and the attention modules, tracks how many original patches
  each token stands for. It is reset at the start of every forward pass and kept per thread.
* **Proportional attention.** The model's attention implementation (``eager`` or ``sdpa``)
  is swapped for a wrapper registered with transformers' ``AttentionInterface``
  (``mame_eager`` / ``mame_sdpa``). The wrapper finds the state through an attribute set on
  each attention module at apply time and adds ``log(size)`` to the keys' logits, then calls
  the original implementation. The wrapper looks the bias up by key length, so it is right
  even when gradient checkpointing recomputes a layer later.
* **Pooling.** CLS-pooled models need nothing. SigLIP's attention-pooling head gets the
  log-size bias on its keys; VideoMAE's mean pooling becomes a size-weighted mean.
* **Outputs.** ``last_hidden_state`` holds the merged tokens (special tokens first).
  With ``output_hidden_states=True``, ``hidden_states[0]`` is the first layer's input as that
  layer saw it (merged if it merges) and ``hidden_states[i + 1]`` the output of layer ``i``,
  before the next layer merges it, so lengths shrink. ``output_attentions=True`` (eager only,
  as in transformers) gives attention weights over the merged tokens, size bias included.
  :func:`merge_history` gives the grid and sizes after each merge of the last forward pass;
  :func:`merge_membership` which original patches each merged token holds.

:func:`remove_mame_from_vision_model` removes every hook and attribute and restores the
attention implementation, so outputs are bit-identical to before. ``ratio=0`` merges nothing
and is bit-identical to the unpatched model.
"""


from __future__ import annotations

from .config import (
    DEFAULT_SIMILARITY_CHANNELS,
    DEFAULT_VIDEO_GRID,
    DEFAULT_VISION_BLOCK,
    DEFAULT_VISION_RATIO,
    SUPPORTED_VISION_MODELS,
    VIDEO_GRIDS,
    VisionMaMeConfig,
)
from .merge import (
    MergeRecord,
    TokenMerge,
    TokenMerger,
    mame_token_merge,
    similarity_features,
)
from .models import is_supported_vision_model
from .patching import (
    apply_mame_to_vision_model,
    merge_history,
    patched_vision_config,
    remove_mame_from_vision_model,
)
from .visualize import merge_membership, visualize_merges

__all__ = [
    "DEFAULT_SIMILARITY_CHANNELS",
    "DEFAULT_VIDEO_GRID",
    "DEFAULT_VISION_BLOCK",
    "DEFAULT_VISION_RATIO",
    "SUPPORTED_VISION_MODELS",
    "VIDEO_GRIDS",
    "MergeRecord",
    "TokenMerge",
    "TokenMerger",
    "VisionMaMeConfig",
    "apply_mame_to_vision_model",
    "is_supported_vision_model",
    "mame_token_merge",
    "merge_history",
    "merge_membership",
    "patched_vision_config",
    "remove_mame_from_vision_model",
    "similarity_features",
    "visualize_merges",
]
