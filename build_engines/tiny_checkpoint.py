"""`sd-tiny-checkpoint`: a diffusers-format Stable Diffusion v1.x checkpoint with random weights.

Tests and benchmarks need a checkpoint but cannot download one. This writes v1-4's layout (UNet, VAE, CLIP
text encoder, the real CLIP tokenizer, v1-4's PNDM scheduler) from a fixed seed: by default a tiny model that
keeps v1-4's block structure (3 UNet downsamplings, VAE factor 8) and runs in milliseconds on CPU, or with
``--full-size`` v1-4's own architecture for benchmarks. `sd-tiny-lora` writes random LoRA files for such a
checkpoint (A1111/kohya or diffusers/PEFT layout).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from build_engines.clip_vocab import (
    END_OF_TEXT,
    START_OF_TEXT,
    VOCAB_SIZE,
    find_clip_bpe_file,
    write_clip_vocab_files,
)

if TYPE_CHECKING:
    from python_backend.lora import Target

OPEN_CLIP_HINT = (
    "the CLIP tokenizer vocabulary (bpe_simple_vocab_16e6.txt.gz) comes from the open-clip-torch package, "
    "which is not installed; run `pip install --no-deps open-clip-torch` (--no-deps: its dependencies pull "
    "torchvision) and try again"
)

MAX_TOKENS = 77
BOS_TOKEN_ID = VOCAB_SIZE - 2  # <|startoftext|>
EOS_TOKEN_ID = VOCAB_SIZE - 1  # <|endoftext|>, also SD 1.x's padding token

# stable-diffusion-v1-4/scheduler/scheduler_config.json
SCHEDULER_CONFIG: dict[str, Any] = {
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "num_train_timesteps": 1000,
    "steps_offset": 1,
    "skip_prk_steps": True,
    "set_alpha_to_one": False,
    "clip_sample": False,
    "trained_betas": None,
}

COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


class MissingClipVocabError(RuntimeError):
    """open-clip-torch, which ships CLIP's BPE file, is not installed."""


def component_configs(full_size: bool = False, inpainting: bool = False) -> dict[str, dict[str, Any]]:
    """Kwargs for UNet2DConditionModel ("unet"), AutoencoderKL ("vae") and CLIPTextConfig ("text_encoder").

    Both sizes keep v1-4's block types, so the tiny UNet downsamples 3 times (odd latent sizes take diffusers'
    forward_upsample_size path as in the real model) and the tiny VAE by 8.
    """
    if full_size:
        unet_channels, unet_layers, heads, text_dim = (320, 640, 1280, 1280), 2, 8, 768
        vae_channels, vae_layers, groups, vae_sample_size = (128, 256, 512, 512), 2, 32, 512
        text_layers, text_heads, text_intermediate = 12, 12, 3072
    else:
        unet_channels, unet_layers, heads, text_dim = (32, 32, 64, 64), 1, 2, 32
        vae_channels, vae_layers, groups, vae_sample_size = (32, 64, 64, 64), 1, 8, 64
        text_layers, text_heads, text_intermediate = 2, 4, 64
    vae_factor = 2 ** (len(vae_channels) - 1)
    return {
        "unet": {
            "sample_size": vae_sample_size // vae_factor,
            # Inpainting UNets also take the masked image's latents (4) and the mask (1).
            "in_channels": 9 if inpainting else 4,
            "out_channels": 4,
            "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
            "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
            "block_out_channels": unet_channels,
            "layers_per_block": unet_layers,
            "attention_head_dim": heads,  # diffusers' legacy name: this is the number of heads
            "cross_attention_dim": text_dim,
            "norm_num_groups": groups,
        },
        "vae": {
            "in_channels": 3,
            "out_channels": 3,
            "down_block_types": ("DownEncoderBlock2D",) * 4,
            "up_block_types": ("UpDecoderBlock2D",) * 4,
            "block_out_channels": vae_channels,
            "layers_per_block": vae_layers,
            "latent_channels": 4,
            "norm_num_groups": groups,
            "sample_size": vae_sample_size,
            "scaling_factor": 0.18215,
        },
        "text_encoder": {
            "vocab_size": VOCAB_SIZE,
            "hidden_size": text_dim,
            "intermediate_size": text_intermediate,
            "num_hidden_layers": text_layers,
            "num_attention_heads": text_heads,
            "max_position_embeddings": MAX_TOKENS,
            "hidden_act": "quick_gelu",
            "projection_dim": text_dim,
            "bos_token_id": BOS_TOKEN_ID,
            # With the real EOS id transformers pools at the first <|endoftext|>, like CLIP's argmax.
            "eos_token_id": EOS_TOKEN_ID,
            "pad_token_id": EOS_TOKEN_ID,
        },
    }


