"""Single-file SD v1.x checkpoints (A1111's `.safetensors` / `.ckpt`) to and from diffusers folders.

Reading uses diffusers' own single-file loading (`from_single_file`) with component configs this project
ships (v1's architecture, `tiny_checkpoint.component_configs(full_size=True)`), so nothing is fetched from
the hub. What may differ from v1's architecture is read from the file: the UNet's input channels from its
first convolution (9 for the inpainting variants), a whole architecture from the file's own metadata
(`ARCHITECTURE_KEY`, which the tiny checkpoints written here carry).

Writing (for `sd-tiny-checkpoint --single-file`) maps diffusers' parameter names to the original
(CompVis/A1111) layout: `model.diffusion_model.*`, `first_stage_model.*`, `cond_stage_model.transformer.*`.
"""

from __future__ import annotations

import json
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TEXT_PREFIX = "cond_stage_model.transformer."
# SD 2.x's OpenCLIP text encoder, which these configs cannot describe.
SD2_TEXT_PREFIX = "cond_stage_model.model."
# safetensors metadata: JSON of the UNet/VAE/text-encoder configs, for files whose architecture is not v1's.
ARCHITECTURE_KEY = "sd_triton.architecture"
SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")


class SingleFileError(ValueError):
    """A file that is not a usable SD v1.x single-file checkpoint; the message says why."""


