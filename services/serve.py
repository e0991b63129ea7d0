"""`sd-serve`: start Triton Inference Server on a model repository and report clearly when it cannot serve.

Uses `tritonserver` from PATH when there is one (e.g. inside the NGC container), else the server bundled in
the nvidia-pytriton wheel, copied once into a cache folder with the python backend stub for this
interpreter (the wheel's layout lacks it, see `prepare_bundled_tritonserver`).

    sd-serve --model-repository model_repository -- --cache-config local,size=1048576

Reusable pieces: `prepare_tritonserver()` finds or prepares the executable, `TritonProcess` runs it
(log passed through, failures diagnosed), `serve()` is the whole command with signal forwarding, and
`check_engines()` tells before Triton starts whether the repository's TensorRT plans fit this machine.
"""

from __future__ import annotations

import argparse
import collections
import errno
import http.client
import importlib.metadata
import importlib.util
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from python_backend.adapters import DEFAULT_CACHE_BYTES, LORA_CACHE_ENV
from python_backend.shapes import DRAIN_FILE_ENV, JOBS_DIR_ENV, LORA_DIR_ENV, OPENVINO_CACHE_ENV
from services import supervisor

if TYPE_CHECKING:
    from build_engines.tensorrt_engine import GpuIdentity

TAIL_LINES = 60
_POLL_INTERVAL_S = 0.2
TRITON_EXIT_TIMEOUT_S = 10
# Plain HTTP to our own server: a proxy from the environment must not be asked for 127.0.0.1.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class ServeError(Exception):
    """An expected failure to serve, reported to the user without a traceback."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# --------------------------------------------------------------------------------------------------------
# Finding / preparing the tritonserver executable


@dataclass(frozen=True)
class TritonCommand:
    """How to launch a tritonserver installation."""

    executable: Path
    args: tuple[str, ...] = ()  # arguments the installation itself needs (backend and cache folders)
    env: Mapping[str, str] | None = None  # None: inherit our environment unchanged


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "sd-triton"


def prepare_tritonserver(cache_dir: Path | None = None) -> TritonCommand:
    """`tritonserver` from PATH as is, else the nvidia-pytriton one (prepared on first use)."""
    on_path = shutil.which("tritonserver")
    if on_path:
        return TritonCommand(Path(on_path))
    return prepare_bundled_tritonserver(cache_dir)


def prepare_bundled_tritonserver(cache_dir: Path | None = None) -> TritonCommand:
    """Make the tritonserver of the nvidia-pytriton wheel runnable, once per wheel version and Python.

    As shipped its python backend finds no stub; a copy of bin/, backends/ and caches/ with the stub for
    this Python in backends/python/ works. The copy is made in a temporary folder and renamed into place,
    so concurrent first starts cannot leave a half-copied installation behind.
    """
    spec = importlib.util.find_spec("pytriton")  # locates the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ServeError(
            "no tritonserver on PATH and nvidia-pytriton is not installed: pip install 'sd-triton[serve]', "
            "or run inside the Triton container"
        )
    package = Path(next(iter(spec.submodule_search_locations)))
    source = package / "tritonserver"
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = source / "python_backend_stubs" / python / "triton_python_backend_stub"
    if not stub.is_file():
        raise ServeError(f"nvidia-pytriton has no python backend stub for Python {python} ({stub})")

    root = cache_dir or default_cache_dir()
    target = root / f"tritonserver-pytriton{importlib.metadata.version('nvidia-pytriton')}-py{python}"
    if not target.is_dir():
        try:
            _install_atomically(source, stub, target)
        except OSError as e:
            raise ServeError(
                f"cannot prepare tritonserver in {root}: {e} (set XDG_CACHE_HOME elsewhere)"
            ) from e

    env = dict(os.environ)
    # The copy lost the binary's RPATH to the wheel's libraries. LIBDIR makes the stub load the libpython
    # of this interpreter, not the system's one next to another stdlib (that breaks multiprocessing).
    env["LD_LIBRARY_PATH"] = _path_list(
        str(package.parent / "nvidia_pytriton.libs"),
        sysconfig.get_config_var("LIBDIR"),
        env.get("LD_LIBRARY_PATH"),
    )
    # The stub finds its site-packages (numpy, ...) through the `python` it sees first on PATH.
    env["PATH"] = _path_list(sysconfig.get_path("scripts"), env.get("PATH"))
    return TritonCommand(
        executable=target / "bin" / "tritonserver",
        args=(f"--backend-directory={target / 'backends'}", f"--cache-directory={target / 'caches'}"),
        env=env,
    )


def _install_atomically(source: Path, stub: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name in ("bin", "backends", "caches"):
            shutil.copytree(source / name, staging / name, ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy2(stub, staging / "backends" / "python" / stub.name)
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():  # else another process finished first: use its copy
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _path_list(*parts: str | None) -> str:
    return os.pathsep.join(part for part in parts if part)


# --------------------------------------------------------------------------------------------------------
# TensorRT engines: will they load here?

PLAN_SIDECAR = "model.plan.json"  # build_engines.tensorrt_engine.SIDECAR_FILE, written beside each plan


class EngineCheckSkipped(Exception):
    """The runtime cannot be identified; the message says why (a warning: Triton will have its say)."""


def plan_sidecars(repository: Path) -> list[tuple[str, Path]]:
    """(model name, sidecar) for each `MODEL/<version>/model.plan.json` in the repository, and each LoRA
    branch plan beside one (`MODEL/<version>/lora/model.plan.json`, build-engines --lora)."""
    found = []
    for sidecar in sorted(repository.glob(f"*/*/{PLAN_SIDECAR}")) + sorted(
        repository.glob(f"*/*/lora/{PLAN_SIDECAR}")
    ):
        branch = sidecar.parent.name == "lora"
        version_dir = sidecar.parent.parent if branch else sidecar.parent
        model, version = version_dir.parent.name, version_dir.name
        if version.isdigit():  # Triton ignores other folders (build-engines keeps the ONNX in onnx/)
            name = model if version == "1" else f"{model} version {version}"
            found.append((f"{name} (LoRA branches)" if branch else name, sidecar))
    return found


def runtime_tensorrt_version() -> str | None:
    """The TensorRT Triton's TensorRT backend will load: libnvinfer.so.<version> (None: not found)."""
    from build_engines.tensorrt_engine import runtime_tensorrt_version  # stdlib and numpy only, no torch

    return runtime_tensorrt_version()


