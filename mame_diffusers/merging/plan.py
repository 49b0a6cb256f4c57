"""MaMe and MaRe on a plan: :func:`plan_merge` and :class:`MergePlan`.

A plan holds the assignment ``A`` (which slot each token joins, one-hot rows built by
comparison) and everything derived from it:

- **MaMe** (:meth:`MergePlan.merge`): ``Y = diag(n)^-1 A^T X``, the size-weighted mean of
  each slot, with sizes ``n = A^T w`` (``w``: the tokens' own sizes, 1 unless given);
- **proportional attention** (:meth:`MergePlan.attention_bias`): ``log n`` added to the keys,
  so a slot standing for ``k`` tokens weighs like ``k`` tokens and an empty one not at all;
- **MaRe** (:meth:`MergePlan.restore`): ``X_hat = W O``, where each token's row of ``W`` is
  the affine combination of its block's slots that best rebuilds the token itself from the
  slots' means (a ridge least-squares fit, one ``K x K`` solve per block, made once per
  plan). A function of the tokens close to linear around them, as attention mostly is, is
  then restored to first order in what handing every token its slot's value would miss;
- :meth:`MergePlan.spread`: every token its slot's value (``A O``), for membership maps.

Every step is a matrix product, a comparison, a reduction, a solve or a reshape, so all
shapes follow from the layout and the path compiles into one graph.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..defaults import DEFAULT_BLOCK
from .layout import MergeLayout, merge_layout
from .ranked import bipartite_slots, ranked_block_slots

__all__ = ["AFFINE_RIDGE", "MergePlan", "PlanGrid", "plan_merge", "plan_on_layout", "proportional_attention_bias"]

#: Ridge of the affine restore, relative to the mean squared norm of a block's slots: it pulls
#: the fit towards handing every token its slot's value. Measured on the layer benchmark
#: (docs/fidelity.md): 0.01 fits best with near-uniform attention, 0.1-0.3 with sharp
#: attention; 0.1 is within a few percent of the best at both.
AFFINE_RIDGE = 0.1


def proportional_attention_bias(sizes: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Additive key bias ``log(size)`` for proportional attention, shaped like ``sizes``.

    Empty slots (size 0) get ``log`` of the smallest normal float32 (about -87, a weight of
    1e-38): no weight, and never NaN, neither in the softmax (a fully ``-inf`` row would be
    NaN) nor in gradients.
    """
    dtype = dtype or sizes.dtype
    sizes = sizes.to(torch.promote_types(sizes.dtype, torch.float32))  # half's tiny is not small
    return sizes.clamp_min(torch.finfo(sizes.dtype).tiny).log().to(dtype)


