"""Export a checkpoint's text encoder, UNet and VAE halves to ONNX, and check them against torch.

Every axis named in `shapes.engine_specs` is exported dynamic. Each model.onnx gets a JSON sidecar
recording what it was made from; a later build with the same source and settings skips it.
"""

from __future__ import annotations

import copy
import json
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import torch
from torch import nn

from python_backend.shapes import (
    TEXT_ENCODER,
    TOKENS_PER_CHUNK,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    EngineSpec,
    ModelGeometry,
    with_scaled_latents,
)

OPSET = 17  # LayerNormalization is a single op from 17 on (no fp16 overflow in a decomposed one)
EXPORT_FORMAT = 6  # bump when the export itself changes, so cached ONNX files are redone
PROTOBUF_LIMIT = 2**31 - 1
EXTERNAL_DATA = "model.onnx.data"
# ONNX Runtime vs fp32 torch on random inputs. Measured on the tiny checkpoint: fp32 ≤ 4e-6;
# fp16 UNet 1.1e-3, VAE decoder 3.3e-3, VAE encoder 6e-4; full-size v1-4 architecture (random
# weights): fp16 UNet 1.0e-3, VAE decoder 4.2e-3, VAE encoder 7.1e-4.
MAX_ABS_DIFF = {"fp32": 1e-3, "fp16": 2e-2}
# fp16 keeps the timestep in fp32: Euler-type schedulers use fractional timesteps fp16 would round.
FP32_INPUTS = frozenset({"timestep"})

COMPONENT_OF = {TEXT_ENCODER: "text_encoder", UNET: "unet", VAE_DECODER: "vae", VAE_ENCODER: "vae"}


class ExportError(RuntimeError):
    pass


class _TextEncoder(nn.Module):
    """CLIP's text encoder with A1111's clip skip N per row: the output of layer L - N + 1 of its L layers
    (N = 1: the last), through the final layer norm as the last layer's output goes. The layer is picked
    by a gather in the graph, so one batch can mix values."""

    def __init__(self, text_encoder: nn.Module) -> None:
        super().__init__()
        self.text_encoder = text_encoder
        # transformers 4 keeps it under `text_model`, transformers 5 on the model itself.
        text_model = getattr(text_encoder, "text_model", text_encoder)
        self.final_layer_norm = text_model.get_submodule("final_layer_norm")

    def forward(self, input_ids: torch.Tensor, clip_skip: torch.Tensor) -> torch.Tensor:
        hidden = self.text_encoder(input_ids.to(torch.int64), output_hidden_states=True).hidden_states
        layers = torch.stack(hidden[1:], dim=1)  # [B, L, 77, D]; hidden[0] is the token embedding
        num_layers = len(hidden) - 1
        # The pipeline rejects values outside 1..L; the clamp keeps a direct call to the engine inside
        # the stack (TensorRT does not bounds-check gathers).
        index = (num_layers - clip_skip.to(torch.int64)).clamp(0, num_layers - 1)  # [B, 1]
        index = index[:, :, None, None].expand(-1, -1, *layers.shape[2:])
        return self.final_layer_norm(layers.gather(1, index).squeeze(1))


class _UNet(nn.Module):
    def __init__(self, unet: nn.Module) -> None:
        super().__init__()
        self.unet = unet

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        # timestep is [batch, 1] so that Triton can batch it like the other inputs.
        return self.unet(sample, timestep.reshape(-1), encoder_hidden_states=text, return_dict=False)[0]


class _VaeDecoder(nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]


class _VaeEncoder(nn.Module):
    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dist = self.vae.encode(image).latent_dist
        return dist.mean, dist.std


