"""Run a real Triton server (through `sd-serve`) for integration tests.

    @pytest.fixture(scope="module")
    def server(tmp_path_factory):
        repo = build_repository(tmp_path_factory.mktemp("repo"))
        with TritonServer(repo) as server:
            yield server

    def test_infer(server):
        client = tritonclient.http.InferenceServerClient(server.http_url)
        ...

`sd-serve` runs in its own process group, with tritonserver and its python backend stubs; teardown
SIGTERMs it and then kills whatever is left of the group, so no server outlives the test.
"""

from __future__ import annotations

import collections
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from services.serve import free_ports

T = TypeVar("T")

PROJECT_ROOT = Path(__file__).resolve().parents[1]
READY_PREFIX = "sd-serve: ready ("
_PORT_ATTEMPTS = 3  # free ports are picked before the server binds them: another process may win the race


class TritonServerError(RuntimeError):
    """The server did not become ready; the message ends with its log tail."""


def tritonserver_available() -> bool:
    """Whether sd-serve has a server to start: one on PATH or the nvidia-pytriton one."""
    return shutil.which("tritonserver") is not None or importlib.util.find_spec("pytriton") is not None


def sd_serve_command(*args: str) -> list[str]:
    """The `sd-serve` command line with this interpreter, runnable from PROJECT_ROOT without installing."""
    return [sys.executable, "-m", "services.serve", *args]


def run_sd_serve(*args: str, timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Run `sd-serve` to completion, stdout and stderr together; on TimeoutExpired its group is killed."""
    process = subprocess.Popen(
        sd_serve_command(*args),
        cwd=PROJECT_ROOT,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        encoding="utf-8",
        errors="replace",
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    finally:
        _kill_group(process)
    return subprocess.CompletedProcess(process.args, process.returncode, output)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def pid_alive(pid: int) -> bool:
    """Whether `pid` is a live process (a zombie, dead but not yet reaped, is not)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rindex(")") + 2] != "Z"


def _kill_group(process: subprocess.Popen[str]) -> None:
    """SIGKILL whatever is left in the process group `process` leads (tritonserver, stubs), then reap it."""
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:  # the group is already empty
        pass
    process.wait()


