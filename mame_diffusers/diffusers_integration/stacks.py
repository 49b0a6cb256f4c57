"""MaMe before a deep transformer stack, MaRe after it (SDXL's 10-layer stacks)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import MaMeConfig
from .tracking import GridTracker, StackState, TransformerRecord

__all__ = ["StackMerge"]


@dataclass
class StackMerge:
    """Forward hooks on a stack's first and last blocks: the stack's tokens merge before its
    first block and are restored after its last, so that every layer in between
    (self-attention, cross-attention, MLP) runs on the merged tokens.

    MaRe restores the stack's *update* ``stack(Y) - Y`` and adds it to each token's own
    input, rather than handing every token its slot's output: a token keeps whatever set it
    apart from its slot, and only what the stack added is spread (the residual form in
    which tomesd unmerges attention).
    """

    tracker: GridTracker
    record: TransformerRecord
    config: MaMeConfig

    def before_first_block(self, block: torch.nn.Module, args: tuple, kwargs: dict):
        hw = self.record.hw
        hidden = args[0] if args else kwargs["hidden_states"]
        state = self.tracker.current
        if not state.merging or hw is None or hidden.ndim != 3 or not self.tracker.within(hw, self.config.max_downsample):
            return None
        plan = self.config.plan_on(hidden, self.config.layout(hw, "stack_ratio"))
        merged = plan.merge(hidden)
        self.record.stack = StackState(plan, hidden, merged)
        if args:
            return (merged, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": merged}

    def after_last_block(self, block: torch.nn.Module, args: tuple, kwargs: dict, output: torch.Tensor):
        stack = self.record.stack
        if stack is None:
            return None
        return stack.input + stack.plan.restore(output - stack.merged)
