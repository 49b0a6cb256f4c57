"""Settings the library does not offer, measured to show why (docs/frontier.md):

- another query share: how the attention budget splits between merged queries and merged
  keys and values, in log terms, is fixed in the library (``defaults.QUERY_SHARE``, 0.5; 0
  with ``keys_values_only=True``);
- a plan per self-attention: the library plans once per UNet level and forward, and the
  other blocks of the level merge and restore with that plan.
"""

from __future__ import annotations

import dataclasses

from ..diffusers_integration import (
    MaMeConfig,
    apply_mame_to_unet,
    remove_mame_from_unet,
    self_attention_modules,
)
from ..methods import Method, mame, share_of_tokens

__all__ = ["QueryShareConfig", "mame_planning_every_block", "mame_with_query_share"]


@dataclasses.dataclass(frozen=True)
class QueryShareConfig(MaMeConfig):
    """:class:`MaMeConfig` with another query share (benchmarks only)."""

    share: float = 1.0

    @property
    def query_share(self) -> float:
        return 0.0 if self.keys_values_only else self.share


def mame_with_query_share(ratio: float, share: float) -> Method:
    """MaMe at ``ratio`` with query share ``share``, as a benchmark :class:`Method`."""
    config = QueryShareConfig(ratio=ratio, share=share)
    return Method(
        f"MaMe (ratio={ratio}, query share {share})",
        lambda unet: apply_mame_to_unet(unet, config),
        remove_mame_from_unet,
        {"ratio": ratio, "query_share": share},
        f"Q {share_of_tokens(1.0 - config.query_ratio)}, K/V {share_of_tokens(1.0 - config.kv_ratio)}",
    )


def mame_planning_every_block(ratio: float) -> Method:
    """MaMe at ``ratio`` with a plan (and a restore fit) for every self-attention instead of
    one per UNet level, as a benchmark :class:`Method`."""
    config = MaMeConfig(ratio=ratio)

    def patch(unet) -> None:
        apply_mame_to_unet(unet, config)
        for _, _, attention in self_attention_modules(unet):
            processor = attention.processor
            processor._plan = lambda tokens, hw, name, _config=config: _config.plan_on(tokens, _config.layout(hw, name))

    attends = mame(ratio=ratio).attends
    return Method(f"MaMe (ratio={ratio}, a plan per block)", patch, remove_mame_from_unet, {"ratio": ratio}, attends)
