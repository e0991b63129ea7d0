"""Stopping a running generation early and keeping what it made: A1111's interrupt and skip.

A request may name itself with the `job_id` input. The `pipeline_control` model asks for a job to stop;
the pipeline checks after every denoising step and, if asked, decodes the latents it has reached and
answers with those images (cancelling a request, by contrast, answers nothing).

The two are separate processes (each Triton model runs in its own stub), and the pipeline's execute()
blocks while all its workers are busy, so that requests wait in Triton's queue; a stop sent to the
pipeline model itself would wait behind them. So the channel is a directory both processes see (tmpfs
when there is one): a running job holds `<id>.running`, a stop request writes `<id>.stop`.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from python_backend.request import InvalidInput
from python_backend.shapes import JOBS_DIR_ENV

JOB_ID = re.compile(r"[A-Za-z0-9_-]{1,128}")  # a file name, whatever the client sends
ACTIONS = ("interrupt", "skip")  # the pipeline stops alike for both; A1111 clients differ in what follows
# A stop that arrived as its job ended leaves a file no job will remove; sweeps remove it after this long.
STALE_AFTER_S = 60.0


def check_job_id(job_id: str) -> str:
    if not JOB_ID.fullmatch(job_id):
        raise InvalidInput("job_id", f"expected 1 to 128 letters, digits, '-' or '_', got {job_id[:140]!r}")
    return job_id


def job_id_from_input(array: np.ndarray) -> str:
    """The `job_id` input tensor (BYTES, one value) as a checked id."""
    if array.size != 1:
        raise InvalidInput("job_id", f"expected exactly one value, got shape {list(array.shape)}")
    value = array.reshape(-1)[0]
    text = value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
    return check_job_id(text)


def default_dir() -> Path:
    if os.environ.get(JOBS_DIR_ENV):
        return Path(os.environ[JOBS_DIR_ENV])
    shm = Path("/dev/shm")
    base = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    return base / f"sd-jobs-{os.getuid()}"  # per user: another user's server cannot stop ours


class JobBoard:
    """The running jobs of the processes that share `root`, and the stops asked of them."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root or default_dir()
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _file(self, job_id: str, kind: str) -> Path:
        return self.root / f"{check_job_id(job_id)}.{kind}"

    @contextmanager
    def running(self, job_id: str) -> Iterator[Job]:
        """Mark `job_id` running for the duration; a stop left from an earlier job of that id is dropped."""
        marker, stop = self._file(job_id, "running"), self._file(job_id, "stop")
        stop.unlink(missing_ok=True)
        marker.touch()
        try:
            yield Job(stop)
        finally:
            marker.unlink(missing_ok=True)
            stop.unlink(missing_ok=True)

    def request_stop(self, job_id: str, action: str = "interrupt") -> bool:
        """Ask `job_id` to stop after its current step. False when no such job is running (not yet, or no
        more): the caller may ask again once the job has started."""
        if action not in ACTIONS:
            raise InvalidInput("action", f"expected one of {', '.join(ACTIONS)}, got {action[:40]!r}")
        self.sweep()
        if not self._file(job_id, "running").exists():
            return False
        self._file(job_id, "stop").write_text(action)
        return True

    def sweep(self) -> None:
        """Remove stops whose job is gone (it ended between the check and the write above)."""
        now = time.time()
        for stop in self.root.glob("*.stop"):
            try:
                if not stop.with_suffix(".running").exists() and now - stop.stat().st_mtime > STALE_AFTER_S:
                    stop.unlink()
            except FileNotFoundError:
                pass  # its job removed it meanwhile


class Job:
    def __init__(self, stop: Path) -> None:
        self._stop = stop

    def stop_requested(self) -> str | None:
        """The action asked of this job ("interrupt" or "skip"), or None: one stat() per step."""
        try:
            return self._stop.read_text() or "interrupt"
        except FileNotFoundError:
            return None
