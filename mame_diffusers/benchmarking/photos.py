"""Real-photograph inputs for fidelity measurements (no pretrained weights needed).

scikit-image ships a handful of photographs; tokens and latents are made from them with
fixed random projections, so that merging sees real image statistics (smooth regions,
edges, texture) rather than noise.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

#: Natural photographs bundled with scikit-image (no download).
PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera")


def load_photo(name: str, size: tuple[int, int]) -> torch.Tensor:
    """``(3, H, W)`` float photo in ``[0, 1]``, resized to ``size = (H, W)``."""
    try:
        import skimage.data
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("real-photo benchmarks need scikit-image: pip install 'mame-diffusers[bench]'") from error
    image = np.asarray(getattr(skimage.data, name)(), dtype=np.float32) / 255.0
    if image.ndim == 2:
        image = np.repeat(image[..., None], 3, axis=-1)
    tensor = torch.from_numpy(image[..., :3]).permute(2, 0, 1)[None]
    return F.interpolate(tensor, size=size, mode="bilinear", antialias=True, align_corners=False)[0].clamp(0, 1)


def _patch_projection(patch: int, channels: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(3 * patch * patch, channels, generator=generator) / (3 * patch * patch) ** 0.5


def photo_tokens(
    name: str, grid: tuple[int, int] = (64, 64), channels: int = 320, patch: int = 8, seed: int = 0
) -> torch.Tensor:
    """``(1, H*W, channels)`` tokens: the photo cut into ``patch x patch`` patches on a
    ``grid``, each projected to ``channels`` by a fixed random matrix and layer-normalised
    (as the ``norm1`` before a transformer block's self-attention)."""
    height, width = grid
    photo = load_photo(name, (height * patch, width * patch))
    patches = F.unfold(photo[None], kernel_size=patch, stride=patch)  # (1, 3*p*p, H*W)
    patches = patches.transpose(1, 2)
    patches = patches - patches.mean(dim=1, keepdim=True)
    tokens = patches @ _patch_projection(patch, channels, seed)
    return F.layer_norm(tokens, (channels,))


def project_photo(photo: torch.Tensor, channels: int, seed: int = 0) -> torch.Tensor:
    """``(3, 8h, 8w)`` photo -> ``(channels, h, w)``: its 8x8 pixel patches, centred, by a
    fixed random projection (not standardised)."""
    height, width = photo.shape[-2] // 8, photo.shape[-1] // 8
    patches = F.unfold(photo[None], kernel_size=8, stride=8).transpose(1, 2)
    patches = patches - patches.mean(dim=1, keepdim=True)
    latents = patches @ _patch_projection(8, channels, seed)
    return latents[0].T.reshape(channels, height, width)


def photo_latents(name: str, hw: tuple[int, int], channels: int = 4, seed: int = 0) -> torch.Tensor:
    """``(1, channels, h, w)`` latents with the spatial statistics of a photo, standing in for
    a VAE encoding: 8x8 pixel patches projected to ``channels``, standardised to unit variance."""
    latents = project_photo(load_photo(name, (8 * hw[0], 8 * hw[1])), channels, seed)
    return ((latents - latents.mean()) / latents.std())[None]


def photo_latent_batch(hw: tuple[int, int], batch: int = 2, *, channels: int = 4, seed: int = 0) -> torch.Tensor:
    """``(batch, channels, h, w)`` photo latents, astronaut and coffee in turn: at batch 2, the
    pair of inputs a classifier-free-guidance UNet call gets."""
    names = ("astronaut", "coffee")
    return torch.cat([photo_latents(names[i % 2], hw, channels, seed) for i in range(batch)])