def model_index(inpainting: bool, diffusers_version: str) -> dict[str, Any]:
    """model_index.json as diffusers writes it for a pipeline saved without safety checker."""
    return {
        "_class_name": "StableDiffusionInpaintPipeline" if inpainting else "StableDiffusionPipeline",
        "_diffusers_version": diffusers_version,
        "feature_extractor": [None, None],
        "image_encoder": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }


def write_pipeline_configs(out_dir: Path, configs: dict[str, dict[str, Any]], inpainting: bool) -> None:
    """A diffusers folder without weights: model_index.json, each component's config, v1-4's scheduler and
    the real CLIP tokenizer. diffusers' single-file loading reads a checkpoint's architecture from it.

    Raises MissingClipVocabError, before writing anything, when open-clip-torch is not installed."""
    bpe_file = find_clip_bpe_file()
    if bpe_file is None:
        raise MissingClipVocabError(OPEN_CLIP_HINT)
    import diffusers
    from diffusers import PNDMScheduler
    from transformers import CLIPTextConfig, CLIPTokenizer

    out_dir.mkdir(parents=True, exist_ok=True)
    for name, class_name in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
        (out_dir / name).mkdir(exist_ok=True)
        config = {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **configs[name]}
        (out_dir / name / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    CLIPTextConfig(**configs["text_encoder"]).save_pretrained(out_dir / "text_encoder")

    # from_config, unlike the constructor, keeps clip_sample (a DDIM key, as in v1-4's file), so a DDIM
    # scheduler made from this config does not fall back to its default clip_sample=True.
    PNDMScheduler.from_config(SCHEDULER_CONFIG).save_pretrained(out_dir / "scheduler")

    tokenizer_dir = out_dir / "tokenizer"
    vocab_file, merges_file = write_clip_vocab_files(bpe_file, tokenizer_dir)
    # Positional file arguments fit both transformers 4 (vocab_file, merges_file) and 5 (vocab, merges).
    tokenizer = CLIPTokenizer(
        str(vocab_file),
        str(merges_file),
        bos_token=START_OF_TEXT,
        eos_token=END_OF_TEXT,
        pad_token=END_OF_TEXT,
        unk_token=END_OF_TEXT,
        model_max_length=MAX_TOKENS,
    )
    tokenizer.save_pretrained(tokenizer_dir)

    index = model_index(inpainting, diffusers.__version__)
    (out_dir / "model_index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def write_tiny_checkpoint(
    out_dir: Path, seed: int = 0, inpainting: bool = False, full_size: bool = False
) -> Path:
    """Write the checkpoint folder (overwriting its files if present) and return its path.

    The same seed gives byte-identical files. Raises MissingClipVocabError, before writing anything, when
    open-clip-torch is not installed.
    """
    out_dir = Path(out_dir)
    configs = component_configs(full_size=full_size, inpainting=inpainting)
    write_pipeline_configs(out_dir, configs, inpainting)

    # Imported here so that --help and the open_clip hint do not wait for torch.
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    builders: dict[str, Callable[[], Any]] = {
        "unet": lambda: UNet2DConditionModel(**configs["unet"]),
        "vae": lambda: AutoencoderKL(**configs["vae"]),
        "text_encoder": lambda: CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
    }
    for name, build in builders.items():
        torch.manual_seed(seed)  # per component: each one's weights depend on the seed alone
        model = build()
        model.save_pretrained(out_dir / name, safe_serialization=True)
        del model  # full-size weights are GBs: hold one component at a time
    return out_dir


def write_single_file_checkpoint(
    out_file: Path, seed: int = 0, inpainting: bool = False, full_size: bool = False
) -> Path:
    """The same checkpoint (same seed, same weights) as one `.safetensors` file in the original (A1111)
    key layout. Its architecture goes into the file's metadata unless it is v1's own (`full_size`), which
    readers assume, as they do for a real v1.x file."""
    import tempfile

    from safetensors.torch import load_file, save_file

    from build_engines.single_file import ARCHITECTURE_KEY, to_original_layout

    configs = component_configs(full_size=full_size, inpainting=inpainting)
    with tempfile.TemporaryDirectory(prefix="sd-tiny-") as folder:
        write_tiny_checkpoint(Path(folder), seed, inpainting, full_size)
        parts = [
            load_file(str(Path(folder) / name / weights))
            for name, weights in (
                ("unet", "diffusion_pytorch_model.safetensors"),
                ("vae", "diffusion_pytorch_model.safetensors"),
                ("text_encoder", "model.safetensors"),
            )
        ]
    unet, vae, text_encoder = parts
    state = to_original_layout(unet, vae, text_encoder, configs)
    metadata = {} if full_size else {ARCHITECTURE_KEY: json.dumps(configs, sort_keys=True)}
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out_file), metadata=metadata)
    return out_file