def read_state_dict(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors of a `.safetensors` or pickled (`.ckpt`) checkpoint, and its safetensors metadata.

    Pickles are read with `weights_only` loading: tensors and plain containers only, never code."""
    if path.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.torch import load_file

        try:
            with safe_open(str(path), "pt") as file:
                metadata = file.metadata() or {}
            return load_file(str(path)), metadata
        except Exception as e:  # safetensors raises its own SafetensorError for a malformed header
            raise SingleFileError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SingleFileError(
            f"{path}: this pickle needs more than tensors to load (it would run code: {e}); convert it to "
            ".safetensors with a tool you trust, or use the safetensors file the model was published with"
        ) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise SingleFileError(f"{path}: not a readable checkpoint ({e})") from None
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise SingleFileError(f"{path}: expected a dict of tensors (optionally under 'state_dict')")
    return state, {}


def architecture(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    """The UNet/VAE/text-encoder configs of the file: its metadata's, or v1's with the UNet's input
    channels read from the tensors."""
    from build_engines.tiny_checkpoint import component_configs

    if SD2_TEXT_PREFIX + "positional_embedding" in state or not any(k.startswith(TEXT_PREFIX) for k in state):
        raise SingleFileError(f"{path}: not an SD v1.x checkpoint (no CLIP text encoder under {TEXT_PREFIX})")
    first_conv = state.get(UNET_PREFIX + "input_blocks.0.0.weight")
    if first_conv is None:
        raise SingleFileError(f"{path}: not an SD v1.x checkpoint (no UNet under {UNET_PREFIX})")
    if ARCHITECTURE_KEY in metadata:
        configs: dict[str, Any] = json.loads(metadata[ARCHITECTURE_KEY])
    else:
        configs = component_configs(full_size=True)
        configs["unet"]["in_channels"] = int(first_conv.shape[1])
    found = {
        "UNet input channels": int(first_conv.shape[1]),
        "UNet width": int(first_conv.shape[0]),
        "text encoder width": _text_width(state),
    }
    expected = {
        "UNet input channels": configs["unet"]["in_channels"],
        "UNet width": configs["unet"]["block_out_channels"][0],
        "text encoder width": configs["text_encoder"]["hidden_size"],
    }
    if found != expected:
        source = "its metadata's" if ARCHITECTURE_KEY in metadata else "SD v1.x's"
        raise SingleFileError(
            f"{path}: the tensors do not fit {source} architecture: {found}, expected {expected}"
        )
    return configs


def _text_width(state: dict[str, torch.Tensor]) -> int:
    for key, tensor in state.items():
        if key.startswith(TEXT_PREFIX) and key.endswith("position_embedding.weight"):
            return int(tensor.shape[-1])
    return -1


def convert_to_diffusers(path: Path, out_dir: Path) -> Path:
    """Write the diffusers folder of the single-file checkpoint `path` into `out_dir`; return it."""
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline

    from build_engines.tiny_checkpoint import write_pipeline_configs

    state, metadata = read_state_dict(path)
    configs = architecture(path, state, metadata)
    del state  # diffusers reads the file again itself
    inpainting = configs["unet"]["in_channels"] == 9
    pipeline_class = StableDiffusionInpaintPipeline if inpainting else StableDiffusionPipeline
    with tempfile.TemporaryDirectory(prefix="sd-v1-configs-") as config_dir:
        write_pipeline_configs(Path(config_dir), configs, inpainting)
        pipeline = pipeline_class.from_single_file(
            str(path),
            config=config_dir,
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
        )
    pipeline.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


# --- diffusers → original layout ---------------------------------------------------------------------

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename(name: str, table: dict[str, str]) -> str:
    for old, new in table.items():
        if name.startswith(old + "."):
            return new + name[len(old) :]
    return name


def unet_key(name: str, layers_per_block: int, up_attention: list[bool]) -> str:
    """The original name of a diffusers UNet2DConditionModel parameter (SD v1's block layout)."""
    per = layers_per_block + 1  # blocks per level in the original: the layers, then a down/upsampler
    parts = name.split(".")
    simple = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
              "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}  # fmt: skip
    for old, new in simple.items():
        if name.startswith(old + "."):
            return new + name[len(old) :]
    if parts[0] in ("down_blocks", "up_blocks"):
        level, kind = int(parts[1]), parts[2]
        rest = ".".join(parts[4:])
        down = parts[0] == "down_blocks"
        if kind in ("downsamplers", "upsamplers"):
            if down:
                return f"input_blocks.{(level + 1) * per}.0.op.{parts[-1]}"
            index = 2 if up_attention[level] else 1
            return f"output_blocks.{level * per + layers_per_block}.{index}.conv.{parts[-1]}"
        layer = int(parts[3])
        block = f"input_blocks.{1 + level * per + layer}" if down else f"output_blocks.{level * per + layer}"
        if kind == "resnets":
            return f"{block}.0.{_rename(rest, _UNET_RESNET)}"
        return f"{block}.1.{rest}"  # attentions: the same inner names
    if parts[0] == "mid_block":
        kind, index, rest = parts[1], int(parts[2]), ".".join(parts[3:])
        if kind == "resnets":
            return f"middle_block.{2 * index}.{_rename(rest, _UNET_RESNET)}"
        return f"middle_block.1.{rest}"
    raise KeyError(f"no original name for UNet parameter {name!r}")


def vae_key(name: str, levels: int) -> tuple[str, bool]:
    """The original name of a diffusers AutoencoderKL parameter, and whether its tensor is a 1x1
    convolution there (the mid-block attention's projections, linear layers in diffusers)."""
    parts = name.split(".")
    if parts[0] in ("quant_conv", "post_quant_conv"):
        return name, False
    coder, rest = parts[0], parts[1:]
    renamed = {"conv_norm_out": "norm_out"}.get(rest[0], rest[0])
    if rest[0] in ("conv_in", "conv_out", "conv_norm_out"):
        return ".".join([coder, renamed, *rest[1:]]), False
    if rest[0] == "mid_block":
        kind, index, inner = rest[1], int(rest[2]), ".".join(rest[3:])
        if kind == "resnets":
            return f"{coder}.mid.block_{index + 1}.{_rename(inner, {'conv_shortcut': 'nin_shortcut'})}", False
        renamed_inner = _rename(inner, _VAE_ATTENTION)
        return f"{coder}.mid.attn_1.{renamed_inner}", renamed_inner.split(".")[0] in (
            "q",
            "k",
            "v",
            "proj_out",
        )
    level, kind = int(rest[1]), rest[2]
    # The decoder's up blocks run from the deepest level: diffusers' up_blocks.0 is the original up.{n-1}.
    original_level = level if rest[0] == "down_blocks" else levels - 1 - level
    stage = "down" if rest[0] == "down_blocks" else "up"
    if kind in ("downsamplers", "upsamplers"):
        sampler = "downsample" if kind == "downsamplers" else "upsample"
        return f"{coder}.{stage}.{original_level}.{sampler}.conv.{rest[-1]}", False
    inner = _rename(".".join(rest[4:]), {"conv_shortcut": "nin_shortcut"})
    return f"{coder}.{stage}.{original_level}.block.{rest[3]}.{inner}", False


def to_original_layout(
    unet: dict[str, torch.Tensor],
    vae: dict[str, torch.Tensor],
    text_encoder: dict[str, torch.Tensor],
    configs: dict[str, Any],
) -> dict[str, torch.Tensor]:
    """One state dict in the original layout from the three diffusers state dicts."""
    layers = int(configs["unet"]["layers_per_block"])
    up_attention = ["CrossAttn" in t for t in configs["unet"]["up_block_types"]]
    levels = len(configs["vae"]["block_out_channels"])
    out = {UNET_PREFIX + unet_key(k, layers, up_attention): v for k, v in unet.items()}
    for name, tensor in vae.items():
        key, conv = vae_key(name, levels)
        out[VAE_PREFIX + key] = tensor.reshape(*tensor.shape, 1, 1) if conv and tensor.ndim == 2 else tensor
    # transformers 5 saves CLIPTextModel's parameters without its "text_model." level; v1.x files have it.
    out |= {TEXT_PREFIX + "text_model." + k.removeprefix("text_model."): v for k, v in text_encoder.items()}
    return out