class PlanGrid:
    """What every merge plan (:class:`MergePlan`, and the Triton kernels' plan) derives from
    its ``layout``, its batch size and its slots' ``sizes``."""

    layout: MergeLayout
    sizes: torch.Tensor | None
    _biases: dict

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

    def attention_bias(self, dtype: torch.dtype) -> torch.Tensor:
        """:func:`proportional_attention_bias` of the sizes, ``(B, M)``; made once per plan."""
        bias = self._biases.get(dtype)
        if bias is None:
            log_sizes = self._log_sizes_at_hand()
            bias = log_sizes.to(dtype) if log_sizes is not None else proportional_attention_bias(self.sizes, dtype)
            self._biases[dtype] = bias
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
    """How one set of tokens merges and restores; made by :func:`plan_merge`.

    ``merge``, ``restore`` and ``spread`` apply to any tensor laid out like the planned tokens
    (hidden states, or queries, keys and values), with any number of channels: in a UNet one
    plan serves every block of a level.
    """

    layout: MergeLayout
    #: ``(B, blocks, T, K)`` boolean one-hot rows: the slot of its block each token joins.
    assignment: torch.Tensor
    #: ``assignment`` times each token's weight, over the size of its slot: merging with it
    #: gives slot means directly, as convex combinations that cannot overflow in half precision.
    merge_weights: torch.Tensor
    #: ``(B, M)``: how many tokens each merged slot stands for; 0 for an empty slot.
    sizes: torch.Tensor
    # The planned tokens (and in block layout), for the affine fit and to merge them again.
    _source: torch.Tensor | None = field(default=None, repr=False)
    _source_blocks: torch.Tensor | None = field(default=None, repr=False)
    _biases: dict = field(default_factory=dict, repr=False)
    _restore_weights: torch.Tensor | None = field(default=None, repr=False)

    @property
    def batch_size(self) -> int:
        return self.assignment.shape[0]

    def merge(self, tokens: torch.Tensor) -> torch.Tensor:
        """MaMe: ``(B, N, C')`` -> ``(B, M, C')``, the size-weighted mean of each slot."""
        self._check(tokens, self.layout.num_tokens, "merge")
        blocks = self._source_blocks if tokens is self._source else self.layout.to_blocks(tokens)
        return self.layout.slots_to_grid(self.merge_weights.to(tokens.dtype).transpose(-1, -2) @ blocks)

    def restore(self, merged: torch.Tensor) -> torch.Tensor:
        """MaRe: ``(B, M, C')`` -> ``(B, N, C')``, each token the fitted affine combination of
        its block's slots (:attr:`restore_weights`)."""
        return self._spread_with(self.restore_weights, merged, "restore")

    def spread(self, merged: torch.Tensor) -> torch.Tensor:
        """``(B, M, C')`` -> ``(B, N, C')``: every token its slot's value (``A O``)."""
        return self._spread_with(self.assignment, merged, "spread")

    def _spread_with(self, weights: torch.Tensor, merged: torch.Tensor, what: str) -> torch.Tensor:
        self._check(merged, self.layout.num_merged, what)
        slots = self.layout.grid_to_slots(merged)
        return self.layout.from_blocks(weights.to(merged.dtype) @ slots)

    @property
    def restore_weights(self) -> torch.Tensor:
        """``(B, blocks, T, K)``: how much of each slot's value a token receives when restored.

        The assignment plus the ridge least-squares correction that best rebuilds each planned
        token from its block's slot means, with weights that sum to one (an affine
        combination: a constant stays constant). Fitted once, on the plan's first restore.
        """
        if self._restore_weights is None:
            if self._source_blocks is None:
                raise ValueError("the restore needs the planned tokens: make the plan with plan_merge")
            means = self.merge_weights.to(self._source_blocks.dtype).transpose(-1, -2) @ self._source_blocks
            self._restore_weights = affine_restore_weights(self._source_blocks, means, self.assignment, AFFINE_RIDGE)
        return self._restore_weights


def affine_restore_weights(
    token_blocks: torch.Tensor, means: torch.Tensor, assignment: torch.Tensor, ridge: float
) -> torch.Tensor:
    """``(B, blocks, T, K)`` restore weights ``A + D``: the assignment ``A`` plus the
    correction ``D`` that minimises, per token ``x`` with its block's slot means ``Z``,

        ``||x - (a + d) Z||^2 + ridge * s * ||d||^2``  subject to  ``sum(d) = 0``,

    where ``s`` is the mean squared norm of the block's slot means. The solution is
    ``d = P^-1 r - nu P^-1 v`` with ``P = Z Z^T + ridge s I``, ``r = Z (x - a Z)``, ``v``
    marking the slots that are not empty and ``nu`` the multiplier that makes ``d`` sum to
    0: one ``K x K`` solve per block, shared by its tokens. An empty slot has a zero mean,
    hence a zero row in ``Z``: ``r`` and ``v`` are 0 there, and so is its weight.
    """
    fit_dtype = torch.promote_types(token_blocks.dtype, torch.float32)
    means = means.to(fit_dtype)
    gram = means @ means.transpose(-1, -2)
    squared_norms = torch.diagonal(gram, dim1=-2, dim2=-1)
    valid = (squared_norms > 0).to(fit_dtype)  # (B, blocks, K)
    scale = squared_norms.mean(dim=-1, keepdim=True).clamp_min(torch.finfo(fit_dtype).tiny)
    system = gram + torch.diag_embed(ridge * scale.expand_as(squared_norms))
    hard = assignment.to(fit_dtype)
    residual = token_blocks.to(fit_dtype) @ means.transpose(-1, -2) - hard @ gram  # rows of Z (x - a Z)
    # One solve for every token's right-hand side and for v. Cholesky, not LU: P is symmetric
    # positive definite by construction, and torch's CPU LU (MKL getrf) returns garbage or
    # hangs for 176+ slots once torch.set_num_threads has been called. The _ex form: an
    # error check would wait for the GPU (a host sync).
    rhs = torch.cat([residual.transpose(-1, -2), valid[..., None]], dim=-1)
    solved = torch.cholesky_solve(rhs, torch.linalg.cholesky_ex(system)[0]).transpose(-1, -2)
    fitted, constraint = solved[..., :-1, :], solved[..., -1:, :]
    total = constraint.sum(dim=-1, keepdim=True)
    # A block without a non-empty slot has nothing to fit (and would divide 0 by 0).
    multiplier = fitted.sum(dim=-1, keepdim=True) / torch.where(total > 0, total, 1.0)
    return hard + (fitted - multiplier * constraint)


