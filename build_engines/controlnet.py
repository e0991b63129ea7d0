"""ControlNets as engines (issue 16): each SD v1.x ControlNet becomes its own engine, and the UNet gets a
graph that takes the residuals a ControlNet gives.

A ControlNet engine maps (latent, timestep, text, control image) to its residuals unscaled: the pipeline
scales them per batch row (weight, guidance window, control mode) and sums several ControlNets' before the
UNet call, so that requests with different ControlNets, weights and windows share UNet runs.

A ControlNet comes as a diffusers folder, or as one file in the original (lllyasviel/A1111) layout,
`control_model.*` (`.safetensors`, or a `.pth` read as tensors only): such a file is converted with diffusers'
own single-file loading and a config made from the checkpoint's UNet (nothing is fetched from the hub); its
conditioning embedding's widths are read from the file.

`write_tiny_controlnet` makes a random one for tests, as diffusers' own tests do: from the tiny UNet, its zero
convolutions given random weights (else every residual is zero and nothing is tested);
`write_single_file` writes a folder's weights in the original layout.
"""

from __future__ import annotations

import argparse
import inspect
import json
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from build_engines.digests import digest_folder
from build_engines.onnx_export import ExportResult, ModuleLoader, _UNet, export_engine
from build_engines.single_file import SUFFIXES, SingleFileError, read_state_dict, unet_key
from python_backend.shapes import ModelGeometry, controlled_unet_spec, controlnet_spec


class ControlNetError(ValueError):
    """A ControlNet that cannot be used with this checkpoint; the message names it and says why."""


class _ControlNet(nn.Module):
    def __init__(self, controlnet: nn.Module) -> None:
        super().__init__()
        self.controlnet = controlnet

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, cond: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        down, mid = self.controlnet(
            sample, timestep.reshape(-1), encoder_hidden_states=text, controlnet_cond=cond, return_dict=False
        )
        return (*down, mid)


class _ControlledUNet(_UNet):
    """The UNet adding the ControlNet residuals (already scaled and summed by the pipeline)."""

    def forward(  # type: ignore[override]
        self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, *residuals: torch.Tensor
    ) -> torch.Tensor:
        return self.unet(  # type: ignore[no-any-return]
            sample,
            timestep.reshape(-1),
            encoder_hidden_states=text,
            down_block_additional_residuals=residuals[:-1],
            mid_block_additional_residual=residuals[-1],
            return_dict=False,
        )[0]


def load_controlnet(path: Path, geometry: ModelGeometry) -> nn.Module:
    """A diffusers ControlNet folder, checked against the checkpoint's geometry."""
    from diffusers import ControlNetModel

    config_file = path / "config.json"
    if not config_file.is_file():
        raise ControlNetError(f"{path}: not a diffusers ControlNet folder (no config.json)")
    config = json.loads(config_file.read_text())
    expected = {
        "block_out_channels": list(geometry.unet_block_channels),
        "layers_per_block": geometry.unet_layers_per_block,
        "cross_attention_dim": geometry.text_hidden_size,
        "in_channels": geometry.latent_channels,
    }
    wrong = {key: config.get(key) for key, value in expected.items() if config.get(key) != value}
    if wrong:
        raise ControlNetError(
            f"{path}: not a ControlNet for this checkpoint (an SD v1.x one is needed): it has {wrong}, the "
            f"checkpoint needs { ({k: expected[k] for k in wrong}) }"
        )
    model = ControlNetModel.from_pretrained(path).eval()
    return _ControlNet(model)


def export_controlnet(path: Path, geometry: ModelGeometry, out_dir: Path, precision: str) -> ExportResult:
    """out_dir/model.onnx from the ControlNet folder `path` (kept when up to date)."""
    spec = controlnet_spec(geometry)
    return export_engine(
        spec, lambda: load_controlnet(path, geometry), digest_folder(path), out_dir, precision
    )


def controlled_unet(loader: ModuleLoader) -> nn.Module:
    """The checkpoint's UNet taking ControlNet residuals, as the engine's inputs come."""
    return _ControlledUNet(loader.component("unet"))


def export_controlled_unet(
    loader: ModuleLoader, geometry: ModelGeometry, source_digest: str, out_dir: Path, precision: str
) -> ExportResult:
    """out_dir/model.onnx: the checkpoint's UNet taking ControlNet residuals."""
    spec = controlled_unet_spec(geometry)
    return export_engine(spec, lambda: controlled_unet(loader), source_digest, out_dir, precision)


PREFIX = "control_model."  # the original layout's parameter names
V1_EMBEDDING_WIDTHS = (16, 32, 96, 256)  # SD v1.x ControlNets' control-image encoder (diffusers' default)
_HINT = "input_hint_block."


