"""Per-forward state that each thread keeps for itself: the one mechanism behind the UNet
tracker (``diffusers_integration``) and the vision models' merge state
(``transformers_integration.state``)."""

from __future__ import annotations

import threading
from typing import Any

import torch


class PerThread:
    """A value each thread sets for its own forward pass.

    Threads sharing one patched model then never see each other's grids. A thread that set
    nothing (autograd's device threads, which recompute checkpointed blocks during the
    backward pass) reads the latest value any thread set; so does a graph being traced,
    where the value lives in the graph rather than in a thread. A copy or pickle keeps the
    latest value (a thread-local itself cannot be copied).
    """

    def __init__(self, value: Any = None) -> None:
        self._local = threading.local()
        self._latest = value

    def get(self) -> Any:
        if not torch.compiler.is_compiling():
            mine = self._local.__dict__
            if "value" in mine:
                return mine["value"]
        return self._latest

    def set(self, value: Any) -> None:
        if not torch.compiler.is_compiling():
            self._local.value = value
        self._latest = value

    def __getstate__(self) -> dict:
        return {"latest": self._latest}

    def __setstate__(self, state: dict) -> None:
        self._local = threading.local()
        self._latest = state["latest"]

