"""What differs from one DiT family to the next: :class:`Family` and :class:`BlockKind`.

A family says where the image tokens' grid comes from (the model's own inputs: the spatial
shape of ``hidden_states`` over the patch size, or Flux's ``img_ids``), which blocks run on
the image tokens, and, per block class, how the block takes and returns them: which argument
holds the image tokens, the rotary tables, per-token modulation and masks, and where the
image tokens sit in its output. Nothing here changes a model.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Callable

import torch

from .grids import TokenGrid

__all__ = ["FAMILIES", "BlockKind", "Family", "family_of", "supported_classes"]


@dataclass(frozen=True)
class BlockKind:
    """How one block class takes and returns the image tokens.

    ``params`` are the block's forward parameters in order (models call blocks by keyword,
    gradient checkpointing by position). ``image_output`` is where the image tokens sit in a
    tuple output (``None``: the output is them). ``rotary`` names the rotary tables, laid out
    as ``rotary_layout``: ``"joint"`` (Flux: ``(text + image, D)``, text first, shared by the
    batch) or ``"video"`` (Wan: ``(1, image, 1, D)``). ``modulation`` names a timestep
    projection that is per token when it has ``per_token_ndim`` dimensions (Wan 2.2).
    ``image_mask`` names an attention mask over the image tokens and ``attention_kwargs`` a dict
    of attention arguments: MaMe cannot merge such a mask. ``key_bias`` says how the merged
    tokens' proportional-attention bias reaches attention: ``"image_mask"`` (as that mask),
    ``"rotary"`` (a third entry of the rotary tables) or ``"attention_kwargs"`` (as
    ``key_bias`` in them). ``processors`` lists ``(attention attribute, diffusers processor
    class name)`` pairs whose processor MaMe wraps (:mod:`.processors`).
    """

    class_name: str
    params: tuple[str, ...]
    image_output: int | None = None
    rotary: str | None = None
    rotary_layout: str | None = None
    text: str | None = None
    modulation: str | None = None
    per_token_ndim: int = 0
    image_mask: str | None = None
    attention_kwargs: str | None = None
    key_bias: str | None = None
    processors: tuple[tuple[str, str], ...] = ()

    def argument(self, args: tuple, kwargs: dict, name: str) -> Any:
        position = self.params.index(name)
        if name in kwargs:
            return kwargs[name]
        return args[position] if position < len(args) else None

    def with_argument(self, args: tuple, kwargs: dict, name: str, value: Any) -> tuple[tuple, dict]:
        position = self.params.index(name)
        if name not in kwargs and position < len(args):
            return (*args[:position], value, *args[position + 1:]), kwargs
        return args, {**kwargs, name: value}

    def image_tokens_out(self, output: Any) -> torch.Tensor:
        return output if self.image_output is None else output[self.image_output]

    def with_image_tokens_out(self, output: Any, tokens: torch.Tensor) -> Any:
        if self.image_output is None:
            return tokens
        parts = list(output)
        parts[self.image_output] = tokens
        return tuple(parts)


@dataclass(frozen=True)
class Family:
    """One supported DiT class: its grid reader, its block lists and their kinds."""

    name: str
    class_name: str
    block_lists: tuple[str, ...]
    kinds: tuple[BlockKind, ...]
    #: Makes, for each patched model, its reader of the image tokens' grid:
    #: ``(model, args, kwargs) -> TokenGrid | None`` for one call of the model.
    grid_reader: Callable[[], Callable[[torch.nn.Module, tuple, dict], TokenGrid | None]]

    def blocks(self, model: torch.nn.Module) -> list[torch.nn.Module]:
        """The model's blocks in the order they run."""
        found = []
        for name in self.block_lists:
            found.extend(getattr(model, name, None) or [])
        return found

    def kind_of(self, block: torch.nn.Module) -> BlockKind:
        for kind in self.kinds:
            if type(block).__name__ == kind.class_name:
                return kind
        raise TypeError(f"MaMe does not know how a {type(block).__name__} block of a {self.class_name} runs")


def _hidden_states(args: tuple, kwargs: dict) -> Any:
    return args[0] if args else kwargs.get("hidden_states")


