"""One engine's OpenVINO models (build-engines --target openvino), with or without LoRA branches: one source
for the served engine models (model_repository/engine) and the in-process engines
(python_backend.engines.OpenVinoEngines).

An engine folder holds the IR `model.xml` (+ `model.bin`, memory-mapped), and the UNet of a LoRA build its
branch graph in `lora/model.xml`, as on the onnx target (python_backend/ort_sessions.py).

Shapes. By default (`static`) each image count and size (the sizes of its image axes, `shapes.is_image_axis`:
the batch rows and the sides) gets its own compiled model on first use, the way OpenVINO's CPU plugin runs a
model fastest (the full-size UNet 20% faster at 512 px than compiled dynamic): compiled once, kept in memory
(at most `compiled_limit` per graph, least recently used dropped first, as each holds its own copy of the
weights in the inference precision), and with a cache folder also written to disk, so that the next process,
or this one after an eviction, imports it instead of compiling again. The axes that follow what a request
says rather than its images (prompt length, LoRA ranks) stay dynamic in every compiled model: they cost
nothing measurable, and keyed too they would compile on most requests. `dynamic` compiles each graph once for
every shape: one copy of the weights, no compile on a new size, for traffic of many sizes (docs/openvino.md).
The IR names its inputs' axes (AXES_INFO, written by build_engines/openvino_engine.py from
`shapes.engine_specs`).

Precision is always explicit (OpenVINO's default depends on the host CPU: bf16 wherever it has AVX512_BF16
or AMX).
"""

from __future__ import annotations

import ctypes
import json
import os
import sys
import threading
import time
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

# OpenVINO's package sends usage telemetry (to Google Analytics) as it is imported, unless the user opted out
# in a file in their home folder: a server and an offline build must not. Without its telemetry module
# OpenVINO uses its own no-op stub (openvino/tools/ovc/telemetry_stub.py). Import OpenVINO through this
# module (`from python_backend.ov_sessions import ov`), so that this comes first.
sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]  # None: "not importable"
import openvino as ov  # noqa: E402

from python_backend.adapters import (  # noqa: E402
    DEFAULT_CACHE_BYTES,
    AdapterStore,
    BranchFeeder,
    LoraEngine,
    branch_targets,
)
from python_backend.shapes import CONTROLNET, UNET, is_image_axis  # noqa: E402

IR_FILE = "model.xml"  # beside it model.bin, the weights
# The IR's rt_info entry naming each input's axes: JSON {input: [axis name, or null for a fixed dim, ...]}
AXES_INFO = "sd_triton_axes"
LORA_IR = Path("lora") / IR_FILE  # the UNet's branch graph, beside its plain model.xml
# build-engines --precision → OpenVINO's inference precision (the arithmetic of the ops that are not int8)
INFERENCE_PRECISION = {"fp32": "f32", "bf16": "bf16", "int8-hybrid": "f32", "int8-hybrid-bf16": "bf16"}
# ... → the IR it is compiled from: the int8-hybrid precisions share one (NNCF's, openvino_int8.py), so
# that a repository rebuilt from one to the other keeps its IRs instead of calibrating again
IR_PRECISION = {**{p: p for p in ("fp32", "bf16", "int8-hybrid")}, "int8-hybrid-bf16": "int8-hybrid"}
STATIC, DYNAMIC = "static", "dynamic"
DEFAULT_COMPILED_LIMIT = 2  # static shapes kept compiled per graph
RELEASE_AFTER_RUN = "release_memory_after_run"  # an engine model's config parameter: "true" or absent


def host_supports(precision: str, core: ov.Core | None = None) -> bool:
    """Whether this CPU runs `precision` natively: bf16 needs AVX512_BF16 or AMX (OpenVINO then lists BF16
    among the CPU's capabilities); elsewhere OpenVINO emulates or refuses it."""
    if INFERENCE_PRECISION[precision] != "bf16":
        return True
    capabilities = (core or ov.Core()).get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    return "BF16" in capabilities


def runs_once_per_request(engine: str) -> bool:
    """The text encoder and VAE engines run once per request; the UNet and ControlNets every step."""
    return engine != UNET and not engine.startswith(f"{CONTROLNET}_")


