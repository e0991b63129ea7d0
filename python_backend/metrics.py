"""Pipeline metrics on Triton's metrics endpoint (:8002), beside Triton's own per-model ones.

`pb_utils` is passed in, so this module imports nothing of Triton's and the core stays free of it.
"""

from __future__ import annotations

from typing import Any

STAGES = ("text_encode", "denoise", "hires", "decode")
# Seconds: a tiny model's stage takes milliseconds, a 50-step 512 px image on a CPU minutes.
BUCKETS = [0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300]
FAILURE_REASONS = ("invalid_input", "error")


class PipelineMetrics:
    def __init__(self, pb_utils: Any, model: str) -> None:
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
        # A family must outlive its metrics (Triton deletes a family's series with it).
        self._families = (stage, rate, images, failed, cancelled)

    def generated(self, images: int, steps: int, timings_ms: dict[str, float]) -> None:
        for stage, metric in self._stages.items():
            if stage in timings_ms:
                metric.observe(timings_ms[stage] / 1000)
        denoising_s = (timings_ms.get("denoise", 0) + timings_ms.get("hires", 0)) / 1000
        if denoising_s > 0:
            self._steps_per_second.set(steps / denoising_s)
        self._images.increment(images)

    def failed(self, reason: str) -> None:
        self._failed[reason].increment(1)

    def cancelled(self) -> None:
        self._cancelled.increment(1)