class _Fp16(nn.Module):
    """The module in fp16 behind fp32 inputs and outputs: a strongly typed TensorRT network takes its
    precision from the ONNX graph, while the engine's interface stays the same as the fp32 one."""

    def __init__(self, module: nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.module = copy.deepcopy(module).half()  # the fp32 module is still needed for the check
        self.input_names = input_names

    def forward(self, *inputs: torch.Tensor) -> Any:
        cast = [
            x.half() if x.is_floating_point() and name not in FP32_INPUTS else x
            for x, name in zip(inputs, self.input_names, strict=True)
        ]
        out = self.module(*cast)
        return tuple(o.float() for o in out) if isinstance(out, tuple) else out.float()


def read_geometry(checkpoint: Path) -> ModelGeometry:
    """The checkpoint's fixed sizes, from its component configs (no weights loaded)."""

    def config(component: str) -> dict:
        return json.loads((checkpoint / component / "config.json").read_text())

    unet, vae, text = config("unet"), config("vae"), config("text_encoder")
    return ModelGeometry(
        unet_in_channels=unet["in_channels"],
        latent_channels=vae["latent_channels"],
        text_hidden_size=text["hidden_size"],
        text_layers=text["num_hidden_layers"],
        vae_scaling_factor=float(vae.get("scaling_factor", 0.18215)),
        unet_block_channels=tuple(unet["block_out_channels"]),
        unet_layers_per_block=unet["layers_per_block"],
    )


class ModuleLoader:
    """Loads a checkpoint's torch modules on first use, so a fully cached build loads none."""

    def __init__(self, checkpoint: Path, extra_tokens: torch.Tensor | None = None) -> None:
        self.checkpoint = checkpoint
        # Textual-inversion vectors [n, D]: appended to the text encoder's token-embedding table, as ids
        # vocab_size.. (build_engines.embeddings says why there).
        self.extra_tokens = extra_tokens
        self._loaded: dict[str, nn.Module] = {}

    def component(self, component: str) -> nn.Module:
        from diffusers import AutoencoderKL, UNet2DConditionModel
        from transformers import CLIPTextModel

        if component not in self._loaded:
            classes = {"unet": UNet2DConditionModel, "vae": AutoencoderKL, "text_encoder": CLIPTextModel}
            cls = classes[component]
            model = cls.from_pretrained(self.checkpoint, subfolder=component).eval()
            if component == "text_encoder" and self.extra_tokens is not None and len(self.extra_tokens):
                table = model.get_input_embeddings()
                vocab = table.num_embeddings
                model.resize_token_embeddings(vocab + len(self.extra_tokens))
                with torch.no_grad():
                    model.get_input_embeddings().weight[vocab:] = self.extra_tokens
            self._loaded[component] = model
        return self._loaded[component]

    def module(self, engine: str) -> nn.Module:
        wrapper = {
            TEXT_ENCODER: _TextEncoder,
            UNET: _UNet,
            VAE_DECODER: _VaeDecoder,
            VAE_ENCODER: _VaeEncoder,
        }
        return wrapper[engine](self.component(COMPONENT_OF[engine]))


def sample_inputs(spec: EngineSpec, sizes: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """Random inputs for `spec` with each dynamic axis set from `sizes`."""
    rng = np.random.default_rng(seed)
    sizes = with_scaled_latents(sizes)
    out: dict[str, np.ndarray] = {}
    for tensor in spec.inputs:
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in tensor.dims)
        if tensor.value_range is not None:
            # Distinct values while there are enough of them, so that one batch mixes several.
            low, high = tensor.value_range
            values = rng.permutation(np.arange(low, high + 1, dtype=np.int32))
            out[tensor.name] = np.resize(values, shape)
        elif tensor.dtype == np.int32:  # token ids
            out[tensor.name] = rng.integers(0, 49406, size=shape, dtype=np.int32)
        elif tensor.name == "timestep":
            out[tensor.name] = rng.uniform(0, 999, size=shape).astype(np.float32)
        else:
            out[tensor.name] = rng.standard_normal(shape, dtype=np.float32)
    return out


# The export traces at these sizes. Latent sides not divisible by 8 make the UNet trace take
# diffusers' explicit-upsample-size path, which is correct for every size (a multiple of 8 would
# bake in plain 2x upsampling and break odd sizes). Batch 2 keeps batch-1 specialisation out.
TRACE_SIZES = {
    "batch": 2,
    "guided_batch": 2,
    "text_rows": 2,
    "latent_height": 12,
    "latent_width": 10,
    "height": 96,
    "width": 80,
    "text_sequence": TOKENS_PER_CHUNK,
}
# ...and are checked at other sizes, to prove the axes are dynamic.
CHECK_SIZES = {
    "batch": 1,
    "guided_batch": 3,
    "text_rows": 3,
    "latent_height": 8,
    "latent_width": 16,
    "height": 64,
    "width": 128,
    "text_sequence": 2 * TOKENS_PER_CHUNK,  # long prompts: the UNet takes 77·k text tokens
}


@dataclass(frozen=True)
class ExportResult:
    path: Path
    max_abs_diff: float
    reused: bool


def export_engine(
    spec: EngineSpec,
    module: Callable[[], nn.Module],
    source_digest: str,
    out_dir: Path,
    precision: str = "fp32",
) -> ExportResult:
    """Write out_dir/model.onnx for one engine unless an up-to-date one is there; check it vs torch.

    fp16 exports compute in fp16 behind fp32 inputs and outputs, and are checked against the fp32
    torch module.
    """
    target = out_dir / "model.onnx"
    sidecar = out_dir / "model.onnx.json"
    key = export_key(spec, source_digest, precision=precision)
    kept = kept_export(out_dir, key)
    if kept is not None:
        return kept

    model = module()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in (target, sidecar, out_dir / EXTERNAL_DATA):
        stale.unlink(missing_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        raw = Path(tmp) / "model.onnx"
        exported = _Fp16(model, [t.name for t in spec.inputs]) if precision == "fp16" else model
        _torch_export(spec, exported, raw)
        _save_checked(spec, raw, target)
    diff = check_against_torch(spec, model, target)
    if diff > MAX_ABS_DIFF[precision]:
        raise ExportError(
            f"{spec.name}: {precision} ONNX Runtime differs from fp32 torch by {diff:.2e} "
            f"(limit {MAX_ABS_DIFF[precision]:.0e})"
        )
    sidecar.write_text(json.dumps({"key": key, "max_abs_diff": diff}, indent=2) + "\n")
    return ExportResult(target, diff, reused=False)


def export_key(spec: EngineSpec, source_digest: str, **settings: Any) -> dict[str, Any]:
    """What an export is made from, recorded in its sidecar: a later build with the same key keeps it."""
    return {
        "source_sha256": source_digest,
        **settings,
        "opset": OPSET,
        "export_format": EXPORT_FORMAT,
        "torch": torch.__version__.split("+")[0],
        # The graph declares these dims (axis names included), which the configs and profiles are built from.
        "dims": {t.name: list(t.dims) for t in (*spec.inputs, *spec.outputs)},
    }


def kept_export(out_dir: Path, key: dict[str, Any]) -> ExportResult | None:
    """out_dir's model.onnx when its sidecar records `key`, else None."""
    target, sidecar = out_dir / "model.onnx", out_dir / "model.onnx.json"
    if target.exists() and sidecar.exists():
        recorded = json.loads(sidecar.read_text())
        if recorded.get("key") == key:
            return ExportResult(target, recorded["max_abs_diff"], reused=True)
    return None


def _torch_export(
    spec: EngineSpec, model: nn.Module, path: Path, sizes: dict[str, int] | None = None
) -> None:
    # sizes: trace sizes of axes TRACE_SIZES lacks (build_engines.lora_branch: a rank axis per target).
    inputs = sample_inputs(spec, {**TRACE_SIZES, **(sizes or {})})
    args = tuple(torch.from_numpy(inputs[t.name]) for t in spec.inputs)
    names = [t.name for t in (*spec.inputs, *spec.outputs)]
    dynamic_axes = {t.name: t.dynamic_axes for t in (*spec.inputs, *spec.outputs)}
    # Tracer and exporter warnings (python branches on shapes, the legacy exporter's deprecation)
    # are expected here; check_against_torch proves the result at other shapes.
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            args,
            str(path),
            input_names=[t.name for t in spec.inputs],
            output_names=[t.name for t in spec.outputs],
            dynamic_axes={n: dynamic_axes[n] for n in names},
            opset_version=OPSET,
            do_constant_folding=True,
            dynamo=False,  # the TorchScript exporter handles diffusers' data-dependent shapes
        )


def _save_checked(spec: EngineSpec, raw: Path, target: Path) -> None:
    """Clean the graph up, name its axes as `spec` does, save (one external data file past protobuf's
    2 GB) and check it. The cleanup (constant folding, dead nodes, topological order) is what TensorRT's
    ONNX parser expects; it changes no result, which check_against_torch then shows."""
    size = sum(f.stat().st_size for f in raw.parent.iterdir() if f.is_file())
    graph = gs.import_onnx(onnx.load(str(raw), load_external_data=True))
    graph.fold_constants().cleanup().toposort()
    model = gs.export_onnx(graph)
    declared = {v.name: v for v in (*model.graph.input, *model.graph.output)}
    for tensor in (*spec.inputs, *spec.outputs):
        dims = declared[tensor.name].type.tensor_type.shape.dim
        for dim, value in zip(dims, tensor.dims, strict=True):
            if isinstance(value, str):
                dim.dim_param = value
            else:
                dim.dim_value = value
    if size < PROTOBUF_LIMIT:
        onnx.save_model(model, str(target))
    else:
        onnx.save_model(
            model,
            str(target),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=EXTERNAL_DATA,
            size_threshold=1024,
        )
        # onnx writes the data file owner-only; the server may run as another user than the build.
        (target.parent / EXTERNAL_DATA).chmod(0o644)
    onnx.checker.check_model(str(target), full_check=True)


def check_against_torch(spec: EngineSpec, model: nn.Module, path: Path) -> float:
    """Max abs difference between ONNX Runtime and torch on random inputs at non-trace sizes."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    inputs = sample_inputs(spec, CHECK_SIZES, seed=1)
    got = session.run([t.name for t in spec.outputs], inputs)
    with torch.inference_mode():
        expected = model(*(torch.from_numpy(inputs[t.name]) for t in spec.inputs))
    if isinstance(expected, torch.Tensor):
        expected = (expected,)
    return max(float(np.max(np.abs(g - e.numpy()))) for g, e in zip(got, expected, strict=True))
