"""MaMe and MaRe: matrix-based token merging and restoration.

This module is the operator and nothing else: pure tensor math on ``(B, N, C)`` token
tensors laid out row-major on an ``H x W`` grid. It imports neither diffusers nor
transformers.

The formulation (``docs/operator.md``; the method is from arXiv 2604.13432):

1. **Anchors.** The grid is cut into blocks; each block holds a fixed ``kh x kw`` grid of
   anchor cells. A cell's anchor is its middle token (or a random token, or the mean of
   its tokens), and every token has an *own* anchor: that of the cell it lies in.
2. **Similarity.** Cosine similarity between each token and the anchors it may join:
   those of its own block and ``halo`` cells beyond it on every side
   (``block=None`` makes one block of the whole grid: global merging).
3. **Assignment.** A token joins its most similar anchor when that similarity is at
   least ``tau``; otherwise it stays with its own anchor. Built by comparison, never by
   ``one_hot``/``scatter``. A soft mode uses ``softmax(similarity / temperature)``.
4. **Merge (MaMe).** ``Y = diag(n)^-1 A^T X`` with sizes ``n = A^T 1``.
5. **Restore (MaRe).** ``X_hat = A @ O``: every token receives its slot's output. Optional
   refinements (``docs/operator.md``, section 6): ``anchor="distinct"`` takes each cell's
   least typical token as its anchor, ``refine`` moves the anchors to the means of their
   slots and assigns again (k-means steps), and ``restore="affine"`` gives each
   token the affine combination of nearby slots' outputs that best rebuilds its own input
   from the slots' inputs (a ridge least-squares fit, one small solve per block).

Every step is a matrix product, a comparison, a reduction, padding or a reshape, so all
shapes follow from ``(N, H, W, ratio)`` alone and the whole path compiles into a single
graph. The merged length ``M`` never depends on the data.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from .defaults import (
    ANCHORS,
    DEFAULT_ANCHOR,
    DEFAULT_BLOCK,
    DEFAULT_HALO,
    DEFAULT_REFINE,
    DEFAULT_RESTORE,
    DEFAULT_TAU,
    RESTORES,
)

__all__ = [
    "AFFINE_RIDGE",
    "ANCHORS",
    "DEFAULT_ANCHOR",
    "DEFAULT_BLOCK",
    "DEFAULT_HALO",
    "DEFAULT_TAU",
    "MergeLayout",
    "MergePlan",
    "OperatorSettings",
    "RESTORES",
    "check_merge_settings",
    "merge_layout",
    "plan_merge",
    "proportional_attention_bias",
]


# Similarity given to candidates that do not exist (outside the grid, or empty anchors):
# below any cosine, so never the best match and never above ``tau``.
_INVALID_SIMILARITY = -2.0


def own_anchor_tie_break(dtype: torch.dtype) -> float:
    """What a token's own anchor gets added to its score (in ``dtype``, float32 or wider):
    ties go to the own anchor, and no real difference of similarities is this small."""
    return 64 * torch.finfo(dtype).eps


#: Ridge of the affine restore, relative to the mean squared norm of a block's slots: it pulls
#: the fit towards plain copying. Measured on the layer benchmark (docs/fidelity.md): 0.01
#: fits best with near-uniform attention, 0.1-0.3 with sharp attention; 0.1 is within a few
#: percent of the best at both.
AFFINE_RIDGE = 0.1


def cuda_graph_recording(device: torch.device | str) -> bool:
    """Whether the current stream of ``device`` is recording a CUDA graph (launches then cost
    nothing at replay, and kernels do not run until it)."""
    if torch.device(device).type != "cuda" or not torch.cuda.is_available():
        return False
    return torch.cuda.is_current_stream_capturing()


def is_number(value: Any) -> bool:
    """A real number (numpy scalars included), not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_ratio(ratio: float) -> float:
    if not is_number(ratio) or not math.isfinite(ratio):
        raise ValueError(f"ratio must be a number in [0, 1), got {ratio!r}")
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio is the fraction of tokens removed and must lie in [0, 1), got {ratio}")
    return float(ratio)


def _check_tau(tau: float) -> float:
    if not is_number(tau) or not math.isfinite(tau):
        raise ValueError(f"tau must be a number in [-1, 1], got {tau!r}")
    if not -1.0 <= tau <= 1.0:
        raise ValueError(f"tau is a cosine-similarity threshold and must lie in [-1, 1], got {tau}")
    return float(tau)


def check_merge_settings(
    *,
    ratio: float,
    tau: float,
    block: int | None,
    halo: int,
    anchor: str = "strided",
    temperature: float | None = None,
    straight_through: bool = False,
    refine: int = DEFAULT_REFINE,
    restore: str = DEFAULT_RESTORE,
) -> float:
    """Validate merge settings up front, with messages that say what is allowed.

    Returns ``tau`` as a float. Raises ``ValueError`` for anything out of range.
    """
    _check_ratio(ratio)
    tau = _check_tau(tau)
    if block is not None and (isinstance(block, bool) or not isinstance(block, int) or block < 1):
        raise ValueError(f"block must be a positive int or None (global merging), got {block!r}")
    if isinstance(halo, bool) or not isinstance(halo, int) or halo < 0:
        raise ValueError(f"halo must be a non-negative int, got {halo!r}")
    if anchor not in ANCHORS:
        raise ValueError(f"anchor must be one of {ANCHORS}, got {anchor!r}")
    if temperature is not None and (not is_number(temperature) or not math.isfinite(temperature) or temperature <= 0):
        raise ValueError(f"temperature must be a positive number or None (hard assignment), got {temperature!r}")
    if not isinstance(straight_through, bool):
        raise ValueError(f"straight_through must be True or False, got {straight_through!r}")
    if straight_through and temperature is None:
        raise ValueError("straight_through needs a temperature (it is a soft-assignment mode)")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise ValueError(f"refine must be a non-negative int (anchor refinement steps), got {refine!r}")
    if restore not in RESTORES:
        raise ValueError(f"restore must be one of {RESTORES}, got {restore!r}")
    if anchor == "ranked":
        # Ranked slots are chosen among the tokens of a block (or all of them), and exactly
        # the most redundant tokens merge: no halo, no threshold, no soft mode and no anchor
        # to move.
        unused = {
            "halo": halo != 0 and block is not None,
            "tau": tau != DEFAULT_TAU,
            "temperature": temperature is not None,
            "refine": refine != 0,
        }
        named = [name for name, used in unused.items() if used]
        if named:
            raise ValueError(
                f"anchor='ranked' merges the most redundant tokens of each block and takes no "
                f"{', '.join(named)}: use halo=0 (or block=None), tau={DEFAULT_TAU}, temperature=None "
                f"and refine=0 with it, or another anchor (e.g. anchor='strided') for halos, "
                f"thresholds, soft assignment or refinement"
            )
    return tau


#: Anchor cells may be at most this much longer than wide (or wider than long) when a grid of
#: them keeps enough of the anchors: within :data:`_SQUARE_ENOUGH_SHARE` of the most, or
#: failing that at least :data:`_SQUARE_AT_LEAST_SHARE` of them.
_MAX_CELL_ASPECT = 2.0
_SQUARE_ENOUGH_SHARE = 0.9
_SQUARE_AT_LEAST_SHARE = 0.5
#: Blocks grow (doubling) while whole anchors per block would keep less than this share of the
#: requested merged length (8 x 8 blocks at ratio 0.97 hold 1.9 anchors' worth each: one
#: anchor per block would halve M).
_BLOCK_KEEPS_SHARE = 0.75


