"""The engines the denoising core calls, behind one small interface.

The same four models run in-process (`OnnxRuntimeEngines`, `OpenVinoEngines`: for tests and benchmarks)
or served (`BlsEngines`: Triton BLS calls to the engine models). Each only says how to run one
model; tensor names come from `shapes.engine_specs`. Tensors are torch tensors on `device`, so
the core keeps latents where the engines are (the GPU, for TensorRT engines).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from python_backend import adapters
from python_backend.shapes import (
    CONTROLNET,
    TEXT_ENCODER,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    ModelGeometry,
    engine_specs,
    residual_names,
)


class EngineError(RuntimeError):
    pass


class EngineUnavailable(EngineError):
    """The engine cannot run now but will again (its process died and is being reloaded, the server is
    stopping): the request is worth retrying, on this server or another."""


class Engines(ABC):
    """`lora`: the request's LoRA set for that engine (python_backend.adapters.encode_set; "" for none),
    which the text encoder and UNet engines of a LoRA-capable repository take with every call."""

    device = torch.device("cpu")

    @abstractmethod
    def run(self, engine: str, inputs: dict[str, torch.Tensor], lora: str = "") -> dict[str, torch.Tensor]:
        """Run one engine model on named inputs; return its named outputs."""

    def encode_text(self, input_ids: torch.Tensor, clip_skip: int = 1, lora: str = "") -> torch.Tensor:
        """CLIP embeddings of [B, 77] token ids; clip_skip as A1111's (1 = the last layer)."""
        skip = torch.full((input_ids.shape[0], 1), clip_skip, dtype=torch.int32, device=self.device)
        inputs = {"input_ids": input_ids.to(torch.int32), "clip_skip": skip}
        return self.run(TEXT_ENCODER, inputs, lora)["last_hidden_state"]

    def predict_noise(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        text_embeddings: torch.Tensor,
        lora: str = "",
        residuals: Sequence[torch.Tensor] = (),
    ) -> torch.Tensor:
        """`residuals`: ControlNet residuals, for a UNet built to take them (zeros where a row has none)."""
        inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": text_embeddings}
        inputs.update(zip(residual_names(len(residuals)), residuals, strict=True))
        return self.run(UNET, inputs, lora)["noise_pred"]

    def control(
        self,
        controlnet: str,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        text_embeddings: torch.Tensor,
        image: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """The residuals of ControlNet `controlnet` (its build-engines --controlnet name), unscaled, in the
        UNet's order: `image` is the control map, [rows, 3, H, W] in [0, 1]."""
        inputs = {
            "sample": sample,
            "timestep": timestep,
            "encoder_hidden_states": text_embeddings,
            "controlnet_cond": image,
        }
        return tuple(self.run(f"{CONTROLNET}_{controlnet}", inputs).values())

    def decode_latents(self, latent: torch.Tensor) -> torch.Tensor:
        return self.run(VAE_DECODER, {"latent": latent})["image"]

    def encode_image(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.run(VAE_ENCODER, {"image": image})
        return out["latent_mean"], out["latent_std"]


class _LocalEngines(Engines):
    """Engines run in this process, one LoraEngine (python_backend/adapters.py) per engine model."""

    _sessions: dict[str, adapters.LoraEngine]

    def run(self, engine: str, inputs: dict[str, torch.Tensor], lora: str = "") -> dict[str, torch.Tensor]:
        sessions = self._sessions[engine]
        feeds = {name: t.cpu().numpy() for name, t in inputs.items()}
        rows = next(iter(feeds.values())).shape[0]
        try:
            arrays = sessions.run(feeds, [lora] * rows)
        except ValueError as e:  # a LoRA set this engine cannot apply
            raise EngineError(f"{engine}: {e}") from None
        names = sessions.outputs
        return {name: torch.from_numpy(a).to(self.device) for name, a in zip(names, arrays, strict=True)}


def _engine_names(geometry: ModelGeometry, controlnets: Iterable[str]) -> list[str]:
    return [*engine_specs(geometry), *(f"{CONTROLNET}_{name}" for name in controlnets)]


class OnnxRuntimeEngines(_LocalEngines):
    """In-process ONNX Runtime sessions (CPU) over `<repository>/<engine>/1/model.onnx`.

    `device` is where the core keeps its tensors; a CUDA device there exercises the GPU path of the
    core with these CPU engines. `lora_dir`: the LoRA folder, for engines with LoRA branches.
    `controlnets`: the repository's ControlNet engines (build-engines --controlnet), by name.
    """

    def __init__(
        self,
        repository: Path,
        geometry: ModelGeometry,
        threads: int = 0,
        device: str = "cpu",
        lora_dir: Path | None = None,
        controlnets: Iterable[str] = (),
    ) -> None:
        from python_backend.ort_sessions import EngineSessions

        self.device = torch.device(device)
        self._sessions = {
            name: EngineSessions(
                repository / name / "1", adapters.COMPONENT_OF.get(name), lora_dir, threads=threads
            )
            for name in _engine_names(geometry, controlnets)
        }


class OpenVinoEngines(_LocalEngines):
    """In-process OpenVINO models (CPU) over `<repository>/<engine>/1/model.xml` (build-engines --target
    openvino), compiled at `precision` as the served engines compile them. `only`: open just these engines
    (build_engines/openvino_int8.py calibrates on the text encoder and UNet before the others exist)."""

    def __init__(
        self,
        repository: Path,
        geometry: ModelGeometry,
        precision: str,
        lora_dir: Path | None = None,
        controlnets: Iterable[str] = (),
        shapes: str = "static",
        cache_dir: Path | None = None,
        only: Iterable[str] | None = None,
    ) -> None:
        from python_backend.ov_sessions import OpenVinoSessions, runs_once_per_request

        names = _engine_names(geometry, controlnets) if only is None else list(only)

        self._sessions = {
            name: OpenVinoSessions(
                repository / name / "1",
                precision,
                adapters.COMPONENT_OF.get(name),
                lora_dir,
                shapes=shapes,
                cache_dir=cache_dir,
                release_after_run=runs_once_per_request(name),
            )
            for name in names
        }
