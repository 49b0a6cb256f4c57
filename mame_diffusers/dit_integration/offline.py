"""Diffusion transformers built offline from configs, with random weights, and inputs for them.

``"wide"`` builds the real architecture's widths from the configs shipped in
``mame_diffusers/configs`` (never weights), usually with fewer blocks (``num_layers``);
``"tiny"`` builds a small model of the same shape for tests and quick runs. Real weights load
the usual way, e.g. ``FluxTransformer2DModel.from_pretrained(path, subfolder="transformer")``.
"""

from __future__ import annotations

import json
from importlib.resources import files
from typing import Any

import torch

__all__ = ["DIT_FAMILIES", "build_transformer", "transformer_config", "transformer_inputs"]

#: Families :func:`build_transformer` builds, with the shipped config of their wide size.
DIT_FAMILIES = {
    "pixart": "pixart_alpha",
    "sd3": "sd3_medium",
    "sd35": "sd35_medium",
    "flux": "flux1_dev",
    "wan": "wan21_1_3b",
}

_TINY: dict[str, dict[str, Any]] = {
    "pixart": {
        "_class_name": "PixArtTransformer2DModel",
        "num_attention_heads": 2, "attention_head_dim": 8, "in_channels": 4, "out_channels": 8, "num_layers": 2,
        "cross_attention_dim": 16, "caption_channels": 32, "sample_size": 8, "patch_size": 2,
        "norm_type": "ada_norm_single", "num_embeds_ada_norm": 1000, "norm_elementwise_affine": False,
        "norm_eps": 1e-6, "activation_fn": "gelu-approximate", "attention_bias": True,
        "use_additional_conditions": False,
    },
    # SD3.5's shape: an image-only attn2 in the first block, RMS q/k norms; the last block's
    # text stream stops early (context_pre_only), as in every SD3.
    "sd3": {
        "_class_name": "SD3Transformer2DModel",
        "sample_size": 16, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 3,
        "attention_head_dim": 8, "num_attention_heads": 2, "joint_attention_dim": 32, "caption_projection_dim": 16,
        "pooled_projection_dim": 16, "pos_embed_max_size": 32, "dual_attention_layers": [0], "qk_norm": "rms_norm",
    },
    "flux": {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1, "in_channels": 16, "num_layers": 1, "num_single_layers": 2, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 16, "guidance_embeds": True,
        "axes_dims_rope": [4, 6, 6],
    },
    "wan": {
        "_class_name": "WanTransformer3DModel",
        "patch_size": [1, 2, 2], "num_attention_heads": 2, "attention_head_dim": 12, "in_channels": 4,
        "out_channels": 4, "text_dim": 16, "freq_dim": 16, "ffn_dim": 32, "num_layers": 2, "cross_attn_norm": True,
        "qk_norm": "rms_norm_across_heads", "rope_max_seq_len": 64,
    },
}
_TINY["sd35"] = _TINY["sd3"]



def transformer_config(family: str, size: str = "tiny") -> dict[str, Any]:
    """The config of ``family`` (:data:`DIT_FAMILIES`) at ``size`` (``"tiny"`` or ``"wide"``)."""
    if family not in DIT_FAMILIES:
        raise ValueError(f"unknown DiT family {family!r}; choose one of {tuple(DIT_FAMILIES)}")
    if size == "tiny":
        return json.loads(json.dumps(_TINY[family]))
    if size != "wide":
        raise ValueError(f"size must be 'tiny' or 'wide', got {size!r}")
    config = json.loads(files("mame_diffusers").joinpath(f"configs/{DIT_FAMILIES[family]}.json").read_text())
    return {k: v for k, v in config.items() if k == "_class_name" or not k.startswith("_")}


