"""Every default setting of MaMe, in one light module (no torch, diffusers or
transformers import), so that the command line can show them instantly.

The operator's defaults are re-exported by :mod:`mame_diffusers.merging`, the UNet's by
:mod:`mame_diffusers.diffusers_integration`; the vision models' live with
:class:`~mame_diffusers.VisionMaMeConfig`.
"""

# -- the operator (merging.py) ------------------------------------------------------------

#: Similarity threshold: a token leaves its own cell only for an anchor at least this similar.
DEFAULT_TAU = 0.0
#: What each cell offers to merge into (see :func:`plan_merge`); ``"ranked"`` has no cells:
#: it picks the slots by content among a block's tokens (or all of them, ``block=None``).
ANCHORS = ("strided", "random", "pooled", "distinct", "ranked")
DEFAULT_ANCHOR = "strided"
#: Side of the token blocks in which anchors are placed (``None``: the whole grid).
DEFAULT_BLOCK = 8
#: How many anchor cells beyond its block (on every side) a token may merge into.
DEFAULT_HALO = 2
#: k-means steps on the anchors before the final assignment (``refine``).
DEFAULT_REFINE = 0
#: How merged outputs go back to the tokens: ``"copy"`` each token its slot's value,
#: ``"affine"`` the combination of nearby slots that best rebuilds its own input.
RESTORES = ("copy", "affine")
DEFAULT_RESTORE = "copy"

# -- diffusers UNets (diffusers_integration.py) -------------------------------------------

#: What computes the UNet's merges: ``"torch"`` the operator's ATen path (every device,
#: differentiable, traced by ``torch.compile``); ``"triton"`` fused kernels on CUDA
#: (``mame_diffusers/kernels.py``: two launches to plan and merge instead of some 27);
#: ``"auto"`` the kernels where they can run (CUDA tensors, no gradient wanted, triton
#: importable, the default operator), the torch path elsewhere.
BACKENDS = ("torch", "triton", "auto")
#: The Triton kernels match the torch path in tests but have not been timed on a GPU yet.
DEFAULT_BACKEND = "torch"

# Chosen from measurements on the SD 2.1 architecture (docs/ablation.md) and an H200.
#: Attention budget, as tomesd's ratio: attention costs as much as over N * (1 - ratio) tokens.
DEFAULT_RATIO = 0.75
#: Share of the merging, in log terms, that falls on the queries (the rest on keys/values).
DEFAULT_QUERY_SHARE = 0.0
#: Attention levels that merge, counted from the highest-resolution one with attention.
DEFAULT_MAX_DOWNSAMPLE = 2
#: Tokens merged before deep transformer stacks (SDXL's 10-layer ones) and restored after.
DEFAULT_STACK_RATIO = 0.5
#: A Transformer2DModel with at least this many blocks counts as a deep stack.
DEFAULT_STACK_MIN_LAYERS = 4
#: Per device type, when ``min_latent_tokens`` is not given: UNet calls with fewer latent
#: tokens in the batch (batch x latent height x width) than this run unmerged. Measured on an
#: H200 (benchmarks/results/gpu_h200_run*):
#:
#: - ``"cuda"``, eager: below it an SD forward is bound by kernel launches (~31-52 ms from 512
#:   to 1024 at batch 2, while the GPU is busy 12-34 ms), so merging mostly adds launches
#:   (768 b2: 0.88-0.91x; SDXL 1024 b2: 0.71x); at 2048 (batch 2) or 1024 (batch 8) the GPU
#:   bounds it and merging pays (1.96x, 1.27x). Compiled with inductor's default mode, SD 2.1
#:   768 b2 was still faster unmerged (0.90x).
#: - ``"cuda-graph"``, a call being recorded into a CUDA graph (``torch.cuda.graph``): replays
#:   launch nothing, and merging pays from SD 2.1 768 b2 (1.08x; 1024 b2 1.21x, SDXL 1024 b2
#:   1.15x), while 512 b2 is level (1.00x). ``torch.compile(mode="reduce-overhead")`` records
#:   its graphs after tracing, where this cannot be seen: pass ``min_latent_tokens=16384``
#:   there (SD 2.1 768 b2 1.09x, 1024 b2 1.36x over compiled stock).
#: - CPUs gain at every size. Other device types (MPS, XPU) were not measured: they merge
#:   every call, as CPUs do.
DEFAULT_MIN_LATENT_TOKENS = {"cuda": 65536, "cuda-graph": 16384}
