"""The one source of truth for engine tensors and the sizes they accept.

The ONNX export (dynamic axes), the config.pbtxt writer (dims), the TensorRT build (optimization
profiles) and the pipeline's input validation all read this module. Dynamic axes carry names; a
`Profile` gives each name its (min, opt, max).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

VAE_SCALE = 8  # pixels per latent cell
TOKENS_PER_CHUNK = 77  # CLIP context length: BOS + 75 tokens + EOS


SideRange = tuple[int, int, int]  # (min, opt, max) pixels of one image side
# The dynamic axes that lead engine tensors: Triton's batch axis (config max_batch_size = the axis' max).
BATCH_AXES = frozenset({"batch", "guided_batch", "text_rows"})


def is_image_axis(axis: str) -> bool:
    """Whether a dynamic axis follows the images a request asks for: how many (its rows through the UNet and
    VAE) and their size in pixels or latent cells. The others follow what the request says: the prompt's
    length (`text_rows`, `text_sequence`) and its LoRAs' ranks. OpenVINO compiles a static model per set of
    image axes' sizes and leaves the others dynamic (python_backend/ov_sessions.py)."""
    return axis in ("batch", "guided_batch", "height", "width") or axis.startswith("latent_")


@dataclass(frozen=True)
class Profile:
    """What the engines are built for: image sides in pixels and images per request."""

    width: SideRange = (64, 512, 1024)
    height: SideRange = (64, 512, 1024)
    max_batch: int = 4
    opt_batch: int = 1
    max_prompt_chunks: int = 3

    @classmethod
    def square(cls, min_size: int, opt_size: int, max_size: int, **batch: int) -> Profile:
        """Both sides from the same range (build-engines --min-size/--opt-size/--max-size)."""
        side = (min_size, opt_size, max_size)
        return cls(width=side, height=side, **batch)

    @classmethod
    def static(cls, width: int, height: int, **batch: int) -> Profile:
        """One fixed image size (build-engines --static WxH): the fastest TensorRT engines."""
        return cls(width=(width, width, width), height=(height, height, height), **batch)

    def __post_init__(self) -> None:
        for name in ("width", "height"):
            side = tuple(getattr(self, name))
            object.__setattr__(self, name, side)  # JSON gives lists
            if len(side) != 3 or any(v <= 0 or v % VAE_SCALE for v in side):
                raise ValueError(f"{name} sizes must be positive multiples of {VAE_SCALE}, got {side}")
            if not side[0] <= side[1] <= side[2]:
                raise ValueError(f"{name} sizes must satisfy min <= opt <= max, got {side}")
        if not 1 <= self.opt_batch <= self.max_batch:
            raise ValueError(
                f"batch must satisfy 1 <= opt_batch <= max_batch, got {self.opt_batch}, {self.max_batch}"
            )
        if self.max_prompt_chunks < 1:
            raise ValueError(f"max_prompt_chunks must be >= 1, got {self.max_prompt_chunks}")

    def axis_ranges(self) -> dict[str, tuple[int, int, int]]:
        """(min, opt, max) of every named dynamic axis. The UNet batch doubles for guidance."""
        seq = TOKENS_PER_CHUNK
        return {
            "batch": (1, self.opt_batch, self.max_batch),
            # The UNet sees each image twice with guidance: unconditional and conditional.
            "guided_batch": (1, 2 * self.opt_batch, 2 * self.max_batch),
            # The text encoder runs once per request (its embeddings are repeated per image), on one row per
            # 77-token chunk of the prompt and, with guidance, of the negative prompt padded to as many
            # chunks: up to 2 x max_prompt_chunks rows, however many images. Typical: one chunk, guided.
            "text_rows": (1, 2, 2 * self.max_prompt_chunks),
            "latent_height": _latent(self.height),
            "latent_width": _latent(self.width),
            "height": self.height,
            "width": self.width,
            "text_sequence": (seq, seq, seq * self.max_prompt_chunks),
            # The UNet's feature maps below the latent's size (ControlNet residuals): each down block halves
            # them, rounding up (a stride-2 convolution with padding 1).
            **{
                f"latent_{side}_{factor}": _downscaled(_latent(getattr(self, side)), factor)
                for side in ("height", "width")
                for factor in RESIDUAL_SCALES
            },
        }

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Profile:
        return cls(**data)


