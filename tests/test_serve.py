"""`sd-serve` against a real tritonserver, with tiny python-backend models written by the tests; its check
of TensorRT engines against the server (no server needed)."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NoReturn

import numpy as np
import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2 as mc

from build_engines import tensorrt_engine as te
from build_engines.tensorrt_engine import GpuIdentity, PlanRecord
from python_backend.shapes import (
    PIPELINE,
    PIPELINE_MANIFEST,
    ModelGeometry,
    PipelineManifest,
    Profile,
    stream_model,
    triton_model,
)
from services import serve, supervisor
from services.serve import free_ports
from tests.triton_server import (
    PROJECT_ROOT,
    TritonServer,
    group_alive,
    pid_alive,
    run_sd_serve,
    tritonserver_available,
)

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
def test_cuda_memory_pool_option_reaches_triton_and_cpu_runs_still_serve(identity_repository: Path) -> None:
    with TritonServer(identity_repository, serve_args=["--cuda-memory-pool-mb", "128"]) as running:
        log = running.log()
    # Triton's start-up table; without a GPU it logs "CUDA memory pool disabled" and serves anyway.
    assert re.search(r"cuda_memory_pool_byte_size\{0\}\s*\|\s*134217728\s*\|", log), log


def _infer_identity(server: TritonServer) -> None:
    import tritonclient.http as httpclient

    client = httpclient.InferenceServerClient(server.http_url)
    infer_input = httpclient.InferInput("INPUT0", list(INPUT.shape), "FP32")
    infer_input.set_data_from_numpy(INPUT)
    result = client.infer("identity", [infer_input])
    np.testing.assert_array_equal(result.as_numpy("OUTPUT0"), INPUT)


def _ready(server: TritonServer) -> bool:
    return serve._http_ok(f"http://{server.http_url}/v2/health/ready")


@requires_tritonserver
@pytest.mark.integration
def test_infer_http(server: TritonServer) -> None:
    _infer_identity(server)


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


@requires_tritonserver
@pytest.mark.integration
@pytest.mark.parametrize("how", ["SIGTERM to sd-serve", "SIGINT to the group (Ctrl-C)"])
def test_signal_stops_server_cleanly(identity_repository: Path, how: str) -> None:
    with TritonServer(identity_repository) as server:
        assert server.process is not None
        pgid = server.process.pid
        triton = server.triton_pid()
        assert triton is not None
        stubs = supervisor.child_stubs(triton)
        started = time.monotonic()
        if how.startswith("SIGTERM"):
            server.process.send_signal(signal.SIGTERM)
        else:
            os.killpg(pgid, signal.SIGINT)
        returncode = server.process.wait(timeout=30)
        elapsed = time.monotonic() - started
        assert returncode == 0, server.log()
        assert elapsed < 20, f"took {elapsed:.1f} s\n{server.log()}"
        assert not group_alive(pgid), "a process of sd-serve's group outlived it"
        assert not any(pid_alive(pid) for pid in (triton, *(s.pid for s in stubs))), "tritonserver or a stub"
        for port in (server.http_port, server.grpc_port, server.metrics_port):
            assert _port_is_free(port), f"port {port} still bound"


@requires_tritonserver
@pytest.mark.integration
def test_nothing_outlives_a_killed_sd_serve(identity_repository: Path) -> None:
    """SIGKILL leaves sd-serve no chance to clean up: tritonserver dies with it (parent-death signal) and
    its stubs follow (they exit when their parent is gone)."""
    with TritonServer(identity_repository) as server:
        assert server.process is not None
        triton = server.triton_pid()
        assert triton is not None
        pids = [triton, *(s.pid for s in supervisor.child_stubs(triton))]
        assert len(pids) > 1
        server.process.kill()
        server.process.wait(timeout=10)
        deadline = time.monotonic() + 10
        while any(pid_alive(pid) for pid in pids):
            assert time.monotonic() < deadline, [pid for pid in pids if pid_alive(pid)]
            time.sleep(0.2)


@requires_tritonserver
@pytest.mark.integration
def test_crashed_tritonserver_is_restarted(identity_repository: Path) -> None:
    """tritonserver killed (as a crash would end it): sd-serve starts it again, kills the stubs it left,
    and the server answers again; after --max-restarts such crashes in the window it gives up."""
    with TritonServer(identity_repository, serve_args=["--max-restarts=1"]) as server:
        assert server.process is not None
        first = server.triton_pid()
        assert first is not None
        orphans = supervisor.child_stubs(first)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 60
        while (second := server.triton_pid()) in (None, first) or not _ready(server):
            assert time.monotonic() < deadline and server.process.poll() is None, server.log()
            time.sleep(0.3)
        assert "tritonserver exited with code -9; restarting tritonserver" in server.log()
        assert not any(pid_alive(stub.pid) for stub in orphans)
        _infer_identity(server)
        os.kill(second, signal.SIGKILL)  # the second crash within the window: give up, exit non-zero
        assert server.process.wait(timeout=60) != 0
        server.kill()  # reaps what is left and reads the output to its end
        assert "not restarting tritonserver again" in server.log()


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


# --- TensorRT engines: checked against this server before Triton starts (no server needed) -----------

ENGINES = ("text_encoder", "unet", "vae_decoder", "vae_encoder")
A10G = GpuIdentity("NVIDIA A10G", "8.6")
H100 = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0")


def plan_record(tensorrt_version: str = "10.3.0.26", gpu: GpuIdentity = A10G) -> PlanRecord:
    return PlanRecord(
        tensorrt_version=tensorrt_version,
        gpu=gpu,
        precision="fp16",
        builder={"optimization_level": 3, "workspace_bytes": None, "refittable": False},
        profiles=[{"sample": {"min": [1, 4, 8, 8], "opt": [2, 4, 64, 64], "max": [8, 4, 128, 128]}}],
        onnx_sha256={"model.onnx": "0" * 64},
    )


def tensorrt_repository(root: Path, record: PlanRecord, engines: tuple[str, ...] = ENGINES) -> Path:
    """The layout build-engines --target tensorrt writes, with sidecars and placeholder files."""
    for engine in engines:
        (root / engine / "1").mkdir(parents=True)
        (root / engine / "onnx").mkdir()
        (root / engine / "config.pbtxt").write_text(f'name: "{engine}"\nplatform: "tensorrt_plan"\n')
        (root / engine / "1" / "model.plan").write_bytes(b"not a real plan")
        (root / engine / "1" / te.SIDECAR_FILE).write_text(record.to_json())
        (root / engine / "onnx" / "model.onnx").write_bytes(b"")
    (root / "pipeline" / "1").mkdir(parents=True)
    return root


def onnx_repository(root: Path) -> Path:
    for engine in ENGINES:
        (root / engine / "1").mkdir(parents=True)
        (root / engine / "1" / "model.onnx.json").write_text("{}")
    return root


def _unexpected(*_: object, **__: object) -> NoReturn:
    raise AssertionError("must not be called")


@pytest.fixture
def no_runtime_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(serve, "runtime_gpu", _unexpected)
    monkeypatch.setattr(serve, "runtime_tensorrt_version", _unexpected)


@pytest.fixture
def fake_runtime(monkeypatch: pytest.MonkeyPatch) -> dict[str, object]:
    """This 'server' has what the dict says (TensorRT 10.8.0 on an H100 unless a test changes it)."""
    runtime: dict[str, object] = {"tensorrt_version": "10.8.0", "gpu": H100}
    monkeypatch.setattr(serve, "runtime_tensorrt_version", lambda: runtime["tensorrt_version"])
    monkeypatch.setattr(serve, "runtime_gpu", lambda: runtime["gpu"])
    return runtime


@pytest.fixture
def triton_starts(monkeypatch: pytest.MonkeyPatch) -> list[serve.ServeOptions]:
    """Stands in for `serve.serve`: records each start instead of running tritonserver."""
    started: list[serve.ServeOptions] = []

    def fake_serve(options: serve.ServeOptions, **_: object) -> int:
        started.append(options)
        return 0

    monkeypatch.setattr(serve, "serve", fake_serve)
    return started


def test_sidecar_file_name_is_the_builders() -> None:
    assert serve.PLAN_SIDECAR == te.SIDECAR_FILE


def test_engine_mismatch_names_each_engine(tmp_path: Path) -> None:
    repository = tensorrt_repository(tmp_path, plan_record("10.3.0.26", A10G))
    with pytest.raises(serve.ServeError) as raised:
        serve.check_engines(repository, tensorrt_version=lambda: "10.8.0", gpu=lambda: H100)
    lines = str(raised.value).splitlines()
    assert lines[0] == (
        f"4 TensorRT engine(s) in {repository} will not load on this server "
        "(--skip-engine-check starts Triton anyway):"
    )
    assert lines[1:] == [
        f"  {engine}: engine built with TensorRT 10.3.0 for NVIDIA A10G (8.6); this server has TensorRT "
        "10.8.0 on NVIDIA H100 80GB HBM3 (9.0): rebuild the engines with build-engines --target tensorrt "
        "inside the serving container"
        for engine in ENGINES
    ]


def test_sd_serve_exits_on_mismatch_without_starting_triton(
    tmp_path: Path,
    fake_runtime: dict[str, object],
    triton_starts: list[serve.ServeOptions],
    capsys: pytest.CaptureFixture[str],
) -> None:
    tensorrt_repository(tmp_path, plan_record("10.3.0.26", A10G))
    fake_runtime["gpu"] = GpuIdentity("NVIDIA A100-SXM4-80GB", "8.0")  # TensorRT differs too
    assert serve.main([f"--model-repository={tmp_path}"]) == 1
    assert triton_starts == []
    err = capsys.readouterr().err
    assert err.startswith("sd-serve: error: 4 TensorRT engine(s) in ")
    assert (
        "  unet: engine built with TensorRT 10.3.0 for NVIDIA A10G (8.6); this server has TensorRT 10.8.0 "
        "on NVIDIA A100-SXM4-80GB (8.0): rebuild the engines" in err
    )
    assert "Traceback" not in err


def test_only_mismatched_engines_are_reported(tmp_path: Path, fake_runtime: dict[str, object]) -> None:
    tensorrt_repository(tmp_path, plan_record("10.8.0.43", H100))
    (tmp_path / "vae_encoder" / "1" / te.SIDECAR_FILE).write_text(plan_record("10.7.0.23", H100).to_json())
    with pytest.raises(serve.ServeError) as raised:
        serve.check_engines(tmp_path)
    assert str(raised.value).splitlines()[1:] == [
        "  vae_encoder: engine built with TensorRT 10.7.0 for NVIDIA H100 80GB HBM3 (9.0); this server has "
        "TensorRT 10.8.0 on NVIDIA H100 80GB HBM3 (9.0): rebuild the engines with build-engines --target "
        "tensorrt inside the serving container"
    ]


def test_matching_engines_pass(
    tmp_path: Path, fake_runtime: dict[str, object], triton_starts: list[serve.ServeOptions]
) -> None:
    # libnvinfer.so.10.8.0 names no build number.
    tensorrt_repository(tmp_path, plan_record("10.8.0.43", H100))
    assert serve.check_engines(tmp_path) == []
    assert serve.main([f"--model-repository={tmp_path}"]) == 0
    assert [options.model_repository for options in triton_starts] == [tmp_path.absolute()]


def test_another_gpu_model_of_the_same_capability_is_refused_unless_skipped(
    tmp_path: Path,
    fake_runtime: dict[str, object],
    triton_starts: list[serve.ServeOptions],
    capsys: pytest.CaptureFixture[str],
) -> None:
    tensorrt_repository(tmp_path, plan_record("10.8.0.43", GpuIdentity("NVIDIA H100 PCIe", "9.0")))
    assert serve.main([f"--model-repository={tmp_path}"]) == 1
    assert triton_starts == []
    err = capsys.readouterr().err
    assert (
        "  unet: engine built with TensorRT 10.8.0 for NVIDIA H100 PCIe (9.0); this server has TensorRT "
        "10.8.0 on NVIDIA H100 80GB HBM3 (9.0): rebuild the engines" in err
    )
    assert "(--skip-engine-check starts Triton anyway)" in err
    assert serve.main([f"--model-repository={tmp_path}", "--skip-engine-check"]) == 0
    assert len(triton_starts) == 1


def test_engines_without_a_gpu(tmp_path: Path) -> None:
    tensorrt_repository(tmp_path, plan_record())
    with pytest.raises(serve.ServeError, match=r"TensorRT engines \(text_encoder, unet, vae_decoder, "):
        serve.check_engines(tmp_path, tensorrt_version=lambda: "10.3.0", gpu=lambda: None)
    with pytest.raises(serve.ServeError, match="need a CUDA GPU, and nvidia-smi lists none"):
        serve.check_engines(tmp_path, tensorrt_version=lambda: None, gpu=lambda: None)


def test_sd_serve_without_a_gpu(
    tmp_path: Path,
    fake_runtime: dict[str, object],
    triton_starts: list[serve.ServeOptions],
    capsys: pytest.CaptureFixture[str],
) -> None:
    tensorrt_repository(tmp_path, plan_record())
    fake_runtime["gpu"] = None
    assert serve.main([f"--model-repository={tmp_path}"]) == 1
    assert triton_starts == []
    err = capsys.readouterr().err
    assert err.startswith("sd-serve: error: the model repository has TensorRT engines (")
    assert "which need a CUDA GPU" in err


def test_unknown_tensorrt_version_warns_and_serves(
    tmp_path: Path,
    fake_runtime: dict[str, object],
    triton_starts: list[serve.ServeOptions],
    capsys: pytest.CaptureFixture[str],
) -> None:
    tensorrt_repository(tmp_path, plan_record())
    fake_runtime["tensorrt_version"] = None
    assert serve.main([f"--model-repository={tmp_path}"]) == 0
    assert len(triton_starts) == 1
    err = capsys.readouterr().err
    assert err.startswith("sd-serve: warning: cannot tell this server's TensorRT version")
    assert err.count("sd-serve: warning:") == 1  # then the CUDA memory pool's line


def test_unknown_gpu_warns(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    tensorrt_repository(tmp_path, plan_record())
    monkeypatch.setenv("PATH", str(tmp_path / "no-tools-here"))
    [warning] = serve.check_engines(tmp_path, tensorrt_version=_unexpected)
    assert warning.startswith("nvidia-smi is not on PATH, so this server's GPU is unknown; not checking")


def test_unreadable_sidecar_warns(tmp_path: Path, fake_runtime: dict[str, object]) -> None:
    tensorrt_repository(tmp_path, plan_record("10.8.0.43", H100))
    (tmp_path / "unet" / "1" / te.SIDECAR_FILE).write_text("{truncated")
    assert serve.check_engines(tmp_path) == [
        f"unet: cannot read {tmp_path / 'unet' / '1' / te.SIDECAR_FILE}; not checking that its engine "
        "fits this server"
    ]


def test_skip_engine_check(
    tmp_path: Path, no_runtime_lookup: None, triton_starts: list[serve.ServeOptions]
) -> None:
    tensorrt_repository(tmp_path, plan_record())
    assert serve.main([f"--model-repository={tmp_path}", "--skip-engine-check"]) == 0
    assert len(triton_starts) == 1


def test_onnx_repository_is_not_checked(
    tmp_path: Path,
    no_runtime_lookup: None,
    triton_starts: list[serve.ServeOptions],
    capsys: pytest.CaptureFixture[str],
) -> None:
    onnx_repository(tmp_path)
    (tmp_path / "unet" / "onnx").mkdir()
    (tmp_path / "unet" / "onnx" / te.SIDECAR_FILE).write_text("{}")  # not a version folder: not Triton's
    assert serve.check_engines(tmp_path) == []
    assert serve.main([f"--model-repository={tmp_path}"]) == 0
    assert len(triton_starts) == 1
    assert capsys.readouterr().err == ""


def test_runtime_found_from_nvidia_smi_and_libnvinfer_without_torch(tmp_path: Path) -> None:
    """The real look-ups, with a fake nvidia-smi and libnvinfer file, in a fresh interpreter."""
    tools, libs = tmp_path / "bin", tmp_path / "lib"
    tools.mkdir()
    libs.mkdir()
    nvidia_smi = tools / "nvidia-smi"
    nvidia_smi.write_text('#!/bin/sh\necho "NVIDIA H100 80GB HBM3, 9.0"\necho "NVIDIA H100 80GB HBM3, 9.0"\n')
    nvidia_smi.chmod(0o755)
    (libs / "libnvinfer.so.10").symlink_to("libnvinfer.so.10.8.0")
    (libs / "libnvinfer.so.10.8.0").write_bytes(b"")
    repository = tensorrt_repository(tmp_path / "repo", plan_record("10.3.0.26", A10G), ("unet",))
    script = (
        "import sys\n"
        "from pathlib import Path\n"
        "from services import serve\n"
        "print(serve.runtime_gpu(), serve.runtime_tensorrt_version())\n"
        "try:\n"
        f"    serve.check_engines(Path({str(repository)!r}))\n"
        "except serve.ServeError as e:\n"
        "    print(e)\n"
        "print('torch imported:', 'torch' in sys.modules)\n"
    )
    env = {**os.environ, "PATH": f"{tools}{os.pathsep}{os.environ['PATH']}", "LD_LIBRARY_PATH": str(libs)}
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=PROJECT_ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "NVIDIA H100 80GB HBM3 (9.0) 10.8.0"
    assert lines[2] == (
        "  unet: engine built with TensorRT 10.3.0 for NVIDIA A10G (8.6); this server has TensorRT 10.8.0 "
        "on NVIDIA H100 80GB HBM3 (9.0): rebuild the engines with build-engines --target tensorrt inside "
        "the serving container"
    )
    assert lines[-1] == "torch imported: False"


# --- Triton's CUDA memory pool ---------------------------------------------------------------------------


def pipeline_repository(
    root: Path, profile: Profile, concurrent: int | None, prefix: str = "", controlnets: tuple[str, ...] = ()
) -> Path:
    """The pipeline models' files sd-serve sizes the pool from: pipeline.json and config.pbtxt."""
    pipeline = triton_model(prefix, PIPELINE)
    for name in (pipeline, stream_model(pipeline)):
        (root / name / "1").mkdir(parents=True, exist_ok=True)
        manifest = PipelineManifest(
            profile, ModelGeometry(), "sd", device="cuda", prefix=prefix, controlnets=controlnets
        )
        manifest.write(root / name / "1" / PIPELINE_MANIFEST)
        config = mc.ModelConfig(name=name, backend="python")
        if concurrent is not None:
            config.parameters["max_concurrent_requests"].string_value = str(concurrent)
        (root / name / "config.pbtxt").write_text(text_format.MessageToString(config))
    return root


