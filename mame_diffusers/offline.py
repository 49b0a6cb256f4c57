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

__all__ = [
    "PIPELINE_SIZES",
    "UNET_CONFIGS",
    "build_clip_tokenizer",
    "build_unet",
    "offline_pipeline_components",
    "unet_config",
    "unet_inputs",
]

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


def build_unet(
    name: str = "sd21", *, seed: int = 0, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> torch.nn.Module:
    """A ``UNet2DConditionModel`` of the named architecture with seeded random weights,
    initialised directly on ``device`` (fast for SDXL on a GPU)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel.from_config(unet_config(name))
    # nn.Module.to, not ModelMixin.to: diffusers warns on every dtype cast of a UNet that
    # "modules should be kept in float32" even when the list is empty, as it is here.
    return torch.nn.Module.to(unet, dtype).eval()


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
    SDXL-style UNets, the added ``text_embeds``/``time_ids`` conditioning.

    Every tensor is on the UNet's device (floating ones in its dtype, the timestep an
    integer), whatever device ``latents`` come on; random ones are drawn on the CPU, so
    they are the same on every device for a given ``seed``.
    """
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
        "timestep": torch.full((batch,), 500, dtype=torch.long, device=param.device),
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


# -- a whole Stable Diffusion 2.1 pipeline, offline --------------------------------------------

#: Pipeline sizes :func:`offline_pipeline_components` builds.
PIPELINE_SIZES = ("sd21", "tiny")

_VAE = {
    # Stable Diffusion's AutoencoderKL (the same for 1.x and 2.x).
    "sd21": {
        "block_out_channels": [128, 256, 512, 512],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "latent_channels": 4,
        "layers_per_block": 2,
        "norm_num_groups": 32,
        "sample_size": 768,
        "scaling_factor": 0.18215,
    },
    # Same 8x downsampling, tiny channels.
    "tiny": {
        "block_out_channels": [8, 8, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "sample_size": 64,
        "scaling_factor": 0.18215,
    },
}

_TEXT_ENCODER = {
    # OpenCLIP ViT-H/14 text tower, as in SD 2.x (penultimate layer dropped: 23 layers).
    "sd21": {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_attention_heads": 16,
        "num_hidden_layers": 23,
        "projection_dim": 512,
        "hidden_act": "gelu",
        "max_position_embeddings": 77,
    },
    "tiny": {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "projection_dim": 32,
        "hidden_act": "gelu",
        "max_position_embeddings": 77,
    },
}

#: SD 2.1's scheduler: DDIM with v-prediction.
_SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "steps_offset": 1,
}

#: Words the offline tokenizer knows whole; anything else is spelled out in characters.
_WORDS = (
    "a photo of an the astronaut cat dog on in with and red blue green sky mountain city "
    "painting portrait landscape high quality detailed street night sunset forest river"
).split()


def _byte_level_alphabet() -> list[str]:
    """The 256 printable characters byte-level BPE uses for the 256 byte values."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    alphabet = {}
    for byte in range(256):
        if byte in printable:
            alphabet[byte] = chr(byte)
        else:
            alphabet[byte] = chr(256 + extra)
            extra += 1
    return [alphabet[b] for b in range(256)]


def build_clip_tokenizer(directory: str | None = None):
    """A working ``CLIPTokenizer`` from a small vocabulary written on the spot.

    Byte-level characters (so any text encodes), a few whole words, and CLIP's special
    tokens. Saved to ``directory`` (a temporary one by default) and loaded from there, the
    way a real tokenizer loads.
    """
    import tempfile
    from pathlib import Path

    from transformers import CLIPTokenizer

    tokens = ["<|startoftext|>", "<|endoftext|>"]
    for char in _byte_level_alphabet():
        tokens += [char, char + "</w>"]
    merges: list[str] = []
    for word in _WORDS:
        # Merge the word left to right, the last piece carrying the end-of-word marker.
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merges.append(f"{pieces[0]} {pieces[1]}")
            merged = pieces[0] + pieces[1]
            if merged not in tokens:
                tokens.append(merged)
            pieces = [merged] + pieces[2:]
    merges = list(dict.fromkeys(merges))
    vocab = {token: index for index, token in enumerate(dict.fromkeys(tokens))}

    target = Path(directory or tempfile.mkdtemp(prefix="mame-tokenizer-"))
    target.mkdir(parents=True, exist_ok=True)
    (target / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (target / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return CLIPTokenizer.from_pretrained(str(target), model_max_length=77)


def offline_pipeline_components(
    size: str = "sd21", *, seed: int = 0, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32
) -> dict[str, Any]:
    """Every component of a Stable Diffusion 2.1-architecture pipeline, random weights.

    ``size="sd21"`` is the real architecture (UNet from the shipped config, SD's VAE, an
    OpenCLIP-H-sized text encoder, DDIM v-prediction); ``"tiny"`` the same structure at toy
    width for tests. Pass the result to a pipeline class: ``Pipeline(**components)``.
    """
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    if size not in PIPELINE_SIZES:
        raise ValueError(f"unknown pipeline size {size!r}; choose one of {PIPELINE_SIZES}")
    unet = build_unet("sd21" if size == "sd21" else "tiny-sd", seed=seed, device=device, dtype=dtype)
    tokenizer = build_clip_tokenizer()
    torch.manual_seed(seed + 1)
    with torch.device(device):
        vae = torch.nn.Module.to(AutoencoderKL(**_VAE[size]), dtype).eval()  # see build_unet
    torch.manual_seed(seed + 2)
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **_TEXT_ENCODER[size],
    )
    with torch.device(device):
        text_encoder = CLIPTextModel(text_config).to(dtype).eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": DDIMScheduler(**_SCHEDULER),
        "safety_checker": None,
        "feature_extractor": None,
        "requires_safety_checker": False,
    }
