"""Shared check: a patched model traces into one torch.compile graph."""

from __future__ import annotations

import torch


def assert_one_graph(model: torch.nn.Module, **inputs) -> torch.fx.GraphModule:
    """``torch._dynamo.explain`` finds exactly one graph and no break (dynamo state reset
    before and after, so no test sees another's cache); returns the graph."""
    torch._dynamo.reset()
    try:
        explanation = torch._dynamo.explain(model)(**inputs)
    finally:
        torch._dynamo.reset()
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    return explanation.graphs[0]
