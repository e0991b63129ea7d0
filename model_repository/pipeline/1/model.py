"""Triton python models `pipeline` and `pipeline_stream` (decoupled: chosen by config): request tensors →
the denoising core (over BLS) → images + info. The stream also sends progress after every step (and a
preview every `preview_every` steps); both stop the denoising loop when the client cancels.

One instance generates up to `max_concurrent_requests` requests at once, each in a worker thread that
answers through the request's response sender (allowed for non-decoupled models too: one final
response). Threads, not instances: the torch and diffusers of a process cost ~250 MB. Their UNet calls
meet in the UNet's dynamic batcher.

A request's Triton `timeout` (microseconds, as every Triton client can send it) bounds its wait in the
queue (Triton's queue policy) and its generation: the denoising loop stops once it has run that long,
since Triton 2.51 does not cancel a unary request whose client gave up.

With the `open_on_first_request` parameter (build-engines sets it) the core (torch, diffusers, the tokenizer:
~300 MB) is imported with the first request, not at load: clients use one of `pipeline` and
`pipeline_stream` (the A1111 gateway the stream), and the other then holds ~30 MB. The first request waits
those few seconds once. Everything here that imports torch is therefore imported where it is used.
"""

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import triton_python_backend_utils as pb_utils

from python_backend.control import unit_inputs
from python_backend.jobs import JobBoard, job_id_from_input
from python_backend.metrics import PipelineMetrics
from python_backend.request import (
    CONTROL_INPUTS,
    REQUEST_INPUTS,
    STREAM_INPUTS,
    InvalidInput,
    request_from_inputs,
)
from python_backend.shapes import (
    DRAIN_FILE_ENV,
    LORA_DIR_ENV,
    OPEN_ON_FIRST_REQUEST,
    PIPELINE_MANIFEST,
    TEXT_ENCODER,
    UNET,
    PipelineManifest,
)

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        config = json.loads(args["model_config"])
        self.folder = Path(args["model_repository"]) / args["model_version"]
        manifest = PipelineManifest.read(self.folder / PIPELINE_MANIFEST)
        self.unit_inputs = list(unit_inputs(manifest.controlnet_units))  # controlnet_{i}_{field}
        self.logger = pb_utils.Logger
        self.metrics = PipelineMetrics(pb_utils, config["name"])
        self.streaming = pb_utils.using_decoupled_model_transaction_policy(config)
        workers = int(config["parameters"]["max_concurrent_requests"]["string_value"])
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="generate")
        self.free_workers = threading.BoundedSemaphore(workers)
        # sd-serve creates this file when it starts a graceful stop: new requests are refused from then on.
        self.drain_file = os.environ.get(DRAIN_FILE_ENV)
        self.jobs = JobBoard()  # requests with a job_id stop early when pipeline_control asks
        self.assets = self.engines = None
        if config["parameters"].get(OPEN_ON_FIRST_REQUEST, {}).get("string_value") != "true":
            self._open_core()

    def _open_core(self):
        from python_backend.bls import BlsEngines
        from python_backend.pipeline import PipelineAssets

        lora_dir = os.environ.get(LORA_DIR_ENV)  # sd-serve --lora-dir
        assets = PipelineAssets.load(self.folder, Path(lora_dir) if lora_dir else None)
        manifest = assets.manifest
        lora_engines = (TEXT_ENCODER, UNET) if assets.loras is not None else ()
        self.engines = BlsEngines(
            manifest.geometry, manifest.device, manifest.prefix, lora_engines, manifest.controlnets
        )
        self.assets = assets

    def execute(self, requests):
        for request in requests:
            if self.drain_file and os.path.exists(self.drain_file):
                self.metrics.failed("unavailable")
                _refuse(
                    request, "unavailable: the server is shutting down; retry (another replica will take it)"
                )
                continue
            if self.assets is None:  # here, not in a worker: requests after this one wait in Triton's queue
                try:
                    self._open_core()
                except Exception as e:
                    self.logger.log_error(f"pipeline: could not open its core: {e!r}")
                    self.metrics.failed("error")
                    request.get_response_sender().send(
                        _error(
                            f"the pipeline could not load its tokenizer and scheduler ({e}); the server's "
                            "log says why: fix the model repository and reload the model"
                        ),
                        flags=FINAL,
                    )
                    continue
            timeout_s = request.timeout() / 1e6
            deadline = time.monotonic() + timeout_s if timeout_s > 0 else None
            self.metrics.started()
            # Block while every worker is busy: later requests then wait in Triton's queue, where its
            # queue policy bounds them and its queue metrics (and an autoscaler reading them) see them.
            wait = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not self.free_workers.acquire(timeout=wait):
                self.metrics.finished(waited_in_vain=True)
                self.metrics.failed("unavailable")
                _refuse(
                    request,
                    f"unavailable: no worker was free within the request's timeout of {timeout_s:g} s (the "
                    "server is busy); retry later or on another server",
                )
                continue
            self.metrics.got_worker()
            self.pool.submit(self._serve, request, deadline)
        return None

    def finalize(self):
        self.pool.shutdown(wait=True)
        self.metrics.close()  # now, not in the interpreter's teardown (see PipelineMetrics.close)

    def _serve(self, request, deadline):
        try:
            sender = request.get_response_sender()
            response = self._respond(request, sender if self.streaming else None, deadline)
            sender.send(response, flags=FINAL)
        finally:
            self.free_workers.release()
            self.metrics.finished()

    def _respond(self, request, sender, deadline):
        inputs = {}
        for name in (*REQUEST_INPUTS, *self.unit_inputs, *STREAM_INPUTS, *CONTROL_INPUTS):
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is not None:
                inputs[name] = tensor.as_numpy()
        preview_every = int(inputs.pop("preview_every", [0])[0])
        job_id = inputs.pop("job_id", None)
        try:
            if job_id is None:
                return self._generate(request, inputs, sender, deadline, preview_every, None)
            with self.jobs.running(job_id_from_input(job_id)) as job:
                return self._generate(request, inputs, sender, deadline, preview_every, job)
        except InvalidInput as e:  # a bad job_id
            self.metrics.failed("invalid_input")
            return _error(str(e), pb_utils.TritonError.INVALID_ARG)

    def _generate(self, request, inputs, sender, deadline, preview_every, job):
        from python_backend.engines import EngineUnavailable
        from python_backend.pipeline import Cancelled, Interrupted, generate
        from python_backend.previews import preview_png

        steps, timed_out = 0, False

        def on_step(progress):
            nonlocal steps, timed_out
            steps = progress.step
            if request.is_cancelled():  # the client went away (stream cancelled, timeout): stop now
                raise Cancelled
            if deadline is not None and time.monotonic() > deadline:
                timed_out = True
                raise Cancelled
            if job is not None and job.stop_requested():
                raise Interrupted  # the core decodes what it has and answers with it
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
            return _error(str(e), pb_utils.TritonError.INVALID_ARG)
        except EngineUnavailable as e:
            self.metrics.failed("unavailable")
            return _error(
                f"unavailable: {e}; the server is restarting that engine or stopping: retry in a few seconds",
                pb_utils.TritonError.UNAVAILABLE,
            )
        except Cancelled:
            if not timed_out:
                self.metrics.cancelled()
                return _error("cancelled", pb_utils.TritonError.CANCELLED)
            # Triton 2.51 has no DEADLINE_EXCEEDED code; the client's own deadline (sd-client --timeout
            # sets both) gives it that status, and the message says which limit it was.
            self.metrics.failed("timeout")
            return _error(
                f"timeout: the request's timeout of {request.timeout() / 1e6:g} s passed after {steps} "
                "denoising step(s); send a longer timeout, or fewer steps or a smaller size",
                pb_utils.TritonError.CANCELLED,
            )
        except Exception as e:  # one failed request must not fail the others
            self.logger.log_error(f"pipeline: request failed: {e!r}")
            self.metrics.failed("error")
            return _error(f"generation failed (a bug: please report it with the request): {e}")
        self.metrics.generated(len(result.images), steps, result.info["timings_ms"])
        info = np.array([json.dumps(result.info).encode()], dtype=np.object_)
        return pb_utils.InferenceResponse(
            output_tensors=[pb_utils.Tensor("images", result.images), pb_utils.Tensor("info", info)]
        )


def _refuse(request, message):
    """Answer a request that will not be generated: UNAVAILABLE, which clients retry (later, elsewhere)."""
    request.get_response_sender().send(_error(message, pb_utils.TritonError.UNAVAILABLE), flags=FINAL)


def _error(message, code=None):
    # pb_utils.TritonError exists only once the stub has set the module up, not at import.
    error = pb_utils.TritonError(message, pb_utils.TritonError.INTERNAL if code is None else code)
    return pb_utils.InferenceResponse(error=error)