def test_cuda_memory_pool_is_sized_from_the_profile(tmp_path: Path) -> None:
    # The default profile (1024 px, 4 images, 3 prompt chunks): the VAE encoder's call holds the most,
    # image 4x3x1024x1024 fp32 (48 MiB) + mean and std 2 x 4x4x128x128 (2 MiB), plus the text encoder's
    # output kept all request long, 6x77x768 fp32 (1.35 MiB): 51.35 MiB per request. 4 + 4 requests at
    # once (pipeline and pipeline_stream), doubled: 821.7 MiB, rounded up to a multiple of 64: 832.
    default = pipeline_repository(tmp_path / "default", Profile(), concurrent=4)
    assert serve.cuda_memory_pool_mib(default) == 832
    # deploy/k8s's GPU overlay: 256..768 px, 2 images, 2 + 2 requests: 2 x 4 x 15.4 MiB = 123.3 -> 128.
    overlay = Profile.square(256, 512, 768, max_batch=2)
    assert serve.cuda_memory_pool_mib(pipeline_repository(tmp_path / "gpu", overlay, concurrent=2)) == 128
    # A config without the parameter counts build-engines' default, --max-batch.
    assert serve.cuda_memory_pool_mib(pipeline_repository(tmp_path / "old", overlay, concurrent=None)) == 128
    assert serve.cuda_memory_pool_mib(tmp_path / "no-pipeline") == serve.DEFAULT_CUDA_POOL_MIB == 512


