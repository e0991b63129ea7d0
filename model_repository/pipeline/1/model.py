"""Triton python models `pipeline` and `pipeline_stream` (decoupled: chosen by config): request tensors →
the denoising core (over BLS) → images + info. The stream also sends progress after every step (and a
preview every `preview_every` steps); both stop the denoising loop when the client cancels.

One instance generates up to `max_concurrent_requests` requests at once, each in a worker thread that
answers through the request's response sender (allowed for non-decoupled models too: one final
response). Threads, not instances: the torch and diffusers of a process cost ~250 MB. Their UNet calls
meet in the UNet's dynamic batcher.
"""

import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend.bls import BlsEngines
from python_backend.metrics import PipelineMetrics
from python_backend.pipeline import Cancelled, PipelineAssets, generate
from python_backend.previews import preview_png
from python_backend.request import REQUEST_INPUTS, STREAM_INPUTS, InvalidInput, request_from_inputs

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.assets = PipelineAssets.load(Path(args["model_repository"]) / args["model_version"])
        manifest = self.assets.manifest
        self.engines = BlsEngines(manifest.geometry, manifest.device)
        self.logger = pb_utils.Logger
        self.metrics = PipelineMetrics(pb_utils, config["name"])
        self.streaming = pb_utils.using_decoupled_model_transaction_policy(config)
        workers = int(config["parameters"]["max_concurrent_requests"]["string_value"])
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="generate")
        self.free_workers = threading.BoundedSemaphore(workers)

    def execute(self, requests):
        for request in requests:
            # Block while every worker is busy: later requests then wait in Triton's queue, where its
            # queue metrics (and an autoscaler reading them) see them.
            self.free_workers.acquire()
            self.pool.submit(self._serve, request)
        return None

    def finalize(self):
        self.pool.shutdown(wait=True)

    def _serve(self, request):
        try:
            sender = request.get_response_sender()
            sender.send(self._respond(request, sender if self.streaming else None), flags=FINAL)
        finally:
            self.free_workers.release()

    def _respond(self, request, sender):
        inputs = {}
        for name in (*REQUEST_INPUTS, *STREAM_INPUTS):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                inputs[name] = tensor.as_numpy()
        preview_every = int(inputs.pop("preview_every", [0])[0])

        steps = 0

        def on_step(progress):
            nonlocal steps
            steps = progress.step
            if request.is_cancelled():  # the client went away (stream cancelled, timeout): stop now
                raise Cancelled
            if sender is None:
                return
            status = {
                "step": progress.step,
                "total": progress.total,
                "elapsed_s": round(progress.elapsed_s, 3),
            }
            tensors = [pb_utils.Tensor("progress", np.array([json.dumps(status).encode()], dtype=np.object_))]
            if preview_every > 0 and progress.step % preview_every == 0:
                preview = np.array([preview_png(progress.latents)], dtype=np.object_)
                tensors.append(pb_utils.Tensor("preview", preview))
            sender.send(pb_utils.InferenceResponse(output_tensors=tensors))

        try:
            result = generate(request_from_inputs(inputs), self.engines, self.assets, on_step)
        except InvalidInput as e:
            self.metrics.failed("invalid_input")
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError(str(e), pb_utils.TritonError.INVALID_ARG)
            )
        except Cancelled:
            self.metrics.cancelled()
            return pb_utils.InferenceResponse(
                error=pb_utils.TritonError("cancelled", pb_utils.TritonError.CANCELLED)
            )
        except Exception as e:  # one failed request must not fail the others
            self.logger.log_error(f"pipeline: request failed: {e!r}")
            self.metrics.failed("error")
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"generation failed: {e}"))
        self.metrics.generated(len(result.images), steps, result.info["timings_ms"])
        info = np.array([json.dumps(result.info).encode()], dtype=np.object_)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("images", result.images), pb_utils.Tensor("info", info)]
        )
