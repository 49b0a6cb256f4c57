"""The operator: layouts, exact identities, loop and sort-based references, the affine
restore, gradients, banned ops, errors and cost."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from mame_diffusers import merge_layout, plan_merge, proportional_attention_bias
from mame_diffusers.merging.layout import fit_cell_grid

from .banned_ops import assert_no_banned_ops


def photo_pair(hw: tuple[int, int], channels: int) -> torch.Tensor:
    from mame_diffusers.benchmarking.photos import photo_tokens

    return torch.cat([photo_tokens("astronaut", hw, channels=channels), photo_tokens("coffee", hw, channels=channels)])


# -- the static layout ---------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(
    height=st.integers(1, 70),
    width=st.integers(1, 70),
    ratio=st.floats(0.0, 0.99),
    block=st.sampled_from([None, 2, 4, 8, 16]),
)
def test_merged_length_is_static_and_bounded(height, width, ratio, block):
    layout = merge_layout((height, width), ratio, block=block)
    num_tokens = height * width
    assert 1 <= layout.num_merged <= max(1, round(num_tokens * (1 - ratio)))
    assert layout.num_merged == layout.merged_hw[0] * layout.merged_hw[1]
    assert layout.blocks_h * layout.block_h >= height and layout.blocks_w * layout.block_w >= width
    # Equal blocks with less than one block of padding.
    assert layout.blocks_h * layout.block_h - height < layout.block_h
    assert layout.slots_per_block <= layout.tokens_per_block
    assert merge_layout((height, width), ratio, block=block) is layout  # shared, with its constants


def test_merged_length_follows_ratio_on_a_64_grid():
    assert merge_layout((64, 64), 0.75).num_merged == 1024
    assert merge_layout((64, 64), 0.5).num_merged == 2048
    assert merge_layout((64, 64), 0.75, block=None).merged_hw == (32, 32)
    assert merge_layout((64, 64), 0.9).num_merged == 400  # 16 blocks of 5 x 5 slots
    assert merge_layout((63, 47), 0.75).num_merged <= round(63 * 47 * 0.25)


@pytest.mark.parametrize("hw,ratio,block", [((64, 64), 0.99, None), ((64, 64), 0.97, None), ((100, 30), 0.98, None)])
def test_slot_cells_stay_close_to_square_at_high_ratios(hw, ratio, block):
    # The most slots under the budget once meant one row of 1 x 41 slots on 64 x 64.
    layout = merge_layout(hw, ratio, block=block)
    budget = round(hw[0] * hw[1] * (1 - ratio))
    cell_h, cell_w = layout.block_h / layout.slots_h, layout.block_w / layout.slots_w
    assert max(cell_h / cell_w, cell_w / cell_h) <= 2.0 + 1e-9
    assert 0.9 * budget <= layout.num_merged <= budget


@pytest.mark.parametrize("block", [8, 16])
@pytest.mark.parametrize("ratio", [0.95, 0.97, 0.98])
def test_blocked_layouts_keep_square_cells_and_most_of_the_merged_length(ratio, block):
    # 8 x 8 blocks at 0.97 once kept one slot each (M = 64 of 123), and 16 x 16 blocks took
    # 1 x 7 slots (cells 16 tokens tall, 2.3 wide).
    layout = merge_layout((64, 64), ratio, block=block)
    budget = round(4096 * (1 - ratio))
    cell_h, cell_w = layout.block_h / layout.slots_h, layout.block_w / layout.slots_w
    assert max(cell_h / cell_w, cell_w / cell_h) <= 2.0 + 1e-9
    assert 0.75 * budget <= layout.num_merged <= budget


@settings(max_examples=40, deadline=None)
@given(
    height=st.integers(2, 40),
    width=st.integers(2, 40),
    ratio=st.floats(0.0, 0.95),
    block=st.sampled_from([None, 4, 8, 16]),
    dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
)
def test_shapes_sizes_and_dtypes(height, width, ratio, block, dtype):
    x = torch.randn(3, height * width, 6).to(dtype)
    plan = plan_merge(x, (height, width), ratio=ratio, block=block)
    merged = plan.merge(x)
    assert merged.shape == (3, plan.num_merged, 6) and merged.dtype == dtype
    assert plan.sizes.shape == (3, plan.num_merged)
    # Hard assignment: every token lands in exactly one slot, and every slot that a staying
    # token holds is not empty.
    torch.testing.assert_close(plan.sizes.float().sum(-1), torch.full((3,), float(height * width)))
    assert (plan.sizes >= 0).all()
    for spread in (plan.restore(merged), plan.spread(merged)):
        assert spread.shape == x.shape and spread.dtype == dtype
        assert torch.isfinite(spread).all()
    assert torch.isfinite(merged).all()
    # Any channel count merges and restores with the same plan.
    assert plan.merge(torch.randn(3, height * width, 2).to(dtype)).shape == (3, plan.num_merged, 2)
    assert plan.restore(torch.randn(3, plan.num_merged, 2).to(dtype)).shape == (3, height * width, 2)


# -- which tokens merge: references written with sort, gather and loops ----------------------


def bipartite_reference(x: torch.Tensor, sizes: torch.Tensor, num_merged: int) -> torch.Tensor:
    """ToMe's bipartite soft matching, written with sort and gather (allowed in a test): rounds
    in which the sources (even positions) most similar to a destination (odd positions) are
    averaged into it, by size. Returns every token's slot value, ``(B, N, C)``."""
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
def test_one_block_of_the_whole_grid_is_bipartite_matching(hw, ratio):
    x = torch.randn(2, hw[0] * hw[1], 16, dtype=torch.float64)
    sizes = torch.rand(2, hw[0] * hw[1], dtype=torch.float64) + 0.5
    plan = plan_merge(x, hw, ratio=ratio, block=None, sizes=sizes)
    assert plan.num_merged == merge_layout(hw, ratio, block=None).num_merged < hw[0] * hw[1]
    torch.testing.assert_close(plan.spread(plan.merge(x)), bipartite_reference(x, sizes, plan.num_merged))
    torch.testing.assert_close(plan.sizes.sum(-1), sizes.sum(-1))


