"""Which tokens merge, and into which slot: ranked slots, chosen by content with comparisons.

In blocks (:func:`ranked_block_slots`): half of each block's ``K`` slots are fixed
destinations (the middle tokens of a grid of cells over the block); every other token is a
source and scores its best cosine similarity to a destination. The ``T - K`` best-scored
sources merge; the others, with the destinations, are the block's ``K`` staying tokens, and
every merging token joins its most similar staying token. One round for any ratio.

Over the whole grid (:func:`bipartite_slots`, ``block=None``): ToMe's bipartite rule in
rounds of at most half the tokens (every other token a destination), each round comparing
the size-weighted means the previous one made.

Both rank by comparisons and counts, never by a sort: a source's rank is the number of
sources scored higher (ties: the earlier first). Slots keep their tokens' order. Tokens that
weigh nothing (block padding, empty slots) rank first, so they never hold a slot a real token
could use. Every function returns each token's slot as a float tensor of whole numbers.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layout import MergeLayout

__all__ = ["bipartite_slots", "one_hot", "ranked_block_slots"]


def ranked_block_slots(
    token_blocks: torch.Tensor, token_weights: torch.Tensor | None, layout: MergeLayout
) -> torch.Tensor:
    """``(B, blocks, T)``: the slot (``0..K-1`` within its block) each token of
    ``token_blocks`` ``(B, blocks, T, C)`` joins."""
    score_dtype = torch.promote_types(token_blocks.dtype, torch.float32)
    device = token_blocks.device
    destination = layout.constant("destination", device, torch.bool)
    unit = F.normalize(token_blocks.to(score_dtype), dim=-1)
    similarity = unit @ unit.transpose(-1, -2)  # (B, blocks, T, T)
    best = torch.where(destination, similarity, -math.inf).amax(dim=-1)
    if token_weights is not None:
        best = torch.where(token_weights > 0, best, math.inf)
    # Only sources compete: destinations rank behind every source.
    best = torch.where(destination, -math.inf, best)
    merges = (_rank(best, layout.constant("earlier", device, torch.bool)) < layout.tokens_per_block - layout.slots_per_block)
    merges = merges & ~destination
    stays = ~merges
    position = stays.to(score_dtype).cumsum(dim=-1) - 1  # the slot of each staying token
    # A merging token's slot: its most similar staying token's position, by a product with
    # that token's one-hot row (no index).
    choice = torch.where(stays[..., None, :], similarity, -math.inf).argmax(dim=-1)
    token_index = layout.constant("token_index", device, score_dtype)
    joined = ((choice[..., None] == token_index).to(score_dtype) @ position[..., None])[..., 0]
    return torch.where(merges, joined, position)


def bipartite_slots(tokens: torch.Tensor, token_weights: torch.Tensor | None, layout: MergeLayout) -> torch.Tensor:
    """``(B, N)``: the slot (``0..M-1``) each of the ``(B, N, C)`` ``tokens`` joins, on a layout
    of one block."""
    work_dtype = torch.promote_types(tokens.dtype, torch.float32)  # slot positions are counted exactly
    tokens, weights, slot = tokens.to(work_dtype), token_weights, None
    earlier = layout.constant("earlier", tokens.device, torch.bool)  # every round's tie-break order
    if weights is not None:
        weights = weights.to(work_dtype)
    while tokens.shape[1] > layout.num_merged:
        count = tokens.shape[1]
        remaining = max(layout.num_merged, count - count // 2)
        round_slot = _bipartite_round(tokens, weights, count - remaining, earlier)
        # Composed with the earlier rounds by a product with one-hot rows, not an index.
        slot = round_slot if slot is None else (one_hot(slot, count) @ round_slot[..., None])[..., 0]
        if remaining == layout.num_merged:
            break
        # The next round compares the size-weighted means of this round's slots.
        members = one_hot(round_slot, remaining).transpose(-1, -2)
        sums = members @ (tokens if weights is None else tokens * weights[..., None])
        weights = members.sum(dim=-1) if weights is None else (members @ weights[..., None])[..., 0]
        tokens = sums / weights.clamp_min(torch.finfo(work_dtype).tiny)[..., None]
    return slot


def _bipartite_round(
    tokens: torch.Tensor, weights: torch.Tensor | None, remove: int, earlier: torch.Tensor
) -> torch.Tensor:
    """``(B, n)``: the slot (``0..n - remove - 1``) each of the ``n`` tokens goes to when the
    ``remove`` sources most similar to a destination join it.

    ``earlier`` is the layout's ``(N, N)`` token-order constant (``n <= N``).
    """
    count = tokens.shape[1]
    unit = F.normalize(tokens, dim=-1)
    sources, destinations = unit[:, 0::2], unit[:, 1::2]
    best, best_destination = (sources @ destinations.transpose(-1, -2)).max(dim=-1)
    if weights is not None:  # weightless sources (empty slots) merge first
        best = torch.where(weights[:, 0::2] > 0, best, math.inf)
    # Among the sources (tokens 0, 2, 4, ...), source j comes before source i where token 2j
    # comes before token 2i: a strided view of the token order, no new matrix.
    merges = _rank(best, earlier[:count:2, :count:2]) < remove
    stays = torch.stack([~merges, torch.ones_like(merges)], dim=-1).flatten(1)[:, :count]
    position = stays.to(tokens.dtype).cumsum(dim=-1) - 1  # slots keep their tokens' order
    destination_slot = position[:, 1::2]
    joined_slot = (one_hot(best_destination, destinations.shape[1], tokens.dtype) @ destination_slot[..., None])[..., 0]
    source_slot = torch.where(merges, joined_slot, position[:, 0::2])
    # Interleave back into token order (a source more than destinations when n is odd).
    padding = source_slot.shape[1] - destination_slot.shape[1]
    return torch.stack([source_slot, F.pad(destination_slot, (0, padding))], dim=-1).flatten(1)[:, :count]


def _rank(score: torch.Tensor, earlier: torch.Tensor) -> torch.Tensor:
    """``(..., n)``: how many entries of the last axis of ``score`` come ahead of each one
    (scored higher, or equal and earlier by ``earlier``, an ``(n, n)`` boolean matrix)."""
    ahead = (score[..., None, :] > score[..., :, None]) | ((score[..., None, :] == score[..., :, None]) & earlier)
    return ahead.sum(dim=-1)


def one_hot(index: torch.Tensor, width: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``(..., width)`` rows with a 1 at ``index`` (whole numbers, any dtype), by comparison."""
    dtype = dtype or index.dtype
    return (index[..., None] == torch.arange(width, device=index.device, dtype=index.dtype)).to(dtype)
