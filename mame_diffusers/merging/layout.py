"""The static geometry of a merge: :class:`MergeLayout` and :func:`merge_layout`.

A token grid of ``H x W`` is cut into equal blocks of at most ``block x block`` tokens
(padded at the bottom and right where the sides do not divide). Each block keeps ``K``
slots, arranged as a ``slots_h x slots_w`` grid so that the merged tokens of all blocks
lie row-major on one ``Hm x Wm`` grid: a merged tensor can be merged again. Every number
here follows from ``(H, W, ratio, block)``; none depends on the tokens.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..defaults import DEFAULT_BLOCK
from .checks import check_block, check_ratio

__all__ = ["MergeLayout", "cuda_graph_recording", "merge_layout"]


def cuda_graph_recording(device: torch.device | str) -> bool:
    """Whether the current stream of ``device`` is recording a CUDA graph (launches then cost
    nothing at replay, and kernels do not run until it)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.is_current_stream_capturing()


#: Slot cells may be at most this much longer than wide (or wider than long) when a grid of
#: them keeps enough of the slots: within :data:`_SQUARE_ENOUGH_SHARE` of the most, or
#: failing that at least :data:`_SQUARE_AT_LEAST_SHARE` of them.
_MAX_CELL_ASPECT = 2.0
_SQUARE_ENOUGH_SHARE = 0.9
_SQUARE_AT_LEAST_SHARE = 0.5
#: Blocks grow (doubling) while whole slot grids per block would keep less than this share
#: of the requested merged length (16 x 16 blocks at ratio 0.995 hold 1.3 slots' worth each:
#: one slot per block would lose a quarter of M).
_BLOCK_KEEPS_SHARE = 0.75