def ranked_blocks_reference(x: torch.Tensor, sizes: torch.Tensor | None, layout) -> torch.Tensor:
    """The blocked rule with Python loops and sorting: per block, destinations are the middle
    tokens of a grid of ``K // 2`` cells; sources (weightless ones first, then by their best
    destination cosine, ties to the earlier) merge until ``K`` tokens stay; each merging token
    joins its most similar staying token. Returns every token's slot value (its slot's
    size-weighted mean)."""
    blocks = layout.to_blocks(x.double())
    if sizes is not None:
        weights = layout.to_blocks(sizes[..., None].double())[..., 0]
    else:
        weights = layout.to_blocks(torch.ones(*x.shape[:2], 1, dtype=torch.float64))[..., 0]
    rows, cols = fit_cell_grid(max(1, layout.slots_per_block // 2), layout.block_h, layout.block_w)
    middle_rows = {(2 * i + 1) * layout.block_h // (2 * rows) for i in range(rows)}
    middle_cols = {(2 * j + 1) * layout.block_w // (2 * cols) for j in range(cols)}
    count = layout.tokens_per_block
    destinations = [t for t in range(count) if t // layout.block_w in middle_rows and t % layout.block_w in middle_cols]
    spread = torch.zeros_like(blocks)
    for b in range(blocks.shape[0]):
        for k in range(blocks.shape[1]):
            tokens, weight = blocks[b, k], weights[b, k]
            unit = F.normalize(tokens, dim=-1)
            similarity = unit @ unit.T
            sources = [t for t in range(count) if t not in destinations]

            def key(t):
                best = max(float(similarity[t, d]) for d in destinations)
                return (0 if weight[t] <= 0 else 1, -best, t)

            merging = sorted(sources, key=key)[: count - layout.slots_per_block]
            staying = [t for t in range(count) if t not in merging]
            slot_of = {t: t for t in staying}
            for t in merging:
                slot_of[t] = max(staying, key=lambda s: (float(similarity[t, s]), -s))
            for s in staying:
                members = [t for t in range(count) if slot_of[t] == s]
                total = sum(float(weight[t]) for t in members)
                mean = sum(weight[t] * tokens[t] for t in members) / total if total > 0 else torch.zeros_like(tokens[0])
                for t in members:
                    spread[b, k, t] = mean
    return layout.from_blocks(spread)


@pytest.mark.parametrize("hw,ratio,block", [((16, 16), 0.5, 8), ((21, 19), 0.75, 8), ((16, 24), 0.3, 16), ((32, 32), 0.9, 16)])
@pytest.mark.parametrize("with_sizes", [False, True])
def test_blocks_match_a_loop_reference(hw, ratio, block, with_sizes):
    x = torch.randn(2, hw[0] * hw[1], 6, dtype=torch.float64)
    sizes = None
    if with_sizes:
        sizes = torch.rand(2, hw[0] * hw[1], dtype=torch.float64) + 0.5
        sizes[:, ::7] = 0  # weightless tokens (empty slots of an earlier merge)
    plan = plan_merge(x, hw, ratio=ratio, block=block, sizes=sizes)
    layout = merge_layout(hw, ratio, block=block)
    assert layout.num_blocks > 1 and plan.num_merged == layout.num_merged
    torch.testing.assert_close(plan.spread(plan.merge(x)), ranked_blocks_reference(x, sizes, layout))
    total = torch.full((2,), float(hw[0] * hw[1]), dtype=torch.float64) if sizes is None else sizes.sum(-1)
    torch.testing.assert_close(plan.sizes.sum(-1), total)


def test_the_most_redundant_tokens_merge():
    # Distinct tokens, and each source 0, 2, 4 has a near-copy at the next position.
    x = torch.eye(12)[None]
    for source in (0, 2, 4):
        x[0, source] = x[0, source + 1] + 0.01 * x[0, source]
    plan = plan_merge(x, (3, 4), ratio=0.25, block=None)
    assert plan.num_merged == 9
    spread = plan.spread(plan.merge(x))
    for source in (0, 2, 4):
        torch.testing.assert_close(spread[0, source], spread[0, source + 1])
    unmerged = [index for index in range(12) if index not in (0, 1, 2, 3, 4, 5)]
    torch.testing.assert_close(spread[0, unmerged], x[0, unmerged])


def test_a_nan_token_still_counts_in_the_sizes():
    # Every token lands in exactly one slot, whatever its values.
    x = torch.randn(2, 32 * 32, 8)
    x[0, 5] = float("nan")
    x[1, 300:310] = float("nan")
    for block in (16, None):
        plan = plan_merge(x, (32, 32), ratio=0.75, block=block)
        torch.testing.assert_close(plan.sizes.sum(-1), torch.full((2,), 1024.0))
        assert plan.assignment.sum(-1).eq(1).all()


# -- exact identities and the affine restore -------------------------------------------------


@pytest.mark.parametrize("block", [4, 16, None])
def test_restore_of_merge_is_exact_on_constant_tokens(block):
    x = torch.randn(2, 1, 5).expand(2, 24 * 20, 5).contiguous()
    plan = plan_merge(x, (24, 20), ratio=0.75, block=block)
    # Every tie goes to the first destination, so one slot may average hundreds of tokens.
    torch.testing.assert_close(plan.restore(plan.merge(x)), x, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(plan.spread(plan.merge(x)), x, rtol=1e-5, atol=1e-5)


def test_ratio_zero_is_the_identity():
    x = torch.randn(2, 15 * 13, 8)
    plan = plan_merge(x, (15, 13), ratio=0.0)
    assert plan.num_merged == x.shape[1]
    torch.testing.assert_close(plan.merge(x), x, rtol=0, atol=0)
    torch.testing.assert_close(plan.spread(x), x, rtol=0, atol=0)
    torch.testing.assert_close(plan.restore(x), x, rtol=1e-6, atol=1e-6)
    assert (plan.sizes == 1).all()


@pytest.mark.parametrize("sizes", [False, True])
def test_the_restore_rebuilds_every_token_at_least_as_well_as_its_slot(sizes):
    # The fit minimises each token's reconstruction error plus a ridge, and its own slot's
    # value (the spread) is one of the combinations it considers: no token may come back
    # worse, and on real-photo tokens they come back clearly better. Rows sum to one (a
    # constant stays constant) and empty slots get no weight.
    x = photo_pair((24, 20), 16)
    weights = None
    if sizes:  # merged tokens merged again: some weigh 0
        weights = (torch.rand(2, 24 * 20, generator=torch.Generator().manual_seed(0)) * 3).floor()
    plan = plan_merge(x, (24, 20), ratio=0.75, block=8, sizes=weights)
    merged = plan.merge(x)
    spread_error = (plan.spread(merged) - x).square().sum(-1)
    restore_error = (plan.restore(merged) - x).square().sum(-1)
    counted = weights > 0 if sizes else torch.ones_like(spread_error, dtype=torch.bool)
    assert (restore_error[counted] <= spread_error[counted] * (1 + 1e-4) + 1e-6).all()
    assert restore_error[counted].sum() < 0.8 * spread_error[counted].sum()
    rows = plan.restore_weights.sum(-1)
    torch.testing.assert_close(rows, torch.ones_like(rows), rtol=1e-4, atol=1e-4)
    empty = plan.layout.grid_to_slots(plan.sizes[..., None])[..., 0] == 0  # (B, blocks, K)
    on_empty = plan.layout.from_blocks(plan.restore_weights.abs() @ empty[..., None].float())[..., 0]
    assert on_empty[counted].max() == 0


def test_the_restore_is_fitted_once_and_needs_the_planned_tokens():
    x = torch.randn(1, 64, 4)
    plan = plan_merge(x, (8, 8), ratio=0.5)
    first = plan.restore_weights
    assert plan.restore_weights is first
    plan = plan_merge(x, (8, 8), ratio=0.5)
    plan._source_blocks = None
    with pytest.raises(ValueError, match="planned tokens"):
        plan.restore(torch.randn(1, plan.num_merged, 4))


def test_the_restore_fit_survives_set_num_threads_with_many_slots():
    # torch's CPU LU solve (MKL getrf) returned garbage, or hung a whole CI run, for 176+
    # slots per block once torch.set_num_threads had been called; the fit must not use it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.set_num_threads(max(threads, 2))
    try:
        x = photo_pair((32, 32), 64)
        plan = plan_merge(x, (32, 32), ratio=0.25, block=16)  # 192 slots per 16 x 16 block
        merged = plan.merge(x)
        restored, spread = plan.restore(merged), plan.spread(merged)
    finally:
        torch.set_num_threads(threads)
    assert torch.isfinite(restored).all()
    assert ((restored - x).square().sum(-1) <= (spread - x).square().sum(-1) * (1 + 1e-4) + 1e-6).all()


def test_blocks_of_zero_tokens_restore_to_zero():
    # A block whose slot means are all zero has nothing to fit: no 0 / 0.
    x = torch.randn(1, 32 * 32, 6)
    x[:, :512] = 0  # the top half: two rows of 16 x 16 blocks
    plan = plan_merge(x, (32, 32), ratio=0.75)
    restored = plan.restore(plan.merge(x))
    assert torch.isfinite(restored).all()
    assert restored[:, :512].abs().max() == 0


def test_merging_with_a_lower_ratio_restores_better():
    generator = torch.Generator().manual_seed(0)
    coarse = torch.randn(1, 16, 8, 8, generator=generator)
    x = F.interpolate(coarse, size=(64, 64), mode="bilinear", align_corners=False).flatten(2).transpose(1, 2)

    def error(ratio: float) -> float:
        plan = plan_merge(x, (64, 64), ratio=ratio)
        return float(torch.linalg.vector_norm(plan.restore(plan.merge(x)) - x) / torch.linalg.vector_norm(x))

    errors = [error(ratio) for ratio in (0.5, 0.75, 0.9, 0.97)]
    assert errors == sorted(errors), errors


# -- sizes, empty slots, weights -----------------------------------------------------------


def test_token_weights_make_size_weighted_means_and_empty_slots_stay_finite():
    x = torch.randn(2, 16 * 16, 4)
    sizes = torch.randint(0, 4, (2, 256)).float()
    sizes[:, :128] = 0  # a whole block of empty slots from an earlier merge
    plan = plan_merge(x, (16, 16), ratio=0.75, block=8, sizes=sizes)
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
    torch.testing.assert_close(plan.attention_bias(torch.float32), bias)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_proportional_bias_is_log_size(dtype):
    sizes = torch.tensor([[0.0, 1.0, 2.0, 8.0]])
    bias = proportional_attention_bias(sizes, dtype)
    assert bias.dtype == dtype
    torch.testing.assert_close(bias[0, 1:].float(), torch.log(sizes[0, 1:]), rtol=1e-2, atol=1e-3)
    assert bias[0, 0] < -80 and torch.isfinite(bias).all()


def test_half_precision_merge_does_not_overflow_where_the_mean_fits():
    x = (100 + torch.randn(1, 64 * 64, 8)).half()
    plan = plan_merge(x, (64, 64), ratio=0.99, block=None)
    merged = plan.merge(x)
    assert torch.isfinite(merged).all()
    # Slot means, weighted by slot sizes, average back to the mean of all tokens.
    total = (merged.float() * plan.sizes[..., None]).sum(1) / plan.sizes.sum()
    torch.testing.assert_close(total, x.float().mean(1), rtol=1e-3, atol=0)


# -- differentiability ---------------------------------------------------------------------


@pytest.mark.parametrize("block", [8, None])
def test_gradients_reach_the_tokens(block):
    x = torch.randn(2, 16 * 16, 6, requires_grad=True)
    plan = plan_merge(x, (16, 16), ratio=0.75, block=block)
    loss = (plan.restore(torch.tanh(plan.merge(x)) * 3) ** 2).sum()
    loss.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_constants_built_under_inference_mode_serve_training_later():
    x = torch.randn(2, 12 * 12, 4)
    with torch.inference_mode():
        plan_merge(x, (12, 12), ratio=0.6, block=4)  # first use of this layout builds its constants
    x.requires_grad_(True)
    plan = plan_merge(x, (12, 12), ratio=0.6, block=4)
    plan.restore(plan.merge(x)).square().sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


# -- the matrix-only contract --------------------------------------------------------------


@pytest.mark.parametrize("block", [16, 8, None])
def test_merge_path_has_no_banned_ops(block):
    x = torch.randn(2, 21 * 19, 8, requires_grad=True)
    sizes = torch.rand(2, 21 * 19) * 3

    def merge_and_restore():
        plan = plan_merge(x, (21, 19), ratio=0.75, block=block, sizes=sizes)
        out = plan.restore(plan.merge(x) * plan.attention_bias(x.dtype)[..., None].exp())
        (out.sum() + plan.spread(plan.merge(x)).sum()).backward()

    assert_no_banned_ops(merge_and_restore)


# -- errors --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"ratio": 1.0}, "ratio"),
        ({"ratio": -0.1}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({"ratio": "0.5"}, "ratio"),
        ({"ratio": 0.5, "block": 0}, "block"),
        ({"ratio": 0.5, "block": 2.5}, "block"),
        ({"ratio": 0.5, "block": True}, "block"),
    ],
)
def test_bad_settings_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        plan_merge(torch.randn(1, 16, 4), (4, 4), **kwargs)


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="holds 20 tokens"):
        plan_merge(torch.randn(1, 16, 4), (4, 5), ratio=0.5)
    with pytest.raises(ValueError, match="sizes"):
        plan_merge(torch.randn(1, 16, 4), (4, 4), ratio=0.5, sizes=torch.ones(1, 15))
    with pytest.raises(ValueError, match="floating-point"):
        plan_merge(torch.ones(1, 16, 4, dtype=torch.long), (4, 4), ratio=0.5)
    with pytest.raises(ValueError, match=r"\(batch, tokens, channels\)"):
        plan_merge(torch.randn(16, 4), (4, 4), ratio=0.5)
    with pytest.raises(ValueError, match="ints"):
        plan_merge(torch.randn(1, 68, 4), (8.5, 8), ratio=0.5)
    plan = plan_merge(torch.randn(1, 16, 4), (4, 4), ratio=0.5)
    with pytest.raises(ValueError, match="merge expects"):
        plan.merge(torch.randn(1, 15, 4))
    with pytest.raises(ValueError, match="restore expects"):
        plan.restore(torch.randn(2, plan.num_merged, 4))


# -- cost: what a GPU launches ---------------------------------------------------------------


def test_plan_merge_and_restore_run_few_operations():
    # On a GPU at batch 2 every operation is a kernel launch, and launches are what a
    # Stable Diffusion UNet is bound by: the operator's count is its cost there. The meta
    # device takes the path a GPU takes without computing anything.
    from mame_diffusers.benchmarking.ops import work_ops

    x = torch.randn(2, 64 * 64, 320, device="meta")
    with torch.inference_mode():
        plan_merge(x, (64, 64), ratio=0.75).restore(x[:, :1024])  # builds the layout's constants once
        plan_and_merge = work_ops(lambda: plan_merge(x, (64, 64), ratio=0.75).merge(x))
        plan, other = plan_merge(x, (64, 64), ratio=0.75), torch.randn_like(x)
        merged = plan.merge(x)
        merge = work_ops(lambda: plan.merge(other))
        first_restore = work_ops(lambda: plan.restore(merged))
        second_restore = work_ops(lambda: plan.restore(merged))
    assert sum(plan_and_merge.values()) <= 36, plan_and_merge
    # Merging another tensor with a ready plan (the other blocks of a UNet level): to
    # blocks, one product, to the merged grid.
    assert sum(merge.values()) <= 3, merge
    # The fit (a merge of the planned tokens, a Gram matrix, one batched solve) is made once
    # per plan; every later restore is a product and two reshuffles.
    assert sum(first_restore.values()) <= 30, first_restore
    assert sum(second_restore.values()) <= 3, second_restore


@pytest.mark.parametrize("block", [8, None])
def test_compiled_operator_matches_eager(block):
    # The ranked plan, the merge and the affine restore's solve compile into one graph.
    x = torch.randn(2, 16 * 16, 8)

    def merge_and_restore(tokens):
        plan = plan_merge(tokens, (16, 16), ratio=0.75, block=block)
        return plan.restore(plan.merge(tokens) * 2), plan.sizes

    torch._dynamo.reset()
    try:
        compiled = torch.compile(merge_and_restore, fullgraph=True)(x)
    finally:
        torch._dynamo.reset()
    for got, expected in zip(compiled, merge_and_restore(x)):
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_cell_grids_fit_the_budget_with_square_enough_cells():
    assert sorted(fit_cell_grid(41, 64, 64)) == [5, 8]  # not one row of 1 x 41
    assert sorted(fit_cell_grid(7, 16, 16)) == [2, 3]
    assert fit_cell_grid(64, 16, 16) == (8, 8)
    rows, cols = fit_cell_grid(10, 3, 40)
    assert rows * cols <= 10 and math.isclose(rows * cols, 10, rel_tol=0.5)