def build_transformer(
    family: str,
    size: str = "tiny",
    *,
    num_layers: int | None = None,
    num_single_layers: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> torch.nn.Module:
    """A DiT of ``family`` at ``size`` with seeded random weights, in eval mode.

    ``num_layers`` overrides the number of blocks (Flux: double-stream blocks, and
    ``num_single_layers`` its single-stream ones). SD3's last block keeps its shape (its text
    stream stops early), whatever the count.
    """
    import diffusers

    config = transformer_config(family, size)
    if num_layers is not None:
        config["num_layers"] = num_layers  # Flux: its double-stream blocks
        if family in ("sd3", "sd35"):
            config["dual_attention_layers"] = [i for i in config.get("dual_attention_layers", []) if i < num_layers]
    if num_single_layers is not None:
        config["num_single_layers"] = num_single_layers
    model_class = getattr(diffusers, config.pop("_class_name"))
    torch.manual_seed(seed)
    with torch.device(device):
        model = model_class.from_config(config)
    return torch.nn.Module.to(model, dtype).eval()


def transformer_inputs(
    model: torch.nn.Module,
    latent_size: tuple[int, ...],
    *,
    batch: int = 1,
    seed: int = 0,
    latents: torch.Tensor | None = None,
    text_length: int = 16,
) -> dict[str, Any]:
    """Keyword arguments for one call of ``model`` (PixArt, SD3, Flux or Wan).

    ``latent_size`` is the VAE latent's ``(H, W)`` (video: ``(F, H, W)``); ``latents``, when
    given, are ``(B, C, H, W)`` (video ``(B, C, F, H, W)``) VAE latents used instead of noise.
    Flux gets them packed in 2 x 2 patches, with its ``img_ids`` and ``txt_ids``. Every tensor
    is on the model's device, floating ones in its dtype; random ones are drawn on the CPU.
    """
    name = type(model).__name__
    config = model.config
    param = next(model.parameters())
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator).to(param)

    # Flux packs 2 x 2 latent patches into a token: its in_channels are 4 latent pixels.
    channels = config.in_channels // 4 if name == "FluxTransformer2DModel" else config.in_channels
    if latents is None:
        latents = torch.randn(batch, channels, *latent_size, generator=generator)
    latents = latents.to(param)
    batch = latents.shape[0]
    timestep = torch.full((batch,), 500, dtype=torch.long, device=param.device)
    if name == "PixArtTransformer2DModel":
        conditions = {"resolution": None, "aspect_ratio": None}
        if model.use_additional_conditions:
            height, width = (8 * s for s in latent_size)
            conditions = {
                "resolution": torch.tensor([[height, width]]).repeat(batch, 1).to(param),
                "aspect_ratio": torch.tensor([[height / width]]).repeat(batch, 1).to(param),
            }
        return {
            "hidden_states": latents, "encoder_hidden_states": randn(batch, text_length, config.caption_channels),
            "timestep": timestep, "added_cond_kwargs": conditions,
        }
    if name == "SD3Transformer2DModel":
        return {
            "hidden_states": latents, "encoder_hidden_states": randn(batch, text_length, config.joint_attention_dim),
            "pooled_projections": randn(batch, config.pooled_projection_dim), "timestep": timestep,
        }
    if name == "FluxTransformer2DModel":
        _, _, height, width = latents.shape
        packed = latents.view(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
        packed = packed.reshape(batch, (height // 2) * (width // 2), channels * 4)
        img_ids = torch.zeros(height // 2, width // 2, 3)
        img_ids[..., 1] += torch.arange(height // 2)[:, None]
        img_ids[..., 2] += torch.arange(width // 2)[None, :]
        inputs = {
            "hidden_states": packed, "encoder_hidden_states": randn(batch, text_length, config.joint_attention_dim),
            "pooled_projections": randn(batch, config.pooled_projection_dim),
            "timestep": torch.full((batch,), 0.5, dtype=param.dtype, device=param.device),
            "img_ids": img_ids.reshape(-1, 3).to(param), "txt_ids": torch.zeros(text_length, 3).to(param),
        }
        if config.guidance_embeds:
            inputs["guidance"] = torch.full((batch,), 3.5, dtype=param.dtype, device=param.device)
        return inputs
    if name == "WanTransformer3DModel":
        return {
            "hidden_states": latents, "timestep": timestep,
            "encoder_hidden_states": randn(batch, text_length, config.text_dim),
        }
    raise TypeError(f"no inputs known for a {name}")