LORA_LAYOUTS = ("kohya", "peft")


def lora_targets(shapes: Mapping[Target, tuple[int, ...]], conv: bool = True) -> list[Target]:
    """What kohya-ss sd-scripts trains on SD 1.x: the UNet's Transformer2DModels (attention, feed-forward,
    proj_in/out) and the text encoder's attention and MLP; with `conv` (LoCon, kohya's --conv_dim) also
    the ResnetBlock2D, Downsample2D and Upsample2D layers (3x3 convs, time_emb_proj, conv_shortcut)."""
    chosen = []
    for target in sorted(shapes):
        if target.component == "text_encoder":
            keep = ".self_attn." in target.path or ".mlp." in target.path
        else:
            keep = ".attentions." in target.path or (
                conv and any(f".{kind}." in target.path for kind in ("resnets", "downsamplers", "upsamplers"))
            )
        if keep:
            chosen.append(target)
    return chosen


def write_tiny_lora(
    out_file: Path,
    checkpoint: Path,
    layout: str = "kohya",
    rank: int = 4,
    seed: int = 0,
    conv: bool = True,
    output_name: str | None = None,
) -> Path:
    """A random LoRA for the diffusers checkpoint folder `checkpoint` (any size), as one .safetensors file.

    `layout` "kohya": A1111/kohya keys (`lora_unet_...lora_down.weight`, `.alpha`; LoCon convs with 3x3 down
    and 1x1 up) with kohya's two settings: Linear and 1x1 layers rank `rank`, alpha rank/2; 3x3 convs rank
    rank/2, alpha 1 (one alpha per kind: diffusers 0.42 drops per-layer alphas of attention projections that
    differ from the file's most common alpha, and tests compare with it). "peft": diffusers' keys
    (`unet.<path>.lora_A.weight`, `text_encoder.text_model.<path>...`) without alphas (scale 1).
    `output_name` goes into the metadata as ss_output_name (A1111's alias). The same arguments give identical
    tensors, hence A1111's hash (safetensors writes the metadata's keys in random order). Each ΔW is about
    half the size of its layer's random weights: enough to change images visibly, not enough to wash them
    out."""
    from safetensors.numpy import save_file

    from python_backend.lora import TEXT_MODEL_PREFIX, shapes_from_checkpoint

    if layout not in LORA_LAYOUTS:
        raise ValueError(f"layout must be one of {LORA_LAYOUTS}, got {layout!r}")
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    shapes = shapes_from_checkpoint(checkpoint)
    rng = np.random.default_rng(seed)
    tensors: dict[str, np.ndarray] = {}
    for target in lora_targets(shapes, conv):
        out_features, in_features, *kernel = shapes[target]
        fan_in = in_features * math.prod(kernel)
        # kohya's --network_dim/--network_alpha for Linear and 1x1 layers, --conv_dim/--conv_alpha for 3x3.
        conv3x3 = len(kernel) == 2 and kernel != [1, 1]
        r = max(1, rank // 2) if conv3x3 else rank
        alpha = 1.0 if conv3x3 else rank / 2
        scale = alpha / r if layout == "kohya" else 1.0
        # diffusers' default init draws weights of std ≈ 1/sqrt(3·fan_in); these ΔW have std 0.3/sqrt(fan_in).
        down = rng.standard_normal((r, in_features, *kernel)) / math.sqrt(fan_in)
        up = rng.standard_normal((out_features, r)) * (0.3 / math.sqrt(r) / scale)
        if kernel:
            up = up[:, :, None, None]  # kohya and PEFT store a conv's up as a 1x1 conv
        if layout == "kohya":
            prefix = "lora_unet_" if target.component == "unet" else "lora_te_" + TEXT_MODEL_PREFIX
            name = (prefix + target.path).replace(".", "_")
            tensors[f"{name}.lora_down.weight"] = down
            tensors[f"{name}.lora_up.weight"] = up
            tensors[f"{name}.alpha"] = np.array(alpha)
        else:
            path = target.path if target.component == "unet" else TEXT_MODEL_PREFIX + target.path
            tensors[f"{target.component}.{path}.lora_A.weight"] = down
            tensors[f"{target.component}.{path}.lora_B.weight"] = up
    metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank)}
    if output_name is not None:
        metadata["ss_output_name"] = output_name
    out_file = Path(out_file)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.astype(np.float32) for k, v in tensors.items()}, str(out_file), metadata=metadata)
    return out_file


