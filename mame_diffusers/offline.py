"""Models built offline from configs, with random weights.

The architectures of Stable Diffusion 1.5, 2.1 and SDXL ship with the package as UNet
configs (never weights), plus tiny variants for tests and quick runs. Real weights load the
usual way, ``UNet2DConditionModel.from_pretrained(model_id_or_path, subfolder="unet")``.
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

import torch

__all__ = ["UNET_CONFIGS", "build_unet", "unet_config", "unet_inputs"]

#: Named UNet architectures: the shipped full-size configs and tiny test variants.
UNET_CONFIGS = ("sd15", "sd21", "sdxl", "tiny-sd", "tiny-sdxl")

_TINY = {
    # Two levels with attention, like SD's top of the UNet, small enough for unit tests.
    "tiny-sd": {
        "_class_name": "UNet2DConditionModel",
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1,
        "attention_head_dim": [2, 4],
        "cross_attention_dim": 32,
        "norm_num_groups": 16,
        "sample_size": 16,
        "use_linear_projection": True,
        "upcast_attention": True,
    },
    # SDXL's shape: no attention at full resolution, text_time added conditioning.
    "tiny-sdxl": {
        "_class_name": "UNet2DConditionModel",
        "block_out_channels": [32, 64, 64],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "layers_per_block": 1,
        "transformer_layers_per_block": [1, 1, 2],
        "attention_head_dim": [2, 4, 4],
        "cross_attention_dim": 32,
        "norm_num_groups": 16,
        "sample_size": 32,
        "use_linear_projection": True,
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 8,
        "projection_class_embeddings_input_dim": 80,
    },
}


def unet_config(name: str) -> dict[str, Any]:
    """The UNet config called ``name`` (one of :data:`UNET_CONFIGS`), as a fresh dict."""
    if name in _TINY:
        return json.loads(json.dumps(_TINY[name]))
    if name not in UNET_CONFIGS:
        raise ValueError(f"unknown UNet config {name!r}; choose one of {UNET_CONFIGS}")
    return json.loads(files("mame_diffusers").joinpath(f"configs/{name}_unet.json").read_text())


def build_unet(name: str = "sd21", *, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """A ``UNet2DConditionModel`` of the named architecture with seeded random weights."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(unet_config(name)).to(dtype).eval()


def unet_inputs(
    unet: torch.nn.Module,
    latent_hw: tuple[int, int],
    *,
    batch: int = 2,
    seed: int = 0,
    latents: torch.Tensor | None = None,
    text_length: int = 77,
) -> dict[str, Any]:
    """Keyword arguments for one UNet call: latents, a timestep, text embeddings and, for
    SDXL-style UNets, the added ``text_embeds``/``time_ids`` conditioning."""
    config = unet.config
    param = next(unet.parameters())
    generator = torch.Generator().manual_seed(seed)
    if latents is None:
        latents = torch.randn(batch, config.in_channels, *latent_hw, generator=generator)
    batch = latents.shape[0]
    cross_dim = config.cross_attention_dim
    cross_dim = cross_dim[0] if isinstance(cross_dim, (list, tuple)) else cross_dim
    inputs: dict[str, Any] = {
        "sample": latents.to(param),
        "timestep": torch.full((batch,), 500, dtype=torch.long),
        "encoder_hidden_states": torch.randn(batch, text_length, cross_dim, generator=generator).to(param),
    }
    if config.addition_embed_type == "text_time":
        time_ids_dim = config.addition_time_embed_dim * 6
        text_embeds_dim = config.projection_class_embeddings_input_dim - time_ids_dim
        height, width = (8 * latent_hw[0], 8 * latent_hw[1])
        time_ids = torch.tensor([height, width, 0, 0, height, width], dtype=torch.float32)
        inputs["added_cond_kwargs"] = {
            "text_embeds": torch.randn(batch, text_embeds_dim, generator=generator).to(param),
            "time_ids": time_ids.repeat(batch, 1).to(param),
        }
    return inputs