def compile_config(precision: str, cache_dir: Path | None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "INFERENCE_PRECISION_HINT": INFERENCE_PRECISION[precision],
        # One request at a time per engine, on every core: Triton batches concurrent calls into one run.
        "PERFORMANCE_HINT": "LATENCY",
        "NUM_STREAMS": "1",
        # Four engine processes (and the pipeline's) share the cores: threads pinned to cores would fight.
        "ENABLE_CPU_PINNING": False,
        # OpenVINO caches the kernels it makes for each shape a dynamic axis takes, up to 5000 by default:
        # a UNet with LoRA branches grew to 3.5 GB over mixed batch rows, sizes and ranks (tiny checkpoint,
        # 120 calls), and stayed at 0.77 GB without. The kernels are made again at a change of shape; the
        # full-size UNet ran as fast either way, at one shape and alternating two.
        "CPU_RUNTIME_CACHE_CAPACITY": 0,
    }
    if cache_dir is not None:
        config["CACHE_DIR"] = str(cache_dir)
    return config


Key = tuple[tuple[int, ...], ...]  # per input, the sizes of its image axes; () for dynamic shapes


class _Compiled:
    """One compiled model and its idle infer requests: a request holds the activations' memory, and one made
    per call would allocate them again at every UNet step."""

    def __init__(self, model: ov.CompiledModel) -> None:
        self.model = model
        self.idle: list[ov.InferRequest] = []


class CompiledGraph:
    """One IR, compiled per image count and size (`static`) or once (`dynamic`). Safe to call from several
    threads: each call runs its own infer request.

    `release_after_run`: give back the activations' memory after each run, for an engine that runs once per
    request (text encoder, VAE): the full-size VAE decoder keeps 190 MB at 256 px between runs otherwise, and
    allocating them again costs nothing measurable beside its run. Not for the UNet, which runs every step."""

    def __init__(
        self,
        core: ov.Core,
        path: Path,
        config: dict[str, Any],
        shapes: str = STATIC,
        compiled_limit: int = DEFAULT_COMPILED_LIMIT,
        release_after_run: bool = False,
    ) -> None:
        if shapes not in (STATIC, DYNAMIC):
            raise ValueError(f"shapes must be {STATIC!r} or {DYNAMIC!r}, got {shapes!r}")
        if compiled_limit < 1:
            raise ValueError(f"compiled_limit must be at least 1, got {compiled_limit}")
        self.core, self.path, self.config = core, path, config
        self.shapes, self.compiled_limit, self.release_after_run = shapes, compiled_limit, release_after_run
        model = core.read_model(path)
        self.inputs = [port.get_any_name() for port in model.inputs]
        self.outputs = [port.get_any_name() for port in model.outputs]
        self.input_shapes = [(port.get_any_name(), port.get_partial_shape()) for port in model.inputs]
        if not model.has_rt_info(AXES_INFO):
            raise ValueError(f"{path} does not name its axes: rebuild it with this version's build-engines")
        axes = json.loads(model.get_rt_info(AXES_INFO).astype(str))
        # Per input, the positions of its image axes: the dims a static compile fixes.
        self.image_dims = [
            tuple(i for i, axis in enumerate(axes[name]) if axis is not None and is_image_axis(axis))
            for name in self.inputs
        ]
        self._compiled: OrderedDict[Key, _Compiled] = OrderedDict()
        self._settled: weakref.WeakSet[ov.CompiledModel] = weakref.WeakSet()
        self._lock = threading.Lock()
        self._run_lock = threading.Lock()  # with release_after_run: no release while another run is on
        self.compile_seconds: dict[Key, float] = {}  # per shape, for the logs
        if shapes == DYNAMIC:  # compiled here, so that the first request does not pay it
            self._compiled[()] = _Compiled(self._compile(model, ()))

    def key(self, arrays: list[np.ndarray]) -> Key:
        if self.shapes == DYNAMIC:
            return ()
        return tuple(tuple(a.shape[i] for i in dims) for a, dims in zip(arrays, self.image_dims, strict=True))

    def __call__(self, feeds: dict[str, Any]) -> list[np.ndarray]:
        arrays = [np.ascontiguousarray(feeds[name]) for name in self.inputs]
        compiled = self._compiled_for(self.key(arrays))
        if self.release_after_run:
            with self._run_lock:
                request = compiled.model.create_infer_request()
                request.infer(arrays)
                outputs = self._outputs(request)
                del request
                compiled.model.release_memory()
        else:
            with self._lock:
                request = compiled.idle.pop() if compiled.idle else compiled.model.create_infer_request()
            request.infer(arrays)
            outputs = self._outputs(request)
            with self._lock:
                compiled.idle.append(request)
        if compiled.model not in self._settled:  # its first run has laid out its weights (dynamic: lazily)
            self._settled.add(compiled.model)
            release_file_pages(self.path.with_suffix(".bin"))
        return outputs

    def _outputs(self, request: ov.InferRequest) -> list[np.ndarray]:
        # Copies: the request's output tensors are overwritten by its next run.
        return [np.array(request.get_output_tensor(i).data) for i in range(len(self.outputs))]

    @property
    def compiled_shapes(self) -> list[Key]:
        with self._lock:
            return list(self._compiled)

    def _compiled_for(self, key: Key) -> _Compiled:
        with self._lock:
            if key in self._compiled:
                self._compiled.move_to_end(key)
                return self._compiled[key]
            # Compiled under the lock: two first calls at one size compile it once, and at most one extra
            # copy of the weights is ever being made.
            model = self.core.read_model(self.path)
            shapes = {}
            for (name, shape), dims, sizes in zip(self.input_shapes, self.image_dims, key, strict=True):
                fixed = ov.PartialShape(shape)
                for i, size in zip(dims, sizes, strict=True):
                    fixed[i] = ov.Dimension(size)
                shapes[name] = fixed
            model.reshape(shapes)
            compiled = _Compiled(self._compile(model, key))
            self._compiled[key] = compiled
            while len(self._compiled) > self.compiled_limit:
                self._compiled.popitem(last=False)
            return compiled

    def _compile(self, model: ov.Model, key: Key) -> ov.CompiledModel:
        started = time.perf_counter()
        compiled = self.core.compile_model(model, "CPU", self.config)
        self.compile_seconds[key] = time.perf_counter() - started
        return compiled