def test_cuda_memory_pool_holds_controlnet_residuals(tmp_path: Path) -> None:
    # The GPU overlay's profile with ControlNets: a ControlNet call at 768 px on 4 rows (2 guided images)
    # holds the control image 4x3x768x768 fp32 (27 MiB) and its 13 residuals (230.6 MiB), the most of any
    # call, with the latents, timesteps and text: 261.3 MiB, + the text encoder's output: 262.2 MiB per
    # request. 2 + 2 requests, doubled: 2097.9 MiB, rounded up to 2112.
    overlay = Profile.square(256, 512, 768, max_batch=2)
    repository = pipeline_repository(tmp_path, overlay, concurrent=2, controlnets=("canny",))
    assert serve.cuda_memory_pool_mib(repository) == 2112


def test_cuda_memory_pool_counts_every_checkpoint(tmp_path: Path) -> None:
    # Checkpoints side by side (build-engines --prefix) generate at the same time, each at its own profile:
    # 821.7 MiB for the default one (above) + 123.3 MiB for the overlay's = 945.0 MiB, rounded up: 960.
    repository = pipeline_repository(tmp_path, Profile(), concurrent=4)
    pipeline_repository(repository, Profile.square(256, 512, 768, max_batch=2), concurrent=2, prefix="sd15")
    assert serve.cuda_memory_pool_mib(repository) == 960