def fit_cell_grid(budget: int, rows: int, cols: int) -> tuple[int, int]:
    """The ``kh x kw`` grid with the most cells ``<= budget`` inside ``rows x cols``, among
    grids whose cells are close to square.

    The most cells can mean degenerate ones (41 in a 64 x 64 grid: one row of 1 x 41); a grid
    with at least 90% as many cells at most 2:1 is preferred (5 x 8: 40), else one with at
    least half as many (7 in a 16 x 16 block: 2 x 3 = 6, not 1 x 7). Among grids with equally
    many cells, the squarest wins.
    """
    options = []
    for kh in range(1, rows + 1):
        kw = min(cols, budget // kh)
        if kw < 1:
            break
        skew = abs(math.log((rows / kh) / (cols / kw)))
        options.append((kh * kw, -skew, kh, kw))
    most = max(count for count, *_ in options)
    squarish = [o for o in options if -o[1] <= math.log(_MAX_CELL_ASPECT) + 1e-9]
    for share in (_SQUARE_ENOUGH_SHARE, _SQUARE_AT_LEAST_SHARE):
        enough = [o for o in squarish if o[0] >= share * most]
        if enough:
            best = max(enough)
            break
    else:
        best = max(options)
    return best[2], best[3]


@dataclass(eq=False)  # not frozen: dynamo cannot rebuild frozen dataclasses made in a graph
class MergeLayout:
    """Blocks of ``block_h x block_w`` tokens (``blocks_h x blocks_w`` of them) over an
    ``height x width`` grid, each keeping ``slots_h x slots_w`` merged slots.

    Treat it as immutable: layouts are shared through :func:`merge_layout`, and keep the
    constant tensors their plans use (per device and dtype), so planning rebuilds none.
    """

    height: int
    width: int
    block_h: int
    block_w: int
    blocks_h: int
    blocks_w: int
    slots_h: int
    slots_w: int
    _constants: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.height * self.width

    @property
    def merged_hw(self) -> tuple[int, int]:
        """The grid the merged tokens lie on, row-major."""
        return self.blocks_h * self.slots_h, self.blocks_w * self.slots_w

    @property
    def num_merged(self) -> int:
        return self.blocks_h * self.slots_h * self.blocks_w * self.slots_w

    @property
    def num_blocks(self) -> int:
        return self.blocks_h * self.blocks_w

    @property
    def tokens_per_block(self) -> int:
        return self.block_h * self.block_w

    @property
    def slots_per_block(self) -> int:
        return self.slots_h * self.slots_w

    @property
    def padded(self) -> bool:
        """Whether the blocks reach past the grid (those positions hold no token)."""
        return self.blocks_h * self.block_h != self.height or self.blocks_w * self.block_w != self.width

    @property
    def merges(self) -> bool:
        """Whether any token merges (``False``: the identity layout)."""
        return self.num_merged < self.num_tokens

    def init_fields(self) -> tuple[int, ...]:
        """The integers that define the layout, in field order: ``MergeLayout(*fields)``
        rebuilds it (how a layout crosses a trace or an operator's arguments)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.init)

    # -- constant tensors, built once per device and dtype -----------------------------------

    def constant(self, name: str, device: torch.device | str, dtype: torch.dtype) -> torch.Tensor:
        """The layout's constant ``name`` on ``device`` in ``dtype``:

        - ``"present"`` ``(1, blocks, T)``: 1 at grid positions, 0 at block padding;
        - ``"destination"`` ``(T,)``: 1 at the block's fixed destinations (the middle token
          of each cell of a grid of ``K // 2`` cells over the block);
        - ``"earlier"`` ``(T, T)``: 1 where token ``j`` comes before token ``i``;
        - ``"slot_index"`` ``(K,)`` and ``"token_index"`` ``(T,)``: ``0, 1, ...``.

        Built once and kept; while ``torch.compile`` traces, built inline so that the
        compiler folds it into the graph.
        """
        if torch.compiler.is_compiling():
            return self._build_constant(name, torch.device(device), dtype)
        key = (name, torch.device(device), dtype)
        tensor = self._constants.get(key)
        if tensor is None and cuda_graph_recording(device):
            # A CUDA graph being recorded runs none of its kernels: a constant kept from now
            # would hold garbage until the graph's first replay. Record it with the graph.
            return self._build_constant(name, torch.device(device), dtype)
        if tensor is None:
            # Never an inference tensor, even when first asked for under inference_mode:
            # training later uses the same constants.
            with torch.inference_mode(False):
                tensor = self._constants[key] = self._build_constant(name, torch.device(device), dtype)
        return tensor

    def _build_constant(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        tokens = self.tokens_per_block
        if name == "present":
            return self.to_blocks(torch.ones(1, self.num_tokens, 1, device=device, dtype=dtype))[..., 0]
        if name == "destination":
            rows, cols = fit_cell_grid(max(1, self.slots_per_block // 2), self.block_h, self.block_w)
            middle_rows = (2 * torch.arange(rows, device=device) + 1) * self.block_h // (2 * rows)
            middle_cols = (2 * torch.arange(cols, device=device) + 1) * self.block_w // (2 * cols)
            token = torch.arange(tokens, device=device)
            on_row = ((token // self.block_w)[:, None] == middle_rows[None, :]).any(dim=-1)
            on_col = ((token % self.block_w)[:, None] == middle_cols[None, :]).any(dim=-1)
            return (on_row & on_col).to(dtype)
        if name == "earlier":
            return torch.ones(tokens, tokens, device=device, dtype=dtype).tril(-1)
        if name == "slot_index":
            return torch.arange(self.slots_per_block, device=device, dtype=dtype)
        if name == "token_index":
            return torch.arange(tokens, device=device, dtype=dtype)
        raise KeyError(name)

    # -- reshaping between token order, blocks and the merged grid ---------------------------

    def to_blocks(self, tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` in row-major grid order -> ``(B, blocks, T, C)``, zero-padded."""
        batch, _, channels = tokens.shape
        grid = tokens.reshape(batch, self.height, self.width, channels)
        pad_h = self.blocks_h * self.block_h - self.height
        pad_w = self.blocks_w * self.block_w - self.width
        if pad_h or pad_w:
            grid = F.pad(grid, (0, 0, 0, pad_w, 0, pad_h))
        grid = grid.reshape(batch, self.blocks_h, self.block_h, self.blocks_w, self.block_w, channels)
        return grid.permute(0, 1, 3, 2, 4, 5).reshape(batch, self.num_blocks, self.tokens_per_block, channels)

    def from_blocks(self, blocks: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`to_blocks`: ``(B, blocks, T, C)`` -> ``(B, N, C)``, padding dropped."""
        batch, channels = blocks.shape[0], blocks.shape[-1]
        grid = blocks.reshape(batch, self.blocks_h, self.blocks_w, self.block_h, self.block_w, channels)
        grid = grid.permute(0, 1, 3, 2, 4, 5).reshape(
            batch, self.blocks_h * self.block_h, self.blocks_w * self.block_w, channels
        )
        if self.padded:
            grid = grid[:, : self.height, : self.width]
        return grid.reshape(batch, self.num_tokens, channels)

    def slots_to_grid(self, slots: torch.Tensor) -> torch.Tensor:
        """``(B, blocks, K, C)`` values of each block's slots -> ``(B, M, C)``, row-major on
        :attr:`merged_hw`."""
        batch, channels = slots.shape[0], slots.shape[-1]
        grid = slots.reshape(batch, self.blocks_h, self.blocks_w, self.slots_h, self.slots_w, channels)
        return grid.permute(0, 1, 3, 2, 4, 5).reshape(batch, self.num_merged, channels)

    def grid_to_slots(self, merged: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`slots_to_grid`: ``(B, M, C)`` -> ``(B, blocks, K, C)``."""
        batch, channels = merged.shape[0], merged.shape[-1]
        grid = merged.reshape(batch, self.blocks_h, self.slots_h, self.blocks_w, self.slots_w, channels)
        return grid.permute(0, 1, 3, 2, 4, 5).reshape(batch, self.num_blocks, self.slots_per_block, channels)


def merge_layout(hw: tuple[int, int], ratio: float, *, block: int | None = DEFAULT_BLOCK) -> MergeLayout:
    """The static geometry for merging an ``H x W`` grid by ``ratio`` in blocks of at most
    ``block x block`` tokens (``None``: one block of the whole grid).

    ``M = layout.num_merged`` satisfies ``1 <= M <= round(N * (1 - ratio))`` and depends on
    ``(H, W, ratio, block)`` only. Equal arguments give the same (shared) layout.
    """
    if len(hw) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in hw):
        raise ValueError(f"hw must be a (height, width) pair of ints, got {hw!r}")
    height, width = (int(v) for v in hw)
    if height < 1 or width < 1:
        raise ValueError(f"the token grid must be at least 1x1, got {height}x{width}")
    check_ratio(ratio)
    check_block(block)
    if torch.compiler.is_compiling():  # traced once per shape anyway; dynamo skips caches
        return _layout.__wrapped__(height, width, float(ratio), block)
    return _layout(height, width, float(ratio), block)


@functools.lru_cache(maxsize=256)
def _layout(height: int, width: int, ratio: float, block: int | None) -> MergeLayout:
    num_tokens = height * width
    budget = max(1, round(num_tokens * (1.0 - ratio)))
    if budget >= num_tokens:
        # Nothing to merge: every token is its own one-token block.
        return MergeLayout(height, width, 1, 1, height, width, 1, 1)

    while block is not None:
        blocks_h, blocks_w = math.ceil(height / block), math.ceil(width / block)
        # Equal blocks that cover the grid with the least padding.
        block_h, block_w = math.ceil(height / blocks_h), math.ceil(width / blocks_w)
        per_block = budget // (blocks_h * blocks_w)
        if per_block >= 1:
            slots_h, slots_w = fit_cell_grid(per_block, block_h, block_w)
            kept = slots_h * slots_w * blocks_h * blocks_w
            if kept >= _BLOCK_KEEPS_SHARE * budget or block >= max(height, width):
                return MergeLayout(height, width, block_h, block_w, blocks_h, blocks_w, slots_h, slots_w)
        # Too few slots per block to come near the merged length asked for: larger blocks.
        block = None if block >= max(height, width) else 2 * block

    slots_h, slots_w = fit_cell_grid(budget, height, width)
    return MergeLayout(height, width, height, width, 1, 1, slots_h, slots_w)
