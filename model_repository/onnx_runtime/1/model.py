"""Triton python model hosting one ONNX engine (model.onnx beside this file) on ONNX Runtime.

build-engines copies this file into text_encoder/, unet/, vae_decoder/ and vae_encoder/ for the
`onnx` target: the pip-installed Triton has no onnxruntime backend. Input and output names come
from the model's config.pbtxt.
"""

import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils

from python_backend.ort_options import session_options


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        options = session_options(spinning=False)  # four engine processes share the cores
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        """Triton's dynamic batcher may hand over several requests (same shapes but the batch axis): one
        session run over their concatenation, split back by each request's batch size."""
        feeds = {
            name: [pb_utils.get_input_tensor_by_name(r, name).as_numpy() for r in requests]
            for name in self.inputs
        }
        sizes = [len(array) for array in feeds[self.inputs[0]]]
        try:
            arrays = self.session.run(
                self.outputs, {name: np.concatenate(parts) for name, parts in feeds.items()}
            )
        except (
            Exception
        ) as e:  # e.g. a shape outside what the graph accepts: fail these requests, not the model
            error = pb_utils.TritonError(f"{self.name}: {e}")
            return [pb_utils.InferenceResponse(error=error) for _ in requests]
        bounds = np.cumsum(sizes)[:-1]
        per_request = zip(*(np.split(array, bounds) for array in arrays), strict=True)
        return [
            pb_utils.InferenceResponse(
                output_tensors=[
                    pb_utils.Tensor(name, part) for name, part in zip(self.outputs, parts, strict=True)
                ]
            )
            for parts in per_request
        ]
