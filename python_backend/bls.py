"""`Engines` over Triton BLS: each engine is a model in the same server. Importable only inside Triton.

Tensors cross by DLPack, so with GPU engines they stay on the GPU between steps (a BLS output is
allocated where the called model produced it, unless the request sets preferred_memory); with CPU
engines the same code passes CPU tensors without copies.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import torch
import triton_python_backend_utils as pb_utils
from torch.utils import dlpack

from python_backend.adapters import LORA_INPUT
from python_backend.engines import EngineError, Engines, EngineUnavailable
from python_backend.shapes import CONTROLNET, ModelGeometry, control_residuals, engine_specs, triton_model

# What Triton 2.51 answers a BLS call whose model cannot run now: its stub died ("Stub process 'unet_0_0'
# is not healthy"), it is unloaded or reloading ("... has no available versions", "... is not ready"),
# or the server is stopping ("Server not ready"). BLS errors carry no usable code in 2.51 (they all
# arrive as INTERNAL), so the message is all there is to tell them from a failed run.
_UNAVAILABLE = re.compile(
    r"is not healthy|has no available versions|is not ready|Server not ready|unknown model|health mutex"
)


class BlsEngines(Engines):
    """`prefix`: the checkpoint's build-engines --prefix. The core names engines canonically (`unet`); their
    Triton models are `triton_model(prefix, engine)`, so checkpoints sharing a server never mix engines."""

    def __init__(
        self,
        geometry: ModelGeometry,
        device: str,
        prefix: str = "",
        lora_engines: Iterable[str] = (),
        controlnets: Iterable[str] = (),
    ) -> None:
        self.device = torch.device(device)
        self._lora_engines = frozenset(lora_engines)  # the engines with LoRA branches: they take `lora`
        self._outputs = {
            name: [t.name for t in spec.outputs] for name, spec in engine_specs(geometry).items()
        }
        residuals = [t.name for t in control_residuals(geometry)]
        self._outputs.update({f"{CONTROLNET}_{name}": residuals for name in controlnets})
        self._models = {name: triton_model(prefix, name) for name in self._outputs}

    def run(self, engine: str, inputs: dict[str, torch.Tensor], lora: str = "") -> dict[str, torch.Tensor]:
        outputs = self._outputs[engine]
        tensors = [
            pb_utils.Tensor.from_dlpack(name, dlpack.to_dlpack(t.contiguous())) for name, t in inputs.items()
        ]
        if engine in self._lora_engines:
            # Every call carries it, "" included: Triton batches only requests with the same inputs.
            rows = next(iter(inputs.values())).shape[0]
            tensors.append(pb_utils.Tensor(LORA_INPUT, np.full((rows, 1), lora.encode(), dtype=np.object_)))
        elif lora:
            raise EngineError(f"{self._models[engine]}: this engine has no LoRA branches")
        request = pb_utils.InferenceRequest(
            model_name=self._models[engine], requested_output_names=outputs, inputs=tensors
        )
        response = request.exec()
        if response.has_error():
            message = f"{self._models[engine]}: {response.error().message()}"
            raise (EngineUnavailable if _UNAVAILABLE.search(message) else EngineError)(message)
        return {
            name: dlpack.from_dlpack(pb_utils.get_output_tensor_by_name(response, name).to_dlpack()).to(
                self.device
            )
            for name in outputs
        }