def runtime_gpu() -> GpuIdentity | None:
    """The first GPU nvidia-smi lists; None when it lists none. Without nvidia-smi we cannot tell."""
    if shutil.which("nvidia-smi") is None:
        raise EngineCheckSkipped("nvidia-smi is not on PATH, so this server's GPU is unknown")
    from build_engines.tensorrt_engine import nvidia_smi_gpu

    return nvidia_smi_gpu()


def check_engines(
    repository: Path,
    *,
    tensorrt_version: Callable[[], str | None] | None = None,
    gpu: Callable[[], GpuIdentity | None] | None = None,
) -> list[str]:
    """Raise `ServeError` naming each TensorRT plan that will not load here; return warnings to print.

    Reads the sidecars build-engines writes beside each plan; a repository without any (ONNX models)
    is not looked at further. `tensorrt_version` and `gpu` find this machine's (default: libnvinfer's
    file name and nvidia-smi, so nothing heavy is imported); `gpu` may raise `EngineCheckSkipped`.
    """
    sidecars = plan_sidecars(repository)
    if not sidecars:
        return []
    from build_engines.tensorrt_engine import plan_mismatch, read_plan_record

    names = ", ".join(name for name, _ in sidecars)
    skipped = f"not checking that the TensorRT engines ({names}) were built for this server"
    try:
        here = (gpu or runtime_gpu)()
    except EngineCheckSkipped as e:
        return [f"{e}; {skipped}"]
    if here is None:
        raise ServeError(
            f"the model repository has TensorRT engines ({names}), which need a CUDA GPU, and nvidia-smi "
            "lists none: serve them on a GPU machine (docker run --gpus all ...), or start Triton anyway "
            "with --skip-engine-check"
        )
    version = (tensorrt_version or runtime_tensorrt_version)()
    if version is None:
        return [
            "cannot tell this server's TensorRT version (no libnvinfer.so.<version> on LD_LIBRARY_PATH, in "
            f"the system library folders or in ldconfig's cache); {skipped}"
        ]
    warnings: list[str] = []
    problems: list[str] = []
    for name, sidecar in sidecars:
        record = read_plan_record(sidecar)
        if record is None:
            warnings.append(f"{name}: cannot read {sidecar}; not checking that its engine fits this server")
        elif mismatch := plan_mismatch(record, version, here):
            problems.append(f"  {name}: {mismatch}")
    if problems:
        headline = (
            f"{len(problems)} TensorRT engine(s) in {repository} will not load on this server "
            "(--skip-engine-check starts Triton anyway):"
        )
        raise ServeError("\n".join([headline, *problems]))
    return warnings


# --------------------------------------------------------------------------------------------------------
# OpenVINO engines: does this CPU run their precision?

IR_FILE = "model.xml"  # python_backend.ov_sessions.IR_FILE (importing it imports OpenVINO)
DEFAULT_OPENVINO_CACHE = "openvino"  # under default_cache_dir(): compiled models, per host
_OPENVINO_BACKEND = re.compile(r'backend:\s*"openvino"')
_HINT_BF16 = re.compile(r'key:\s*"HINT_BF16"')


