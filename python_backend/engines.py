"""The engines the denoising core calls, behind one small interface.

Two implementations run the same four models: `OnnxRuntimeEngines` (in-process sessions, for tests
and benchmarks) and `BlsEngines` (Triton BLS calls to the engine models). Both only say how to run
one model; tensor names come from `shapes.engine_specs`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path

import numpy as np

from python_backend.shapes import TEXT_ENCODER, UNET, VAE_DECODER, VAE_ENCODER, ModelGeometry, engine_specs


class EngineError(RuntimeError):
    pass


class Engines(ABC):
    @abstractmethod
    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run one engine model on named inputs; return its named outputs."""

    def encode_text(self, input_ids: np.ndarray) -> np.ndarray:
        return self.run(TEXT_ENCODER, {"input_ids": input_ids.astype(np.int32)})["last_hidden_state"]

    def predict_noise(
        self, sample: np.ndarray, timestep: np.ndarray, text_embeddings: np.ndarray
    ) -> np.ndarray:
        inputs = {"sample": sample, "timestep": timestep, "encoder_hidden_states": text_embeddings}
        return self.run(UNET, inputs)["noise_pred"]

    def decode_latents(self, latent: np.ndarray) -> np.ndarray:
        return self.run(VAE_DECODER, {"latent": latent})["image"]

    def encode_image(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.run(VAE_ENCODER, {"image": image})
        return out["latent_mean"], out["latent_std"]


class OnnxRuntimeEngines(Engines):
    """In-process ONNX Runtime sessions over `<repository>/<engine>/1/model.onnx`."""

    def __init__(self, repository: Path, geometry: ModelGeometry, threads: int = 0) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        self._sessions = {
            name: ort.InferenceSession(
                str(repository / name / "1" / "model.onnx"), options, providers=["CPUExecutionProvider"]
            )
            for name in engine_specs(geometry)
        }

    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        session = self._sessions[engine]
        names = [o.name for o in session.get_outputs()]
        return dict(zip(names, session.run(names, inputs), strict=True))