def plan_merge(
    x: torch.Tensor, hw: tuple[int, int], *, ratio: float, block: int | None = DEFAULT_BLOCK, sizes: torch.Tensor | None = None
) -> MergePlan:
    """Plan how the tokens ``x`` of shape ``(B, N, C)`` on an ``hw = (H, W)`` grid merge.

    Args:
        x: tokens, row-major on the grid (``N == H * W``), floating point.
        hw: the token grid.
        ratio: fraction of tokens removed, in ``[0, 1)`` (tomesd's convention); the merged
            length is ``M <= round(N * (1 - ratio))``, fixed by shapes alone.
        block: side of the blocks in which slots are chosen (at most ``block x block``
            tokens each; ``None``: the whole grid, by bipartite rounds).
        sizes: optional ``(B, N)`` weights of the tokens (how many original tokens each
            already stands for; 0 marks one to ignore), for merging merged tokens again.
    """
    if x.ndim != 3:
        raise ValueError(f"x must have shape (batch, tokens, channels), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must hold floating-point tokens, got {x.dtype}")
    layout = merge_layout(hw, ratio, block=block)
    batch, num_tokens, _ = x.shape
    if num_tokens != layout.num_tokens:
        raise ValueError(
            f"the grid {layout.height}x{layout.width} holds {layout.num_tokens} tokens, but x has {num_tokens}"
        )
    if sizes is not None and tuple(sizes.shape) != (batch, num_tokens):
        raise ValueError(f"sizes must have shape {(batch, num_tokens)}, got {tuple(sizes.shape)}")
    return plan_on_layout(x, layout, sizes)


def plan_on_layout(x: torch.Tensor, layout: MergeLayout, sizes: torch.Tensor | None = None) -> MergePlan:
    """:func:`plan_merge` on a ready layout, with the inputs already checked: the hot path."""
    dtype, device = x.dtype, x.device
    score_dtype = torch.promote_types(dtype, torch.float32)
    token_blocks = layout.to_blocks(x)
    if sizes is not None:
        token_weights = layout.to_blocks(sizes[..., None].to(dtype))[..., 0]
    elif layout.padded:
        token_weights = layout.constant("present", device, dtype)
    else:
        token_weights = None  # every token weighs 1
    if layout.num_blocks == 1 and layout.merges:
        weights = None if token_weights is None else token_weights[:, 0]
        slot = bipartite_slots(token_blocks[:, 0], weights, layout)[:, None]
    else:
        slot = ranked_block_slots(token_blocks, token_weights, layout)
    assignment = slot[..., None] == layout.constant("slot_index", device, slot.dtype)
    weighted = assignment if token_weights is None else assignment * token_weights[..., None]
    block_sizes = weighted.sum(dim=-2, dtype=score_dtype)  # (B, blocks, K)
    # Empty slots receive nothing, so the clamp that keeps their reciprocal finite never shows.
    clamped = block_sizes.clamp_min(torch.finfo(score_dtype).tiny)
    merge_weights = (weighted * clamped.reciprocal()[..., None, :]).to(dtype)
    return MergePlan(
        layout=layout,
        assignment=assignment,
        merge_weights=merge_weights,
        sizes=layout.slots_to_grid(block_sizes[..., None])[..., 0],
        _source=x,
        _source_blocks=token_blocks,
    )
