"""Triton python model `pipeline`: request tensors → the denoising core (over BLS) → images + info."""

import json
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend.bls import BlsEngines
from python_backend.pipeline import PipelineAssets, generate
from python_backend.request import REQUEST_INPUTS, InvalidInput, request_from_inputs


class TritonPythonModel:
    def initialize(self, args):
        self.assets = PipelineAssets.load(Path(args["model_repository"]) / args["model_version"])
        manifest = self.assets.manifest
        self.engines = BlsEngines(manifest.geometry, manifest.device)
        self.logger = pb_utils.Logger

    def execute(self, requests):
        return [self._respond(request) for request in requests]

    def _respond(self, request):
        inputs = {}
        for name in REQUEST_INPUTS:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                inputs[name] = tensor.as_numpy()
        try:
            result = generate(request_from_inputs(inputs), self.engines, self.assets)
        except InvalidInput as e:
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
            )
        except Exception as e:  # one failed request must not fail the others in this batch
            self.logger.log_error(f"pipeline: request failed: {e!r}")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generation failed: {e}"))
        info = np.array([json.dumps(result.info).encode()], dtype=np.object_)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("images", result.images), pb_utils.Tensor("info", info)]
        )
