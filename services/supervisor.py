"""What `sd-serve` watches and repairs in a running tritonserver, through its public APIs and /proc.

Triton 2.51's python backend never restarts a stub process that died (OOM killer, a crash): every later
request to that model fails with "Stub process '<model>_0_0' is not healthy" while the server and the
model keep reporting ready (Triton 25.12 / python_backend#423 makes such a model report not ready; none
restarts it). So sd-serve finds the stubs itself (children of tritonserver in /proc) and, when one dies:

- an engine model (answers from `execute`) is reloaded through the model-control API: unload, then load.
  Strict readiness reports the server not ready from the unload until the new stub is loaded.
- a pipeline model (answers through response senders from worker threads) cannot be reloaded: the
  requests it held are never released, so its unload never finishes and their clients would wait
  forever. The whole server is restarted instead; those clients see their connection close (gRPC
  UNAVAILABLE) and retry.

No torch: sd-serve must start in a moment and stay small.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import signal
import urllib.error
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from python_backend.shapes import PIPELINE_MANIFEST

STUB_COMMAND = "triton_python_backend_stub"
SHM_FOLDER = Path("/dev/shm")
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass(frozen=True)
class Stub:
    """One python backend stub process: `triton_python_backend_stub MODEL_PY SHM_REGION ...`."""

    pid: int
    start_time: int  # clock ticks after boot (/proc/PID/stat field 22): a reused pid is another process
    model: str
    model_py: Path
    shm_region: str

    @property
    def is_pipeline(self) -> bool:
        """Pipeline models answer through response senders; build-engines writes a manifest beside them."""
        return (self.model_py.parent / PIPELINE_MANIFEST).is_file()


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a live process; None once it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the command name may hold spaces and parentheses
    return fields[0], int(fields[1]), int(fields[19])


def child_stubs(parent: int) -> list[Stub]:
    """The live (not zombie) python backend stubs whose parent is `parent`."""
    stubs = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        stat = _stat(pid)
        if stat is None or stat[1] != parent or stat[0] == "Z":
            continue
        try:
            argv = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if len(argv) < 3 or not argv[0].endswith(STUB_COMMAND):
            continue
        model_py = Path(argv[1])
        stubs.append(Stub(pid, stat[2], model_py.parents[1].name, model_py, argv[2]))
    return stubs


def is_alive(stub: Stub) -> bool:
    stat = _stat(stub.pid)
    return stat is not None and stat[0] != "Z" and stat[2] == stub.start_time


def kill_stubs(stubs: Iterable[Stub]) -> None:
    """SIGKILL stubs that are still the processes we saw, and remove their shared memory regions
    (a stub that is killed leaves its region in /dev/shm; Triton removes it only on a clean exit)."""
    for stub in stubs:
        if is_alive(stub):
            with contextlib.suppress(ProcessLookupError):
                os.kill(stub.pid, signal.SIGKILL)
        with contextlib.suppress(OSError):
            (SHM_FOLDER / stub.shm_region).unlink()


def _prctl() -> Callable[..., int] | None:
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _prctl()  # looked up here: a child between fork and exec must not load anything


def become_subreaper() -> bool:
    """Make this process adopt its orphaned descendants (Linux), so stubs that outlive a crashed or
    killed tritonserver become our children: found by `child_stubs(os.getpid())`, killed, reaped."""
    return _PRCTL is not None and _PRCTL(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER


def die_with_parent() -> None:
    """For `Popen(preexec_fn=...)`: the child gets SIGKILL when its parent dies, however it dies. With
    tritonserver in a process group of its own (so that a Ctrl-C reaches only sd-serve, which drains),
    this keeps it from outliving a killed sd-serve; its stubs exit when they see it gone."""
    if _PRCTL is not None:
        _PRCTL(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG


def reap_adopted_stubs() -> list[Stub]:
    """Kill and reap the stubs this (subreaper) process adopted; returns them."""
    adopted = child_stubs(os.getpid())
    kill_stubs(adopted)
    for stub in adopted:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(stub.pid, 0)
    return adopted


class ModelControl:
    """Triton's HTTP model-control (--model-control-mode=explicit) and metrics endpoints."""

    def __init__(self, http_base: str, metrics_url: str) -> None:
        self.http_base = http_base.rstrip("/")
        self.metrics_url = metrics_url

    def _post(self, path: str, timeout: float) -> bytes:
        request = urllib.request.Request(f"{self.http_base}{path}", data=b"{}", method="POST")
        try:
            with _NO_PROXY_OPENER.open(request, timeout=timeout) as response:
                return bytes(response.read())
        except urllib.error.HTTPError as e:
            detail = e.read().decode(errors="replace")
            raise RuntimeError(f"POST {path}: HTTP {e.code}: {detail}") from e

    def unload(self, model: str) -> None:
        self._post(f"/v2/repository/models/{model}/unload", timeout=30)

    def load(self, model: str, timeout: float) -> None:
        """Returns once the model is loaded (Triton answers a load request when it is done)."""
        self._post(f"/v2/repository/models/{model}/load", timeout=timeout)

    def states(self) -> dict[str, str]:
        """Model name → state (READY, LOADING, UNLOADING, UNAVAILABLE) of every model in the repository."""
        return {m["name"]: m.get("state", "") for m in json.loads(self._post("/v2/repository/index", 10))}

    def requests_in_progress(self) -> int:
        """Requests the pipeline models hold (generating, or waiting for a worker: their own gauge) plus
        those in Triton's queues (its pending-request gauge), summed over every model."""
        with _NO_PROXY_OPENER.open(self.metrics_url, timeout=5) as response:
            text = response.read().decode()
        return sum(round(float(match[1])) for match in _IN_PROGRESS.finditer(text))


_IN_PROGRESS = re.compile(
    r"^(?:sd_requests_in_progress|nv_inference_pending_request_count)\{[^}]*\} (\S+)$", re.MULTILINE
)