def _image_grid(model: torch.nn.Module, args: tuple, kwargs: dict) -> TokenGrid | None:
    """PixArt and SD3: ``(B, C, H, W)`` latents, patches of ``patch_size``."""
    hidden = _hidden_states(args, kwargs)
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 4:
        return None
    patch = model.config.patch_size
    return TokenGrid(1, int(hidden.shape[-2]) // patch, int(hidden.shape[-1]) // patch)


def _video_grid(model: torch.nn.Module, args: tuple, kwargs: dict) -> TokenGrid | None:
    """Wan: ``(B, C, F, H, W)`` latents, patches of ``(p_t, p_h, p_w)``."""
    hidden = _hidden_states(args, kwargs)
    if not isinstance(hidden, torch.Tensor) or hidden.ndim != 5:
        return None
    p_t, p_h, p_w = model.config.patch_size
    frames, height, width = (int(s) for s in hidden.shape[-3:])
    return TokenGrid(frames // p_t, height // p_h, width // p_w)


class FluxGrid:
    """Flux's grid, read from ``img_ids``: ``(N, 3)`` ids ``(0, row, column)``, row-major, as
    Flux pipelines make them. Flux's ``hidden_states`` are packed ``(B, N, C)`` tokens with no
    spatial shape, so the ids are the model's only word on the grid.

    Reading them waits for the device once per ids tensor (pipelines pass the same one at
    every step). While ``torch.compile`` traces, values cannot be read: the grid last read for
    the same number of tokens stands in (a graph guard on it recompiles if it changes); with no
    such grid, the reading breaks the graph (``fullgraph=True`` then needs one eager call first;
    ``compile_repeated_blocks()`` compiles the blocks only and never needs it).
    """

    def __init__(self) -> None:
        self._last: tuple | None = None  # (weak reference to ids, data pointer, grid)
        self._by_tokens: dict[int, TokenGrid] = {}

    def __call__(self, model: torch.nn.Module, args: tuple, kwargs: dict) -> TokenGrid | None:
        ids = kwargs.get("img_ids", args[4] if len(args) > 4 else None)
        if not isinstance(ids, torch.Tensor):
            return None
        if ids.ndim == 3:  # the deprecated batched form, as the model reads it
            ids = ids[0]
        tokens = int(ids.shape[0])
        if torch.compiler.is_compiling():
            known = self._by_tokens.get(tokens)
            return known if known is not None else _read_flux_grid_eagerly(ids)
        last = self._last
        if last is not None and last[0]() is ids and last[1] == ids.data_ptr():
            return last[2]
        grid = _read_flux_grid_eagerly(ids)
        self._last = (weakref.ref(ids), ids.data_ptr(), grid)
        self._by_tokens[tokens] = grid
        return grid

    def __getstate__(self) -> dict:
        return {"_last": None, "_by_tokens": dict(self._by_tokens)}


@torch.compiler.disable
def _read_flux_grid_eagerly(ids: torch.Tensor) -> TokenGrid:
    """The ``rows x columns`` grid of Flux image ids; ``ValueError`` when they are not one
    row-major grid (e.g. Flux Kontext's reference-image tokens appended to the image's)."""
    tokens = int(ids.shape[0])
    first, last = ids[0, 1:].tolist(), ids[-1, 1:].tolist()
    height, width = int(last[0] - first[0]) + 1, int(last[1] - first[1]) + 1
    position = torch.arange(tokens, device=ids.device)
    expected = torch.stack([position // max(width, 1), position % max(width, 1)], dim=-1).to(ids.dtype)
    if height * width != tokens or not bool(((ids[:, 1:] - ids[:1, 1:]) == expected).all()):
        raise ValueError(
            f"MaMe reads Flux's image grid from img_ids, which must be one row-major grid of (row, column) "
            f"ids; these {tokens} ids are not (Flux Kontext's reference-image tokens, or ids made another "
            "way, are not supported)"
        )
    return TokenGrid(1, height, width)


_FLUX_PARAMS = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "joint_attention_kwargs")

FAMILIES: tuple[Family, ...] = (
    Family(
        name="pixart",
        class_name="PixArtTransformer2DModel",
        block_lists=("transformer_blocks",),
        kinds=(
            BlockKind(
                "BasicTransformerBlock",
                ("hidden_states", "attention_mask", "encoder_hidden_states", "encoder_attention_mask", "timestep",
                 "cross_attention_kwargs", "class_labels", "added_cond_kwargs"),
                image_mask="attention_mask",
                key_bias="image_mask",
            ),
        ),
        grid_reader=lambda: _image_grid,
    ),
    Family(
        name="sd3",
        class_name="SD3Transformer2DModel",
        block_lists=("transformer_blocks",),
        kinds=(
            BlockKind(
                "JointTransformerBlock",
                ("hidden_states", "encoder_hidden_states", "temb", "joint_attention_kwargs"),
                image_output=1,
                attention_kwargs="joint_attention_kwargs",
                key_bias="attention_kwargs",
                processors=(("attn", "JointAttnProcessor2_0"), ("attn2", "JointAttnProcessor2_0")),
            ),
        ),
        grid_reader=lambda: _image_grid,
    ),
    Family(
        name="flux",
        class_name="FluxTransformer2DModel",
        block_lists=("transformer_blocks", "single_transformer_blocks"),
        kinds=tuple(
            BlockKind(
                name, _FLUX_PARAMS, image_output=1, rotary="image_rotary_emb", rotary_layout="joint",
                text="encoder_hidden_states", attention_kwargs="joint_attention_kwargs", key_bias="rotary",
                processors=(("attn", "FluxAttnProcessor"),),
            )
            for name in ("FluxTransformerBlock", "FluxSingleTransformerBlock")
        ),
        grid_reader=FluxGrid,
    ),
    Family(
        name="wan",
        class_name="WanTransformer3DModel",
        block_lists=("blocks",),
        kinds=(
            BlockKind(
                "WanTransformerBlock",
                ("hidden_states", "encoder_hidden_states", "temb", "rotary_emb"),
                rotary="rotary_emb",
                rotary_layout="video",
                modulation="temb",
                per_token_ndim=4,
                key_bias="rotary",
                processors=(("attn1", "WanAttnProcessor"),),
            ),
        ),
        grid_reader=lambda: _video_grid,
    ),
)


def supported_classes() -> tuple[str, ...]:
    return tuple(family.class_name for family in FAMILIES)


def family_of(model: Any) -> Family | None:
    """The family of ``model`` (by its class or a base class's name), or ``None``."""
    names = {cls.__name__ for cls in type(model).__mro__}
    for family in FAMILIES:
        if family.class_name in names:
            return family
    return None