class TritonServer:
    """`sd-serve` on free ports; ready on enter (or `start()`), stopped with SIGTERM on exit (or `stop()`)."""

    def __init__(
        self,
        model_repository: Path,
        *,
        serve_args: Sequence[str] = (),
        extra_args: Sequence[str] = (),
        ready_timeout: float = 120.0,
        env: Mapping[str, str] | None = None,
        host: str = "127.0.0.1",
        log_lines: int = 5000,
    ) -> None:
        self.model_repository = Path(model_repository).resolve()
        self.serve_args = tuple(serve_args)  # sd-serve's own options
        self.extra_args = tuple(extra_args)  # tritonserver's, after `--`
        self.ready_timeout = ready_timeout
        self.env = env
        self.host = host
        self.http_port = self.grpc_port = self.metrics_port = 0
        self.process: subprocess.Popen[str] | None = None
        self._log: collections.deque[str] = collections.deque(maxlen=log_lines)
        self._ready = threading.Event()
        self._reader: threading.Thread | None = None
        self.left_behind = False

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://{self.host}:{self.metrics_port}/metrics"

    @property
    def returncode(self) -> int | None:
        return self.process.poll() if self.process else None

    def log(self) -> str:
        """sd-serve's output so far: tritonserver's log, then our own lines."""
        return "\n".join(self._log)

    def start(self) -> TritonServer:
        attempts_left = _PORT_ATTEMPTS
        while True:
            attempts_left -= 1
            try:
                self._start_once()
                return self
            except TritonServerError as e:
                if attempts_left == 0 or "already in use" not in str(e):
                    raise

    def _start_once(self) -> None:
        self.http_port, self.grpc_port, self.metrics_port = free_ports(3, self.host)
        self._log.clear()
        self._ready.clear()
        self.process = subprocess.Popen(
            sd_serve_command(
                f"--model-repository={self.model_repository}",
                f"--host={self.host}",
                f"--http-port={self.http_port}",
                f"--grpc-port={self.grpc_port}",
                f"--metrics-port={self.metrics_port}",
                f"--ready-timeout={self.ready_timeout}",
                *self.serve_args,
                "--",
                *self.extra_args,
            ),
            cwd=PROJECT_ROOT,
            env=None if self.env is None else dict(self.env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            start_new_session=True,  # its own process group, so teardown reaches tritonserver and stubs
        )
        self._reader = threading.Thread(target=self._read_output, args=(self.process,), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.ready_timeout + 30  # sd-serve enforces ready_timeout itself
        while not self._ready.wait(0.1):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise TritonServerError(
                    f"sd-serve did not become ready (exit code {self.process.returncode}); "
                    f"its output ends with:\n{self._tail()}"
                )

    def _read_output(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            self._log.append(line.rstrip("\n"))
            if line.startswith(READY_PREFIX):
                self._ready.set()

    def triton_pid(self) -> int | None:
        """The tritonserver sd-serve runs now (its child), None when there is none."""
        if self.process is None:
            return None
        for entry in Path("/proc").iterdir():
            try:
                text = (entry / "stat").read_text() if entry.name.isdigit() else ""
            except OSError:
                continue
            name, _, rest = text.rpartition(")")
            if rest and "tritonserver" in name and int(rest.split()[1]) == self.process.pid:
                return int(entry.name)
        return None

    def stop(self, timeout: float = 45.0) -> int | None:
        """SIGTERM sd-serve (a graceful stop: it drains, then stops tritonserver), wait, then kill what is
        left of the group. `left_behind` tells whether anything was (sd-serve should leave nothing)."""
        if self.process is None:
            return None
        triton = self.triton_pid()  # in a process group of its own
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        self.left_behind = self.process.poll() is not None and (
            group_alive(self.process.pid) or (triton is not None and pid_alive(triton))
        )
        self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL everything left in the server's process group, then reap sd-serve."""
        if self.process is None:
            return
        _kill_group(self.process)
        if self._reader is not None:
            self._reader.join(timeout=5)

    def _tail(self, lines: int = 60) -> str:
        return "\n".join(list(self._log)[-lines:])

    def __enter__(self) -> TritonServer:
        try:
            return self.start()
        except BaseException:
            self.kill()
            raise

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        died = self.process is not None and self.process.poll() is not None
        repaired = any(marker in self.log() for marker in ("restarting tritonserver", "process died"))
        if died or repaired:
            # Shown with the failures of the tests that ran on it (pytest prints a failed test's output).
            what = "exited" if died else "repaired its server"
            # Why, first: the lines naming what died may have scrolled past the tail by now.
            why = [line for line in self.log().splitlines() if line.startswith("sd-serve:")]
            print(f"sd-serve {what}; what it said:\n" + "\n".join(why[-20:]))
            print(f"its output ends with:\n{self._tail()}")
        self.stop()


def concurrent_unet_runs(
    grpc_url: str, jobs: Sequence[Callable[[], T]], timeout: float = 180.0
) -> tuple[list[T | None], int, int]:
    """Each job's result when all start together (None for one that did not finish in `timeout`), and how
    many UNet calls they made and in how many runs Triton's dynamic batcher ran them."""
    import tritonclient.grpc as grpcclient

    def unet() -> object:
        return grpcclient.InferenceServerClient(grpc_url).get_inference_statistics("unet").model_stats[0]

    before = unet()
    results: list[T | None] = [None] * len(jobs)
    start = threading.Barrier(len(jobs))

    def run(i: int) -> None:
        start.wait()
        results[i] = jobs[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout)
    after = unet()
    calls = after.inference_stats.success.count - before.inference_stats.success.count  # type: ignore[attr-defined]
    runs = after.execution_count - before.execution_count  # type: ignore[attr-defined]
    return results, calls, runs
