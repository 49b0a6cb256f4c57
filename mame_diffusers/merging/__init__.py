"""MaMe and MaRe: matrix-based token merging and restoration, the operator alone.

Pure tensor math on ``(B, N, C)`` tokens laid out row-major on an ``H x W`` grid; nothing
here imports diffusers or transformers. One module per concept:

- :mod:`.layout`: the static geometry (blocks of the grid, slots per block, the merged grid);
- :mod:`.ranked`: which tokens merge, and into which slot (ranked slots, by comparisons);
- :mod:`.plan`: MaMe (merge), proportional attention, MaRe (the affine restore);
- :mod:`.checks` and :mod:`.settings`: the operator's settings, checked in one place;
- :mod:`.kernels`: the same plan, merge and restore as fused Triton kernels, for CUDA.

The method is from arXiv 2604.13432; ``docs/operator.md`` gives this project's formulation.
"""

from .checks import check_block, check_ratio, is_number
from .layout import MergeLayout, cuda_graph_recording, merge_layout
from .plan import AFFINE_RIDGE, MergePlan, PlanGrid, plan_merge, plan_on_layout, proportional_attention_bias
from .settings import OperatorSettings

__all__ = [
    "AFFINE_RIDGE",
    "MergeLayout",
    "MergePlan",
    "OperatorSettings",
    "PlanGrid",
    "check_block",
    "check_ratio",
    "cuda_graph_recording",
    "is_number",
    "merge_layout",
    "plan_merge",
    "plan_on_layout",
    "proportional_attention_bias",
]