def _fit_anchor_grid(budget: int, rows: int, cols: int) -> tuple[int, int]:
    """The ``kh x kw`` anchor grid with the most anchors ``<= budget`` inside ``rows x cols``,
    among grids whose cells are close to square.

    The most anchors can mean degenerate cells (41 anchors in a 64 x 64 grid: one row of
    1 x 41, cells 64 tokens tall and 1.6 wide); a grid with at least 90% as many anchors
    and cells at most 2:1 is preferred (5 x 8: 40 anchors), else one with at least half as
    many (7 anchors in a 16 x 16 block: 2 x 3 = 6, not 1 x 7). Among grids with equally
    many anchors, the one whose cells are squarest wins.
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
    """Static geometry of a merge; every field follows from shapes and settings alone.
    Treat it as immutable: layouts are shared.

    The token grid (``height x width``) is padded to ``blocks_h x blocks_w`` blocks of
    ``block_h x block_w`` tokens; each block holds ``anchors_h x anchors_w`` anchor cells.
    The merged tokens form the ``merged_hw`` grid, row-major, so a merged tensor can itself
    be merged again.

    A layout also keeps the constant matrices its merges use (per device and dtype), so that
    planning runs no kernels to rebuild them: layouts are shared through :func:`merge_layout`.
    """

    height: int
    width: int
    block_h: int
    block_w: int
    blocks_h: int
    blocks_w: int
    anchors_h: int
    anchors_w: int
    halo_h: int
    halo_w: int
    _constants: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def num_tokens(self) -> int:
        return self.height * self.width

    @property
    def merged_hw(self) -> tuple[int, int]:
        return self.blocks_h * self.anchors_h, self.blocks_w * self.anchors_w

    @property
    def num_merged(self) -> int:
        return self.merged_hw[0] * self.merged_hw[1]

    @property
    def num_blocks(self) -> int:
        return self.blocks_h * self.blocks_w

    @property
    def tokens_per_block(self) -> int:
        return self.block_h * self.block_w

    @property
    def anchors_per_block(self) -> int:
        return self.anchors_h * self.anchors_w

    @property
    def window_h(self) -> int:
        """Rows of anchor cells a block's tokens may join: its own plus the halo."""
        return self.anchors_h + 2 * self.halo_h

    @property
    def window_w(self) -> int:
        return self.anchors_w + 2 * self.halo_w

    @property
    def num_candidates(self) -> int:
        return self.window_h * self.window_w

    @property
    def padded(self) -> bool:
        """Whether the blocks reach past the grid (those positions hold no token)."""
        return self.blocks_h * self.block_h != self.height or self.blocks_w * self.block_w != self.width

    @property
    def uniform_cells(self) -> bool:
        """Whether every anchor cell has the same ``cell_h x cell_w`` tokens (no padding)."""
        return not self.padded and self.block_h % self.anchors_h == 0 and self.block_w % self.anchors_w == 0

    def init_fields(self) -> tuple[int, ...]:
        """The integers that define the layout, in field order: ``MergeLayout(*fields)``
        rebuilds it (how a layout crosses a trace or an operator's arguments)."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self) if f.init)

    # -- constant matrices, built once per device and dtype ----------------------------------

    def constant(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The layout's constant ``name`` (see :meth:`_build_constant`) on ``device`` in ``dtype``.

        Built once and kept; while ``torch.compile`` traces, built inline so that the
        compiler folds it into the graph as a constant.
        """
        if torch.compiler.is_compiling():
            return self._build_constant(name, device, dtype)
        key = (name, torch.device(device), dtype)
        tensor = self._constants.get(key)
        if tensor is None and cuda_graph_recording(device):
            # A CUDA graph being recorded runs none of its kernels: a constant kept from now
            # would hold garbage until the graph's first replay. Record it with the graph.
            return self._build_constant(name, device, dtype)
        if tensor is None:
            # Never an inference tensor, even when first asked for under inference_mode:
            # training later uses the same constants.
            with torch.inference_mode(False):
                tensor = self._constants[key] = self._build_constant(name, device, dtype)
        return tensor

    def _build_constant(self, name: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        if name == "own_anchor":  # (T, kh*kw): which anchor cell of its block each token lies in
            row, col = self._own_cell(device)
            anchors = torch.arange(self.anchors_per_block, device=device)
            return ((row * self.anchors_w + col)[:, None] == anchors[None, :]).to(dtype)
        if name == "own_candidate":  # (T, K): the column of each token's own anchor among its candidates
            row, col = self._own_cell(device)
            cell = (row + self.halo_h) * self.window_w + col + self.halo_w
            candidates = torch.arange(self.num_candidates, device=device)
            return (cell[:, None] == candidates[None, :]).to(dtype)
        if name == "present":  # (1, blocks, T): 1 for grid positions, 0 for block padding
            return self.to_blocks(torch.ones(1, self.num_tokens, 1, device=device, dtype=dtype))[..., 0]
        if name == "candidate_bias":
            # (blocks, T, K) added to similarities: -inf for candidates that do not exist (past
            # the grid, or cells of padding only), and a tie-break in favour of the own anchor
            # far below any real difference of similarities.
            present = self.constant("present", device, dtype)
            counts = present @ self.constant("own_anchor", device, dtype)
            valid = self.gather_windows(self.anchor_grid(counts[..., None]))[0, ..., 0] > 0
            own_bonus = own_anchor_tie_break(dtype) * self.constant("own_candidate", device, dtype)
            return torch.where(valid[:, None, :], own_bonus, -math.inf)
        if name == "own_floor":  # (T, K): 0 at the own anchor, -inf elsewhere
            own = self.constant("own_candidate", device, dtype)
            return torch.where(own > 0, torch.zeros_like(own), torch.full_like(own, -math.inf))
        if name == "candidate_index":  # (K,): 0..K-1, to turn a best index into a one-hot row
            return torch.arange(self.num_candidates, device=device, dtype=dtype)
        if name == "token_index":  # (T, 1): 0..T-1, to turn a best token of each cell into a column
            return torch.arange(self.tokens_per_block, device=device, dtype=dtype)[:, None]
        if name == "ranked_destination":  # (T,): 1 for the block's fixed destinations (ranked slots)
            rows, cols = _fit_anchor_grid(max(1, self.anchors_per_block // 2), self.block_h, self.block_w)
            # The middle token of each cell of a rows x cols grid over the block.
            odd_rows = 2 * torch.arange(rows, device=device) + 1
            odd_cols = 2 * torch.arange(cols, device=device) + 1
            middle_rows = torch.div(odd_rows * self.block_h, 2 * rows, rounding_mode="floor")
            middle_cols = torch.div(odd_cols * self.block_w, 2 * cols, rounding_mode="floor")
            token = torch.arange(self.tokens_per_block, device=device)
            token_row = torch.div(token, self.block_w, rounding_mode="floor")
            token_col = token - token_row * self.block_w
            on_row = (token_row[:, None] == middle_rows[None, :]).any(dim=-1)
            on_col = (token_col[:, None] == middle_cols[None, :]).any(dim=-1)
            return (on_row & on_col).to(dtype)
        if name == "earlier":  # (T, T): 1 where token j comes before token i
            return torch.ones(self.tokens_per_block, self.tokens_per_block, device=device, dtype=dtype).tril(-1)
        raise KeyError(name)

    def own_anchor_matrix(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``(T, kh*kw)`` 0/1 matrix: which anchor cell of its block each token lies in."""
        return self.constant("own_anchor", device, dtype)

    def own_candidate_matrix(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """``(T, K)`` 0/1 matrix: the column of each token's own anchor among its candidates."""
        return self.constant("own_candidate", device, dtype)

    def _own_cell(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        token = torch.arange(self.tokens_per_block, device=device)
        row = torch.div(token, self.block_w, rounding_mode="floor")
        col = token - row * self.block_w
        return (
            torch.div(row * self.anchors_h, self.block_h, rounding_mode="floor"),
            torch.div(col * self.anchors_w, self.block_w, rounding_mode="floor"),
        )

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
        grid = grid[:, : self.height, : self.width]
        return grid.reshape(batch, self.num_tokens, channels)

    def anchor_grid(self, per_block: torch.Tensor) -> torch.Tensor:
        """``(B, blocks, kh*kw, C)`` values of each block's anchor cells -> ``(B, Hm, Wm, C)``."""
        batch, channels = per_block.shape[0], per_block.shape[-1]
        grid = per_block.reshape(batch, self.blocks_h, self.blocks_w, self.anchors_h, self.anchors_w, channels)
        return grid.permute(0, 1, 3, 2, 4, 5).reshape(batch, *self.merged_hw, channels)

    def gather_windows(self, grid: torch.Tensor) -> torch.Tensor:
        """``(B, Hm, Wm, C)`` values on the merged grid -> ``(B, blocks, K, C)``: the candidates
        of each block, a ``window_h x window_w`` window of anchor cells around it, row-major.

        Outside the grid they are zeros. One pad and a sliding-window view; the only copy is
        the final layout.
        """
        batch, channels = grid.shape[0], grid.shape[-1]
        if self.halo_h or self.halo_w:
            grid = F.pad(grid, (0, 0, self.halo_w, self.halo_w, self.halo_h, self.halo_h))
        windows = grid.unfold(1, self.window_h, self.anchors_h).unfold(2, self.window_w, self.anchors_w)
        # (B, blocks_h, blocks_w, C, window_h, window_w) -> (B, blocks, K, C)
        return windows.permute(0, 1, 2, 4, 5, 3).reshape(batch, self.num_blocks, self.num_candidates, channels)

    def scatter_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """Adjoint of :meth:`gather_windows`: ``(B, blocks, K, C)`` -> ``(B, M, C)``.

        Sums what every window holds for each anchor cell (an overlap-add); what falls
        outside the grid is dropped. On a GPU, eagerly, one ``F.fold``: two kernels where the
        slices below take six, and a GPU at batch 2 is bound by launches. On a CPU, and while
        compiling, shifted slice additions: on a CPU ``F.fold`` took 13x longer (7 ms against 0.5 ms at 64 x 64,
        C = 320), and while ``torch.compile`` traces, inductor's lowering of ``F.fold`` with
        these strides wrote out of bounds (torch 2.13, CPU); the slices fuse anyway.
        """
        if windows.device.type == "cpu" or torch.compiler.is_compiling():
            return self._add_windows(windows)
        return self._fold_windows(windows)

    def _fold_windows(self, windows: torch.Tensor) -> torch.Tensor:
        batch, channels = windows.shape[0], windows.shape[-1]
        columns = windows.permute(0, 3, 2, 1).reshape(batch, channels * self.num_candidates, self.num_blocks)
        grid = F.fold(
            columns,
            self.merged_hw,
            kernel_size=(self.window_h, self.window_w),
            stride=(self.anchors_h, self.anchors_w),
            padding=(self.halo_h, self.halo_w),
        )
        return grid.flatten(2).transpose(1, 2)

    def _add_windows(self, windows: torch.Tensor) -> torch.Tensor:
        batch, channels = windows.shape[0], windows.shape[-1]
        windows = windows.reshape(batch, self.blocks_h, self.blocks_w, self.window_h, self.window_w, channels)
        cells = _overlap_add(_overlap_add(windows, self.halo_w, axis=4), self.halo_h, axis=3)
        return cells.permute(0, 1, 3, 2, 4, 5).reshape(batch, self.num_merged, channels)


def _overlap_add(windows: torch.Tensor, halo: int, axis: int) -> torch.Tensor:
    """Fold one axis of ``(B, bh, bw, wh, ww, C)`` windows (3: rows, 4: columns of anchor
    cells) back onto the blocks: each window's halo is added onto the neighbouring block."""
    if halo == 0:
        return windows
    block_axis = axis - 2
    count = windows.shape[block_axis]
    size = windows.shape[axis] - 2 * halo
    total = windows.narrow(axis, halo, size).clone()
    # What block i+1 saw before itself belongs to the last cells of block i, and what
    # block i-1 saw after itself to the first cells of block i: in-place adds on slices.
    before = windows.narrow(axis, 0, halo).narrow(block_axis, 1, count - 1)
    after = windows.narrow(axis, halo + size, halo).narrow(block_axis, 0, count - 1)
    total.narrow(block_axis, 0, count - 1).narrow(axis, size - halo, halo).add_(before)
    total.narrow(block_axis, 1, count - 1).narrow(axis, 0, halo).add_(after)
    return total


def merge_layout(
    hw: tuple[int, int],
    ratio: float,
    *,
    block: int | None = DEFAULT_BLOCK,
    halo: int = DEFAULT_HALO,
) -> MergeLayout:
    """The static geometry for merging an ``H x W`` grid by ``ratio``.

    ``M = layout.num_merged`` satisfies ``1 <= M <= round(N * (1 - ratio))`` and depends on
    ``(H, W, ratio, block, halo)`` only. Equal arguments give the same (shared) layout, which
    keeps its constant matrices.
    """
    if len(hw) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in hw):
        raise ValueError(f"hw must be a (height, width) pair of ints, got {hw!r}")
    height, width = (int(v) for v in hw)
    if height < 1 or width < 1:
        raise ValueError(f"the token grid must be at least 1x1, got {height}x{width}")
    check_merge_settings(ratio=ratio, tau=0.0, block=block, halo=halo)
    if torch.compiler.is_compiling():  # traced once per shape anyway; dynamo skips caches
        return _layout.__wrapped__(height, width, float(ratio), block, halo)
    return _layout(height, width, float(ratio), block, halo)


@functools.lru_cache(maxsize=256)
def _layout(height: int, width: int, ratio: float, block: int | None, halo: int) -> MergeLayout:
    num_tokens = height * width
    budget = max(1, round(num_tokens * (1.0 - ratio)))
    if budget >= num_tokens:
        # Nothing to merge: every token is its own one-token block.
        return MergeLayout(height, width, 1, 1, height, width, 1, 1, 0, 0)

    while block is not None:
        blocks_h, blocks_w = math.ceil(height / block), math.ceil(width / block)
        # Equal blocks that cover the grid with the least padding.
        block_h, block_w = math.ceil(height / blocks_h), math.ceil(width / blocks_w)
        per_block = budget // (blocks_h * blocks_w)
        if per_block >= 1:
            anchors_h, anchors_w = _fit_anchor_grid(per_block, block_h, block_w)
            kept = anchors_h * anchors_w * blocks_h * blocks_w
            if kept >= _BLOCK_KEEPS_SHARE * budget or block >= max(height, width):
                # A halo reaches at most one block over, and only where there is one.
                halo_h = min(halo, anchors_h) if blocks_h > 1 else 0
                halo_w = min(halo, anchors_w) if blocks_w > 1 else 0
                return MergeLayout(
                    height, width, block_h, block_w, blocks_h, blocks_w, anchors_h, anchors_w, halo_h, halo_w
                )
        # Too few anchors per block to come near the merged length asked for: larger blocks.
        block = None if block >= max(height, width) else 2 * block

    anchors_h, anchors_w = _fit_anchor_grid(budget, height, width)
    return MergeLayout(height, width, height, width, 1, 1, anchors_h, anchors_w, 0, 0)


class PlanGrid:
    """What every merge plan (:class:`MergePlan`, and the Triton kernels' ``SlotPlan``)
    derives from its ``layout`` and its batch size."""

    layout: MergeLayout

    @property
    def batch_size(self) -> int:
        raise NotImplementedError

    @property
    def num_merged(self) -> int:
        return self.layout.num_merged

    @property
    def merged_hw(self) -> tuple[int, int]:
        """The grid the merged tokens lie on, row-major."""
        return self.layout.merged_hw

    def attention_bias(self, dtype: torch.dtype, *, proportional: bool = True) -> torch.Tensor:
        """:func:`proportional_attention_bias` of the sizes, ``(B, M)``; computed once per plan."""
        key = (dtype, proportional)
        bias = self._biases.get(key)
        if bias is None:
            log_sizes = self._log_sizes_at_hand() if proportional else None
            if log_sizes is not None:
                bias = log_sizes.to(dtype)  # the same, from the clamped sizes merging made
            else:
                bias = proportional_attention_bias(self.sizes, dtype, proportional=proportional)
            self._biases[key] = bias
        return bias

    def _log_sizes_at_hand(self) -> torch.Tensor | None:
        """``log`` of the sizes clamped away from 0, where merging made them (else ``None``)."""
        return None

    def _check(self, tensor: torch.Tensor, length: int, what: str) -> None:
        expected = (self.batch_size, length)
        if tensor.ndim != 3 or tuple(tensor.shape[:2]) != expected:
            raise ValueError(
                f"{what} expects a (batch, tokens, channels) tensor with batch and tokens "
                f"{expected}, got shape {tuple(tensor.shape)}"
            )


@dataclass
class MergePlan(PlanGrid):
    """How one set of tokens merges and restores.

    Build it with :func:`plan_merge`. ``merge`` and ``restore`` apply to any tensor laid
    out like the tokens the plan was made from (hidden states, or queries, keys and values
    separately), with any number of channels. A plan can be reused for other tensors on the
    same grid: in a UNet, one plan per level serves every block of that level.
    """

    layout: MergeLayout
    #: ``(B, blocks, T, K)``: how much of each token goes to each candidate anchor
    #: (boolean one-hot rows in hard mode, row-stochastic floats in soft mode). Restoring
    #: uses it as is.
    assignment: torch.Tensor
    #: ``assignment`` times each token's weight (its size; 0 for grid padding), divided by
    #: the size of the slot it goes to: merging with it gives slot means directly, as convex
    #: combinations that cannot overflow in half precision.
    merge_weights: torch.Tensor
    #: ``(B, M)``: how many tokens each merged slot stands for; 0 for an empty slot.
    sizes: torch.Tensor
    #: How :meth:`restore` spreads merged values back (one of :data:`RESTORES`).
    restore_mode: str = DEFAULT_RESTORE
    # The planned tokens in block layout, so that merging them again skips one reshuffle.
    _source: torch.Tensor | None = field(default=None, repr=False)
    _source_blocks: torch.Tensor | None = field(default=None, repr=False)
    # ``sizes`` clamped away from 0, as merging divides by them.
    _clamped_sizes: torch.Tensor | None = field(default=None, repr=False)
    _biases: dict = field(default_factory=dict, repr=False)
    # The affine restore's weights, fitted on first use (plans that never restore skip it).
    _affine_weights: torch.Tensor | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.assignment.shape[0]

    def merge(self, tokens: torch.Tensor) -> torch.Tensor:
        """MaMe: ``(B, N, C')`` -> ``(B, M, C')``, the size-weighted mean of each slot."""
        self._check(tokens, self.layout.num_tokens, "merge")
        if tokens is self._source and self._source_blocks is not None:
            blocks = self._source_blocks
        else:
            blocks = self.layout.to_blocks(tokens)
        sums = self.merge_weights.to(tokens.dtype).transpose(-1, -2) @ blocks
        return self.layout.scatter_windows(sums).contiguous()

    def restore(self, merged: torch.Tensor) -> torch.Tensor:
        """MaRe: ``(B, M, C')`` -> ``(B, N, C')``; every token receives its slot's value
        (``restore_mode="copy"``) or its fitted combination of nearby slots' values
        (``"affine"``, see :attr:`restore_weights`)."""
        self._check(merged, self.layout.num_merged, "restore")
        grid = merged.reshape(merged.shape[0], *self.merged_hw, merged.shape[-1])
        candidates = self.layout.gather_windows(grid)
        return self.layout.from_blocks(self.restore_weights.to(merged.dtype) @ candidates)

    @property
    def restore_weights(self) -> torch.Tensor:
        """``(B, blocks, T, K)``: how much of each candidate slot's value a token receives.

        ``"copy"``: the assignment itself. ``"affine"``: the assignment plus the ridge
        least-squares correction that best rebuilds each planned token from the merged
        planned tokens in its reach, with weights that sum to one (an affine combination, so
        a constant stays constant). A function of the tokens that is close to linear around
        them, as attention mostly is, is then restored to first order in what the copy
        misses. Fitted once per plan, on first use.
        """
        if self.restore_mode == "copy":
            return self.assignment
        if self._affine_weights is None:
            if self._source is None or self._source_blocks is None:
                raise ValueError("the affine restore needs the planned tokens: make the plan with plan_merge")
            means = self.merge(self._source).reshape(self._source.shape[0], *self.merged_hw, -1)
            self._affine_weights = _affine_restore_weights(
                self.layout, self._source_blocks, means, self.assignment, AFFINE_RIDGE
            )
        return self._affine_weights

    def _log_sizes_at_hand(self) -> torch.Tensor | None:
        return None if self._clamped_sizes is None else self._clamped_sizes.log()


def plan_merge(
    x: torch.Tensor,
    hw: tuple[int, int],
    *,
    ratio: float,
    tau: float = DEFAULT_TAU,
    block: int | None = DEFAULT_BLOCK,
    halo: int = DEFAULT_HALO,
    anchor: str = DEFAULT_ANCHOR,
    temperature: float | None = None,
    straight_through: bool = False,
    sizes: torch.Tensor | None = None,
    refine: int = DEFAULT_REFINE,
    restore: str = DEFAULT_RESTORE,
) -> MergePlan:
    """Plan how the tokens ``x`` of shape ``(B, N, C)`` on an ``hw = (H, W)`` grid merge.

    Args:
        x: tokens, row-major on the grid (``N == H * W``).
        hw: the token grid.
        ratio: fraction of tokens removed, in ``[0, 1)`` (tomesd's convention);
            the merged length is ``M <= round(N * (1 - ratio))``.
        tau: cosine-similarity threshold in ``[-1, 1]``. A token leaves its own cell only
            for an anchor at least this similar: ``1`` is plain pool/unpool, ``-1`` always
            takes the best match in reach.
        block: side of the blocks in which anchors are placed; ``None`` merges globally
            (dense, slower on CPUs).
        halo: how many anchor cells beyond its own block, on every side, a token may
            join (``0``: its own block only).
        anchor: what a cell offers to merge into: ``"strided"`` its middle token,
            ``"random"`` a random token (drawn anew each call), ``"pooled"`` the mean of its
            tokens, ``"distinct"`` its token least like the cell's mean (content-following:
            in a cell across an edge the odd token becomes the anchor and the typical ones
            join a neighbour; 16 more operations than ``"strided"``). ``"ranked"``: no
            cells; which tokens merge is chosen by content, by comparisons. With
            ``block=None``, ToMe's bipartite matching: every other token is a destination,
            and the sources most similar to a destination join it (rounds of at most half
            the tokens). In blocks (``halo=0``): half of each block's slots are fixed
            destinations, the others go to the tokens least like any of them, and every
            other token joins its most similar staying token. The slots are the tokens
            that stay, in token order (not a grid), and exactly the most redundant tokens
            merge: no ``halo``, ``tau``, ``temperature`` or ``refine``
            (``docs/operator.md``, section 7).
        temperature: ``None`` for hard assignment; a positive number for the soft,
            differentiable assignment ``softmax(similarity / temperature)`` over the
            anchors that pass ``tau``.
        straight_through: with ``temperature``, use the hard assignment in the forward pass
            and the soft one's gradient.
        sizes: optional ``(B, N)`` weights of the tokens (how many original tokens each
            already stands for; 0 marks a slot to ignore), for merging merged tokens again.
        refine: anchor refinement steps: assign, move every non-empty anchor to the
            (size-weighted) mean of its slot, assign again. Each step costs one more
            similarity product and one more merge product while planning.
        restore: ``"copy"`` (every token gets its slot's value) or ``"affine"`` (each
            token gets the affine combination of the slots in its reach that best rebuilds
            its own input: :attr:`MergePlan.restore_weights`), fitted when the plan first
            restores.
    """
    if x.ndim != 3:
        raise ValueError(f"x must have shape (batch, tokens, channels), got {tuple(x.shape)}")
    tau = check_merge_settings(
        ratio=ratio,
        tau=tau,
        block=block,
        halo=halo,
        anchor=anchor,
        temperature=temperature,
        straight_through=straight_through,
        refine=refine,
        restore=restore,
    )
    layout = merge_layout(hw, ratio, block=block, halo=halo)
    batch, num_tokens, _ = x.shape
    if num_tokens != layout.num_tokens:
        raise ValueError(
            f"the grid {layout.height}x{layout.width} holds {layout.num_tokens} tokens, "
            f"but x has {num_tokens}"
        )
    if sizes is not None and tuple(sizes.shape) != (batch, num_tokens):
        raise ValueError(f"sizes must have shape {(batch, num_tokens)}, got {tuple(sizes.shape)}")
    return plan_on_layout(
        x,
        layout,
        tau=tau,
        anchor=anchor,
        temperature=temperature,
        straight_through=straight_through,
        sizes=sizes,
        refine=refine,
        restore=restore,
    )


def plan_on_layout(
    x: torch.Tensor,
    layout: MergeLayout,
    *,
    tau: float,
    anchor: str,
    temperature: float | None,
    straight_through: bool,
    sizes: torch.Tensor | None = None,
    refine: int = DEFAULT_REFINE,
    restore: str = DEFAULT_RESTORE,
) -> MergePlan:
    """:func:`plan_merge` on a ready layout, with settings already checked: the hot path."""
    if anchor == "ranked":
        if layout.num_merged < layout.num_tokens:
            if layout.num_blocks == 1:
                return _ranked_plan(x, layout, sizes, restore)
            return _ranked_block_plan(x, layout, sizes, restore)
        anchor = "strided"  # nothing merges: the identity plan
    dtype, device = x.dtype, x.device
    # Similarities are compared in at least float32: the own anchor's tie-break is finer
    # than half precision.
    score_dtype = torch.promote_types(dtype, torch.float32)
    token_blocks = layout.to_blocks(x)
    token_weights = _token_weights(layout, sizes, device, dtype)  # None: every token weighs 1

    candidate_bias = layout.constant("candidate_bias", device, score_dtype)
    if sizes is not None:
        # Cells whose tokens all weigh 0 have no anchor.
        counts = token_weights @ layout.own_anchor_matrix(device, dtype)
        exists = layout.gather_windows(layout.anchor_grid(counts[..., None]))[..., 0] > 0
        candidate_bias = torch.where(exists[:, :, None, :], candidate_bias, -math.inf)
    needs_norms = temperature is not None or -1.0 < tau < 1.0 and tau != 0.0
    token_norms = torch.linalg.vector_norm(token_blocks, dim=-1, keepdim=True) if needs_norms else None

    anchors = _anchors(x, token_blocks, token_weights, layout, anchor)
    for _ in range(refine):
        # A k-means step: every anchor moves to the mean of the tokens that chose it. Only
        # its direction counts (anchors are normalised), so the slot's sum serves: no sizes
        # to divide by. A slot nobody chose sums to zero and offers every token a similarity
        # of 0, so a token that no anchor fits may take it.
        hard = _hard_assignment(_similarity(token_blocks, anchors, layout) + candidate_bias, layout, tau, token_norms)
        weighted = hard.to(dtype) if token_weights is None else hard * token_weights[..., None]
        anchors = layout.scatter_windows(weighted.transpose(-1, -2) @ token_blocks).reshape(anchors.shape)

    similarity = _similarity(token_blocks, anchors, layout)
    score = similarity + candidate_bias
    hard = _hard_assignment(score, layout, tau, token_norms)
    if temperature is None:
        assignment = hard
    else:
        cosine = similarity / token_norms.clamp_min(1e-6)
        own = layout.own_candidate_matrix(device, dtype) > 0
        allowed = (((cosine >= tau) & (tau < 1.0)) | own) & (score > -math.inf)
        # Shifted by the row's best allowed cosine: logits <= 0, so a tiny temperature gives
        # -inf and 0, never inf - inf (NaN). The softmax is the same.
        cosine = torch.where(allowed, cosine, torch.full_like(cosine, -math.inf))
        logits = (cosine - cosine.amax(dim=-1, keepdim=True)) / temperature
        soft = torch.softmax(logits.to(score_dtype), dim=-1).to(dtype)
        assignment = hard + (soft - soft.detach()) if straight_through else soft

    return _plan_from_assignment(x, token_blocks, layout, assignment, token_weights, restore)


def _ranked_plan(x: torch.Tensor, layout: MergeLayout, sizes: torch.Tensor | None, restore: str) -> MergePlan:
    """``anchor="ranked"``: bipartite matching (ToMe's rule) by comparisons, on a global layout.

    Rounds of: every other token (the odd positions) is a destination; each other token
    (a source) finds its most similar destination; the ``remove`` sources whose best
    similarity is highest join it, the rest stay. A round removes at most half the tokens, so
    ratios above 0.5 take several; each round compares the size-weighted means the previous
    one made. Slots keep the order of the tokens they hold.
    """
    dtype = x.dtype
    work_dtype = torch.promote_types(dtype, torch.float32)  # slot positions are counted exactly
    token_weights = None if sizes is None else sizes.to(work_dtype)
    tokens, weights, slot = x.to(work_dtype), token_weights, None
    earlier = layout.constant("earlier", x.device, torch.bool)  # every round's tie-break order
    while tokens.shape[1] > layout.num_merged:
        count = tokens.shape[1]
        remaining = max(layout.num_merged, count - count // 2)
        round_slot = _bipartite_round(tokens, count - remaining, earlier)
        # Composed with the earlier rounds by a product with one-hot rows, not an index.
        slot = round_slot if slot is None else (_one_hot(slot, count) @ round_slot[..., None])[..., 0]
        if remaining == layout.num_merged:
            break
        # The next round compares the size-weighted means of this round's slots.
        members = _one_hot(round_slot, remaining).transpose(-1, -2)
        sums = members @ (tokens if weights is None else tokens * weights[..., None])
        weights = members.sum(dim=-1) if weights is None else (members @ weights[..., None])[..., 0]
        tokens = sums / weights.clamp_min(torch.finfo(work_dtype).tiny)[..., None]
    # One global block: its candidates are the M slots, so the layout's 0..K-1 serves (as in blocks).
    assignment = (slot[..., None] == layout.constant("candidate_index", x.device, work_dtype))[:, None]
    block_weights = None if token_weights is None else token_weights[:, None].to(dtype)
    return _plan_from_assignment(x, layout.to_blocks(x), layout, assignment, block_weights, restore)


def _ranked_block_plan(x: torch.Tensor, layout: MergeLayout, sizes: torch.Tensor | None, restore: str) -> MergePlan:
    """``anchor="ranked"`` in blocks: each block keeps its ``K`` slots, half of them fixed
    destinations (the middle tokens of a grid of cells over the block), the rest the tokens
    least like any destination; every other token joins its most similar slot in the block.

    One round for any ratio: a source's rank is the number of sources more similar to
    their best destination (ties: the earlier first), and the ``T - K`` best-matched merge.
    Tokens that weigh nothing (grid padding, empty slots) rank first, so they never hold a
    slot a real token could use. Slots keep their tokens' order within the block.
    """
    dtype, device = x.dtype, x.device
    score_dtype = torch.promote_types(dtype, torch.float32)
    token_blocks = layout.to_blocks(x)
    token_weights = _token_weights(layout, sizes, device, dtype)
    destination = layout.constant("ranked_destination", device, torch.bool)  # (T,)
    unit = F.normalize(token_blocks.to(score_dtype), dim=-1)
    similarity = unit @ unit.transpose(-1, -2)  # (B, blocks, T, T)
    best = torch.where(destination, similarity, -math.inf).amax(dim=-1)
    if token_weights is not None:
        best = torch.where(token_weights > 0, best, math.inf)
    # Only sources compete: destinations rank last (-inf ahead of nobody, behind everyone).
    best = torch.where(destination, -math.inf, best)
    earlier = layout.constant("earlier", device, torch.bool)
    ahead = (best[..., None, :] > best[..., :, None]) | ((best[..., None, :] == best[..., :, None]) & earlier)
    merges = (ahead.sum(dim=-1) < layout.tokens_per_block - layout.anchors_per_block) & ~destination
    stays = ~merges
    position = stays.to(score_dtype).cumsum(dim=-1) - 1  # (B, blocks, T): slot of each staying token
    # A merging token's slot: its most similar staying token's position, by a product with
    # the one-hot row of that token (no index).
    choice = torch.where(stays[..., None, :], similarity, -math.inf).argmax(dim=-1)
    token_index = layout.constant("token_index", device, score_dtype)[:, 0]
    joined = ((choice[..., None] == token_index).to(score_dtype) @ position[..., None])[..., 0]
    slot = torch.where(merges, joined, position)
    assignment = slot[..., None] == layout.constant("candidate_index", device, score_dtype)
    return _plan_from_assignment(x, token_blocks, layout, assignment, token_weights, restore)


def _bipartite_round(tokens: torch.Tensor, remove: int, earlier: torch.Tensor) -> torch.Tensor:
    """``(B, n)``: the slot (``0..n - remove - 1``, as floats) each of the ``n`` tokens goes to.

    ``earlier`` is the layout's ``(N, N)`` token-order constant (``n <= N``).
    """
    count = tokens.shape[1]
    unit = F.normalize(tokens, dim=-1)
    sources, destinations = unit[:, 0::2], unit[:, 1::2]
    best, best_destination = (sources @ destinations.transpose(-1, -2)).max(dim=-1)
    # A source's rank: how many sources are more similar to their destination (ties: the
    # earlier source first). The ``remove`` best-matched merge. Comparisons, not a sort.
    # Among the sources (tokens 0, 2, 4, ...), source j comes before source i where token 2j
    # comes before token 2i: a strided view of the token order, no new matrix.
    earlier = earlier[:count:2, :count:2]
    ahead = (best[:, None, :] > best[:, :, None]) | ((best[:, None, :] == best[:, :, None]) & earlier)
    merges = ahead.sum(dim=-1) < remove
    stays = torch.stack([~merges, torch.ones_like(merges)], dim=-1).flatten(1)[:, :count]
    position = stays.to(tokens.dtype).cumsum(dim=-1) - 1  # slots keep their tokens' order
    destination_slot = position[:, 1::2]
    joined_slot = (_one_hot(best_destination, destinations.shape[1], tokens.dtype) @ destination_slot[..., None])[..., 0]
    source_slot = torch.where(merges, joined_slot, position[:, 0::2])
    # Interleave back into token order (a source more than destinations when n is odd).
    padding = source_slot.shape[1] - destination_slot.shape[1]
    return torch.stack([source_slot, F.pad(destination_slot, (0, padding))], dim=-1).flatten(1)[:, :count]


def _one_hot(index: torch.Tensor, width: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(..., width)`` rows with a 1 at ``index`` (whole numbers, any dtype), by comparison."""
    dtype = dtype or index.dtype
    return (index[..., None] == torch.arange(width, device=index.device, dtype=index.dtype)).to(dtype)


def _token_weights(
    layout: MergeLayout, sizes: torch.Tensor | None, device: torch.device, dtype: torch.dtype
) -> torch.Tensor | None:
    """``(B or 1, blocks, T)`` weights of the tokens in block layout: their sizes, 0 for grid
    padding; ``None`` when every token weighs 1."""
    if sizes is not None:
        return layout.to_blocks(sizes[..., None].to(dtype))[..., 0]
    if layout.padded:
        return layout.constant("present", device, dtype)
    return None


def _plan_from_assignment(
    x: torch.Tensor,
    token_blocks: torch.Tensor,
    layout: MergeLayout,
    assignment: torch.Tensor,
    token_weights: torch.Tensor | None,
    restore: str,
) -> MergePlan:
    """The plan that merges by ``assignment`` ``(B, blocks, T, K)``, with its merge weights and sizes."""
    score_dtype = torch.promote_types(x.dtype, torch.float32)
    merge_weights, slot_sizes, clamped = _slot_weights(assignment, token_weights, layout, score_dtype)
    return MergePlan(
        layout=layout,
        assignment=assignment,
        merge_weights=merge_weights.to(x.dtype),
        sizes=slot_sizes[..., 0],
        restore_mode=restore,
        _source=x,
        _source_blocks=token_blocks,
        _clamped_sizes=clamped[..., 0],
    )


def _similarity(token_blocks: torch.Tensor, anchors: torch.Tensor, layout: MergeLayout) -> torch.Tensor:
    """``(B, blocks, T, K)``: each token's similarity to its candidate anchors.

    Anchors are normalised on the (small) merged grid, then spread to the candidate windows.
    Token norms are left out: they scale a token's row, which leaves its best candidate as it
    is. Scores are cosine similarities times the token norm.
    """
    candidates = layout.gather_windows(F.normalize(anchors, dim=-1))
    return token_blocks @ candidates.transpose(-1, -2)


def _slot_weights(
    assignment: torch.Tensor, token_weights: torch.Tensor | None, layout: MergeLayout, score_dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge weights (each token's share of its slot's mean), slot sizes ``(B, M, 1)`` and
    the sizes clamped away from 0."""
    batch = assignment.shape[0]
    weighted = assignment if token_weights is None else assignment * token_weights[..., None]
    slot_sizes = layout.scatter_windows(weighted.sum(dim=-2, dtype=score_dtype)[..., None])
    # Empty slots receive nothing, so the clamp that keeps their reciprocal finite never shows.
    clamped = slot_sizes.clamp_min(torch.finfo(score_dtype).tiny)
    inverse_windows = layout.gather_windows(clamped.reciprocal().reshape(batch, *layout.merged_hw, 1))
    return weighted * inverse_windows.transpose(-1, -2), slot_sizes, clamped


def _affine_restore_weights(
    layout: MergeLayout, token_blocks: torch.Tensor, means: torch.Tensor, assignment: torch.Tensor, ridge: float
) -> torch.Tensor:
    """``(B, blocks, T, K)`` restore weights ``A + D``: the hard assignment ``A`` plus the
    correction ``D`` that minimises, per token ``x`` with candidate slot means ``Z``,

        ``||x - (a + d) Z||^2 + ridge * s * ||d||^2``  subject to  ``sum(d) = 0``,

    where ``s`` is the mean squared norm of the block's candidates. The solution is
    ``d = P^-1 r - nu P^-1 v`` with ``P = Z Z^T + ridge s I``, ``r = Z (x - a Z)``, ``v``
    marking the candidates that are slots and ``nu`` the multiplier that makes ``d`` sum to
    0: one ``K x K`` solve per block, shared by its tokens.

    Candidates that are no slot (outside the grid, or empty) have a zero mean, hence a zero
    row in ``Z``: ``P`` keeps them apart from the rest, ``r`` and ``v`` are 0 there, and so
    is their weight.
    """
    fit_dtype = torch.promote_types(token_blocks.dtype, torch.float32)
    candidates = layout.gather_windows(means.to(fit_dtype))
    gram = candidates @ candidates.transpose(-1, -2)
    squared_norms = torch.diagonal(gram, dim1=-2, dim2=-1)
    valid = (squared_norms > 0).to(fit_dtype)  # (B, blocks, K)
    system = gram + torch.diag_embed(ridge * squared_norms.mean(dim=-1, keepdim=True).expand_as(squared_norms))
    hard = assignment.to(fit_dtype)
    residual = token_blocks.to(fit_dtype) @ candidates.transpose(-1, -2) - hard @ gram  # rows of Z (x - a Z)
    # One solve for every token's right-hand side and for v (P is symmetric). solve_ex: P is
    # positive definite by construction, and the error check of solve would wait for the
    # GPU (a host sync).
    rhs = torch.cat([residual.transpose(-1, -2), valid[..., None]], dim=-1)
    solved = torch.linalg.solve_ex(system, rhs)[0].transpose(-1, -2)
    fitted, constraint = solved[..., :-1, :], solved[..., -1:, :]
    multiplier = fitted.sum(dim=-1, keepdim=True) / constraint.sum(dim=-1, keepdim=True)
    return hard + (fitted - multiplier * constraint)


def _anchors(
    x: torch.Tensor,
    token_blocks: torch.Tensor,
    token_weights: torch.Tensor | None,
    layout: MergeLayout,
    anchor: str,
) -> torch.Tensor:
    """``(B, Hm, Wm, C)``: each cell's anchor (its picked token, or its weighted sum)."""
    if anchor == "strided" and token_weights is None and layout.uniform_cells:
        # Equal cells: the middle token of every cell is one strided view of the grid.
        cell_h, cell_w = layout.block_h // layout.anchors_h, layout.block_w // layout.anchors_w
        row, col = divmod((cell_h * cell_w + 1) // 2 - 1, cell_w)
        rows_m, cols_m = layout.merged_hw
        return x.reshape(x.shape[0], rows_m, cell_h, cols_m, cell_w, x.shape[-1])[:, :, row, :, col]
    own = layout.own_anchor_matrix(x.device, x.dtype)
    present = None if token_weights is None else (token_weights > 0)[..., None].to(x.dtype)
    if anchor == "distinct":
        pick = _distinct_picker(own, present, token_blocks, token_weights, layout)
    else:
        pick = _anchor_picker(own, anchor, present)
    if anchor == "pooled" and token_weights is not None:
        token_blocks = token_blocks * token_weights[..., None]
    return layout.anchor_grid(pick.transpose(-1, -2) @ token_blocks)


def _distinct_picker(
    own: torch.Tensor,
    present: torch.Tensor | None,
    token_blocks: torch.Tensor,
    token_weights: torch.Tensor | None,
    layout: MergeLayout,
) -> torch.Tensor:
    """``(B, blocks, T, kh*kw)`` columns that pick each cell's token least like its cell's
    (weighted) mean, by cosine; only tokens present are candidates.

    A fixed anchor position is blind to content: where a cell holds two kinds of token, the
    kind its anchor is not must join some other anchor, and the odd, distinctive tokens fit
    worst elsewhere. Taking the least typical token as the anchor lets the typical ones
    join neighbouring cells of their kind. Found by ``argmax`` over each cell's tokens and a
    comparison with the token indices: no index ops.
    """
    members = own if present is None else own * present
    weighted = token_blocks if token_weights is None else token_blocks * token_weights[..., None]
    cell_directions = F.normalize(members.transpose(-1, -2) @ weighted, dim=-1)
    typical = F.normalize(token_blocks, dim=-1) @ cell_directions.transpose(-1, -2)  # (B, blocks, T, kh*kw)
    atypical = torch.where(members > 0, -typical, -math.inf)
    best = atypical.argmax(dim=-2, keepdim=True)
    return (best == layout.constant("token_index", token_blocks.device, best.dtype)).to(token_blocks.dtype)


def _anchor_picker(own: torch.Tensor, anchor: str, present: torch.Tensor | None) -> torch.Tensor:
    """Matrix whose columns pick (or pool) each cell's anchor from the cell's tokens.

    ``own`` is the static ``(T, kh*kw)`` cell membership; ``present`` (``(B, blocks, T, 1)``,
    optional) marks tokens with non-zero weight, so that grid padding and empty slots are
    never picked. ``"strided"`` picks the middle present token of each cell, ``"random"``
    a random one drawn anew each call (as tomesd's destinations), ``"pooled"`` takes them
    all. Picking compares a rank (a cumulative count) with a target: no index ops.
    """
    members = own if present is None else own * present
    if anchor == "pooled":
        return members
    rank = members.cumsum(dim=-2) * members  # 1..n inside each cell, 0 elsewhere
    count = members.sum(dim=-2, keepdim=True)
    if anchor == "strided":
        target = torch.div(count + 1, 2, rounding_mode="floor")
    else:  # "random"
        target = torch.floor(torch.rand_like(count) * count) + 1
    return (rank == target).to(own.dtype)


def _hard_assignment(
    score: torch.Tensor, layout: MergeLayout, tau: float, token_norms: torch.Tensor | None
) -> torch.Tensor:
    """Boolean one-hot rows by comparison: the best anchor if it reaches ``tau``, else the own one.

    ``score`` is similarity times token norm, with the own anchor's tie-break added, so ties
    go to the own anchor, then to the first candidate in order. Raising the own anchor's
    score to ``tau`` (times the norm) makes it win whenever no other anchor reaches ``tau``.
    ``tau = 1`` keeps every token in its own cell, even next to an identical anchor (plain
    pool/unpool).
    """
    device = score.device
    if tau >= 1.0:
        own = layout.own_candidate_matrix(device, score.dtype) > 0
        return own.expand(*score.shape[:2], *own.shape)
    if tau > -1.0:
        floor = layout.constant("own_floor", device, score.dtype)
        if tau != 0.0:
            floor = floor + tau * token_norms.to(score.dtype)
        score = torch.maximum(score, floor)
    best = score.argmax(dim=-1, keepdim=True)
    return best == layout.constant("candidate_index", device, best.dtype)


def proportional_attention_bias(
    sizes: torch.Tensor, dtype: torch.dtype | None = None, *, proportional: bool = True
) -> torch.Tensor:
    """Additive key bias ``log(size)`` for proportional attention.

    A slot that stands for ``k`` tokens then weighs like ``k`` tokens in the softmax. Empty
    slots (size 0) get ``log`` of the smallest normal float32 (about -87, a weight of
    1e-38): no weight, and never NaN, neither in the softmax (a fully ``-inf`` row would be
    NaN) nor in gradients. ``proportional=False`` keeps only that mask: every non-empty slot
    gets 0, whatever its size. Returns a tensor shaped like ``sizes``.
    """
    dtype = dtype or sizes.dtype
    sizes = sizes.to(torch.promote_types(sizes.dtype, torch.float32))  # half's tiny is not small
    tiny = torch.finfo(sizes.dtype).tiny
    if proportional:
        return sizes.clamp_min(tiny).log().to(dtype)
    return torch.where(sizes > 0, 0.0, math.log(tiny)).to(dtype)


class OperatorSettings:
    """What a settings dataclass that carries the operator's options gets for free.

    Subclasses (``MaMeConfig``, ``VisionMaMeConfig``) declare the fields ``tau``, ``block``,
    ``halo``, ``anchor``, ``temperature`` and ``straight_through`` with their own defaults;
    this mixin validates them and plans merges with them, in one place. ``refine`` and
    ``restore`` default to the operator's own defaults here; a subclass may declare them as
    fields too.
    """

    tau: float
    block: int | None
    halo: int
    anchor: str
    temperature: float | None
    straight_through: bool
    refine: int = DEFAULT_REFINE
    restore: str = DEFAULT_RESTORE

    @property
    def operator_options(self) -> dict[str, Any]:
        """The options as :func:`plan_merge` and :func:`check_merge_settings` take them."""
        return {
            "tau": self.tau,
            "block": self.block,
            "halo": self.halo,
            "anchor": self.anchor,
            "temperature": self.temperature,
            "straight_through": self.straight_through,
            "refine": self.refine,
            "restore": self.restore,
        }

    def check_operator_settings(self, ratio: float) -> float:
        """:func:`check_merge_settings` on these options at ``ratio``; returns ``tau`` as a float."""
        return check_merge_settings(ratio=ratio, **self.operator_options)

    def plan(
        self, tokens: torch.Tensor, hw: tuple[int, int], ratio: float, sizes: torch.Tensor | None = None
    ) -> MergePlan:
        """:func:`plan_merge` of ``tokens`` at ``ratio`` with these options."""
        return plan_merge(tokens, hw, ratio=ratio, sizes=sizes, **self.operator_options)

    def plan_on(self, tokens: torch.Tensor, layout: MergeLayout, sizes: torch.Tensor | None = None) -> MergePlan:
        """:func:`plan_on_layout` with these (already checked) options: the hot path."""
        return plan_on_layout(
            tokens,
            layout,
            tau=self.tau,
            anchor=self.anchor,
            temperature=self.temperature,
            straight_through=self.straight_through,
            sizes=sizes,
            refine=self.refine,
            restore=self.restore,
        )

    def remember_layout_settings(self, *ratio_names: str) -> None:
        """Write down, as text, what :meth:`layout` needs for each of ``ratio_names``, and
        ``tau`` for :meth:`constant_tau` (call it once the settings are checked, e.g. in
        ``__post_init__``)."""
        keys = {name: f"{float(getattr(self, name))!r},{self.block!r},{self.halo!r}" for name in ratio_names}
        object.__setattr__(self, "_layout_settings", keys)
        object.__setattr__(self, "_tau_setting", repr(float(self.tau)))

    def constant_tau(self) -> float:
        """``tau``; while ``torch.compile`` traces, a constant read from its text, as
        :meth:`layout` does with the ratios: the Triton kernels branch on ``tau``, which a
        symbolic value (a ``tau`` changed since the last compile) cannot decide."""
        if torch.compiler.is_compiling():
            return _constant_float(self._tau_setting)
        return self.tau

    def layout(self, hw: tuple[int, int], ratio_name: str) -> MergeLayout:
        """The merge layout of an ``hw`` grid at the ratio this config names ``ratio_name``.

        While ``torch.compile`` traces, the layout is computed outside the trace from the
        settings written down as text: dynamo turns a float or int setting that changed
        since the last compile (a new ratio applied to a compiled model) into a symbolic
        value, which the layout's integer arithmetic cannot take; text stays a constant.
        """
        if torch.compiler.is_compiling():
            return MergeLayout(*_constant_layout_fields(tuple(hw), self._layout_settings[ratio_name]))
        return merge_layout(hw, getattr(self, ratio_name), block=self.block, halo=self.halo)


@torch.compiler.assume_constant_result
def _constant_float(text: str) -> float:
    return float(text)


@torch.compiler.assume_constant_result
def _constant_layout_fields(hw: tuple[int, int], settings: str) -> tuple[int, ...]:
    """:func:`merge_layout`'s fields for ``settings`` = ``"ratio,block,halo"`` (reprs)."""
    ratio, block, halo = settings.split(",")
    return merge_layout(hw, float(ratio), block=None if block == "None" else int(block), halo=int(halo)).init_fields()
