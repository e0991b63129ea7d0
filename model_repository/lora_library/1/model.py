"""Triton python model `lora_library`: the LoRA files of this server's LoRA folder (sd-serve --lora-dir), as
A1111's GET /sdapi/v1/loras lists them; with `refresh` true the folder is scanned again first (A1111's POST
/sdapi/v1/refresh-loras). The pipelines find new files themselves (a prompt naming an unknown LoRA rescans),
so this model is for clients that list: sd-gateway.

Input: `refresh` (BOOL, optional). Output: `loras`, JSON: [{"name", "alias", "path", "metadata"}, ...].
"""

import json

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend.lora_library import LoraLibrary


class TritonPythonModel:
    def initialize(self, args):
        self.library = LoraLibrary.from_environment({})  # listing only: no file is checked against a model

    def execute(self, requests):
        responses = []
        for request in requests:
            refresh = pb_utils.get_input_tensor_by_name(request, "refresh")
            if refresh is not None and bool(refresh.as_numpy().reshape(-1)[:1].any()):
                self.library.refresh()
            listing = json.dumps(self.library.listing())
            tensor = pb_utils.Tensor("loras", np.array([listing.encode()], dtype=np.object_))
            responses.append(pb_utils.InferenceResponse(output_tensors=[tensor]))
        return responses
