"""The generations this gateway is running, as /sdapi/v1/progress, /interrupt and /skip see them.

A1111 runs one job at a time: progress reports it, interrupt and skip reach it. The gateway runs its
requests concurrently, so progress reports the oldest running one (clients wait for `progress == 0 and
job_count == 0`, which holds once none runs) and interrupt / skip reach every one running, as A1111's reach
everything it is running. A job is one txt2img/img2img request: `n_iter` pipeline calls, each sent with
its own job id, which `pipeline_control` stops (python_backend.jobs).
"""

from __future__ import annotations

import base64
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Job:
    kind: str  # A1111's state.job: "scripts_txt2img" or "scripts_img2img"
    job_count: int  # pipeline calls (A1111's n_iter)
    started: float = field(default_factory=time.time)
    job_no: int = 0  # the call running, from 0
    sampling_step: int = 0
    sampling_steps: int = 0
    preview: bytes | None = None  # the latest preview PNG
    call_id: str | None = None  # the running call's job id
    interrupted: bool = False  # no more calls; the running one stops after its step
    skipped: bool = False  # the running call stops after its step; the next ones run
    # The stop asked of the running call and not yet confirmed by pipeline_control: asked again at its next
    # progress report (a call still waiting in Triton's queue has no running job to find).
    pending_stop: str | None = None

    @property
    def timestamp(self) -> str:
        return time.strftime("%Y%m%d%H%M%S", time.localtime(self.started))


class Jobs:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._running: list[Job] = []

    @contextmanager
    def track(self, kind: str, job_count: int) -> Iterator[Job]:
        job = Job(kind, job_count)
        with self._lock:
            self._running.append(job)
        try:
            yield job
        finally:
            with self._lock:
                self._running.remove(job)

    def begin_call(self, job: Job, job_no: int) -> str | None:
        """The job id for call `job_no`, or None when the job was interrupted: make no more calls."""
        with self._lock:
            if job.interrupted:
                return None
            job.job_no, job.sampling_step, job.sampling_steps, job.preview = job_no, 0, 0, None
            job.skipped, job.pending_stop = False, None  # a skip ends one call
            job.call_id = uuid.uuid4().hex
            return job.call_id

    def stop_all(self, action: str) -> list[tuple[str, str]]:
        """Mark every running job interrupted ("interrupt") or its current call skipped ("skip"); the
        (call id, action) pairs to send to pipeline_control."""
        sends = []
        with self._lock:
            for job in self._running:
                if action == "interrupt":
                    job.interrupted = True
                else:
                    job.skipped = True
                job.pending_stop = action
                if job.call_id is not None:
                    sends.append((job.call_id, action))
        return sends

    def confirmed(self, job: Job, call_id: str) -> None:
        """pipeline_control found the call running: it stops after its current step."""
        with self._lock:
            if job.call_id == call_id:
                job.pending_stop = None

    def on_progress(
        self, job: Job, send_stop: Callable[[str, str], bool]
    ) -> Callable[[dict[str, Any], bytes | None], None]:
        """The client's `on_progress` for the job's running call: records the step and preview, and asks
        again for a stop that found the call not yet running."""

        def update(status: dict[str, Any], preview: bytes | None) -> None:
            with self._lock:
                job.sampling_step, job.sampling_steps = int(status["step"]), int(status["total"])
                if preview is not None:
                    job.preview = preview
                call_id, action = job.call_id, job.pending_stop
            if call_id is not None and action is not None and send_stop(call_id, action):
                self.confirmed(job, call_id)

        return update

    def progress(self, skip_current_image: bool) -> dict[str, Any]:
        """A1111's ProgressResponse for the oldest running job; its idle answer when none runs."""
        with self._lock:
            if not self._running:
                idle = {"progress": 0.0, "eta_relative": 0.0, "current_image": None, "textinfo": None}
                return {**idle, "state": dict(IDLE_STATE)}
            job = self._running[0]
            # A1111's formula (modules/api/api.py progressapi): 0.01 from the start, so that a job that has
            # begun is never reported idle; each call an equal share.
            progress = 0.01 + job.job_no / job.job_count
            if job.sampling_steps > 0:
                progress += job.sampling_step / job.sampling_steps / job.job_count
            state = {
                "skipped": job.skipped,
                "interrupted": job.interrupted,
                "stopping_generation": False,
                "job": job.kind,
                "job_count": job.job_count,
                "job_timestamp": job.timestamp,
                "job_no": job.job_no,
                "sampling_step": job.sampling_step,
                "sampling_steps": job.sampling_steps,
            }
            preview = None if skip_current_image else job.preview
            elapsed = time.time() - job.started
        return {
            "progress": min(progress, 1.0),
            "eta_relative": elapsed / progress - elapsed,
            "state": state,
            "current_image": None if preview is None else base64.b64encode(preview).decode("ascii"),
            "textinfo": None,
        }


# A1111's shared.state.dict() with nothing running.
IDLE_STATE: dict[str, Any] = {
    "skipped": False,
    "interrupted": False,
    "stopping_generation": False,
    "job": "",
    "job_count": 0,
    "job_timestamp": "0",
    "job_no": 0,
    "sampling_step": 0,
    "sampling_steps": 0,
}
