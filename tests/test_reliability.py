"""Reliability of the served pipeline under faults and load, against real `sd-serve` + tritonserver:
stubs killed mid-request come back, SIGTERM drains, overload and timeouts are refused at once with a
status that says what to do, nothing crashes on shutdown, and a short soak with malformed requests.
"""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import tritonclient.grpc as grpc

from build_engines import cli as build_cli
from client import StableDiffusionClient
from client.api import GenerationError
from perf import soak
from services import supervisor
from tests.conftest import PROFILE_ARGS
from tests.triton_server import TritonServer, tritonserver_available

pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(not tritonserver_available(), reason="no tritonserver (pip install nvidia-pytriton)"),
]

RECOVERY_S = 60  # the promise: requests succeed again within this long after a process dies
LONG = {"num_inference_steps": 400, "width": 128, "height": 128}  # seconds of work on the tiny model


def infer(url: str, timeout_us: int | None = None, **inputs: Any) -> tuple[str, str]:
    """(gRPC status name, message) of one `pipeline` request; ("OK", "") when it succeeds."""
    tensors = []
    defaults = {"prompt": "a lighthouse", "num_inference_steps": 2, "width": 64, "height": 64}
    for name, value in (defaults | inputs).items():
        array = np.array([value.encode() if isinstance(value, str) else value])
        dtype = "BYTES" if array.dtype.kind == "S" else "INT32"
        tensor = grpc.InferInput(name, [1], dtype)
        tensor.set_data_from_numpy(array.astype(object if dtype == "BYTES" else np.int32))
        tensors.append(tensor)
    with grpc.InferenceServerClient(url) as client:
        try:
            client.infer("pipeline", tensors, **({} if timeout_us is None else {"timeout": timeout_us}))
        except grpc.InferenceServerException as e:
            return str(e.status()).removeprefix("StatusCode."), e.message() or ""
    return "OK", ""


def wait_for_backlog(server: TritonServer, requests: int, timeout: float = 30) -> None:
    """Until the `pipeline` model holds `requests` (generating, waiting for a worker, or queued)."""
    deadline = time.monotonic() + timeout
    while True:
        metrics = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
        gauges = r"^(?:sd_requests_in_progress|nv_inference_pending_request_count)"
        held = sum(float(v) for v in re.findall(gauges + r'\{model="pipeline"[^}]*\} (\S+)$', metrics, re.M))
        if held == requests:
            return
        assert time.monotonic() < deadline, f"the pipeline holds {held} requests, not {requests}"
        time.sleep(0.1)


