"""MaMe for diffusion transformers: PixArt-α/Σ, SD3/SD3.5, Flux.1 and Wan 2.1/2.2.

Design (measurements behind every choice: docs/dits.md)
-------------------------------------------------------
**Where merging happens: whole blocks, on the image tokens.** A forward pre-hook on each
block merges the image tokens entering it (MaMe, the one operator of
:mod:`mame_diffusers.merging`: ranked slots in blocks of 16 x 16 tokens); the block runs
unchanged on the merged tokens (self-attention, cross- or joint attention with the untouched
text tokens, MLP); a forward hook restores the block's *update* and adds it to each token's
own input (MaRe in residual form): ``x + restore(block(y) - y)``, ``y = merge(x)``. Each block
plans its own merge, comparing the tokens as its attention and MLP see them (layer-normed).
Block-level merging was faster than merging inside self-attention at every error level on Wan
and is the only one that reaches the Flux and Wan speed targets (Flux's and Wan's MLPs
dominate); per-block plans cost ~9% against one shared plan.

**Proportional attention**: a merged token's key weighs as many tokens as it stands for (a
``log(size)`` key bias); it halved the error of every measured family.

**What differs per family** (:mod:`.families`): where the grid comes from (PixArt, SD3, Wan:
the spatial shape of the model's ``hidden_states`` over the patch size, frames included; Flux:
its ``img_ids``), which blocks run (Flux: the double-stream, then the single-stream blocks), and
how each block class takes and returns tokens (argument names and positions, where the image
tokens sit in its output, rotary tables, per-token modulation, masks, the key bias's way in).

**Positions** (:mod:`.rotary`): Flux's and Wan's rotary tables merge with the tokens' own plan
(size-weighted means of the members' ``cos``/``sin``), one table per sample; PixArt and SD3 add
absolute positions before the first block, which merging keeps. **Video** (:mod:`.grids`):
frames merge in groups of up to 9, interleaved row by row, so that a token can merge with the
same place in neighbouring frames.

**Hooks, not new classes; processors only where needed.** Plain ``torch.nn.Module`` hooks
(:mod:`.blocks`, :mod:`.patching`) keep every block's class (diffusers' FirstBlockCache and
MagCache find blocks by class). SD3's, Flux's and Wan's default processors are wrapped
(:mod:`.processors`) to add the key bias and rotate by per-sample tables; the merge reaches them
through the block's own arguments, and Flux and Wan still attend through
``dispatch_attention_fn`` with the user's backend (``set_attention_backend`` works before,
during and after MaMe). diffusers' own hooks replace ``forward`` inside the module call, so
they see merged tokens, whichever was applied first: a block cache's first and last blocks run
unmerged (they compare and add residuals of every token); the blocks between merge, and a
cached step skips them with MaMe's restore adding 0.

**State per call** (:mod:`.state`): the grid, whether the call merges (CUDA calls below
``min_image_tokens`` do not) and each running block's plan live in a per-thread
:class:`~.state.ForwardState`, never on the shared model.

**Contract, as the UNet path**: static shapes (the merged length follows from the grid and
the ratio), matrix-only merging (no sort, gather, scatter or index op), one
``torch.compile(fullgraph=True)`` graph, bit-identical outputs after ``remove_mame``.
"""

from .config import DEFAULT_DIT_MIN_IMAGE_TOKENS, DEFAULT_DIT_RATIO, DiTMaMeConfig
from .families import FAMILIES, family_of, supported_classes
from .grids import GridPlan, TokenGrid
from .offline import DIT_FAMILIES, build_transformer, transformer_config, transformer_inputs
from .patching import apply_mame_to_dit, dit_models_of, is_dit, patched_dit_config, remove_mame_from_dit

__all__ = [
    "DEFAULT_DIT_MIN_IMAGE_TOKENS",
    "DEFAULT_DIT_RATIO",
    "DIT_FAMILIES",
    "FAMILIES",
    "DiTMaMeConfig",
    "GridPlan",
    "TokenGrid",
    "apply_mame_to_dit",
    "build_transformer",
    "dit_models_of",
    "family_of",
    "is_dit",
    "patched_dit_config",
    "remove_mame_from_dit",
    "supported_classes",
    "transformer_config",
    "transformer_inputs",
]
