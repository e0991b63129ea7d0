"""Triton python model `pipeline_control`: asks a running generation to stop after its current step and
answer with what it has (A1111's interrupt and skip); python_backend.jobs says how. It answers at once:
its own process, never queued behind generations.

Inputs: `job_id` (the id a pipeline request was sent with), `action` ("interrupt", the default, or
"skip"). Output `found`: whether that job was running; false for one not started yet (or finished).
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend.jobs import JobBoard, job_id_from_input
from python_backend.request import InvalidInput


class TritonPythonModel:
    def initialize(self, args):
        self.jobs = JobBoard()

    def execute(self, requests):
        return [self._answer(request) for request in requests]

    def _answer(self, request):
        job_id = pb_utils.get_input_tensor_by_name(request, "job_id").as_numpy()
        action = pb_utils.get_input_tensor_by_name(request, "action")
        try:
            text = "interrupt" if action is None else _text(action.as_numpy())
            found = self.jobs.request_stop(job_id_from_input(job_id), text)
        except InvalidInput as e:
            error = pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
            return pb_utils.InferenceResponse(error=error)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("found", np.array([found]))])


def _text(array):
    if array.size != 1:
        raise InvalidInput("action", f"expected exactly one value, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
