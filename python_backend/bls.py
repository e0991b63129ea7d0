"""`Engines` over Triton BLS: each engine is a model in the same server. Importable only inside Triton."""

from __future__ import annotations

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend.engines import EngineError, Engines
from python_backend.shapes import ModelGeometry, engine_specs


class BlsEngines(Engines):
    def __init__(self, geometry: ModelGeometry) -> None:
        self._outputs = {
            name: [t.name for t in spec.outputs] for name, spec in engine_specs(geometry).items()
        }

    def run(self, engine: str, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        outputs = self._outputs[engine]
        request = pb_utils.InferenceRequest(
            model_name=engine,
            requested_output_names=outputs,
            inputs=[pb_utils.Tensor(name, array) for name, array in inputs.items()],
        )
        response = request.exec()
        if response.has_error():
            raise EngineError(f"{engine}: {response.error().message()}")
        return {name: pb_utils.get_output_tensor_by_name(response, name).as_numpy() for name in outputs}