def lora_main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sd-tiny-lora",
        description="Write a random-weight LoRA .safetensors file for a diffusers checkpoint folder (e.g. "
        "one from sd-tiny-checkpoint) in A1111/kohya or diffusers/PEFT key layout, for tests and benchmarks.",
    )
    parser.add_argument("checkpoint", type=Path, help="diffusers checkpoint folder the LoRA is for")
    parser.add_argument("out_file", type=Path, help="the .safetensors file to write (overwritten)")
    parser.add_argument(
        "--layout",
        choices=LORA_LAYOUTS,
        default="kohya",
        help="kohya: A1111/kohya keys (lora_unet_*, lora_te_*, with alphas); peft: diffusers keys (unet.*, "
        "text_encoder.*, lora_A/lora_B, no alphas) (default: kohya)",
    )
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (default: 4)")
    parser.add_argument("--seed", type=int, default=0, help="weight seed; one seed gives identical tensors")
    parser.add_argument(
        "--no-conv", action="store_true", help="plain LoRA: leave out LoCon's ResNet/down/upsampler layers"
    )
    parser.add_argument("--alias", help="ss_output_name metadata (A1111 shows and writes this name)")
    args = parser.parse_args(argv)
    if args.out_file.suffix != ".safetensors":
        parser.error(f"the LoRA file must end in .safetensors, got {args.out_file}")
    if args.rank < 1:
        parser.error(f"--rank must be >= 1, got {args.rank}")
    try:
        write_tiny_lora(
            args.out_file, args.checkpoint, args.layout, args.rank, args.seed, not args.no_conv, args.alias
        )
    except FileNotFoundError as e:
        sys.exit(f"sd-tiny-lora: {e}")
    print(f"wrote {args.out_file.resolve()} ({args.out_file.stat().st_size:,} bytes)")


def checkpoint_files(out_dir: Path) -> list[Path]:
    """The files of the checkpoint in out_dir (others that share the folder are left out)."""
    files = [out_dir / "model_index.json"]
    for name in COMPONENTS:
        files += sorted(p for p in (out_dir / name).rglob("*") if p.is_file())
    return files


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sd-tiny-checkpoint",
        description="Write a diffusers-format Stable Diffusion v1.x checkpoint with random weights "
        "(tiny by default) and the real CLIP tokenizer.",
    )
    parser.add_argument(
        "out_dir",
        type=Path,
        help="checkpoint folder to write (its files are overwritten); with --single-file, the file",
    )
    parser.add_argument("--seed", type=int, default=0, help="weight seed; one seed gives identical files")
    parser.add_argument("--inpainting", action="store_true", help="9-channel inpainting UNet and pipeline")
    parser.add_argument(
        "--full-size", action="store_true", help="v1-4's real architecture (several GB, for benchmarks)"
    )
    parser.add_argument(
        "--single-file",
        action="store_true",
        help="write one .safetensors file in A1111's key layout instead of a diffusers folder",
    )
    args = parser.parse_args(argv)
    out_dir: Path = args.out_dir
    if args.single_file:
        if out_dir.suffix != ".safetensors" or out_dir.is_dir():
            parser.error(f"--single-file writes a .safetensors file, got {out_dir}")
        try:
            write_single_file_checkpoint(out_dir, args.seed, args.inpainting, args.full_size)
        except MissingClipVocabError as e:
            sys.exit(f"sd-tiny-checkpoint: {e}")
        print(f"wrote {out_dir.resolve()} ({out_dir.stat().st_size:,} bytes)")
        return
    if out_dir.exists() and not out_dir.is_dir():
        parser.error(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        print(f"{out_dir} is not empty: overwriting its checkpoint files")

    try:
        write_tiny_checkpoint(out_dir, seed=args.seed, inpainting=args.inpainting, full_size=args.full_size)
    except MissingClipVocabError as e:
        sys.exit(f"sd-tiny-checkpoint: {e}")

    print("wrote:")
    for path in checkpoint_files(out_dir):
        print(f"  {path.relative_to(out_dir)}  ({path.stat().st_size:,} bytes)")
    print(out_dir.resolve())


if __name__ == "__main__":
    main()