def test_repository_with_plans_gets_a_pool_sized_for_it(
    tmp_path: Path,
    fake_runtime: dict[str, object],
    triton_starts: list[serve.ServeOptions],
    capsys: pytest.CaptureFixture[str],
) -> None:
    repository = tensorrt_repository(tmp_path, plan_record("10.8.0.43", H100))
    pipeline_repository(repository, Profile(), concurrent=4)
    assert serve.main([f"--model-repository={repository}"]) == 0
    [options] = triton_starts
    assert options.cuda_memory_pool_bytes == 832 * serve.MIB
    assert "--cuda-memory-pool-byte-size=0:872415232" in options.triton_args()
    assert "sd-serve: CUDA memory pool 832 MiB on GPU 0, sized for the repository's profile" in (
        capsys.readouterr().err
    )


def test_cpu_repository_keeps_tritons_pool_unless_asked(
    tmp_path: Path, no_runtime_lookup: None, triton_starts: list[serve.ServeOptions]
) -> None:
    onnx_repository(tmp_path)
    assert serve.main([f"--model-repository={tmp_path}"]) == 0
    assert serve.main([f"--model-repository={tmp_path}", "--cuda-memory-pool-mb", "256"]) == 0
    unasked, asked = triton_starts
    assert unasked.cuda_memory_pool_bytes is None
    assert not any(a.startswith("--cuda-memory-pool-byte-size") for a in unasked.triton_args())
    assert "--cuda-memory-pool-byte-size=0:268435456" in asked.triton_args()


