"""Every default setting of MaMe, in one light module (no torch, diffusers or
transformers import), so that the command line can show them instantly.

Each default says where it was measured; ``docs/frontier.md`` and ``docs/ablation.md`` hold
the numbers. The vision models' defaults live with :class:`~mame_diffusers.VisionMaMeConfig`.
"""

# -- the operator (mame_diffusers/merging) -------------------------------------------------

#: Side of the blocks in which UNets and DiTs choose their slots: ranked slots in blocks of
#: 16 x 16 tokens with the affine restore were the most faithful operator measured on an SD
#: 2.1 self-attention, at every ratio, at random and at sharpened attention (docs/fidelity.md);
#: blocks of 8 are cheaper and less faithful, the whole grid (``None``) costs N x N.
DEFAULT_BLOCK = 16

# -- diffusers UNets (mame_diffusers/diffusers_integration) --------------------------------

#: What computes the UNet's merges: ``"torch"`` the operator's ATen path (every device,
#: differentiable, traced by ``torch.compile``); ``"triton"`` fused kernels on CUDA
#: (``mame_diffusers/merging/kernels.py``); ``"auto"`` the kernels where they can run (CUDA
#: tensors, no gradient wanted, triton importable), the torch path elsewhere.
BACKENDS = ("torch", "triton", "auto")
#: The Triton kernels match the torch path in tests but have not been timed on a GPU yet.
DEFAULT_BACKEND = "torch"

#: Attention budget, as tomesd's ratio: attention costs as much as over N * (1 - ratio)
#: tokens. Chosen on the SD 2.1 768 speed-error frontier (docs/frontier.md).
DEFAULT_RATIO = 0.75
#: Share of the merging, in log terms, that falls on the queries (MaMe + MaRe): queries
#: merge to N * (1 - ratio) ** share and are restored after attention, keys and values merge
#: to N * (1 - ratio) ** (2 - share). ``keys_values_only=True`` is a share of 0. Chosen on the
#: SD 2.1 768 frontier (docs/frontier.md): at ratio 0.75 a share of 0.5 left 31% less error than
#: a share of 1 at random weights and 4% less at sharpened attention, at the same speed.
QUERY_SHARE = 0.5
#: Attention levels that merge, counted from the highest-resolution one with attention.
DEFAULT_MAX_DOWNSAMPLE = 2
#: Tokens merged before deep transformer stacks (SDXL's 10-layer ones) and restored after.
DEFAULT_STACK_RATIO = 0.5
#: A Transformer2DModel with at least this many blocks is a deep stack (SDXL: 10; SD: 1).
STACK_MIN_LAYERS = 4
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
#:
#: These thresholds were measured with the keys/values-only operator of v0.2.0; the present
#: default operator has not run on a GPU (README, "On a GPU").
DEFAULT_MIN_LATENT_TOKENS = {"cuda": 65536, "cuda-graph": 16384}