def ready(server: TritonServer) -> bool:
    try:
        with urllib.request.urlopen(f"http://{server.http_url}/v2/health/ready", timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def saw_not_ready(server: TritonServer, until: threading.Event) -> bool:
    """Whether the server answered not ready at any time before `until` is set (asked every 20 ms)."""
    seen = False
    while not until.is_set():
        seen |= not ready(server)
        time.sleep(0.02)
    return seen


def stub_of(server: TritonServer, model: str) -> supervisor.Stub:
    pid = server.triton_pid()
    assert pid is not None, server.log()
    [stub] = [s for s in supervisor.child_stubs(pid) if s.model == model]
    return stub


def no_crash(server: TritonServer, pids: set[int]) -> None:
    """Nothing in sd-serve's output or the kernel log says that a process of the server crashed."""
    assert not soak.server_troubles(server.log()), server.log()
    crashes = soak.kernel_crashes(pids)
    assert not crashes, crashes  # None (unreadable kernel log) passes: the server log was checked


@pytest.fixture(scope="module")
def server(model_repository: Path):
    with TritonServer(model_repository) as server:
        yield server


@pytest.fixture(scope="module")
def openvino_server(openvino_repository: Path):
    with TritonServer(openvino_repository) as server:
        yield server


@pytest.mark.parametrize("model", ["unet", "vae_decoder", "pipeline", "pipeline_stream"])
def test_a_killed_process_comes_back(server: TritonServer, model: str) -> None:
    """kill -9 (the OOM killer's way) of an engine or a pipeline stub while a request runs: that request
    fails as UNAVAILABLE (retry), the server reports not ready, and within a minute it serves again."""
    kill_and_recover(server, model)


def test_a_killed_openvino_unet_comes_back(openvino_server: TritonServer) -> None:
    """The same for the openvino target's UNet, which holds compiled models per shape and reused infer
    requests: the reloaded one compiles again, and makes the same image as before the kill."""
    kill_and_recover(openvino_server, "unet")


def kill_and_recover(server: TritonServer, model: str) -> None:
    url = server.grpc_url
    before = StableDiffusionClient(url).generate("a lighthouse", steps=3, seed=5, width=64, height=64)
    victim = stub_of(server, model)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        if model == "pipeline_stream":
            client = StableDiffusionClient(url)
            running = pool.submit(
                client.generate, "a lighthouse", steps=400, width=128, height=128, on_progress=lambda *_: None
            )
        else:
            running = pool.submit(infer, url, **LONG)
        time.sleep(2)  # mid-generation
        assert not running.done(), "the long request finished before the kill"
        # Readiness is watched from the kill on: a tiny engine can be reloaded before the failed request's
        # answer comes back, so the outage may be over before the loop below first looks.
        recovered = threading.Event()
        outage = pool.submit(saw_not_ready, server, recovered)
        killed = time.monotonic()
        os.kill(victim.pid, signal.SIGKILL)
        try:
            if model == "pipeline_stream":
                with pytest.raises(GenerationError) as failure:
                    running.result(timeout=30)
                status = failure.value.status
            else:
                status, _ = running.result(timeout=30)
            if model == "vae_decoder":
                # Killed while the request denoises: it is reloaded before the request needs it.
                assert status == "OK", (status, server.log())
            else:
                assert status == "UNAVAILABLE", (status, server.log())
            while time.monotonic() - killed < RECOVERY_S:
                if infer(url)[0] == "OK":
                    break
                time.sleep(0.5)
            else:
                pytest.fail(f"no successful request {RECOVERY_S} s after killing {model}:\n{server.log()}")
        finally:
            recovered.set()
    assert outage.result() or model == "vae_decoder", "readiness never reported the outage"
    assert ready(server)
    assert stub_of(server, model).pid != victim.pid
    after = StableDiffusionClient(url).generate("a lighthouse", steps=3, seed=5, width=64, height=64)
    assert np.array_equal(np.asarray(after.images[0]), np.asarray(before.images[0]))
    way = "reloading it" if model in ("unet", "vae_decoder") else "restarting tritonserver"
    assert f"the {model} model's process" in server.log() and way in server.log(), server.log()


def test_sigterm_drains_requests_in_progress_and_stops_cleanly(model_repository: Path) -> None:
    """SIGTERM: requests in progress finish, new ones are refused as UNAVAILABLE, sd-serve exits 0, no
    process crashed (the stubs used to segfault on every shutdown) and none is left behind."""
    server = TritonServer(model_repository, serve_args=["--grace-period=60"]).start()
    try:
        assert server.process is not None
        triton = server.triton_pid()
        assert triton is not None
        pids = {triton, *(s.pid for s in supervisor.child_stubs(triton))}
        # The pipeline opens its core with its first request: after this one the next two are in progress
        # within a second, not still waiting in the queue.
        assert infer(server.grpc_url) == ("OK", "")
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            in_progress = [
                pool.submit(infer, server.grpc_url, **LONG | {"num_inference_steps": steps})
                for steps in (150, 120)
            ]
            time.sleep(1.5)
            assert not any(f.done() for f in in_progress)
            server.process.send_signal(signal.SIGTERM)
            time.sleep(1)
            status, message = infer(server.grpc_url)
            assert status == "UNAVAILABLE" and "shutting down" in message, (status, message)
            assert [f.result(timeout=60) for f in in_progress] == [("OK", "")] * 2
        assert server.process.wait(timeout=60) == 0, server.log()
        time.sleep(0.5)
        assert not group_left(server), "a process outlived sd-serve"
        no_crash(server, pids)
    finally:
        server.kill()


def group_left(server: TritonServer) -> bool:
    assert server.process is not None
    try:
        os.killpg(server.process.pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def small_server(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """One worker, a queue of one, queued requests refused after 20 s: easy to overload."""
    repo = tmp_path_factory.mktemp("repository") / "small"
    serving = ["--max-concurrent-requests=1", "--max-queue-size=1", "--queue-timeout=20"]
    assert (
        build_cli.main(["--checkpoint", str(tiny_checkpoint), "--output", str(repo), *PROFILE_ARGS, *serving])
        == 0
    )
    with TritonServer(repo) as server:
        yield server


def test_overload_is_refused_at_once(small_server: TritonServer) -> None:
    """Beyond one generating, one waiting in execute and one queued, a request is refused in well under a
    second with UNAVAILABLE; the accepted ones all succeed."""
    url = small_server.grpc_url
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        accepted = []
        for held in range(1, 4):  # one at a time: two arriving together could both find the queue empty
            accepted.append(pool.submit(infer, url, **LONG))
            wait_for_backlog(small_server, held)
        started = time.monotonic()
        status, message = infer(url)
        assert time.monotonic() - started < 1
        assert (status, "maximum queue size" in message) == ("UNAVAILABLE", True), (status, message)
        assert [f.result(timeout=120) for f in accepted] == [("OK", "")] * 3


def test_requests_waiting_past_their_timeout_are_refused(small_server: TritonServer) -> None:
    """Behind a generating request, one waits in execute and the next in Triton's queue. Each whose
    timeout passes before it gets a worker is refused as UNAVAILABLE (busy: retry) and never generated:
    the queued one by Triton's queue policy (when the queue next moves), the one in execute at once."""
    url = small_server.grpc_url
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        busy = pool.submit(infer, url, **LONG)
        wait_for_backlog(small_server, 1)
        waiting = pool.submit(infer, url, timeout_us=1_500_000)  # blocks in execute
        wait_for_backlog(small_server, 2)
        queued = pool.submit(infer, url, timeout_us=500_000)  # in Triton's queue behind it
        waiting_status, waiting_message = waiting.result(timeout=30)
        queued_status, queued_message = queued.result(timeout=30)
        assert not busy.done()
        assert busy.result(timeout=120) == ("OK", "")
    assert waiting_status == "UNAVAILABLE" and "no worker was free" in waiting_message, waiting_message
    assert queued_status == "UNAVAILABLE" and "timeout" in queued_message.lower(), queued_message


def test_timeout_stops_generation(small_server: TritonServer) -> None:
    """A unary request's timeout ends its denoising loop on the server (Triton 2.51 would run it to the
    end): the worker is free again at once, and the client sees DEADLINE_EXCEEDED."""
    url = small_server.grpc_url
    started = time.monotonic()
    status, message = infer(url, timeout_us=1_500_000, num_inference_steps=999, width=128, height=128)
    elapsed = time.monotonic() - started
    assert status == "CANCELLED" and message.startswith("timeout:"), (status, message)
    assert elapsed < 5, elapsed
    assert infer(url)[0] == "OK"  # the one worker is free: the long request did not run on
    with StableDiffusionClient(url, timeout_s=1.5) as client, pytest.raises(GenerationError) as failure:
        client.generate("a lighthouse", steps=999, width=128, height=128)
    assert failure.value.status == "DEADLINE_EXCEEDED"
    deadline = time.monotonic() + 5  # the server stops within a step of the same timeout
    while True:
        metrics = urllib.request.urlopen(small_server.metrics_url, timeout=5).read().decode()
        timeouts = re.search(
            r'^sd_requests_failed_total\{model="pipeline",reason="timeout"\} (\S+)$', metrics, re.M
        )
        in_progress = re.search(r'^sd_requests_in_progress\{model="pipeline"\} (\S+)$', metrics, re.M)
        assert timeouts and in_progress, metrics
        # The second request ends as a timeout or as a cancellation (its client's gRPC deadline), by a race.
        if float(timeouts[1]) >= 1 and float(in_progress[1]) == 0:
            break
        assert time.monotonic() < deadline, (timeouts[0], in_progress[0])
        time.sleep(0.2)


def test_client_retries_unavailable(small_server: TritonServer) -> None:
    """With the one worker and the queue taken, a client without retries is refused; one with retries
    gets its image once a place frees up."""
    url = small_server.grpc_url
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        busy = []
        for held in range(1, 4):
            busy.append(pool.submit(infer, url, **LONG))
            wait_for_backlog(small_server, held)
        with pytest.raises(GenerationError) as refused:
            StableDiffusionClient(url).generate("a lighthouse", steps=2, width=64, height=64)
        assert refused.value.is_retryable
        result = StableDiffusionClient(url, retries=8).generate("a lighthouse", steps=2, width=64, height=64)
        assert len(result.images) == 1
        assert [f.result(timeout=120) for f in busy] == [("OK", "")] * 3


def test_round_robin_client_over_a_dns_name(small_server: TritonServer) -> None:
    """How long-lived clients spread over the headless Service's pods: gRPC's DNS resolver and round_robin
    (here `localhost` resolves to 127.0.0.1, where the server is, and ::1, where it is not)."""
    with StableDiffusionClient(f"dns:///localhost:{small_server.grpc_port}", round_robin=True) as client:
        result = client.generate("a lighthouse", steps=2, width=64, height=64, num_images=2, seed=3)
    with StableDiffusionClient(small_server.grpc_url) as client:
        direct = client.generate("a lighthouse", steps=2, width=64, height=64, num_images=2, seed=3)
    assert [np.asarray(i).tobytes() for i in result.images] == [
        np.asarray(i).tobytes() for i in direct.images
    ]
    with pytest.raises(ValueError, match="grpc"):
        StableDiffusionClient(small_server.http_url, protocol="http", round_robin=True)


def test_short_soak(model_repository: Path, tmp_path: Path) -> None:
    """About a minute of eight clients, a quarter of their requests malformed: no failed valid request,
    every malformed one INVALID_ARGUMENT, no crash or restart, a clean SIGTERM (perf/soak.py's checks)."""
    settings = soak.SoakSettings(model_repository, concurrency=8, duration_s=45, warmup_s=15, max_growth=0.25)
    result = soak.run(settings, log=lambda _: None)
    assert result.ok, soak.report(result)
    malformed = sum(n for outcome, n in result.requests.items() if outcome.startswith("malformed"))
    assert result.requests.get("valid OK", 0) > 20 and malformed > 5
