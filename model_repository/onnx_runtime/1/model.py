"""Triton python model hosting one ONNX engine (model.onnx beside this file) on ONNX Runtime.

build-engines copies this file into text_encoder/, unet/, vae_decoder/ and vae_encoder/ for the
`onnx` target: the pip-installed Triton has no onnxruntime backend. Input and output names come
from the model's config.pbtxt.
"""

import json
from pathlib import Path

import onnxruntime as ort
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.inputs = [t["name"] for t in config["input"]]
        self.outputs = [t["name"] for t in config["output"]]
        path = Path(args["model_repository"]) / args["model_version"] / "model.onnx"
        options = ort.SessionOptions()
        # Four engine processes share the cores: threads that spin after a run starve the next engine.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    def execute(self, requests):
        responses = []
        for request in requests:
            feeds = {
                name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.inputs
            }
            try:
                arrays = self.session.run(self.outputs, feeds)
            except Exception as e:  # e.g. a shape outside what the graph accepts: fail this request only
                responses.append(pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{self.name}: {e}")))
                continue
            tensors = [pb_utils.Tensor(name, array) for name, array in zip(self.outputs, arrays, strict=True)]
            responses.append(pb_utils.InferenceResponse(output_tensors=tensors))
        return responses
