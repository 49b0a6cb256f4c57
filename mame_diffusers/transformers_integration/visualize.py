"""Which patches share a token: :func:`merge_membership` and :func:`visualize_merges`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from .config import _PATCH_ATTRIBUTE, VisionMaMeConfig
from .models import _Family, _tower_of
from .patching import (
    _patch_of,
    apply_mame_to_vision_model,
    remove_mame_from_vision_model,
)
from .state import _pair


def merge_membership(model: nn.Module, **inputs: Any) -> list[tuple[int, torch.Tensor]]:
    """Run ``model(**inputs)`` once and return, for every merge, ``(layer, membership)``.

    ``membership`` is ``(B, N, M)``: row ``i`` is one-hot on the merged token that original
    patch ``i`` ended up in (row-stochastic with a soft assignment). It is built matrix-only,
    by spreading the identity of the ``M`` merged tokens through every plan back to the patches.
    """
    state = _patch_of(model).state
    state.record_spreads = True
    try:
        with torch.no_grad():
            model(**inputs)
        records = list(state.history)
        memberships = []
        for k, record in enumerate(records):
            batch, merged = record.sizes.shape
            identity = torch.eye(merged, dtype=record.sizes.dtype, device=record.sizes.device)
            membership = identity.expand(batch, merged, merged)
            for earlier in reversed(records[: k + 1]):
                membership = earlier.spread(membership)
            memberships.append((record.layer, membership))
    finally:
        state.record_spreads = False
        for record in state.history:  # the plans hold activations: let them go
            record.spread = None
    return memberships


def _image_array(image: Any) -> torch.Tensor:
    """``(3, H, W)`` float RGB in [0, 1] from an (H, W, 3) array or a (3, H, W) tensor."""
    tensor = torch.as_tensor(image)
    if tensor.ndim == 3 and tensor.shape[-1] in (3, 4) and tensor.shape[0] not in (3, 4):
        tensor = tensor[..., :3].permute(2, 0, 1)
    if tensor.ndim != 3 or tensor.shape[0] != 3:
        raise ValueError(f"image must be an (H, W, 3) RGB array or a (3, H, W) tensor, got shape {tuple(tensor.shape)}")
    tensor = tensor.float()
    return tensor / 255.0 if tensor.max() > 1.0 else tensor


def _vision_inputs(tower: PreTrainedModel, family: _Family, rgb: torch.Tensor) -> tuple[dict, tuple[int, int]]:
    """Model inputs for one photo (normalised to [-1, 1]) and the patch grid."""
    patch = _pair(tower.config.patch_size)
    if family.inputs == "patches":
        side = int(math.isqrt(int(tower.config.num_patches)))
        hw = (side, side)
    else:
        size = _pair(tower.config.image_size)
        hw = (size[0] // patch[0], size[1] // patch[1])
    pixels = F.interpolate(rgb[None], size=(hw[0] * patch[0], hw[1] * patch[1]), mode="bilinear", antialias=True)
    pixels = (pixels.clamp(0, 1) - 0.5) / 0.5
    dtype = next(tower.parameters()).dtype
    device = next(tower.parameters()).device
    if family.inputs == "patches":
        # Siglip2's processor layout: row-major patches, each (p, p, C) flattened.
        patches = pixels[0].reshape(3, hw[0], patch[0], hw[1], patch[1]).permute(1, 3, 2, 4, 0)
        patches = patches.reshape(1, hw[0] * hw[1], -1)
        inputs = {
            "pixel_values": patches.to(device, dtype),
            "pixel_attention_mask": torch.ones(1, hw[0] * hw[1], dtype=torch.long, device=device),
            "spatial_shapes": torch.tensor([hw], device=device),
        }
    else:
        inputs = {"pixel_values": pixels.to(device, dtype)}
    return inputs, hw


def visualize_merges(
    model: nn.Module,
    image: Any,
    path: str | Path,
    *,
    config: VisionMaMeConfig | None = None,
) -> Path:
    """Save a PNG of which patches share a token after each merging layer (the paper's
    token-progression figure): every group of patches is painted in its mean colour, with
    white lines between groups.

    ``image`` is an (H, W, 3) RGB array (e.g. ``skimage.data.astronaut()``) or a (3, H, W)
    tensor in [0, 1]; it is resized to the model's input size. An unpatched model is patched
    with ``config`` (default settings when ``None``) for the figure and restored after.
    Image models only (ViT, DeiT, CLIP, SigLIP, SigLIP2).
    """
    # A bare Figure on the Agg canvas: no pyplot, so no global figure state or backend switch.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    tower, family = _tower_of(model)
    if family.inputs == "video":
        raise ValueError("visualize_merges draws images; VideoMAE is not supported")
    rgb = _image_array(image)
    inputs, hw = _vision_inputs(tower, family, rgb)
    temporary = getattr(tower, _PATCH_ATTRIBUTE, None) is None
    if temporary:
        apply_mame_to_vision_model(model, config)
    elif config is not None and _patch_of(model).config != config:
        raise ValueError("the model is already patched with other settings; remove MaMe or pass config=None")
    try:
        memberships = merge_membership(tower, **inputs)
    finally:
        if temporary:
            remove_mame_from_vision_model(model)

    side = 32  # pixels per patch in the figure
    photo = F.interpolate(rgb[None], size=(hw[0] * side, hw[1] * side), mode="bilinear", antialias=True)[0]
    patch_colours = F.adaptive_avg_pool2d(rgb[None], hw)[0].reshape(3, -1).T  # (N, 3)
    panels = [("input", photo.permute(1, 2, 0).clamp(0, 1).numpy())]
    for layer, membership in memberships:
        members = membership[0].float()  # (N, M)
        counts = members.sum(dim=0).clamp_min(1e-6)
        group_colours = (members.T @ patch_colours) / counts[:, None]
        painted = (members @ group_colours).T.reshape(3, *hw)
        groups = members.argmax(dim=-1).reshape(hw)  # plotting only: which group to outline
        panels.append((f"layer {layer} input: {int((counts > 0.5).sum())} tokens", _outlined(painted, groups, side)))

    columns = min(len(panels), 5)
    rows = math.ceil(len(panels) / columns)
    figure = Figure(figsize=(3 * columns, 3.3 * rows), layout="constrained")
    FigureCanvasAgg(figure)
    for index, (title, picture) in enumerate(panels):
        axis = figure.add_subplot(rows, columns, index + 1)
        axis.imshow(picture)
        axis.set_title(title, fontsize=9)
        axis.axis("off")
    figure.suptitle(f"MaMe token merging on {type(model).__name__}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    return path


def _outlined(painted: torch.Tensor, groups: torch.Tensor, side: int):
    """Upsample ``painted`` (3, h, w) by ``side`` and draw white lines where groups change."""
    picture = painted.repeat_interleave(side, dim=1).repeat_interleave(side, dim=2)
    labels = groups.repeat_interleave(side, dim=0).repeat_interleave(side, dim=1)
    edge = torch.zeros_like(labels, dtype=torch.bool)
    edge[:, 1:] |= labels[:, 1:] != labels[:, :-1]
    edge[1:, :] |= labels[1:, :] != labels[:-1, :]
    picture = torch.where(edge[None], torch.ones_like(picture), picture)
    return picture.permute(1, 2, 0).clamp(0, 1).numpy()