def test_pool_given_to_tritonserver_directly_wins(
    tmp_path: Path,
    fake_runtime: dict[str, object],
    triton_starts: list[serve.ServeOptions],
    capsys: pytest.CaptureFixture[str],
) -> None:
    tensorrt_repository(tmp_path, plan_record("10.8.0.43", H100))
    raw = "--cuda-memory-pool-byte-size=0:1073741824"
    assert serve.main([f"--model-repository={tmp_path}", "--", raw]) == 0
    [options] = triton_starts
    assert options.cuda_memory_pool_bytes is None
    assert [a for a in options.triton_args() if a.startswith("--cuda-memory-pool")] == [raw]
    with pytest.raises(SystemExit) as exited:
        serve.main([f"--model-repository={tmp_path}", "--cuda-memory-pool-mb", "64", "--", raw])
    assert exited.value.code == 2
    assert "give --cuda-memory-pool-mb or --cuda-memory-pool-byte-size after --, not both" in (
        capsys.readouterr().err
    )
    with pytest.raises(SystemExit):
        serve.main([f"--model-repository={tmp_path}", "--cuda-memory-pool-mb", "-1"])


def test_engine_check_covers_lora_branch_plans(tmp_path: Path) -> None:
    """build-engines --lora --target tensorrt puts the UNet's branch plan in unet/1/lora/: checked too."""
    repository = tensorrt_repository(tmp_path, plan_record("10.8.0.43", H100))
    branch = repository / "unet" / "1" / "lora"
    branch.mkdir()
    (branch / "model.plan").write_bytes(b"plan")
    (branch / serve.PLAN_SIDECAR).write_text(plan_record("10.3.0.26", A10G).to_json())
    assert ("unet (LoRA branches)", branch / serve.PLAN_SIDECAR) in serve.plan_sidecars(repository)
    with pytest.raises(serve.ServeError) as raised:
        serve.check_engines(repository, tensorrt_version=lambda: "10.8.0", gpu=lambda: H100)
    [problem] = str(raised.value).splitlines()[1:]
    assert problem.startswith("  unet (LoRA branches): engine built with TensorRT 10.3.0 for NVIDIA A10G")