@dataclass(frozen=True)
class OpenVinoEngine:
    precision: str  # build-engines --precision; Triton's openvino backend: "bf16" if hinted, else "fp32"
    native: bool  # on Triton's openvino backend (build-engines --openvino-backend native)


def openvino_engines(repository: Path) -> dict[str, OpenVinoEngine]:
    """Model name → how its OpenVINO IR is served, as its config.pbtxt says: our python model's `precision`
    parameter, or Triton's openvino backend with or without HINT_BF16 (it takes no other precision)."""
    found = {}
    for ir in sorted(repository.glob(f"*/*/{IR_FILE}")):
        model_dir = ir.parent.parent
        if not ir.parent.name.isdigit():
            continue
        try:
            config = (model_dir / "config.pbtxt").read_text()
        except OSError:
            continue
        if _OPENVINO_BACKEND.search(config):
            found[model_dir.name] = OpenVinoEngine("bf16" if _HINT_BF16.search(config) else "fp32", True)
        elif precision := _string_parameter(config, "precision"):
            found[model_dir.name] = OpenVinoEngine(precision, False)
    return found


def check_openvino_precision(
    repository: Path, host_supports: Callable[[str], bool] | None = None
) -> list[str]:
    """Raise `ServeError` when the repository's OpenVINO engines are served at a precision this CPU does not
    run natively (bf16, or int8-hybrid-bf16's other ops, without AVX512_BF16 or AMX: OpenVINO would emulate
    it, many times slower, or refuse it); return warnings to print. `host_supports`: build-engines
    --precision → whether this CPU runs it (ov_sessions.host_supports; tests give their own)."""
    engines = openvino_engines(repository)
    if not engines:
        return []
    supports = host_supports or _openvino_host_supports
    unsupported = sorted(f"{m} ({e.precision})" for m, e in engines.items() if not supports(e.precision))
    if unsupported:
        raise ServeError(
            f"the OpenVINO engines {', '.join(unsupported)} were built for bf16 inference, which this CPU "
            "does not run (it needs AVX512_BF16 or AMX): rebuild them with build-engines --target openvino "
            "--precision fp32 (or int8-hybrid), or serve them on such a CPU (--skip-engine-check starts "
            "Triton anyway)"
        )
    # fp32 and int8-hybrid (its unquantized ops) run f32 by our hint, which the native backend cannot give
    native_f32 = sorted(model for model, e in engines.items() if e.native and e.precision == "fp32")
    if native_f32 and supports("bf16"):
        return [
            f"{', '.join(native_f32)}: OpenVINO engines built for f32 inference (fp32, int8-hybrid) on "
            "Triton's openvino backend run in bf16 on this CPU (the backend cannot ask for f32): build with "
            "--openvino-backend python for f32"
        ]
    return []


def _openvino_host_supports(precision: str) -> bool:
    from python_backend.ov_sessions import host_supports  # imports OpenVINO: only for such repositories

    return host_supports(precision)


# --------------------------------------------------------------------------------------------------------
# Triton's CUDA memory pool: where the GPU tensors of the pipeline's BLS calls go

MIB = 1 << 20
CUDA_POOL_FLAG = "--cuda-memory-pool-byte-size"
# Used when the repository's pipeline.json cannot be read (a repository build-engines did not write).
DEFAULT_CUDA_POOL_MIB = 512
_POOL_STEP_MIB = 64  # Triton's own default pool size; sizes are rounded up to multiples of it


def has_tensorrt_plans(repository: Path) -> bool:
    """Whether any model of the repository has a TensorRT plan in a version folder (GPU engines)."""
    return any(p.parent.name.isdigit() for p in repository.glob("*/*/model.plan"))