class OpenVinoSessions(LoraEngine):
    """`folder`: the engine's version folder (where model.xml is). `component`: the LoRA component its
    branches apply ("unet", "text_encoder"), None for an engine without. `precision`: the build's
    (build-engines --precision). `cache_dir`: where compiled models are kept on disk, None for nowhere.
    `release_after_run`: see CompiledGraph (build-engines sets it for the engines run once per request)."""

    def __init__(
        self,
        folder: Path,
        precision: str,
        component: str | None = None,
        lora_dir: Path | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        shapes: str = STATIC,
        compiled_limit: int = DEFAULT_COMPILED_LIMIT,
        cache_dir: Path | None = None,
        release_after_run: bool = False,
    ) -> None:
        core = ov.Core()
        config = compile_config(precision, cache_dir)

        def graph(path: Path) -> CompiledGraph:
            return CompiledGraph(core, path, config, shapes, compiled_limit, release_after_run)

        plain = graph(folder / IR_FILE)
        self.graphs = [plain]
        self.outputs = plain.outputs
        self.plain = plain
        if component is None:
            return
        branched = None
        if (folder / LORA_IR).exists():
            branched = graph(folder / LORA_IR)
            self.graphs.append(branched)
        elif branch_targets(_static_dims(plain)):
            branched, self.plain = plain, None  # one graph: branches
        if branched is not None:
            self.branched = branched
            targets = branch_targets(_static_dims(branched))
            # min_rank 1: OpenVINO compiles no empty tensors (a layer no row uses gets one rank of zeros)
            store = AdapterStore(lora_dir, component, targets, cache_bytes)
            self.feeder = BranchFeeder(store, min_rank=1)


MADV_PAGEOUT = 21  # Linux 5.4+: reclaim these pages now (clean file pages: dropped, read again if touched)


def release_file_pages(path: Path) -> None:
    """Give back the resident pages of this process's memory maps of `path`.

    A compiled model holds its weights in its own layout, and OpenVINO keeps the IR's memory-mapped weights
    beside them, which it no longer reads: resident, they count a second time in the process's memory (PSS),
    though the kernel would drop them under pressure. A hint only: pages read again are read from the file,
    and where madvise cannot do it (another OS, an older kernel) nothing changes."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        maps = Path("/proc/self/maps").read_text().splitlines()
        # The kernel drops only clean pages: an IR written moments ago (a build just before) may not be yet.
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    except OSError:
        return
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    name = str(path.resolve())
    for line in maps:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5] == name:
            start, end = (int(address, 16) for address in fields[0].split("-"))
            libc.madvise(start, end - start, MADV_PAGEOUT)


def _static_dims(graph: CompiledGraph) -> list[tuple[str, list[int | str]]]:
    """(name, dims) of a graph's inputs, a dynamic dim as "?" (branch_targets reads the static ones)."""
    return [
        (name, [d.get_length() if d.is_static else "?" for d in shape]) for name, shape in graph.input_shapes
    ]