def _latent(side: SideRange) -> SideRange:
    lo, opt, hi = (v // VAE_SCALE for v in side)
    return lo, opt, hi


RESIDUAL_SCALES = (2, 4, 8)  # SD v1.x UNets have four down blocks: feature maps at 1, 1/2, 1/4, 1/8


def _downscaled(side: SideRange, factor: int) -> SideRange:
    lo, opt, hi = (-(-v // factor) for v in side)
    return lo, opt, hi


def with_scaled_latents(sizes: dict[str, int]) -> dict[str, int]:
    """`sizes` (axis name → one size) plus the sizes of the UNet's smaller feature maps that follow from its
    latent sides."""
    scaled = {
        f"latent_{side}_{factor}": -(-sizes[f"latent_{side}"] // factor)
        for side in ("height", "width")
        if f"latent_{side}" in sizes
        for factor in RESIDUAL_SCALES
    }
    return {**scaled, **sizes}


@dataclass(frozen=True)
class ModelGeometry:
    """Fixed sizes of one checkpoint's components (read from its configs)."""

    unet_in_channels: int = 4  # 9 for inpainting checkpoints
    latent_channels: int = 4
    text_hidden_size: int = 768
    text_layers: int = 12  # CLIP's num_hidden_layers: clip_skip takes 1..text_layers
    vae_scaling_factor: float = 0.18215
    unet_block_channels: tuple[int, ...] = (320, 640, 1280, 1280)  # the UNet's block_out_channels
    unet_layers_per_block: int = 2

    def __post_init__(self) -> None:
        object.__setattr__(self, "unet_block_channels", tuple(self.unet_block_channels))  # JSON gives lists

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelGeometry:
        return cls(**data)


@dataclass(frozen=True)
class TensorSpec:
    """One engine input or output; a str in `dims` names a dynamic axis of `Profile.axis_ranges`."""

    name: str
    dtype: type[np.generic]
    dims: tuple[int | str, ...]
    value_range: tuple[int, int] | None = None  # (min, max) an integer input's values must lie in

    @property
    def dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.dims) if isinstance(d, str)}

    def concrete_dims(self) -> tuple[int, ...]:
        """Dims with -1 for every dynamic axis, as Triton and ONNX Runtime report them."""
        return tuple(-1 if isinstance(d, str) else d for d in self.dims)


@dataclass(frozen=True)
class EngineSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


TEXT_ENCODER = "text_encoder"
UNET = "unet"
VAE_DECODER = "vae_decoder"
VAE_ENCODER = "vae_encoder"
ENGINE_NAMES = (TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER)
PIPELINE = "pipeline"  # the pipeline model of a repository's unprefixed (default) checkpoint


def triton_model(prefix: str, model: str) -> str:
    """The Triton name of one of a checkpoint's models (an engine, `pipeline`): `PREFIX_model` for a
    checkpoint built with `build-engines --prefix PREFIX`, so that several share one repository; `model`
    for the unprefixed one."""
    return f"{prefix}_{model}" if prefix else model


def stream_model(pipeline: str) -> str:
    """The decoupled twin of pipeline model `pipeline` (progress, previews, cancellation)."""
    return f"{pipeline}_stream"


def engine_specs(geometry: ModelGeometry) -> dict[str, EngineSpec]:
    """Inputs and outputs of the four engines, keyed by engine (= Triton model) name."""
    f32, lat, hid = np.float32, geometry.latent_channels, geometry.text_hidden_size
    latent_dims = ("latent_height", "latent_width")
    image_dims = ("height", "width")
    specs = [
        EngineSpec(
            TEXT_ENCODER,
            inputs=(
                TensorSpec("input_ids", np.int32, ("text_rows", TOKENS_PER_CHUNK)),
                # A1111's clip skip, one per row (batch first so that Triton can batch it).
                TensorSpec("clip_skip", np.int32, ("text_rows", 1), value_range=(1, geometry.text_layers)),
            ),
            outputs=(TensorSpec("last_hidden_state", f32, ("text_rows", TOKENS_PER_CHUNK, hid)),),
        ),
        EngineSpec(
            UNET,
            inputs=(
                TensorSpec("sample", f32, ("guided_batch", geometry.unet_in_channels, *latent_dims)),
                # One timestep per sample, so samples at different steps can share a batch.
                TensorSpec("timestep", f32, ("guided_batch", 1)),
                TensorSpec("encoder_hidden_states", f32, ("guided_batch", "text_sequence", hid)),
            ),
            outputs=(TensorSpec("noise_pred", f32, ("guided_batch", lat, *latent_dims)),),
        ),
        EngineSpec(
            VAE_DECODER,
            inputs=(TensorSpec("latent", f32, ("batch", lat, *latent_dims)),),
            outputs=(TensorSpec("image", f32, ("batch", 3, *image_dims)),),
        ),
        EngineSpec(
            VAE_ENCODER,
            inputs=(TensorSpec("image", f32, ("batch", 3, *image_dims)),),
            outputs=(
                TensorSpec("latent_mean", f32, ("batch", lat, *latent_dims)),
                TensorSpec("latent_std", f32, ("batch", lat, *latent_dims)),
            ),
        ),
    ]
    return {spec.name: spec for spec in specs}


CONTROLNET = "controlnet"  # a ControlNet engine; each one's Triton model is `controlnet_model(prefix, name)`
MID_RESIDUAL = "mid_residual"


def controlnet_model(prefix: str, name: str) -> str:
    """The Triton name of the ControlNet engine `name` (build-engines --controlnet NAME=PATH)."""
    return triton_model(prefix, f"{CONTROLNET}_{name}")


def residual_names(count: int) -> list[str]:
    """The names of a UNet's `count` ControlNet residuals, in the order the UNet takes them."""
    return [f"down_residual_{i}" for i in range(count - 1)] + [MID_RESIDUAL] if count else []


def control_residuals(geometry: ModelGeometry) -> tuple[TensorSpec, ...]:
    """What a ControlNet adds to the UNet, as diffusers' ControlNetModel gives it: one residual per feature
    map the UNet's down path keeps for its skip connections (its input convolution's, each down block's
    layers' and downsampler's), then one for the middle block; batch-first like the UNet's inputs."""
    blocks = geometry.unet_block_channels
    maps: list[tuple[int, int]] = [(blocks[0], 1)]  # (channels, downscale) of the input convolution's output
    for i, channels in enumerate(blocks):
        maps += [(channels, 2**i)] * geometry.unet_layers_per_block
        if i < len(blocks) - 1:
            maps.append((channels, 2 ** (i + 1)))  # the downsampler's
    mid = (blocks[-1], 2 ** (len(blocks) - 1))
    names = residual_names(len(maps) + 1)
    return tuple(
        TensorSpec(name, np.float32, ("guided_batch", channels, *_scaled_latent_dims(scale)))
        for name, (channels, scale) in zip(names, [*maps, mid], strict=True)
    )


def _scaled_latent_dims(scale: int) -> tuple[str, str]:
    if scale == 1:
        return ("latent_height", "latent_width")
    if scale not in RESIDUAL_SCALES:
        raise ValueError(f"a UNet with feature maps at 1/{scale} of the latent is not an SD v1.x UNet")
    return (f"latent_height_{scale}", f"latent_width_{scale}")


def controlnet_spec(geometry: ModelGeometry) -> EngineSpec:
    """A ControlNet engine: the UNet's latent (4 channels, also for an inpainting UNet), timestep and text,
    and the control image in pixels ([0, 1], as diffusers' pipeline feeds it) → the residuals, unscaled (the
    pipeline scales them per row: weight, guidance window, control mode)."""
    unet = engine_specs(geometry)[UNET]
    latent = TensorSpec(
        "sample", np.float32, ("guided_batch", geometry.latent_channels, *_scaled_latent_dims(1))
    )
    return EngineSpec(
        CONTROLNET,
        inputs=(
            latent,
            *unet.inputs[1:],
            TensorSpec("controlnet_cond", np.float32, ("guided_batch", 3, "height", "width")),
        ),
        outputs=control_residuals(geometry),
    )


def controlled_unet_spec(geometry: ModelGeometry) -> EngineSpec:
    """The UNet with the ControlNet residuals as inputs (added to its skip connections and middle block)."""
    unet = engine_specs(geometry)[UNET]
    return EngineSpec(UNET, (*unet.inputs, *control_residuals(geometry)), unet.outputs)


def request_engine_tensor_bytes(profile: Profile, geometry: ModelGeometry, controlnet: bool = False) -> int:
    """The most bytes of engine inputs and outputs one request holds at once, at the profile's largest sizes.

    The pipeline calls one engine at a time, so that is its largest call (inputs + outputs, every dynamic
    axis at its maximum; the VAE's images dominate), plus the text encoder's output, which stays referenced
    for the whole request. With `controlnet` (a build with ControlNets) the UNet call carries the residuals,
    which the request also holds from its ControlNet calls. With GPU engines these tensors cross BLS in
    Triton's CUDA memory pool.
    """
    ranges = profile.axis_ranges()

    def nbytes(tensor: TensorSpec) -> int:
        count = 1
        for d in tensor.dims:
            count *= ranges[d][2] if isinstance(d, str) else d
        return count * np.dtype(tensor.dtype).itemsize

    specs = engine_specs(geometry)
    if controlnet:
        specs[UNET] = controlled_unet_spec(geometry)
        specs[CONTROLNET] = controlnet_spec(geometry)
    per_call = {name: sum(nbytes(t) for t in (*s.inputs, *s.outputs)) for name, s in specs.items()}
    held = sum(nbytes(t) for t in specs[TEXT_ENCODER].outputs)
    return max(per_call.values()) + held


PIPELINE_MANIFEST = "pipeline.json"
LORA_LIBRARY = "lora_library"  # the model listing the server's LoRA files (python_backend.lora_library)
# Set by sd-serve in tritonserver's environment: the pipeline models refuse new requests while the file it
# names exists (services/serve.py's graceful stop).
DRAIN_FILE_ENV = "SD_SERVE_DRAIN_FILE"
# Where the pipeline models and `pipeline_control` share which jobs run and which are to stop
# (python_backend.jobs); sd-serve gives each server its own.
JOBS_DIR_ENV = "SD_JOBS_DIR"
# Set by sd-serve --lora-dir: the folder of LoRA files the pipelines and engine models read.
LORA_DIR_ENV = "SD_LORA_DIR"
# An engine or pipeline model's config parameter: "true" when it opens its engine (a pipeline: its core)
# with its first request, not at load.
OPEN_ON_FIRST_REQUEST = "open_on_first_request"
# Set by sd-serve --openvino-cache-dir: where OpenVINO engines keep the models they compile (per host CPU).
OPENVINO_CACHE_ENV = "SD_OPENVINO_CACHE_DIR"


@dataclass(frozen=True)
class PipelineManifest:
    """What the build hands the pipeline model: written next to its model.py."""

    profile: Profile
    geometry: ModelGeometry
    model_name: str
    device: str = "cpu"  # where the engines take and give tensors: "cuda" for TensorRT engines
    model_hash: str = ""  # first 10 hex digits of the weights' sha256 (A1111's "Model hash" field)
    vae_name: str = ""  # build-engines --vae: its file name (A1111's "VAE"); "" for the checkpoint's own
    vae_hash: str = ""  # ... and its sha256's first 10 hex digits (A1111's "VAE hash")
    prefix: str = ""  # build-engines --prefix: the pipeline calls its engines `triton_model(prefix, engine)`
    lora_max_rank: int = 0  # TensorRT engines with LoRA branches: the rank per layer they take; 0: any
    # build-engines --controlnet: the ControlNet engines' names; with any, the UNet takes their residuals
    controlnets: tuple[str, ...] = ()
    controlnet_units: int = 0  # build-engines --controlnet-units: the most units a request may have

    def write(self, path: Path) -> None:
        data = {
            "profile": self.profile.to_dict(),
            "geometry": self.geometry.to_dict(),
            "model_name": self.model_name,
            "device": self.device,
            "model_hash": self.model_hash,
            "vae_name": self.vae_name,
            "vae_hash": self.vae_hash,
            "prefix": self.prefix,
            "lora_max_rank": self.lora_max_rank,
            "controlnets": list(self.controlnets),
            "controlnet_units": self.controlnet_units,
        }
        path.write_text(json.dumps(data, indent=2) + "\n")

    @classmethod
    def read(cls, path: Path) -> PipelineManifest:
        data = json.loads(path.read_text())
        return cls(
            profile=Profile.from_dict(data["profile"]),
            geometry=ModelGeometry.from_dict(data["geometry"]),
            model_name=data["model_name"],
            device=data.get("device", "cpu"),
            model_hash=data.get("model_hash", ""),
            vae_name=data.get("vae_name", ""),
            vae_hash=data.get("vae_hash", ""),
            prefix=data.get("prefix", ""),
            lora_max_rank=data.get("lora_max_rank", 0),
            controlnets=tuple(data.get("controlnets", ())),
            controlnet_units=data.get("controlnet_units", 0),
        )
