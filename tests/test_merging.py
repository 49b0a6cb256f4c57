"""The operator: shapes, exact identities, a loop-based reference, gradients, banned ops."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mame_diffusers import merge_layout, plan_merge, proportional_attention_bias
from mame_diffusers.merging import ANCHORS

from .banned_ops import assert_no_banned_ops


def piecewise_constant(batch: int, hw: tuple[int, int], patch: tuple[int, int], channels: int, seed: int = 0):
    """Tokens constant on ``patch``-sized rectangles of the grid, random per rectangle."""
    generator = torch.Generator().manual_seed(seed)
    rows, cols = math.ceil(hw[0] / patch[0]), math.ceil(hw[1] / patch[1])
    values = torch.randn(batch, rows, cols, channels, generator=generator)
    grid = values.repeat_interleave(patch[0], dim=1).repeat_interleave(patch[1], dim=2)
    return grid[:, : hw[0], : hw[1]].reshape(batch, hw[0] * hw[1], channels)


# -- the static layout ---------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    ratio=st.floats(0.0, 0.99),
    block=st.sampled_from([None, 2, 4, 8, 16]),
    halo=st.integers(0, 4),
)
def test_merged_length_is_static_and_bounded(height, width, ratio, block, halo):
    layout = merge_layout((height, width), ratio, block=block, halo=halo)
    num_tokens = height * width
    assert 1 <= layout.num_merged <= max(1, round(num_tokens * (1 - ratio)))
    assert layout.num_merged == layout.merged_hw[0] * layout.merged_hw[1]
    assert layout.blocks_h * layout.block_h >= height and layout.blocks_w * layout.block_w >= width
    # Equal blocks with less than one block of padding.
    assert layout.blocks_h * layout.block_h - height < layout.block_h
    assert layout.halo_h <= layout.anchors_h and layout.halo_w <= layout.anchors_w


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(2, 40),
    width=st.integers(2, 40),
    ratio=st.floats(0.0, 0.95),
    block=st.sampled_from([None, 4, 8]),
    halo=st.integers(0, 3),
    anchor=st.sampled_from(ANCHORS),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_shapes_sizes_and_dtypes(height, width, ratio, block, halo, anchor, dtype):
    x = torch.randn(3, height * width, 6).to(dtype)
    options = {"halo": 0, "tau": 0.0} if anchor == "ranked" else {"halo": halo, "tau": -1.0}
    plan = plan_merge(x, (height, width), ratio=ratio, block=block, anchor=anchor, **options)
    merged = plan.merge(x)
    assert merged.shape == (3, plan.num_merged, 6) and merged.dtype == dtype
    assert plan.sizes.shape == (3, plan.num_merged)
    # Hard assignment: every token lands in exactly one slot.
    torch.testing.assert_close(plan.sizes.float().sum(-1), torch.full((3,), float(height * width)))
    assert (plan.sizes >= 0).all()
    restored = plan.restore(merged)
    assert restored.shape == x.shape and restored.dtype == dtype
    assert torch.isfinite(merged).all() and torch.isfinite(restored).all()
    # Any channel count merges and restores with the same plan.
    assert plan.merge(torch.randn(3, height * width, 2).to(dtype)).shape == (3, plan.num_merged, 2)


def test_merged_length_follows_ratio_on_a_64_grid():
    assert merge_layout((64, 64), 0.75).num_merged == 1024
    assert merge_layout((64, 64), 0.5).num_merged == 2048
    assert merge_layout((64, 64), 0.75, block=None).merged_hw == (32, 32)
    assert merge_layout((63, 47), 0.75).num_merged <= round(63 * 47 * 0.25)


# -- exact identities ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "block,halo,anchor",
    [
        (block, halo, anchor)
        for block, halo in [(8, 2), (4, 1), (None, 0), (16, 0)]
        for anchor in ANCHORS
        if not (anchor == "ranked" and halo)  # ranked slots take no halo
    ],
)
def test_restore_of_merge_is_exact_on_constant_tokens(block, halo, anchor):
    x = torch.randn(2, 1, 5).expand(2, 24 * 20, 5).contiguous()
    plan = plan_merge(x, (24, 20), ratio=0.75, block=block, halo=halo, anchor=anchor)
    # Ranked: every tie goes to the first destination, so one slot averages hundreds of tokens.
    tolerance = 1e-5 if anchor == "ranked" else 1e-6
    torch.testing.assert_close(plan.restore(plan.merge(x)), x, rtol=tolerance, atol=tolerance)


@pytest.mark.parametrize("hw,ratio", [((16, 16), 0.75), ((32, 24), 0.75), ((16, 16), 0.9375), ((24, 24), 0.5)])
@pytest.mark.parametrize("tau", [-1.0, 0.0, 0.9, 1.0])
def test_restore_of_merge_is_exact_on_piecewise_constant_tokens(hw, ratio, tau):
    # Pieces aligned with the anchor cells: every cell holds a single value.
    layout = merge_layout(hw, ratio)
    cell = (layout.block_h // layout.anchors_h, layout.block_w // layout.anchors_w)
    x = piecewise_constant(2, hw, cell, 7)
    plan = plan_merge(x, hw, ratio=ratio, tau=tau)
    torch.testing.assert_close(plan.restore(plan.merge(x)), x, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("hw,ratio,block,halo", [((16, 16), 0.75, 8, 2), ((32, 24), 0.9375, 8, 1), ((16, 16), 0.75, None, 0)])
def test_affine_restore_is_exact_where_copying_is(hw, ratio, block, halo):
    # Pieces aligned with the anchor cells: the copy is exact, and the fit has nothing to
    # correct (refined anchors are the pieces' values).
    layout = merge_layout(hw, ratio, block=block, halo=halo)
    assert layout.uniform_cells
    cell = (layout.block_h // layout.anchors_h, layout.block_w // layout.anchors_w)
    x = piecewise_constant(2, hw, cell, 7)
    plan = plan_merge(x, hw, ratio=ratio, block=block, halo=halo, refine=1, restore="affine")
    torch.testing.assert_close(plan.restore(plan.merge(x)), x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sizes", [False, True])
def test_affine_restore_rebuilds_every_token_at_least_as_well_as_copying(sizes):
    # The fit minimises each token's reconstruction error plus a ridge, and copying is one
    # of the candidates it considers: no token may come back worse, and on smooth real-ish
    # tokens most come back clearly better. Rows sum to one (a constant stays constant) and
    # slots that do not exist get no weight.
    from mame_diffusers.benchmarking.photos import photo_tokens

    x = torch.cat([photo_tokens("astronaut", (24, 20), channels=16), photo_tokens("coffee", (24, 20), channels=16)])
    weights = None
    if sizes:  # merged tokens merged again: some weigh 0 (empty slots)
        weights = (torch.rand(2, 24 * 20, generator=torch.Generator().manual_seed(0)) * 3).floor()
    copy = plan_merge(x, (24, 20), ratio=0.75, block=8, halo=1, sizes=weights)
    affine = plan_merge(x, (24, 20), ratio=0.75, block=8, halo=1, sizes=weights, restore="affine")
    merged = copy.merge(x)
    torch.testing.assert_close(affine.merge(x), merged)
    copy_error = (copy.restore(merged) - x).square().sum(-1)
    affine_error = (affine.restore(merged) - x).square().sum(-1)
    counted = weights > 0 if sizes else torch.ones_like(copy_error, dtype=torch.bool)
    assert (affine_error[counted] <= copy_error[counted] * (1 + 1e-4) + 1e-6).all()
    assert affine_error[counted].sum() < 0.8 * copy_error[counted].sum()
    rows = affine.restore_weights.sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows), rtol=1e-4, atol=1e-4)
    candidates_exist = affine.layout.gather_windows(affine.sizes.reshape(2, *affine.merged_hw, 1))[..., 0] > 0
    assert (affine.restore_weights.abs() * ~candidates_exist[:, :, None, :]).max() == 0


def test_refinement_moves_anchors_to_their_slot_means_and_tightens_slots():
    # One k-means step: slots get tighter on real-photo tokens (lower within-slot squared
    # error), the merged length stays, and zero steps is exactly the plain plan.
    from mame_diffusers.benchmarking.photos import photo_tokens

    x = photo_tokens("chelsea", (32, 32), channels=24)

    def within_slot_error(plan):
        return float((plan.restore(plan.merge(x)) - x).square().sum())

    plain = plan_merge(x, (32, 32), ratio=0.75)
    refined = [plan_merge(x, (32, 32), ratio=0.75, refine=steps) for steps in (1, 2)]
    assert within_slot_error(refined[0]) < 0.97 * within_slot_error(plain)
    assert within_slot_error(refined[1]) <= within_slot_error(refined[0]) * 1.01
    assert refined[0].num_merged == plain.num_merged and torch.equal(
        plan_merge(x, (32, 32), ratio=0.75, refine=0).assignment, plain.assignment
    )


def bipartite_reference(x: torch.Tensor, sizes: torch.Tensor, num_merged: int) -> torch.Tensor:
    """ToMe's bipartite soft matching, written with sort and gather (allowed in a test): rounds
    in which the sources (even positions) most similar to a destination (odd positions) are
    averaged into it, by size. Returns every token's restored value, ``(B, N, C)``."""
    tokens, weights = x.double(), sizes.double()
    where = torch.arange(x.shape[1]).expand(x.shape[:2])  # each token's row among ``tokens``
    while tokens.shape[1] > num_merged:
        count = tokens.shape[1]
        remove = count - max(num_merged, count - count // 2)
        unit = F.normalize(tokens, dim=-1)
        best, target = (unit[:, 0::2] @ unit[:, 1::2].transpose(-1, -2)).max(dim=-1)
        order = best.argsort(dim=-1, descending=True, stable=True)
        merges = torch.zeros_like(best, dtype=torch.bool).scatter(1, order[:, :remove], True)
        # New row of every current row: sources that merge go to their destination's row.
        goes_to = torch.arange(count).repeat(x.shape[0], 1)
        goes_to[:, 0::2] = torch.where(merges, 2 * target + 1, goes_to[:, 0::2])
        stays = torch.ones_like(goes_to, dtype=torch.bool)
        stays[:, 0::2] = ~merges
        new_row = stays.long().cumsum(-1) - 1
        slot = new_row.gather(1, goes_to)
        width = count - remove
        sums = torch.zeros(x.shape[0], width, x.shape[-1], dtype=tokens.dtype)
        sums.scatter_add_(1, slot[..., None].expand_as(tokens), tokens * weights[..., None])
        weights = torch.zeros(x.shape[0], width, dtype=tokens.dtype).scatter_add_(1, slot, weights)
        tokens = sums / weights[..., None]
        where = slot.gather(1, where)
    return tokens.gather(1, where[..., None].expand(*where.shape, x.shape[-1]))


# 0.7 and 0.9 take several rounds, whose pairs depend on the order of the slots: the
# reference keeps the staying tokens' order, as the operator must.
@pytest.mark.parametrize("hw,ratio", [((14, 14), 0.1), ((13, 15), 0.3), ((14, 14), 0.7), ((7, 9), 0.9)])
def test_ranked_anchors_are_bipartite_matching(hw, ratio):
    x = torch.randn(2, hw[0] * hw[1], 16, dtype=torch.float64)
    sizes = torch.rand(2, hw[0] * hw[1], dtype=torch.float64) + 0.5
    plan = plan_merge(x, hw, ratio=ratio, block=None, anchor="ranked", sizes=sizes)
    layout = merge_layout(hw, ratio, block=None)
    assert plan.num_merged == layout.num_merged < hw[0] * hw[1]
    torch.testing.assert_close(plan.restore(plan.merge(x)), bipartite_reference(x, sizes, plan.num_merged))
    torch.testing.assert_close(plan.sizes.sum(-1), sizes.sum(-1))


def ranked_blocks_reference(x: torch.Tensor, sizes: torch.Tensor | None, layout) -> torch.Tensor:
    """The blocked ranked rule with Python loops and sorting: per block, destinations are the
    middle tokens of a grid of ``K // 2`` cells; sources (weightless ones first, then by
    their best destination cosine, ties to the earlier) merge until ``K`` tokens stay; each
    merging token joins its most similar staying token. Returns every token's restored
    value (its slot's size-weighted mean)."""
    from mame_diffusers.merging import _fit_anchor_grid

    blocks = layout.to_blocks(x.double())
    if sizes is not None:
        weights = layout.to_blocks(sizes[..., None].double())[..., 0]
    else:
        weights = layout.to_blocks(torch.ones(*x.shape[:2], 1, dtype=torch.float64))[..., 0]
    rows, cols = _fit_anchor_grid(max(1, layout.anchors_per_block // 2), layout.block_h, layout.block_w)
    middle_rows = {(2 * i + 1) * layout.block_h // (2 * rows) for i in range(rows)}
    middle_cols = {(2 * j + 1) * layout.block_w // (2 * cols) for j in range(cols)}
    count = layout.tokens_per_block
    destinations = [t for t in range(count) if t // layout.block_w in middle_rows and t % layout.block_w in middle_cols]
    restored = torch.zeros_like(blocks)
    for b in range(blocks.shape[0]):
        for k in range(blocks.shape[1]):
            tokens, weight = blocks[b, k], weights[b, k]
            unit = F.normalize(tokens, dim=-1)
            similarity = unit @ unit.T
            sources = [t for t in range(count) if t not in destinations]

            def key(t):
                best = max(float(similarity[t, d]) for d in destinations)
                return (0 if weight[t] <= 0 else 1, -best, t)

            merging = sorted(sources, key=key)[: count - layout.anchors_per_block]
            staying = [t for t in range(count) if t not in merging]
            slot_of = {t: t for t in staying}
            for t in merging:
                slot_of[t] = max(staying, key=lambda s: (float(similarity[t, s]), -s))
            for s in staying:
                members = [t for t in range(count) if slot_of[t] == s]
                total = sum(float(weight[t]) for t in members)
                mean = sum(weight[t] * tokens[t] for t in members) / total if total > 0 else torch.zeros_like(tokens[0])
                for t in members:
                    restored[b, k, t] = mean
    return layout.from_blocks(restored)


@pytest.mark.parametrize("hw,ratio,block", [((16, 16), 0.5, 8), ((21, 19), 0.75, 8), ((16, 24), 0.3, 16), ((32, 32), 0.9, 8)])
@pytest.mark.parametrize("with_sizes", [False, True])
def test_ranked_blocks_match_a_loop_reference(hw, ratio, block, with_sizes):
    x = torch.randn(2, hw[0] * hw[1], 6, dtype=torch.float64)
    sizes = None
    if with_sizes:
        sizes = torch.rand(2, hw[0] * hw[1], dtype=torch.float64) + 0.5
        sizes[:, ::7] = 0  # weightless tokens (empty slots of an earlier merge)
    plan = plan_merge(x, hw, ratio=ratio, block=block, halo=0, anchor="ranked", sizes=sizes)
    layout = merge_layout(hw, ratio, block=block, halo=0)
    assert layout.num_blocks > 1 and plan.num_merged == layout.num_merged
    expected = ranked_blocks_reference(x, sizes, layout)
    torch.testing.assert_close(plan.restore(plan.merge(x)), expected)
    total = torch.full((2,), float(hw[0] * hw[1]), dtype=torch.float64) if sizes is None else sizes.sum(-1)
    torch.testing.assert_close(plan.sizes.sum(-1), total)


def test_ranked_anchors_merge_the_most_redundant_tokens():
    # Distinct tokens, and each source 0, 2, 4 has a near-copy at the next position.
    x = torch.eye(12)[None]
    for source in (0, 2, 4):
        x[0, source] = x[0, source + 1] + 0.01 * x[0, source]
    plan = plan_merge(x, (3, 4), ratio=0.25, block=None, anchor="ranked")
    assert plan.num_merged == 9
    restored = plan.restore(plan.merge(x))
    for source in (0, 2, 4):
        torch.testing.assert_close(restored[0, source], restored[0, source + 1])
    unmerged = [index for index in range(12) if index not in (0, 1, 2, 3, 4, 5)]
    torch.testing.assert_close(restored[0, unmerged], x[0, unmerged])


def test_distinct_anchor_is_the_odd_token_of_its_cell():
    # 4 x 4 grid, ratio 0.75: four 2 x 2 cells. Cells 0 and 1 hold three tokens of kind A and
    # one odd token (B, C); cells 2 and 3 only A. The odd tokens become their cells' anchors
    # and stay alone, while the A tokens around them join the A anchors of cells 2 and 3. A
    # middle-token anchor would be an A token and leave B and C without a slot of their own.
    kinds = torch.eye(3)
    x = kinds[0].repeat(1, 16, 1) + 0.01 * torch.randn(1, 16, 3, generator=torch.Generator().manual_seed(0))
    x[0, 0], x[0, 3] = kinds[1], kinds[2]  # token 0 lies in cell 0, token 3 in cell 1
    options = {"ratio": 0.75, "block": None, "halo": 0, "tau": -1.0}
    plan = plan_merge(x, (4, 4), anchor="distinct", **options)
    merged = plan.merge(x)[0]
    torch.testing.assert_close(merged[:2], x[0, [0, 3]])
    assert plan.sizes[0, :2].tolist() == [1.0, 1.0] and float(plan.sizes[0, 2:].sum()) == 14.0
    strided = plan_merge(x, (4, 4), anchor="strided", **options)
    assert not torch.allclose(strided.merge(x)[0, :2], x[0, [0, 3]])

    # A token of weight 0 is never an anchor: cell 0 then offers an A token.
    weights = torch.ones(1, 16)
    weights[0, 0] = 0
    weighted = plan_merge(x, (4, 4), anchor="distinct", sizes=weights, **options)
    assert weighted.merge(x)[0, 0, 0] > 0.9


def test_affine_restore_needs_the_planned_tokens():
    plan = plan_merge(torch.randn(1, 64, 4), (8, 8), ratio=0.5, restore="affine")
    plan._source = None
    with pytest.raises(ValueError, match="planned tokens"):
        plan.restore(torch.randn(1, plan.num_merged, 4))


def test_ratio_zero_is_the_identity():
    x = torch.randn(2, 15 * 13, 8)
    plan = plan_merge(x, (15, 13), ratio=0.0, tau=-1.0)
    assert plan.num_merged == x.shape[1]
    torch.testing.assert_close(plan.merge(x), x, rtol=0, atol=0)
    torch.testing.assert_close(plan.restore(x), x, rtol=0, atol=0)
    assert (plan.sizes == 1).all()


def test_tau_one_is_pool_and_unpool():
    x = torch.randn(2, 32 * 32, 4)
    plan = plan_merge(x, (32, 32), ratio=0.75, tau=1.0, block=8)
    pooled = torch.nn.functional.avg_pool2d(x.transpose(1, 2).reshape(2, 4, 32, 32), 2)
    torch.testing.assert_close(plan.merge(x), pooled.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-6)
    assert (plan.sizes == 4).all()
    upsampled = torch.nn.functional.interpolate(pooled, scale_factor=2, mode="nearest")
    torch.testing.assert_close(plan.restore(plan.merge(x)), upsampled.flatten(2).transpose(1, 2), rtol=1e-5, atol=1e-6)


def test_similar_tokens_leave_their_cell_below_tau_only():
    # Two colours in vertical stripes one cell wide, offset by one token: every cell mixes
    # both colours; with tau=-1 tokens go to the anchor of their own colour.
    x = torch.zeros(1, 8, 8, 2)
    x[..., 0] = 1.0
    x[:, :, 1::4, :] = torch.tensor([0.0, 1.0])
    x[:, :, 2::4, :] = torch.tensor([0.0, 1.0])
    x = x.reshape(1, 64, 2)
    merged_pure = plan_merge(x, (8, 8), ratio=0.75, tau=-1.0, block=None)
    # Means are taken as weighted sums with weights 1/size: exact up to rounding.
    torch.testing.assert_close(merged_pure.restore(merged_pure.merge(x)), x, rtol=0, atol=1e-6)
    kept_in_cells = plan_merge(x, (8, 8), ratio=0.75, tau=1.0, block=None)
    assert not torch.equal(kept_in_cells.restore(kept_in_cells.merge(x)), x)


# -- equivalence to a loop-based reference -------------------------------------------------


def reference_assignment(x: torch.Tensor, layout, tau: float) -> torch.Tensor:
    """Dense ``(B, N, M)`` assignment written with explicit loops, from the definition."""
    batch, num_tokens, _ = x.shape
    rows_m, cols_m = layout.merged_hw
    cell_h, cell_w = layout.block_h / layout.anchors_h, layout.block_w / layout.anchors_w

    def cell_of(i, j):
        bi, bj = i // layout.block_h, j // layout.block_w
        return (
            bi * layout.anchors_h + int((i - bi * layout.block_h) // cell_h),
            bj * layout.anchors_w + int((j - bj * layout.block_w) // cell_w),
        )

    members = {}
    for i in range(layout.height):
        for j in range(layout.width):
            members.setdefault(cell_of(i, j), []).append(i * layout.width + j)
    assignment = torch.zeros(batch, num_tokens, rows_m * cols_m, dtype=x.dtype)
    for b in range(batch):
        anchors = {c: x[b, toks[(len(toks) + 1) // 2 - 1]] for c, toks in members.items()}
        for i in range(layout.height):
            for j in range(layout.width):
                own = cell_of(i, j)
                bi, bj = i // layout.block_h, j // layout.block_w
                token = x[b, i * layout.width + j]
                best, best_cell = None, None
                for r in range(bi * layout.anchors_h - layout.halo_h, (bi + 1) * layout.anchors_h + layout.halo_h):
                    for c in range(bj * layout.anchors_w - layout.halo_w, (bj + 1) * layout.anchors_w + layout.halo_w):
                        if (r, c) not in anchors:
                            continue
                        sim = torch.nn.functional.cosine_similarity(token, anchors[(r, c)], dim=0, eps=1e-12)
                        if best is None or sim > best:
                            best, best_cell = sim, (r, c)
                own_sim = torch.nn.functional.cosine_similarity(token, anchors[own], dim=0, eps=1e-12)
                chosen = own if (own_sim >= best or best < tau) else best_cell
                assignment[b, i * layout.width + j, chosen[0] * cols_m + chosen[1]] = 1.0
    return assignment


@pytest.mark.parametrize(
    "hw,ratio,block,halo,tau",
    [((12, 12), 0.75, 4, 1, -1.0), ((10, 14), 0.75, 4, 2, 0.2), ((9, 7), 0.6, 4, 1, -1.0), ((8, 8), 0.75, None, 0, 0.0)],
)
def test_matches_loop_reference(hw, ratio, block, halo, tau):
    x = torch.randn(2, hw[0] * hw[1], 5, dtype=torch.float64)
    plan = plan_merge(x, hw, ratio=ratio, block=block, halo=halo, tau=tau)
    dense = reference_assignment(x, plan.layout, tau)
    sizes = dense.sum(1)
    torch.testing.assert_close(plan.sizes, sizes)
    expected_merge = (dense.transpose(1, 2) @ x) / sizes.clamp_min(1e-12)[..., None]
    torch.testing.assert_close(plan.merge(x), expected_merge)
    outputs = torch.randn(2, plan.num_merged, 3, dtype=torch.float64)
    torch.testing.assert_close(plan.restore(outputs), dense @ outputs)


# -- sizes, empty slots, weights -----------------------------------------------------------


def test_token_weights_make_size_weighted_means_and_empty_slots_stay_finite():
    x = torch.randn(2, 16 * 16, 4)
    sizes = torch.randint(0, 4, (2, 256)).float()
    sizes[:, :64] = 0  # a whole region of empty slots from an earlier merge
    plan = plan_merge(x, (16, 16), ratio=0.75, sizes=sizes, tau=-1.0)
    torch.testing.assert_close(plan.sizes.sum(-1), sizes.sum(-1))
    assert (plan.sizes == 0).any()
    merged = plan.merge(x)
    assert torch.isfinite(merged).all()
    assert (merged[plan.sizes == 0] == 0).all()
    bias = proportional_attention_bias(plan.sizes)
    assert torch.isfinite(bias).all()
    scores = torch.softmax(torch.randn(2, 5, plan.num_merged) + bias[:, None, :], dim=-1)
    assert torch.isfinite(scores).all()
    assert (scores[(plan.sizes == 0)[:, None, :].expand_as(scores)] < 1e-30).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_proportional_bias_is_log_size(dtype):
    sizes = torch.tensor([[0.0, 1.0, 2.0, 8.0]])
    bias = proportional_attention_bias(sizes, dtype)
    assert bias.dtype == dtype
    torch.testing.assert_close(bias[0, 1:].float(), torch.log(sizes[0, 1:]), rtol=1e-2, atol=1e-3)
    assert bias[0, 0] < -80 and torch.isfinite(bias).all()
    mask_only = proportional_attention_bias(sizes, dtype, proportional=False)
    assert mask_only.dtype == dtype and (mask_only[0, 1:] == 0).all()
    assert mask_only[0, 0] == bias[0, 0]


# -- differentiability ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"temperature": 0.1},
        {"temperature": 0.1, "straight_through": True},
        {"anchor": "pooled"},
        {"refine": 1, "restore": "affine"},
    ],
)
def test_gradients_reach_the_tokens(options):
    x = torch.randn(2, 16 * 16, 6, requires_grad=True)
    plan = plan_merge(x, (16, 16), ratio=0.75, tau=-1.0, **options)
    loss = (plan.restore(torch.tanh(plan.merge(x)) * 3) ** 2).sum()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_soft_assignment_gradient_flows_through_the_assignment():
    # Detach the merged values: any gradient left comes from the soft assignment itself.
    x = torch.randn(1, 8 * 8, 4, requires_grad=True)
    plan = plan_merge(x, (8, 8), ratio=0.75, tau=-1.0, temperature=0.2)
    plan.restore(plan.merge(x.detach())).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    rows = plan.assignment.sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows))


def test_straight_through_forward_equals_hard():
    x = torch.randn(2, 16 * 16, 6)
    hard = plan_merge(x, (16, 16), ratio=0.75, tau=-1.0)
    straight = plan_merge(x, (16, 16), ratio=0.75, tau=-1.0, temperature=0.1, straight_through=True)
    torch.testing.assert_close(straight.merge(x), hard.merge(x))


# -- the matrix-only contract --------------------------------------------------------------


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"block": None, "halo": 0},
        {"anchor": "random"},
        {"anchor": "pooled"},
        {"temperature": 0.1, "straight_through": True},
        {"refine": 2, "restore": "affine"},
        {"anchor": "distinct", "refine": 1, "restore": "affine"},
        {"refine": 1, "restore": "affine", "block": None, "halo": 0},
        {"anchor": "ranked", "block": None, "restore": "affine"},
        {"anchor": "ranked", "block": 8, "halo": 0, "restore": "affine"},
    ],
)
def test_merge_path_has_no_banned_ops(options):
    x = torch.randn(2, 21 * 19, 8, requires_grad=True)
    sizes = torch.rand(2, 21 * 19) * 3

    def merge_and_restore():
        plan = plan_merge(x, (21, 19), ratio=0.75, sizes=sizes, **options)
        out = plan.restore(plan.merge(x) * proportional_attention_bias(plan.sizes)[..., None].exp())
        out.sum().backward()

    assert_no_banned_ops(merge_and_restore)


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({"ratio": 0.5, "tau": 1.5}, "tau"),
        ({"ratio": 0.5, "tau": -2}, "tau"),
        ({"ratio": 0.5, "block": 0}, "block"),
        ({"ratio": 0.5, "halo": -1}, "halo"),
        ({"ratio": 0.5, "anchor": "median"}, "anchor"),
        ({"ratio": 0.5, "temperature": 0.0}, "temperature"),
        ({"ratio": 0.5, "straight_through": True}, "straight_through"),
        ({"ratio": 0.5, "refine": -1}, "refine"),
        ({"ratio": 0.5, "refine": True}, "refine"),
        ({"ratio": 0.5, "restore": "soft"}, "restore"),
        ({"ratio": 0.5, "anchor": "ranked"}, "ranked.*takes no halo"),
        ({"ratio": 0.5, "anchor": "ranked", "block": None, "tau": 0.5}, "ranked.*tau"),
        ({"ratio": 0.5, "anchor": "ranked", "block": None, "temperature": 0.1}, "ranked.*temperature"),
        ({"ratio": 0.5, "anchor": "ranked", "block": None, "refine": 1}, "ranked.*refine"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_merge(torch.randn(1, 16, 4), (4, 4), **kwargs)


def test_grid_that_does_not_match_the_tokens_raises():
    with pytest.raises(ValueError, match="holds 20 tokens"):
        plan_merge(torch.randn(1, 16, 4), (4, 5), ratio=0.5)
    with pytest.raises(ValueError, match="sizes"):
        plan_merge(torch.randn(1, 16, 4), (4, 4), ratio=0.5, sizes=torch.ones(1, 15))
    plan = plan_merge(torch.randn(1, 16, 4), (4, 4), ratio=0.5)
    with pytest.raises(ValueError, match="merge expects"):
        plan.merge(torch.randn(1, 15, 4))
    with pytest.raises(ValueError, match="restore expects"):
        plan.restore(torch.randn(2, plan.num_merged, 4))


# -- cost: what a GPU launches ---------------------------------------------------------------


def test_plan_and_merge_run_few_operations():
    # On a GPU at batch 2 every operation is a kernel launch, and launches are what a
    # Stable Diffusion UNet is bound by: the operator's count is its cost there. The meta
    # device takes the path a GPU takes (a CPU takes slice additions instead of F.fold,
    # more operations but faster there) without computing anything.
    from mame_diffusers import MaMeConfig
    from mame_diffusers.benchmarking.ops import work_ops

    x = torch.randn(2, 64 * 64, 320, device="meta")
    ratio = MaMeConfig().kv_ratio
    with torch.inference_mode():
        plan_merge(x, (64, 64), ratio=ratio)  # builds the layout's constants once
        counts = work_ops(lambda: plan_merge(x, (64, 64), ratio=ratio).merge(x))
        reused, other = plan_merge(x, (64, 64), ratio=ratio), torch.randn_like(x)
        merge_counts = work_ops(lambda: reused.merge(other))
    copies = counts["aten::copy (reshape)"]
    assert sum(counts.values()) - copies <= 20, counts  # 96 before, reshape copies not counted
    assert sum(counts.values()) <= 24, counts
    # Merging another tensor with a ready plan (the other blocks of a UNet level): to
    # blocks, one product, the overlap-add (a copy and a fold), a contiguous result.
    assert sum(merge_counts.values()) <= 5, merge_counts


def test_refinement_and_affine_restore_cost_a_bounded_number_of_operations():
    # The symmetric path (query_share=1) at ratio 0.75: one refinement step adds one
    # similarity product, one merge product and their bookkeeping; the affine restore is
    # fitted once per plan, on its first restore (a plan that never restores pays nothing).
    from mame_diffusers.benchmarking.ops import work_ops

    x = torch.randn(2, 64 * 64, 320, device="meta")
    with torch.inference_mode():
        plan_merge(x, (64, 64), ratio=0.75, refine=1, restore="affine").restore(x[:, :1024])  # constants
        plain = work_ops(lambda: plan_merge(x, (64, 64), ratio=0.75).merge(x))
        refined = work_ops(lambda: plan_merge(x, (64, 64), ratio=0.75, refine=1).merge(x))
        unrestored = work_ops(lambda: plan_merge(x, (64, 64), ratio=0.75, restore="affine").merge(x))
        copy_plan = plan_merge(x, (64, 64), ratio=0.75)
        affine_plan = plan_merge(x, (64, 64), ratio=0.75, restore="affine")
        merged = copy_plan.merge(x)
        copy_restore = work_ops(lambda: copy_plan.restore(merged))
        first_restore = work_ops(lambda: affine_plan.restore(merged))
        second_restore = work_ops(lambda: affine_plan.restore(merged))
    assert sum(unrestored.values()) == sum(plain.values()), (unrestored, plain)
    assert sum(refined.values()) - sum(plain.values()) <= 14, (refined, plain)
    assert refined["aten::matmul"] + refined["aten::bmm"] <= plain["aten::matmul"] + plain["aten::bmm"] + 2
    assert sum(first_restore.values()) - sum(copy_restore.values()) <= 26, first_restore
    assert sum(second_restore.values()) <= sum(copy_restore.values())  # fitted once, kept
    with torch.inference_mode():
        distinct = work_ops(lambda: plan_merge(x, (64, 64), ratio=0.75, anchor="distinct").merge(x))
    assert sum(distinct.values()) - sum(plain.values()) <= 17, distinct


def test_half_precision_merge_does_not_overflow_where_the_mean_fits():
    x = (100 + torch.randn(1, 64 * 64, 8)).half()
    plan = plan_merge(x, (64, 64), ratio=0.99, block=None)
    merged = plan.merge(x)
    assert torch.isfinite(merged).all()
    # Slot means, weighted by slot sizes, average back to the mean of all tokens.
    total = (merged.float() * plan.sizes[..., None]).sum(1) / plan.sizes.sum()
    torch.testing.assert_close(total, x.float().mean(1), rtol=1e-3, atol=0)


@pytest.mark.parametrize("hw,ratio,block,halo", [((64, 64), 0.9375, 8, 2), ((21, 19), 0.75, 4, 1), ((16, 16), 0.5, None, 0)])
def test_both_overlap_adds_agree(hw, ratio, block, halo):
    # F.fold runs on CUDA, slice additions elsewhere: the same sums.
    layout = merge_layout(hw, ratio, block=block, halo=halo)
    windows = torch.randn(2, layout.num_blocks, layout.num_candidates, 5, dtype=torch.float64)
    torch.testing.assert_close(layout._fold_windows(windows), layout._add_windows(windows))


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"refine": 1, "restore": "affine", "anchor": "distinct"},
        {"anchor": "ranked", "block": None, "halo": 0},
        {"anchor": "ranked", "block": 8, "halo": 0, "restore": "affine"},
    ],
)
def test_compiled_operator_matches_eager(options):
    # Inductor once lowered F.fold with these window strides to out-of-bounds writes; the
    # compiled path takes slice additions instead, and must compute the same thing. The
    # refinement loop and the affine restore's solve compile into the same single graph.
    x = torch.randn(2, 16 * 16, 8)

    def merge_and_restore(tokens):
        plan = plan_merge(tokens, (16, 16), ratio=0.75, **{"block": 8, "halo": 2, **options})
        return plan.restore(plan.merge(tokens) * 2), plan.sizes

    torch._dynamo.reset()
    try:
        compiled = torch.compile(merge_and_restore, fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    for got, expected in zip(compiled, merge_and_restore(x)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_tiny_temperature_stays_finite():
    x = torch.randn(2, 16 * 16, 6)
    plan = plan_merge(x, (16, 16), ratio=0.75, tau=-1.0, temperature=1e-30)
    assert torch.isfinite(plan.assignment).all() and torch.isfinite(plan.merge(x)).all()


def test_grid_sides_must_be_ints():
    with pytest.raises(ValueError, match="ints"):
        plan_merge(torch.randn(1, 68, 4), (8.5, 8), ratio=0.5)


def test_constants_built_under_inference_mode_serve_training_later():
    x = torch.randn(2, 12 * 12, 4)
    with torch.inference_mode():
        plan_merge(x, (12, 12), ratio=0.6, halo=1)  # first use of this layout builds its constants
    x.requires_grad_(True)
    plan = plan_merge(x, (12, 12), ratio=0.6, halo=1)
    plan.restore(plan.merge(x)).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("hw,ratio,block", [((64, 64), 0.99, None), ((64, 64), 0.97, None), ((100, 30), 0.98, None)])
def test_anchor_cells_stay_close_to_square_at_high_ratios(hw, ratio, block):
    # The most anchors under the budget once meant one row of 1 x 41 anchors on 64 x 64.
    layout = merge_layout(hw, ratio, block=block)
    budget = round(hw[0] * hw[1] * (1 - ratio))
    cell_h, cell_w = layout.block_h / layout.anchors_h, layout.block_w / layout.anchors_w
    assert max(cell_h / cell_w, cell_w / cell_h) <= 2.0 + 1e-9
    assert 0.9 * budget <= layout.num_merged <= budget


@pytest.mark.parametrize("block", [8, 16])
@pytest.mark.parametrize("ratio", [0.95, 0.97, 0.98])
def test_blocked_layouts_keep_square_cells_and_most_of_the_merged_length(ratio, block):
    # Issue 10 #7: 8 x 8 blocks at 0.97 kept one anchor each (M = 64 of 123), and 16 x 16
    # blocks took 1 x 7 anchors (cells 16 tokens tall, 2.3 wide).
    layout = merge_layout((64, 64), ratio, block=block)
    budget = round(4096 * (1 - ratio))
    cell_h, cell_w = layout.block_h / layout.anchors_h, layout.block_w / layout.anchors_w
    assert max(cell_h / cell_w, cell_w / cell_h) <= 2.0 + 1e-9
    assert 0.75 * budget <= layout.num_merged <= budget


def test_blocked_merging_restores_better_at_a_lower_ratio():
    # It used to be the other way round: blocked 0.97 restored worse than 0.99 did.
    generator = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 16, 8, 8, generator=generator)
    x = F.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)

    def error(ratio: float) -> float:
        plan = plan_merge(x, (64, 64), ratio=ratio, block=8)
        return float(torch.linalg.vector_norm(plan.restore(plan.merge(x)) - x) / torch.linalg.vector_norm(x))

    errors = [error(ratio) for ratio in (0.9, 0.95, 0.97, 0.99)]
    assert errors == sorted(errors), errors