def cuda_memory_pool_mib(repository: Path) -> int:
    """A CUDA memory pool size for this repository: every request the pipeline models (each checkpoint's
    `pipeline` and `pipeline_stream`, however prefixed: those with a pipeline.json) generate at once holding
    its largest set of engine tensors (`shapes.request_engine_tensor_bytes` for its checkpoint's profile),
    doubled (slack for the pool allocator's fragmentation and for tensors Python has not released yet when
    the next call allocates), rounded up to a multiple of 64 MiB. DEFAULT_CUDA_POOL_MIB when no pipeline.json
    can be read (a repository build-engines did not write).

    Why it matters: BLS outputs of GPU engines, and the GPU inputs the pipeline sends, are allocated from
    this pool (Triton's default is 64 MB); past it each tensor is a cudaMalloc shared through CUDA IPC.
    """
    from python_backend.shapes import PIPELINE_MANIFEST, PipelineManifest, request_engine_tensor_bytes

    needed = 0
    for path in sorted(repository.glob(f"*/*/{PIPELINE_MANIFEST}")):
        model_dir = path.parents[1]
        try:
            manifest = PipelineManifest.read(path)
        except (OSError, ValueError, KeyError, TypeError):
            continue
        concurrent = _max_concurrent_requests(model_dir, manifest.profile.max_batch)
        per_request = request_engine_tensor_bytes(
            manifest.profile, manifest.geometry, bool(manifest.controlnets)
        )
        needed += 2 * concurrent * per_request
    if not needed:
        return DEFAULT_CUDA_POOL_MIB
    steps = -(-needed // (_POOL_STEP_MIB * MIB))  # ceiling division
    return steps * _POOL_STEP_MIB


def _max_concurrent_requests(model_dir: Path, default: int) -> int:
    """The pipeline model's `max_concurrent_requests` parameter (build-engines writes it); 0 without the
    model; `default` (build-engines' own default, --max-batch) when its config does not say."""
    try:
        config = (model_dir / "config.pbtxt").read_text()
    except OSError:
        return 0
    value = _string_parameter(config, "max_concurrent_requests")
    return int(value) if value and value.isdigit() else default


def _string_parameter(config: str, key: str) -> str | None:
    """A model config's (config.pbtxt text) string parameter `key`, or None."""
    match = re.search(rf'key:\s*"{re.escape(key)}"\s*value\s*\{{\s*string_value:\s*"([^"]*)"', config)
    return match[1] if match else None


# --------------------------------------------------------------------------------------------------------
# Running it


@dataclass(frozen=True)
class ServeOptions:
    model_repository: Path
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_verbose: int = 0
    cuda_memory_pool_bytes: int | None = None  # on GPU 0; None: Triton's default (64 MB)
    extra_args: tuple[str, ...] = ()  # passed to tritonserver as given, after ours
    lora_dir: Path | None = None  # the LoRA files prompts name with <lora:NAME:MULT>
    lora_cache_bytes: int | None = None  # compiled LoRA sets each engine process keeps; None: the default
    openvino_cache_dir: Path | None = None  # OpenVINO engines' compiled models on disk; None: none kept

    def environment(self) -> dict[str, str]:
        """What tritonserver's model processes read from their environment."""
        env = {}
        if self.openvino_cache_dir is not None:
            env[OPENVINO_CACHE_ENV] = str(self.openvino_cache_dir)
        if self.lora_dir is not None:
            env[LORA_DIR_ENV] = str(self.lora_dir)
        if self.lora_cache_bytes is not None:
            env[LORA_CACHE_ENV] = str(self.lora_cache_bytes)
        return env

    def triton_args(self) -> list[str]:
        pool = self.cuda_memory_pool_bytes
        return [
            f"--model-repository={self.model_repository}",
            # Every model at start, and sd-serve may reload one whose process died (supervisor.py).
            "--model-control-mode=explicit",
            "--load-model=*",
            "--strict-readiness=true",  # not ready while any model is unloading or loading
            "--exit-on-error=true",  # a model that fails to load ends the server
            # sd-serve has drained the pipelines before it stops Triton: nothing is left to wait for.
            f"--exit-timeout-secs={TRITON_EXIT_TIMEOUT_S}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            f"--log-verbose={self.log_verbose}",
            *([f"{CUDA_POOL_FLAG}=0:{pool}"] if pool is not None else []),
            *self.extra_args,
        ]

    def ready_line(self) -> str:
        return (
            f"sd-serve: ready (http://{_host_port(self.host, self.http_port)}, "
            f"grpc {_host_port(self.host, self.grpc_port)}, "
            f"metrics http://{_host_port(self.host, self.metrics_port)}/metrics)"
        )


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


class LogDiagnosis:
    """What Triton's log says went wrong, fed line by line as the server writes it."""

    _LOAD_FAILED = re.compile(r"failed to load '([^']+)' version \d+: (.*?)(?:\\n|\"?$)")
    _POLL_FAILED = re.compile(r"Poll failed for model directory '([^']+)': (.*?)(?:\\n|\"?$)")
    _STATUS_ROW = re.compile(r"^\|\s*(\S+)\s*\|\s*\d+\s*\|\s*UNAVAILABLE:\s*(.*?)\s*\|$")
    _STUB_PREINIT_FAILED = re.compile(r"Failed to preinitialize Python stub: (.*?)\s*$")
    _MODEL_FROM_PATH = re.compile(r"/([^/']+)/\d+/[^/']+'")
    _SERVICE_FAILED = re.compile(r"(failed to start \w+ service: .*?)\s*\"?$")
    _SERVER_ERROR = re.compile(r"^error: (.*)")

    def __init__(self) -> None:
        self.failed_models: dict[str, str] = {}  # model name -> first line of the reason
        self.errors: list[str] = []
        # Set when the server will neither become ready nor exit by itself.
        self.hopeless = threading.Event()

    def feed(self, line: str) -> None:
        for pattern in (self._LOAD_FAILED, self._POLL_FAILED, self._STATUS_ROW):
            if match := pattern.search(line):
                self.failed_models.setdefault(match[1], match[2])
                return
        if match := self._STUB_PREINIT_FAILED.search(line):
            # Triton 2.51 waits forever for a python model whose stub failed this early (model.py missing).
            model = self._MODEL_FROM_PATH.search(match[1])
            self.failed_models.setdefault(model[1] if model else "(unknown python model)", match[1])
            self.hopeless.set()
        elif match := self._SERVICE_FAILED.search(line) or self._SERVER_ERROR.search(line):
            self.errors.append(match[1])


class TritonProcess:
    """A tritonserver child process whose log is echoed to our stderr as it comes, the last lines kept.

    Usable as a context manager (start on enter, stop on exit). It forwards no signals: see `serve`.
    """

    def __init__(
        self,
        options: ServeOptions,
        command: TritonCommand | None = None,
        *,
        echo_log: bool = True,
        tail_lines: int = TAIL_LINES,
    ) -> None:
        self.options = options
        self.command = command
        self.diagnosis = LogDiagnosis()
        self._echo_log = echo_log
        self._tail: collections.deque[str] = collections.deque(maxlen=tail_lines)
        self._process: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process else None

    def start(self) -> None:
        options = self.options
        if not options.model_repository.is_dir():
            raise ServeError(f"model repository {options.model_repository} does not exist or is not a folder")
        for what, port in (
            ("HTTP", options.http_port),
            ("gRPC", options.grpc_port),
            ("metrics", options.metrics_port),
        ):
            _check_port_free(options.host, port, what)
        command = self.command = self.command or prepare_tritonserver()
        self._process = subprocess.Popen(
            [str(command.executable), *command.args, *options.triton_args()],
            env=command.env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            encoding="utf-8",
            errors="replace",
            # Its own process group: a terminal's Ctrl-C reaches sd-serve alone, which stops it gracefully.
            start_new_session=True,
            preexec_fn=supervisor.die_with_parent,  # a prctl call only, between fork and exec
        )
        self._reader = threading.Thread(target=self._read_log, name="tritonserver-log", daemon=True)
        self._reader.start()

    def _read_log(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        for line in self._process.stdout:
            if self._echo_log:
                try:
                    sys.stderr.write(line)
                    sys.stderr.flush()
                except (OSError, ValueError):  # our stderr went away: keep draining, or the server blocks
                    self._echo_log = False
            line = line.rstrip()
            self._tail.append(line)
            self.diagnosis.feed(line)

    @property
    def http_base(self) -> str:
        """The HTTP endpoint's base URL, reachable from this machine (a wildcard host is not)."""
        host = {"": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(
            self.options.host, self.options.host
        )
        return f"http://{_host_port(host, self.options.http_port)}"

    @property
    def metrics_url(self) -> str:
        return self.http_base.rsplit(":", 1)[0] + f":{self.options.metrics_port}/metrics"

    def poll(self) -> int | None:
        return self._running_process().poll()

    def wait_ready(self, timeout: float, stop: threading.Event | None = None) -> bool:
        """Poll /v2/health/ready until 200 (True), or until `stop` is set (False); on failure stop the
        server and raise `ServeError`."""
        process = self._running_process()
        url = f"{self.http_base}/v2/health/ready"
        deadline = time.monotonic() + timeout
        while True:
            if stop is not None and stop.is_set():
                return False
            returncode = process.poll()
            if returncode is not None:
                raise ServeError(
                    self.failure_report(f"tritonserver exited with code {returncode} before becoming ready"),
                    exit_code=_exit_code(returncode) or 1,
                )
            if self.diagnosis.hopeless.is_set():
                self.stop()
                raise ServeError(
                    self.failure_report("tritonserver would wait forever for a model that failed, stopped it")
                )
            if _http_ok(url):
                return True
            if time.monotonic() > deadline:
                self.stop()
                raise ServeError(
                    self.failure_report(f"tritonserver not ready after {timeout:g} s, stopped it")
                )
            time.sleep(_POLL_INTERVAL_S)

    def send_signal(self, signum: int) -> None:
        if self._process is not None:
            self._process.send_signal(signum)  # no-op once the process has been waited for

    def wait(self, timeout: float | None = None) -> int:
        """The server's exit code, once it has exited and its log has been read to the end."""
        returncode = self._running_process().wait(timeout)
        self._join_reader()
        return returncode

    def stop(self, timeout: float = TRITON_EXIT_TIMEOUT_S + 5) -> int:
        """SIGTERM, then SIGKILL if Triton has not exited after `timeout` seconds (past its own limit)."""
        process = self._running_process()
        process.terminate()
        try:
            return self.wait(timeout)
        except subprocess.TimeoutExpired:
            return self.kill()

    def kill(self) -> int:
        """SIGKILL tritonserver and the python backend stubs it started (they would outlive it), and
        remove their shared memory regions."""
        process = self._running_process()
        stubs = supervisor.child_stubs(process.pid)
        process.kill()
        supervisor.kill_stubs(stubs)
        returncode = process.wait()
        supervisor.reap_adopted_stubs()  # started after we looked, then adopted by us (subreaper)
        self._join_reader()
        return returncode

    def log_tail(self) -> list[str]:
        return list(self._tail)

    def failure_report(self, headline: str) -> str:
        self._join_reader()
        failed = self.diagnosis.failed_models
        if failed:
            headline += f"; model(s) failed to load: {', '.join(map(repr, failed))}"
        lines = [headline]
        lines += [f"  model {name!r}: {reason}" for name, reason in failed.items()]
        lines += [f"  tritonserver: {error}" for error in self.diagnosis.errors]
        tail = self.log_tail()
        lines += [f"--- last {len(tail)} lines of the tritonserver log ---", *tail]
        return "\n".join(lines)

    def _running_process(self) -> subprocess.Popen[str]:
        if self._process is None:
            raise RuntimeError("TritonProcess.start() was not called")
        return self._process

    def _join_reader(self) -> None:
        # Bounded: python backend stubs, which share the pipe, may outlive the server by a moment.
        if self._reader is not None and (self._process is None or self._process.poll() is not None):
            self._reader.join(timeout=5)

    def __enter__(self) -> TritonProcess:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self._process is not None and self._process.poll() is None:
            self.stop()


def _check_port_free(host: str, port: int, what: str) -> None:
    """Fail before starting: against a port already serving, our readiness poll could ask another server.

    SO_REUSEADDR as Triton sets it, so a port in TIME_WAIT from a previous run counts as free.
    """
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise ServeError(f"{what} port {_host_port(host, port)} is already in use") from e
        raise ServeError(f"cannot bind the {what} port {_host_port(host, port)}: {e}") from e


def _http_ok(url: str) -> bool:
    try:
        with _NO_PROXY_OPENER.open(url, timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, http.client.HTTPException):  # refused, not ready yet (HTTPError), reset...
        return False


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N: 128 + N, as shells do


@dataclass(frozen=True)
class Supervision:
    """What `serve` does beyond running tritonserver (see services/supervisor.py)."""

    grace_period_s: float = 30.0  # a stop lets requests in progress finish for this long
    max_restarts: int = 5  # server restarts allowed within `restart_window_s`; one more ends sd-serve
    restart_window_s: float = 600.0
    poll_interval_s: float = 0.5
    reload_timeout_s: float = 600.0


def serve(
    options: ServeOptions,
    *,
    ready_timeout: float = 600.0,
    command: TritonCommand | None = None,
    supervision: Supervision = Supervision(),
) -> int:
    """Run tritonserver until asked to stop; keep it serving meanwhile. Returns the exit code.

    - Prints the ready line on stdout once the server answers ready (and a line each time it recovers).
    - A python stub that dies is repaired: an engine model is reloaded, a pipeline model by restarting
      the server; so is a server that exits by itself (at most `max_restarts` times per window).
    - SIGTERM/SIGINT stop it gracefully: the pipelines refuse new requests (UNAVAILABLE), those in
      progress get `grace_period_s` to finish, then Triton is stopped. Exit code 0 when none was cut off.
      A second signal stops at once.
    Must run in the main thread (signals). Raises `ServeError` when the server cannot start.
    """
    signals: list[int] = []
    stop = threading.Event()
    state: dict[str, TritonProcess] = {}

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        signals.append(signum)
        stop.set()
        if len(signals) > 1 and "server" in state:  # asked twice: no more waiting
            state["server"].send_signal(signal.SIGKILL)

    previous = {signum: signal.signal(signum, on_signal) for signum in (signal.SIGINT, signal.SIGTERM)}
    drain_dir = Path(tempfile.mkdtemp(prefix="sd-serve-"))
    drain_file = drain_dir / "draining"
    restarts: collections.deque[float] = collections.deque()
    try:
        supervisor.become_subreaper()
        command = command or prepare_tritonserver()
        env = {**(command.env or os.environ), **options.environment(), DRAIN_FILE_ENV: str(drain_file)}
        env.setdefault(JOBS_DIR_ENV, str(drain_dir / "jobs"))  # this server's jobs only (interrupt/skip)
        command = TritonCommand(command.executable, command.args, env)
        while True:
            server = state["server"] = TritonProcess(options, command)
            with server:  # stops the server should anything below raise while it runs
                if not server.wait_ready(ready_timeout, stop):
                    return _stop(server, drain_file, 0)  # asked to stop while it was starting
                if restarts:
                    _log("recovered")
                print(options.ready_line(), flush=True)
                problem = _watch(server, stop, supervision)
                if problem is None:
                    return _stop(server, drain_file, supervision.grace_period_s)
                now = time.monotonic()
                while restarts and now - restarts[0] > supervision.restart_window_s:
                    restarts.popleft()
                if len(restarts) >= supervision.max_restarts:
                    server.kill()
                    raise ServeError(
                        server.failure_report(
                            f"{problem}; not restarting tritonserver again: it was restarted "
                            f"{len(restarts)} times in the last {supervision.restart_window_s:g} s"
                        )
                    )
                restarts.append(now)
                _log(f"{problem}; restarting tritonserver")
                server.kill()
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        supervisor.reap_adopted_stubs()
        shutil.rmtree(drain_dir, ignore_errors=True)


def _log(message: str) -> None:
    print(f"sd-serve: {message}", file=sys.stderr, flush=True)


def _watch(server: TritonProcess, stop: threading.Event, supervision: Supervision) -> str | None:
    """Watch the running server until `stop` is set (None) or it needs a restart (the reason why).

    Engine models whose stub died are reloaded here; the server is not ready meanwhile.
    """
    pid = server.pid
    assert pid is not None
    control = supervisor.ModelControl(server.http_base, server.metrics_url)
    stubs = supervisor.child_stubs(pid)
    while not stop.wait(supervision.poll_interval_s):
        returncode = server.poll()
        if returncode is not None:
            return f"tritonserver exited with code {returncode}"
        dead = [stub for stub in stubs if not supervisor.is_alive(stub)]
        if not dead:
            continue
        for stub in dead:
            if stub.is_pipeline:  # its requests hang and it cannot be unloaded: see supervisor.py
                return f"the {stub.model} model's process (pid {stub.pid}) died"
        for model in sorted({stub.model for stub in dead}):
            _log(f"the {model} model's process died; reloading it (the server is not ready until then)")
            started = time.monotonic()
            try:
                control.unload(model)
                control.load(model, supervision.reload_timeout_s)
            except (OSError, RuntimeError) as e:
                return f"reloading {model} failed: {e}"
            _log(f"{model} reloaded in {time.monotonic() - started:.1f} s")
        stubs = supervisor.child_stubs(pid)
    return None


def _stop(server: TritonProcess, drain_file: Path, grace_period_s: float) -> int:
    """Refuse new requests, give those in progress `grace_period_s`, then stop Triton."""
    drain_file.touch()
    control = supervisor.ModelControl(server.http_base, server.metrics_url)
    deadline = time.monotonic() + grace_period_s
    in_progress = 0
    while server.poll() is None:
        try:
            in_progress = control.requests_in_progress()
        except OSError:  # metrics disabled or not answering: nothing to wait on
            break
        if in_progress == 0 or time.monotonic() > deadline:
            break
        time.sleep(_POLL_INTERVAL_S)
    returncode = server.stop() if server.poll() is None else server.wait()
    if in_progress:
        _log(f"{in_progress} request(s) still in progress after the grace period of {grace_period_s:g} s")
        return 1
    return _exit_code(returncode)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports nothing listens on now (all held open together while picking, so they are distinct)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def _port(text: str) -> int:
    port = int(text)
    if not 1 <= port <= 65535:  # 0 would let Triton pick one we cannot poll for readiness
        raise argparse.ArgumentTypeError(f"must be in 1..65535, got {port}")
    return port


def _mib(text: str) -> int:
    mib = int(text)
    if mib < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0: no pool), got {mib}")
    return mib


def _megabytes(text: str) -> int:
    mib = int(text)
    if mib < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {mib}")
    return mib


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        prog="sd-serve",
        usage="sd-serve --model-repository REPO [options] [-- TRITONSERVER_ARGS...]",
        description="Start Triton Inference Server on a model repository; exit non-zero if it cannot serve.",
        epilog="Arguments after `--` go to tritonserver as given, e.g. -- --cache-config local,size=1048576",
    )
    parser.add_argument("--model-repository", type=Path, required=True, metavar="REPO")
    parser.add_argument("--host", default="127.0.0.1", help="address for HTTP, gRPC and metrics")
    parser.add_argument("--http-port", type=_port, default=8000)
    parser.add_argument("--grpc-port", type=_port, default=8001)
    parser.add_argument("--metrics-port", type=_port, default=8002)
    parser.add_argument("--log-verbose", type=int, default=0, metavar="N", help="tritonserver's verbosity")
    parser.add_argument(
        "--ready-timeout", type=float, default=600.0, metavar="SECONDS", help="give up if not ready by then"
    )
    parser.add_argument(
        "--grace-period",
        type=float,
        default=Supervision.grace_period_s,
        metavar="SECONDS",
        help="on SIGTERM/SIGINT, refuse new requests and give those in progress this long to finish "
        "(default %(default)s; a second signal stops at once)",
    )
    parser.add_argument(
        "--max-restarts",
        type=int,
        default=Supervision.max_restarts,
        metavar="N",
        help="restart a crashed tritonserver (or one whose pipeline process died) at most N times in "
        f"{Supervision.restart_window_s:g} s, then exit non-zero (default %(default)s)",
    )
    parser.add_argument(
        "--cuda-memory-pool-mb",
        type=_mib,
        metavar="MB",
        help="Triton's CUDA memory pool on GPU 0 in MiB, where the pipeline's GPU tensors cross BLS "
        "(default: sized from the repository's profile when it has TensorRT plans, else Triton's 64 MB)",
    )
    parser.add_argument(
        "--lora-dir",
        type=Path,
        metavar="DIR",
        help="the LoRA files (.safetensors, searched recursively) that prompts name with <lora:NAME:MULT>; "
        "files added later are found without a restart",
    )
    parser.add_argument(
        "--lora-cache-mb",
        type=_megabytes,
        metavar="MB",
        help="memory each LoRA-applying engine process (text encoder, UNet) keeps for compiled LoRA sets, "
        f"least recently used dropped first (default {DEFAULT_CACHE_BYTES // MIB})",
    )
    parser.add_argument(
        "--openvino-cache-dir",
        default=str(default_cache_dir() / DEFAULT_OPENVINO_CACHE),
        metavar="DIR",
        help="where OpenVINO engines keep the models they compile for each input shape, so that a restart "
        "or a shape compiled before imports them instead of compiling again (default: %(default)s; "
        "'' for none)",
    )
    parser.add_argument(
        "--skip-engine-check",
        action="store_true",
        help="start Triton even if the TensorRT engines' sidecars say they were built for another "
        "TensorRT or GPU, or the OpenVINO engines for a precision this CPU does not run",
    )
    args = parser.parse_args(argv[:split])
    if args.lora_dir is not None and not args.lora_dir.is_dir():
        parser.error(f"--lora-dir {args.lora_dir} is not a folder")
    extra_args = tuple(argv[split + 1 :])
    repository = args.model_repository.absolute()
    pool_in_extra = any(a.split("=", 1)[0] == CUDA_POOL_FLAG for a in extra_args)
    if args.cuda_memory_pool_mb is not None and pool_in_extra:
        parser.error(f"give --cuda-memory-pool-mb or {CUDA_POOL_FLAG} after --, not both")
    try:
        if not args.skip_engine_check:
            for warning in [*check_engines(repository), *check_openvino_precision(repository)]:
                print(f"sd-serve: warning: {warning}", file=sys.stderr, flush=True)
        pool_mib = args.cuda_memory_pool_mb
        if pool_mib is None and not pool_in_extra and has_tensorrt_plans(repository):
            # GPU engines only: a CPU repository keeps Triton's default (the pool is unused there).
            pool_mib = cuda_memory_pool_mib(repository)
            print(
                f"sd-serve: CUDA memory pool {pool_mib} MiB on GPU 0, sized for the repository's profile "
                "(--cuda-memory-pool-mb sets another)",
                file=sys.stderr,
                flush=True,
            )
        options = ServeOptions(
            model_repository=repository,
            host=args.host,
            http_port=args.http_port,
            grpc_port=args.grpc_port,
            metrics_port=args.metrics_port,
            log_verbose=args.log_verbose,
            cuda_memory_pool_bytes=None if pool_mib is None else pool_mib * MIB,
            extra_args=extra_args,
            lora_dir=None if args.lora_dir is None else args.lora_dir.absolute(),
            lora_cache_bytes=None if args.lora_cache_mb is None else args.lora_cache_mb * MIB,
            openvino_cache_dir=Path(args.openvino_cache_dir).absolute() if args.openvino_cache_dir else None,
        )
        supervision = Supervision(grace_period_s=args.grace_period, max_restarts=args.max_restarts)
        return serve(options, ready_timeout=args.ready_timeout, supervision=supervision)
    except ServeError as e:
        print(f"sd-serve: error: {e}", file=sys.stderr, flush=True)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
