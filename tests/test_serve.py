"""`sd-serve` against a real tritonserver, with tiny python-backend models written by the tests."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from python_backend import serve
from tests.triton_server import TritonServer, free_ports, run_sd_serve, tritonserver_available

requires_tritonserver = pytest.mark.skipif(
    not tritonserver_available(), reason="no tritonserver on PATH and nvidia-pytriton not installed"
)

CONFIG = """
name: "{name}"
backend: "python"
max_batch_size: 0
input [ {{ name: "INPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
output [ {{ name: "OUTPUT0" data_type: TYPE_FP32 dims: [ -1 ] }} ]
instance_group [ {{ kind: KIND_CPU count: 1 }} ]
"""

IDENTITY_MODEL = """
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [
            pb_utils.InferenceResponse(
                [pb_utils.Tensor("OUTPUT0", pb_utils.get_input_tensor_by_name(r, "INPUT0").as_numpy())]
            )
            for r in requests
        ]
"""

BROKEN_MESSAGE = "weights file is corrupt: checksum mismatch"
BROKEN_MODEL = f"""
class TritonPythonModel:
    def initialize(self, args):
        raise RuntimeError("{BROKEN_MESSAGE}")
"""

INPUT = np.array([1.0, -2.5, 3.25], dtype=np.float32)


def add_model(repository: Path, name: str, model_py: str | None) -> None:
    """A python model taking and returning FP32 [-1]; `model_py` None leaves model.py out."""
    (repository / name / "1").mkdir(parents=True)
    (repository / name / "config.pbtxt").write_text(CONFIG.format(name=name))
    if model_py is not None:
        (repository / name / "1" / "model.py").write_text(model_py)


def port_args() -> list[str]:
    http, grpc, metrics = free_ports(3)
    return [f"--http-port={http}", f"--grpc-port={grpc}", f"--metrics-port={metrics}"]


def error_report(output: str) -> str:
    """sd-serve's own report: from its error line on (the server's log streams before it)."""
    assert "sd-serve: error:" in output, output
    return output[output.index("sd-serve: error:") :]


@pytest.fixture(scope="module")
def identity_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    repository = tmp_path_factory.mktemp("identity_repository")
    add_model(repository, "identity", IDENTITY_MODEL)
    return repository


@pytest.fixture(scope="module")
def server(identity_repository: Path) -> Iterator[TritonServer]:
    with TritonServer(identity_repository, extra_args=["--cache-config", "local,size=1048576"]) as server:
        yield server


@requires_tritonserver
@pytest.mark.integration
def test_ready_line_and_pass_through_arguments(server: TritonServer) -> None:
    log = server.log()
    assert (
        f"sd-serve: ready (http://{server.http_url}, grpc {server.grpc_url}, metrics {server.metrics_url})"
        in log
    )
    assert re.search(r"cache_enabled\s*\|\s*1\s*\|", log), log  # the argument after `--` reached Triton


@requires_tritonserver
@pytest.mark.integration
def test_infer_http(server: TritonServer) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    infer_input = httpclient.InferInput("INPUT0", list(INPUT.shape), "FP32")
    infer_input.set_data_from_numpy(INPUT)
    result = client.infer("identity", [infer_input])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), INPUT)


@requires_tritonserver
@pytest.mark.integration
def test_infer_grpc(server: TritonServer) -> None:
    import tritonclient.grpc as grpcclient

    client = grpcclient.InferenceServerClient(server.grpc_url)
    infer_input = grpcclient.InferInput("INPUT0", list(INPUT.shape), "FP32")
    infer_input.set_data_from_numpy(INPUT)
    result = client.infer("identity", [infer_input])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), INPUT)


@requires_tritonserver
@pytest.mark.integration
def test_metrics(server: TritonServer) -> None:
    with urllib.request.urlopen(server.metrics_url, timeout=10) as response:
        assert response.status == 200
        body = response.read().decode()
    assert 'nv_inference_count{model="identity"' in body, body[:2000]


def _port_is_free(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as Triton binds; TIME_WAIT is free
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@requires_tritonserver
@pytest.mark.integration
@pytest.mark.parametrize("how", ["SIGTERM to sd-serve", "SIGINT to the group (Ctrl-C)"])
def test_signal_stops_server_cleanly(identity_repository: Path, how: str) -> None:
    with TritonServer(identity_repository) as server:
        assert server.process is not None
        pgid = server.process.pid
        started = time.monotonic()
        if how.startswith("SIGTERM"):
            server.process.send_signal(signal.SIGTERM)
        else:
            os.killpg(pgid, signal.SIGINT)
        returncode = server.process.wait(timeout=30)
        elapsed = time.monotonic() - started
        assert returncode == 0, server.log()
        assert elapsed < 20, f"took {elapsed:.1f} s\n{server.log()}"
        assert not _group_alive(pgid), "tritonserver or a stub outlived sd-serve"
        for port in (server.http_port, server.grpc_port, server.metrics_port):
            assert _port_is_free(port), f"port {port} still bound"


@requires_tritonserver
@pytest.mark.integration
def test_model_failing_to_initialize_ends_sd_serve(tmp_path: Path) -> None:
    add_model(tmp_path, "identity", IDENTITY_MODEL)
    add_model(tmp_path, "broken", BROKEN_MODEL)
    started = time.monotonic()
    result = run_sd_serve(f"--model-repository={tmp_path}", *port_args(), timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode != 0
    report = error_report(result.stdout)
    assert "model(s) failed to load: 'broken'" in report
    assert BROKEN_MESSAGE in report
    assert "Traceback" not in result.stdout


@requires_tritonserver
@pytest.mark.integration
def test_missing_model_py_does_not_hang(tmp_path: Path) -> None:
    # Triton 2.51 itself waits forever for this model; sd-serve recognises the stub's error and gives up.
    add_model(tmp_path, "identity", IDENTITY_MODEL)
    add_model(tmp_path, "no_code", None)
    result = run_sd_serve(f"--model-repository={tmp_path}", *port_args(), "--ready-timeout=120", timeout=60)
    assert result.returncode != 0
    report = error_report(result.stdout)
    assert "model(s) failed to load: 'no_code'" in report
    assert "model.py" in report
    assert "Traceback" not in result.stdout


def test_missing_repository(tmp_path: Path) -> None:
    result = run_sd_serve(f"--model-repository={tmp_path / 'nowhere'}", timeout=30)
    assert result.returncode != 0
    assert "does not exist" in error_report(result.stdout)
    assert "Traceback" not in result.stdout


def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        _, grpc, metrics = free_ports(3)
        result = run_sd_serve(
            f"--model-repository={tmp_path}",
            f"--http-port={port}",
            f"--grpc-port={grpc}",
            f"--metrics-port={metrics}",
            timeout=30,
        )
    assert result.returncode != 0
    assert f"HTTP port 127.0.0.1:{port} is already in use" in error_report(result.stdout)
    assert "Traceback" not in result.stdout


@pytest.mark.skipif(importlib.util.find_spec("pytriton") is None, reason="nvidia-pytriton not installed")
def test_bundled_server_is_prepared_once(tmp_path: Path) -> None:
    # Two concurrent first preparations: one copy wins the rename, the other is discarded.
    with ThreadPoolExecutor(2) as pool:
        first, second = pool.map(lambda _: serve.prepare_bundled_tritonserver(tmp_path), range(2))
    assert first == second
    installation = first.executable.parents[1]
    assert [path.name for path in tmp_path.iterdir()] == [installation.name]  # no staging folder left
    assert (installation / "backends" / "python" / "triton_python_backend_stub").is_file()

    before = first.executable.stat()
    assert serve.prepare_bundled_tritonserver(tmp_path) == first
    after = first.executable.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)  # reused, not recopied