def convert_single_file(path: Path, unet_config: dict[str, Any], out_dir: Path) -> Path:
    """The diffusers folder of the original-layout ControlNet file `path`, for a UNet of `unet_config`,
    written into `out_dir`. ControlNetError names the file when it is not an SD v1.x ControlNet for it."""
    from diffusers import ControlNetModel

    try:
        state, _ = read_state_dict(path)
    except SingleFileError as e:
        raise ControlNetError(str(e)) from None
    hints = {
        int(k[len(PREFIX + _HINT) :].split(".")[0]): v
        for k, v in state.items()
        if ".weight" in k and k.startswith(PREFIX + _HINT)
    }
    if not hints or not any(k.startswith(PREFIX + "zero_convs.") for k in state):
        raise ControlNetError(f"{path}: not a ControlNet in the original layout (no control_model.* weights)")
    # The embedding's convolutions: conv_in (0), then pairs keeping and widening the channels, then conv_out.
    indices = sorted(hints)[:-1]
    widths = [int(hints[0].shape[0])] + [int(hints[i].shape[0]) for i in indices[2::2]]
    accepted = set(inspect.signature(ControlNetModel.__init__).parameters)
    config = {k: v for k, v in unet_config.items() if k in accepted and not k.startswith("_")}
    config.update(in_channels=4, conditioning_embedding_out_channels=widths)
    del state
    with tempfile.TemporaryDirectory(prefix="controlnet-config-") as config_dir:
        (Path(config_dir) / "config.json").write_text(
            json.dumps({"_class_name": "ControlNetModel", **config})
        )
        try:
            model = ControlNetModel.from_single_file(str(path), config=config_dir, local_files_only=True)
        except (ValueError, RuntimeError, KeyError) as e:  # shapes of another architecture
            raise ControlNetError(f"{path}: not an SD v1.x ControlNet for this checkpoint ({e})") from None
    model.save_pretrained(out_dir, safe_serialization=True)
    return out_dir


def write_single_file(folder: Path, out_file: Path) -> Path:
    """The diffusers ControlNet in `folder` as one `.safetensors` file in the original layout."""
    from diffusers import ControlNetModel
    from safetensors.torch import save_file

    model = ControlNetModel.from_pretrained(folder)
    layers, blocks = model.config.layers_per_block, len(model.controlnet_cond_embedding.blocks)
    out = {}
    for name, tensor in model.state_dict().items():
        parts = name.split(".")
        if parts[0] == "controlnet_cond_embedding":
            index = {"conv_in": 0, "conv_out": 2 * (blocks + 1)}.get(parts[1])
            if index is None:  # blocks.{j}
                index, parts = 2 * (int(parts[2]) + 1), parts[1:]
            key = f"{_HINT}{index}.{'.'.join(parts[2:])}"
        elif parts[0] == "controlnet_down_blocks":
            key = f"zero_convs.{parts[1]}.0.{parts[2]}"
        elif parts[0] == "controlnet_mid_block":
            key = f"middle_block_out.0.{parts[1]}"
        else:
            key = unet_key(name, layers, [])
        out[PREFIX + key] = tensor.contiguous()
    save_file(out, str(out_file))
    return out_file


def is_single_file(path: Path) -> bool:
    return path.is_file() and path.suffix in SUFFIXES


def write_tiny_controlnet(out_dir: Path, checkpoint: Path, seed: int = 0) -> Path:
    """A random ControlNet for `checkpoint`'s UNet (a diffusers folder), as diffusers' tests make one."""
    from diffusers import ControlNetModel, UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(checkpoint, subfolder="unet")
    torch.manual_seed(seed)
    channels = unet.config.block_out_channels[0]
    # Four stages: the control image is brought down 8x, to the latent's size, as in SD v1.x ControlNets,
    # whose widths a UNet of v1's size gets (so that a benchmark's ControlNet costs what a real one does);
    # a smaller UNet, widths scaled to it.
    widths = V1_EMBEDDING_WIDTHS if channels == 320 else (channels // 2, channels // 2, channels, channels)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=widths)
    del unet
    zero_convs: list[Any] = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block]
    zero_convs.append(controlnet.controlnet_cond_embedding.conv_out)
    with torch.no_grad():
        for conv in zero_convs:
            # Small: residuals of the skip connections' size would swamp a random UNet.
            nn.init.normal_(conv.weight, std=0.05)
            nn.init.normal_(conv.bias, std=0.05)
    controlnet.save_pretrained(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="sd-tiny-controlnet",
        description="Write a random ControlNet (diffusers folder) for a checkpoint's UNet, for tests "
        "and benchmarks.",
    )
    parser.add_argument(
        "checkpoint", type=Path, help="diffusers checkpoint folder (e.g. sd-tiny-checkpoint's)"
    )
    parser.add_argument("out_dir", type=Path, help="ControlNet folder to write")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--single-file", action="store_true", help="also write OUT_DIR.safetensors in the original layout"
    )
    args = parser.parse_args(argv)
    write_tiny_controlnet(args.out_dir, args.checkpoint, args.seed)
    print(args.out_dir.resolve())
    if args.single_file:
        print(write_single_file(args.out_dir, args.out_dir.with_suffix(".safetensors")).resolve())
