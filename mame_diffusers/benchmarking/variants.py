"""Settings the library does not offer, measured to show why: MaMe with another query share.

The query share (how the attention budget splits between merged queries and merged keys and
values, in log terms) is fixed in the library (``defaults.QUERY_SHARE``; 0 with
``keys_values_only=True``). The benchmarks measure other shares on the same frontier to
show that the fixed one is not beaten (docs/frontier.md).
"""

from __future__ import annotations

import dataclasses

from ..diffusers_integration import MaMeConfig, apply_mame_to_unet, remove_mame_from_unet
from ..methods import Method, share_of_tokens

__all__ = ["QueryShareConfig", "mame_with_query_share"]


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
