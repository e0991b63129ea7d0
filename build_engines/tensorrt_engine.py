"""Build TensorRT engines (model.plan) from our ONNX files, and tell whether a built plan fits a server.

Networks are strongly typed: precision comes from the ONNX file (exported in fp16), never from builder
flags (TensorRT 10.12 deprecates them and 11 removes BuilderFlag.FP16). Each plan gets one optimization
profile, because Triton's TensorRT backend uses profile 0 unless the config lists others. A JSON sidecar
records what the plan was built from and for; a rebuild with the same record is skipped.

Plans only load on the TensorRT release and GPU compute capability that built them, and are only meant for
the GPU model that built them, so the sidecar also lets sd-serve refuse a mismatch with a clear message
instead of surfacing Triton's deserialization error (or a plan that loads and then fails).

`tensorrt` is imported inside functions: this module must import (for the shape math and the checks) on
machines without it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from build_engines.digests import file_sha256
from python_backend.shapes import EngineSpec, Profile

if TYPE_CHECKING:
    from tensorrt import IBuilderConfig, IHostMemory, INetworkDefinition, ITimingCache

PLAN_FILE = "model.plan"
SIDECAR_FILE = "model.plan.json"
REBUILD_HINT = "rebuild the engines with build-engines --target tensorrt inside the serving container"
INSTALL_HINT = (
    "install the tensorrt Python package matching the Triton container's TensorRT (build inside "
    "nvcr.io/nvidia/tritonserver:<yy.mm>-py3, which ships it), and a CUDA GPU"
)
# Where Triton's NGC container and NVIDIA's packages put libnvinfer.so.<version>.
LIB_DIRS = (
    Path("/usr/lib/x86_64-linux-gnu"),
    Path("/usr/lib/aarch64-linux-gnu"),
    Path("/usr/local/tensorrt/lib"),
    Path("/usr/local/lib"),
    Path("/usr/lib64"),
)
_LIBNVINFER = re.compile(r"libnvinfer\.so\.(\d+(?:\.\d+)*)$")

Shape = tuple[int, ...]
ShapeRange = tuple[Shape, Shape, Shape]  # (min, opt, max)


class TensorRTUnavailable(RuntimeError):
    """TensorRT or a CUDA GPU is missing; the message says what to install."""


class EngineBuildError(RuntimeError):
    pass


# --- Shapes -------------------------------------------------------------------------------------------


def profile_shapes(
    spec: EngineSpec, profile: Profile, extra_axes: dict[str, tuple[int, int, int]] | None = None
) -> dict[str, ShapeRange]:
    """(min, opt, max) shape of each engine input over the profile's sizes and batches; `extra_axes`: the
    ranges of axes the profile does not know (a LoRA branch graph's rank axes)."""
    ranges = {**profile.axis_ranges(), **(extra_axes or {})}
    shapes = {}
    for tensor in spec.inputs:
        unknown = [d for d in tensor.dims if isinstance(d, str) and d not in ranges]
        if unknown:
            raise ValueError(f"{spec.name}: input '{tensor.name}' has axes {unknown} with no size range")
        per_dim = [(d, d, d) if isinstance(d, int) else ranges[d] for d in tensor.dims]
        lo, opt, hi = (tuple(r[i] for r in per_dim) for i in range(3))
        shapes[tensor.name] = (lo, opt, hi)
    return shapes


def check_network_inputs(
    engine: str, shapes: dict[str, ShapeRange], network_inputs: dict[str, Shape]
) -> None:
    """Fail clearly when the parsed ONNX inputs (-1 = dynamic) do not match the shapes we will set."""
    if set(network_inputs) != set(shapes):
        missing = sorted(set(shapes) - set(network_inputs))
        unexpected = sorted(set(network_inputs) - set(shapes))
        raise EngineBuildError(
            f"{engine}: the ONNX file's inputs {sorted(network_inputs)} do not match the engine spec's "
            f"{sorted(shapes)} (missing {missing}, unexpected {unexpected}); re-export the ONNX model"
        )
    for name, (lo, _, hi) in shapes.items():
        actual = network_inputs[name]
        if len(actual) != len(lo):
            raise EngineBuildError(
                f"{engine}: input '{name}' has rank {len(actual)} in the ONNX file but {len(lo)} in the "
                f"engine spec (shape {list(actual)} vs {list(lo)}..{list(hi)})"
            )
        for axis, (dim, dim_lo, dim_hi) in enumerate(zip(actual, lo, hi, strict=True)):
            if dim != -1 and not dim_lo == dim_hi == dim:
                raise EngineBuildError(
                    f"{engine}: input '{name}' axis {axis} is fixed at {dim} in the ONNX file, but the "
                    f"profile needs {dim_lo}..{dim_hi}"
                )


# --- Runtime identity ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class GpuIdentity:
    name: str
    compute_capability: str  # "major.minor", e.g. "9.0"

    def __str__(self) -> str:
        return f"{self.name} ({self.compute_capability})"


def gpu_identity() -> GpuIdentity | None:
    """The first CUDA GPU, from nvidia-smi when it answers, else from torch; None without a GPU.

    nvidia-smi first: sd-serve's check and the deployment's engine cache key read the name from it, and
    torch's name can differ for the same GPU (a MIG slice adds "MIG 1g.10gb")."""
    return nvidia_smi_gpu() or _torch_gpu()


def _torch_gpu() -> GpuIdentity | None:
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    major, minor = torch.cuda.get_device_capability(0)
    return GpuIdentity(torch.cuda.get_device_name(0), f"{major}.{minor}")


def nvidia_smi_gpu() -> GpuIdentity | None:
    """The first GPU nvidia-smi lists, without importing torch (sd-serve's check); None when it lists none."""
    query = ["nvidia-smi", "--query-gpu=name,compute_cap", "--format=csv,noheader"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    name, sep, capability = out.strip().partition("\n")[0].rpartition(",")
    return GpuIdentity(name.strip(), capability.strip()) if sep else None


def check_tensorrt_available() -> GpuIdentity:
    """The GPU engines will be built for; TensorRTUnavailable (no traceback needed) when we cannot build."""
    try:
        import tensorrt as trt
    except (ImportError, OSError):  # OSError: the bindings are there but libnvinfer is not
        raise TensorRTUnavailable(
            f"cannot build TensorRT engines: `import tensorrt` fails; {INSTALL_HINT}"
        ) from None
    if not hasattr(trt, "Builder"):  # `pip install tensorrt-stubs` alone leaves an empty namespace package
        raise TensorRTUnavailable(
            f"cannot build TensorRT engines: the installed `tensorrt` is only type stubs; {INSTALL_HINT}"
        )
    gpu = gpu_identity()
    if gpu is None:
        raise TensorRTUnavailable(f"cannot build TensorRT engines: no CUDA GPU is visible; {INSTALL_HINT}")
    return gpu


def libnvinfer_version(lib_dirs: Iterable[Path]) -> str | None:
    """TensorRT's version from the libnvinfer.so.<version> files in `lib_dirs` (in search order).

    The first folder holding one is where the loader finds the library, so it sets the release. A folder may
    name only the major version (a bare libnvinfer.so.10, as pip's tensorrt libs wheel ships it), so the most
    specific name that agrees with it, across all the folders and their links' targets, gives the version.
    """
    found: list[list[str]] = []  # per folder that has any, the versions its file names and links give
    for folder in lib_dirs:
        names = []
        for path in folder.glob("libnvinfer.so.*"):
            names.append(path.name)
            if path.is_symlink():
                names.append(path.resolve().name)  # libnvinfer.so.10 -> libnvinfer.so.10.8.0
        versions = [m.group(1) for name in names if (m := _LIBNVINFER.match(name))]
        if versions:
            found.append(versions)
    if not found:
        return None
    loaded = _most_specific_version(found[0])
    return refine_version(loaded, *(v for versions in found[1:] for v in versions))


def refine_version(version: str | None, *candidates: str | None) -> str | None:
    """`version`, or the most specific of `candidates` that it is a prefix of ("10" -> "10.8.0")."""
    if version is None:
        return None
    fields = version.split(".")
    agreeing = [c for c in candidates if c and c.split(".")[: len(fields)] == fields]
    return _most_specific_version(agreeing, default=version)


def runtime_tensorrt_version() -> str | None:
    """This machine's TensorRT without importing it where possible: Triton's container ships libnvinfer."""
    ld_path = [Path(p) for p in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if p]
    version = libnvinfer_version([*ld_path, *LIB_DIRS])
    if version is not None and version.count(".") < 2:  # only "10" or "10.8": ldconfig's links may say more
        version = refine_version(version, _ldconfig_version())
    return version or _ldconfig_version() or _python_tensorrt_version()


def _ldconfig_version() -> str | None:
    ldconfig = shutil.which("ldconfig") or "/sbin/ldconfig"
    try:
        out = subprocess.run([ldconfig, "-p"], capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    # "libnvinfer.so.10 (libc6,x86-64) => /usr/lib/.../libnvinfer.so.10": the link's target names the version.
    targets = (line.rpartition("=>")[2].strip() for line in out.splitlines() if "libnvinfer.so." in line)
    names = (Path(t).resolve().name for t in targets if t)
    return _most_specific_version(m.group(1) for name in names if (m := _LIBNVINFER.match(name)))


def _most_specific_version(versions: Iterable[str], default: str | None = None) -> str | None:
    """The version with the most fields ("10.8.0" over "10"), then the highest."""
    return max(versions, key=lambda v: (v.count("."), _numbers(v)), default=default)


def _python_tensorrt_version() -> str | None:
    try:
        import tensorrt as trt
    except (ImportError, OSError):
        return None
    version = getattr(trt, "__version__", None)  # absent from the stubs-only namespace package
    return str(version) if version else None


def _numbers(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split(".") if part.isdigit())


# --- Sidecar ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BuildOptions:
    optimization_level: int = 3  # TensorRT's default; 0..5 trade build time for engine speed
    workspace_bytes: int | None = None  # None: TensorRT's default (all of the GPU's memory)
    refittable: bool = False

    def __post_init__(self) -> None:
        if self.optimization_level < 0:
            raise ValueError(f"optimization_level must be >= 0, got {self.optimization_level}")
        if self.workspace_bytes is not None and self.workspace_bytes <= 0:
            raise ValueError(f"workspace_bytes must be positive, got {self.workspace_bytes}")


@dataclass(frozen=True)
class PlanRecord:
    """What model.plan.json says about a plan: built with what, for what, from what."""

    tensorrt_version: str
    gpu: GpuIdentity
    precision: str
    builder: dict[str, Any]
    profiles: list[dict[str, dict[str, list[int]]]]  # per profile: input -> {"min", "opt", "max"}
    onnx_sha256: dict[str, str]  # file name -> digest, the ONNX file and its external data

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> PlanRecord:
        data = json.loads(text)
        return cls(**{**data, "gpu": GpuIdentity(**data["gpu"])})


def read_plan_record(sidecar: Path) -> PlanRecord | None:
    """The recorded sidecar, or None when it is missing or unreadable (so the plan counts as unknown)."""
    try:
        return PlanRecord.from_json(sidecar.read_text())
    except (OSError, ValueError, KeyError, TypeError):
        return None


def plan_mismatch(record: PlanRecord, tensorrt_version: str, gpu: GpuIdentity) -> str | None:
    """None when a plan built as `record` is fit to serve here; else a sentence saying why it is not.

    A plan needs the TensorRT release and the compute capability it was built with, and the same GPU model:
    another model of the same capability may load it, but TensorRT warns that this "is likely to affect
    performance or even cause errors", and users report such plans failing (NVIDIA/TensorRT#2900).
    """
    built, here = _release(record.tensorrt_version), _release(tensorrt_version)
    shared = min(len(built), len(here))  # a library file may name only "10": compare what both know
    if (
        built[:shared] == here[:shared]
        and record.gpu.compute_capability == gpu.compute_capability
        and _same_gpu_name(record.gpu.name, gpu.name)
    ):
        return None
    return (
        f"engine built with TensorRT {'.'.join(built)} for {record.gpu}; this server has TensorRT "
        f"{'.'.join(here)} on {gpu}: {REBUILD_HINT}"
    )


def _same_gpu_name(a: str, b: str) -> bool:
    return " ".join(a.split()).casefold() == " ".join(b.split()).casefold()


def _release(version: str) -> tuple[str, ...]:
    return tuple(version.split(".")[:3])  # "10.3.0.26" -> major.minor.patch; the build number can differ


def onnx_digests(onnx_path: Path) -> dict[str, str]:
    """sha256 of the ONNX file and of its external data file (build_engines.onnx_export's naming)."""
    files = [onnx_path, onnx_path.with_name(onnx_path.name + ".data")]
    return {f.name: file_sha256(f) for f in files if f.exists()}


def _profile_json(shapes: dict[str, ShapeRange]) -> dict[str, dict[str, list[int]]]:
    return {
        name: {"min": list(lo), "opt": list(opt), "max": list(hi)} for name, (lo, opt, hi) in shapes.items()
    }


# --- Build --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class EngineBuildResult:
    plan: Path
    record: PlanRecord
    reused: bool


def build_engine(
    onnx_path: Path,
    spec: EngineSpec,
    shapes: dict[str, ShapeRange],
    out_dir: Path,
    *,
    precision: str,
    options: BuildOptions = BuildOptions(),
    timing_cache: Path | None = None,
) -> EngineBuildResult:
    """Write out_dir/model.plan (+ model.plan.json) from `onnx_path` unless an identical build is there.

    `shapes` comes from `profile_shapes`; `precision` labels the ONNX file's dtype in
    the sidecar. A `timing_cache` file is read if present and written back, so later builds on the same
    GPU and TensorRT skip most tactic timing. Raises TensorRTUnavailable or EngineBuildError.
    """
    gpu = check_tensorrt_available()
    import tensorrt as trt

    plan_path, sidecar = out_dir / PLAN_FILE, out_dir / SIDECAR_FILE
    record = PlanRecord(
        tensorrt_version=trt.__version__,
        gpu=gpu,
        precision=precision,
        builder=asdict(options),
        profiles=[_profile_json(shapes)],
        onnx_sha256=onnx_digests(onnx_path),
    )
    if plan_path.exists() and read_plan_record(sidecar) == record:
        return EngineBuildResult(plan_path, record, reused=True)

    out_dir.mkdir(parents=True, exist_ok=True)
    sidecar.unlink(missing_ok=True)  # a crash below must not leave an old record beside a new plan
    plan = _build_plan(onnx_path, spec, shapes, options, timing_cache)
    _write_atomically(plan_path, plan)
    sidecar.write_text(record.to_json())
    return EngineBuildResult(plan_path, record, reused=False)


def _write_atomically(path: Path, data: IHostMemory | bytes) -> None:
    """Write a temporary file beside `path`, then rename it over `path`: a build killed meanwhile (an
    initContainer evicted) leaves the previous file whole, never a truncated one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as stream:
            stream.write(data)  # IHostMemory has the buffer protocol
        os.chmod(name, 0o644)  # mkstemp makes it owner-only; the server may run as another user
        os.replace(name, path)
    finally:
        Path(name).unlink(missing_ok=True)  # gone after the rename; left only if something failed


def _build_plan(
    onnx_path: Path,
    spec: EngineSpec,
    shapes: dict[str, ShapeRange],
    options: BuildOptions,
    timing_cache: Path | None,
) -> IHostMemory:
    import tensorrt as trt

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger)  # must outlive the build: the network refers to its weights
    if not parser.parse_from_file(str(onnx_path)):
        errors = "\n".join(f"  {parser.get_error(i)}" for i in range(parser.num_errors))
        raise EngineBuildError(f"{spec.name}: TensorRT could not parse {onnx_path}:\n{errors}")
    check_network_inputs(spec.name, shapes, _network_inputs(network))

    config = builder.create_builder_config()
    _configure(config, options)
    profile = builder.create_optimization_profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(opt)), trt.Dims(list(hi)))
    config.add_optimization_profile(profile)
    # Held until the build ends: TensorRT needs the attached cache alive while it builds.
    cache = _attach_timing_cache(config, timing_cache) if timing_cache is not None else None

    plan: IHostMemory | None = builder.build_serialized_network(network, config)
    if plan is None:
        raise EngineBuildError(
            f"{spec.name}: TensorRT failed to build an engine from {onnx_path} (its log above says why)"
        )
    if timing_cache is not None and cache is not None:
        _write_atomically(timing_cache, cache.serialize())  # now holding this build's timings too
    return plan


def _network_inputs(network: INetworkDefinition) -> dict[str, Shape]:
    tensors = [network.get_input(i) for i in range(network.num_inputs)]
    return {t.name: tuple(t.shape[d] for d in range(len(t.shape))) for t in tensors}


def _configure(config: IBuilderConfig, options: BuildOptions) -> None:
    import tensorrt as trt

    config.builder_optimization_level = options.optimization_level
    if options.workspace_bytes is not None:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_bytes)
    if options.refittable:
        config.set_flag(trt.BuilderFlag.REFIT)


def _attach_timing_cache(config: IBuilderConfig, path: Path) -> ITimingCache | None:
    """Load the cache file into the build; a damaged one, or one from another GPU or TensorRT, is replaced
    by a fresh one (and the build says so). None: TensorRT gave no cache at all; build without one."""
    try:
        data = path.read_bytes() if path.exists() else b""
    except OSError as e:
        _warn(f"cannot read the timing cache {path} ({e}); starting a fresh one")
        data = b""
    # A damaged blob makes TensorRT log "Serialization assertion ... failed" and may give None, which
    # set_timing_cache (it takes ITimingCache const&) would refuse with a TypeError.
    cache = config.create_timing_cache(data)
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    if data:
        why = "damaged" if cache is None else "from another GPU or TensorRT, or damaged"
        _warn(f"the timing cache {path} cannot be used ({why}); starting a fresh one, saved after this build")
    cache = config.create_timing_cache(b"")
    if cache is not None and config.set_timing_cache(cache, ignore_mismatch=False):
        return cache
    _warn("TensorRT gave no timing cache; building without one (all tactics are timed)")
    return None


def _warn(message: str) -> None:
    print(f"build-engines: warning: {message}", file=sys.stderr, flush=True)
