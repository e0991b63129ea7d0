"""Triton python model hosting one engine: an ONNX file (model.onnx beside this file) on ONNX Runtime, an
OpenVINO IR (model.xml) on OpenVINO, or a TensorRT plan (model.plan) on the instance's GPU.

build-engines copies this file into text_encoder/, unet/, vae_decoder/ and vae_encoder/ for the `onnx` and
`openvino` targets (the pip-installed Triton has neither an onnxruntime nor an openvino backend), and into
text_encoder/ and unet/ for a `tensorrt` target with LoRA (Triton's tensorrt backend runs a plan as it is).
Input and output names come from the model's config.pbtxt, and an OpenVINO engine's precision and shape
policy from its parameters.

A text encoder or UNet built with LoRA branches (build-engines --lora) also takes `lora`, each row's
LoRA set (python_backend/adapters.py): this process compiles each set once, keeps it within the LoRA
cache (sd-serve --lora-cache-mb), and feeds each row's factors to the graph's branch inputs, so that
rows of different sets, and rows with none, share one run (python_backend/ort_sessions.py,
python_backend/trt_sessions.py).
"""

import json
import os
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend.adapters import DEFAULT_CACHE_BYTES, LORA_CACHE_ENV, LORA_INPUT
from python_backend.shapes import LORA_DIR_ENV, OPEN_ON_FIRST_REQUEST, OPENVINO_CACHE_ENV


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.name = config["name"]
        self.inputs = [t["name"] for t in config["input"] if t["name"] != LORA_INPUT]
        self.outputs = [t["name"] for t in config["output"]]
        self.args, self.config, self.sessions = args, config, None
        # An engine only some requests use (the VAE encoder: img2img, inpainting) opens with the first of
        # them, so that a server whose clients never send images does not hold it (build-engines says so).
        if config["parameters"].get(OPEN_ON_FIRST_REQUEST, {}).get("string_value") != "true":
            self.sessions = self._open()

    def _open(self):
        args, config = self.args, self.config
        component = config["parameters"].get("lora_component", {}).get("string_value")
        folder, cache = os.environ.get(LORA_DIR_ENV), os.environ.get(LORA_CACHE_ENV)
        version = Path(args["model_repository"]) / args["model_version"]
        lora_dir, cache_bytes = Path(folder) if folder else None, int(cache) if cache else DEFAULT_CACHE_BYTES
        if (version / "model.plan").exists():
            import torch

            from python_backend.trt_sessions import PlanSessions

            device = torch.device("cuda", int(args["model_instance_device_id"]))
            sessions = PlanSessions(version, device, component, lora_dir, cache_bytes)
        elif (version / "model.xml").exists():
            from python_backend.ov_sessions import RELEASE_AFTER_RUN, OpenVinoSessions

            parameters = {key: value["string_value"] for key, value in config["parameters"].items()}
            cache_dir = os.environ.get(OPENVINO_CACHE_ENV)
            sessions = OpenVinoSessions(
                version,
                parameters["precision"],
                component,
                lora_dir,
                cache_bytes,
                shapes=parameters["shapes"],
                compiled_limit=int(parameters["compiled_shapes"]),
                cache_dir=Path(cache_dir) if cache_dir else None,
                release_after_run=parameters.get(RELEASE_AFTER_RUN) == "true",
            )
        else:
            from python_backend.ort_sessions import EngineSessions

            # spinning=False: four engine processes share the cores
            sessions = EngineSessions(version, component, lora_dir, cache_bytes, spinning=False)
        assert sessions.outputs == self.outputs, (sessions.outputs, self.outputs)
        return sessions

    def execute(self, requests):
        """Triton's dynamic batcher may hand over several requests (same shapes but the batch axis): one
        session run over their concatenation, split back by each request's batch size."""
        if self.sessions is None:  # one execute at a time: opened once
            self.sessions = self._open()
        responses = [None] * len(requests)
        keys = {}  # request index → its rows' LoRA set keys
        for i, request in enumerate(requests):
            try:
                keys[i] = self._lora_keys(request)
                self.sessions.check(keys[i])
            except ValueError as e:  # a set that cannot be compiled fails its own request only
                responses[i] = _error(f"{self.name}: {e}")
        running = [i for i in range(len(requests)) if responses[i] is None]
        if not running:
            return responses
        feeds = {
            name: [pb_utils.get_input_tensor_by_name(requests[i], name).as_numpy() for i in running]
            for name in self.inputs
        }
        sizes = [len(array) for array in feeds[self.inputs[0]]]
        try:
            batch = {name: np.concatenate(parts) for name, parts in feeds.items()}
            arrays = self.sessions.run(batch, [key for i in running for key in keys[i]])
        except Exception as e:  # e.g. a shape outside what the graph accepts: fail these requests only
            for i in running:
                responses[i] = _error(f"{self.name}: {e}")
            return responses
        bounds = np.cumsum(sizes)[:-1]
        per_request = zip(*(np.split(array, bounds) for array in arrays), strict=True)
        for i, parts in zip(running, per_request, strict=True):
            tensors = [pb_utils.Tensor(name, part) for name, part in zip(self.outputs, parts, strict=True)]
            responses[i] = pb_utils.InferenceResponse(output_tensors=tensors)
        return responses

    def _lora_keys(self, request):
        rows = len(pb_utils.get_input_tensor_by_name(request, self.inputs[0]).as_numpy())
        tensor = pb_utils.get_input_tensor_by_name(request, LORA_INPUT)
        if tensor is None:
            return [""] * rows
        return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in tensor.as_numpy().reshape(-1)]


def _error(message):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
