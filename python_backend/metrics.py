"""Pipeline metrics on Triton's metrics endpoint (:8002), beside Triton's own per-model ones.

`pb_utils` is passed in, so this module imports nothing of Triton's and the core stays free of it.
"""

from __future__ import annotations

import threading
from typing import Any

STAGES = ("text_encode", "denoise", "hires", "decode")
# Seconds: a tiny model's stage takes milliseconds, a 50-step 512 px image on a CPU minutes.
BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
FAILURE_REASONS = ("invalid_input", "unavailable", "timeout", "error")


class PipelineMetrics:
    """Updated from the pipeline's worker threads; `close()` in the model's `finalize()`.

    Updates are serialized: each one is an IPC message through the stub's shared memory, and the python
    backend does not document its metric calls as thread-safe.
    """

    def __init__(self, pb_utils: Any, model: str) -> None:
        self._lock = threading.Lock()
        family = pb_utils.MetricFamily
        labels = {"model": model}
        stage = family("sd_stage_duration_seconds", "Time per pipeline stage", kind=family.HISTOGRAM)
        self._stages = {s: stage.Metric(labels={**labels, "stage": s}, buckets=BUCKETS) for s in STAGES}
        rate = family(
            "sd_denoising_steps_per_second", "UNet steps per second of the last request", kind=family.GAUGE
        )
        self._steps_per_second = rate.Metric(labels=labels)
        images = family("sd_images_generated_total", "Images generated", kind=family.COUNTER)
        self._images = images.Metric(labels=labels)
        failed = family("sd_requests_failed_total", "Requests failed, by reason", kind=family.COUNTER)
        self._failed = {r: failed.Metric(labels={**labels, "reason": r}) for r in FAILURE_REASONS}
        cancelled = family(
            "sd_requests_cancelled_total", "Requests cancelled by the client", kind=family.COUNTER
        )
        self._cancelled = cancelled.Metric(labels=labels)
        # Triton's queue metrics stop counting a request once execute has it, but execute holds one while
        # every worker is busy: this counts it too (an autoscaler's load signal; sd-serve's drain waits
        # for it to reach 0).
        in_progress = family(
            "sd_requests_in_progress",
            "Requests taken from Triton's queue and not yet answered (generating or waiting for a worker)",
            kind=family.GAUGE,
        )
        self._in_progress = in_progress.Metric(labels=labels)
        self._in_progress_count = 0
        waiting = family(
            "sd_requests_waiting",
            "Requests taken from Triton's queue that wait for a free worker (Triton counts their wait as "
            "compute time, not queue time)",
            kind=family.GAUGE,
        )
        self._waiting = waiting.Metric(labels=labels)
        self._waiting_count = 0
        # A family must outlive its metrics (Triton deletes a family's series with it).
        self._families: tuple[Any, ...] = (stage, rate, images, failed, cancelled, in_progress, waiting)

    def close(self) -> None:
        """Release the series, then their families, while the stub can still tell Triton.

        Triton 2.51's stub crashes on exit (SIGSEGV in `Metric::SaveToSharedMemory`) when a family
        outlives the stub's shared memory, which is what happens to objects left for the interpreter's
        teardown; mid-traffic such a crash took the whole server down. Fixed upstream by
        triton-inference-server/python_backend#429 (`Stub::DestroyPythonObjects`), not in a release
        branch up to r26.07.
        """
        with self._lock:
            self._stages.clear()
            self._failed.clear()
            del self._steps_per_second, self._images, self._cancelled, self._in_progress, self._waiting
            self._families = ()

    def generated(self, images: int, steps: int, timings_ms: dict[str, float]) -> None:
        with self._lock:
            self._generated(images, steps, timings_ms)

    def _generated(self, images: int, steps: int, timings_ms: dict[str, float]) -> None:
        for stage, metric in self._stages.items():
            if stage in timings_ms:
                metric.observe(timings_ms[stage] / 1000)
        denoising_s = (timings_ms.get("denoise", 0) + timings_ms.get("hires", 0)) / 1000
        if denoising_s > 0:
            self._steps_per_second.set(steps / denoising_s)
        self._images.increment(images)

    def started(self) -> None:
        """A request taken from Triton's queue: it waits for a worker until `got_worker` or `finished`."""
        with self._lock:
            self._in_progress_count += 1
            self._in_progress.set(self._in_progress_count)
            self._waiting_count += 1
            self._waiting.set(self._waiting_count)

    def got_worker(self) -> None:
        with self._lock:
            self._waiting_count -= 1
            self._waiting.set(self._waiting_count)

    def finished(self, waited_in_vain: bool = False) -> None:
        """The request was answered; `waited_in_vain`: refused before it got a worker."""
        with self._lock:
            self._in_progress_count -= 1
            self._in_progress.set(self._in_progress_count)
            if waited_in_vain:
                self._waiting_count -= 1
                self._waiting.set(self._waiting_count)

    def failed(self, reason: str) -> None:
        with self._lock:
            self._failed[reason].increment(1)

    def cancelled(self) -> None:
        with self._lock:
            self._cancelled.increment(1)
