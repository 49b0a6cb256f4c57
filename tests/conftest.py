"""Test session setup."""

import os

import torch

# Without a GPU, Triton's kernels (mame_diffusers/kernels.py) run in its interpreter, on CPU
# tensors. Triton reads this when it is first imported, so it is set before any test imports.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
