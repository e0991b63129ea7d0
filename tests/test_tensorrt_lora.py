"""LoRA on the TensorRT target: build-engines --lora --target tensorrt builds branch plans, and our python
model hosts them (python_backend/trt_sessions.py), so that rows of different LoRA sets share one UNet run
as on ONNX Runtime.

TensorRT cannot be installed here. The CPU tests run the build and the hosting code against a stand-in for
the `tensorrt` module (below, clearly marked) whose "plans" point at the exported ONNX files and whose engines
run them on ONNX Runtime, reading and writing tensors at the addresses the code binds. The real tests
(tests/test_tensorrt_lora_real.py) run where TensorRT and a GPU exist and skip elsewhere.
"""

from __future__ import annotations

import ctypes
import json
import re
import sys
import types
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from tritonclient.grpc import model_config_pb2 as mc

from build_engines import cli as build_cli
from build_engines import lora_branch, repository
from build_engines import tensorrt_engine as te
from build_engines.tiny_checkpoint import write_tiny_lora
from python_backend import lora
from python_backend.adapters import LoraUse, encode_set, file_version
from python_backend.shapes import PIPELINE, PIPELINE_MANIFEST, TEXT_ENCODER, UNET, PipelineManifest
from python_backend.trt_sessions import PlanSessions
from tests.conftest import PROFILE_ARGS
from tests.test_tensorrt_engine import H100, FakeBuilder, FakeNetwork, FakeParser, FakeTensor, FakeTensorRT

MAX_RANK = 12  # --lora-max-rank of the test builds: one tiny LoRA (rank 4) or two fit, four do not


# --- A stand-in for the tensorrt module (TensorRT cannot be installed here) --------------------------------


class OnnxBackedTensorRT(FakeTensorRT):
    """FakeTensorRT (tests/test_tensorrt_engine.py) extended to the runtime, as TensorRT 10's Python API
    names it: the parser reads the network's inputs from the real ONNX file; a "plan" is JSON naming that
    file and the profile it was built with; a deserialized engine answers TensorRT's questions about its
    tensors from the ONNX file and the profile, and runs the ONNX file on ONNX Runtime, reading its inputs
    from and writing its outputs to the device addresses bound with set_tensor_address (CPU memory here).
    What it proves is the code's use of the API (names, shapes, profile bounds, dtypes, addresses), not
    TensorRT's numbers: the real tests do that."""

    class TensorIOMode:
        INPUT = "input"
        OUTPUT = "output"

    float32, float16, int32, int64, bool = "FLOAT", "HALF", "INT32", "INT64", "BOOL"

    def __init__(self) -> None:
        super().__init__({})
        self.engines: list[OnnxBackedEngine] = []

    def Builder(self, logger: FakeTensorRT.Logger) -> FakeBuilder:
        self.builders.append(PlanWritingBuilder(self))
        return self.builders[-1]

    def OnnxParser(self, network: FakeNetwork, logger: FakeTensorRT.Logger) -> FakeParser:
        return OnnxReadingParser(self, network)

    def Runtime(self, logger: FakeTensorRT.Logger) -> OnnxBackedRuntime:
        return OnnxBackedRuntime(self)


ORT_TYPES = {
    "tensor(float)": "FLOAT",
    "tensor(float16)": "HALF",
    "tensor(int32)": "INT32",
    "tensor(int64)": "INT64",
}
NUMPY_TYPES = {"FLOAT": np.float32, "HALF": np.float16, "INT32": np.int32, "INT64": np.int64}


class OnnxReadingParser(FakeParser):
    def parse_from_file(self, model: str) -> bool:
        graph = onnx.load(model, load_external_data=False).graph
        inputs = [
            FakeTensor(
                i.name,
                tuple(d.dim_value if d.HasField("dim_value") else -1 for d in i.type.tensor_type.shape.dim),
            )
            for i in graph.input
        ]
        self.network.inputs, self.network.num_inputs = inputs, len(inputs)
        self.network.onnx_file = model
        return super().parse_from_file(model)

    def __init__(self, trt: FakeTensorRT, network: FakeNetwork) -> None:
        super().__init__(trt, network)
        self.network = network


class PlanWritingBuilder(FakeBuilder):
    def build_serialized_network(self, network: FakeNetwork, config) -> bytes | None:
        (profile,) = config.profiles
        shapes = {name: [list(s) for s in ranges] for name, ranges in profile.shapes.items()}
        return json.dumps({"onnx": network.onnx_file, "profile": shapes}).encode()


class OnnxBackedRuntime:
    def __init__(self, trt: OnnxBackedTensorRT) -> None:
        self.trt = trt

    def deserialize_cuda_engine(self, serialized_engine: bytes) -> OnnxBackedEngine:
        engine = OnnxBackedEngine(json.loads(bytes(serialized_engine)))
        self.trt.engines.append(engine)
        return engine


class OnnxBackedEngine:
    def __init__(self, plan: dict) -> None:
        # The build ran in a stage beside the repository, moved in when done (build_engines.repository.Stage).
        self.onnx_file = re.sub(r"/\.([^/]+)\.build-[^/]+/", r"/\1/", plan["onnx"])
        self.profile = plan["profile"]
        self.session = ort.InferenceSession(self.onnx_file, providers=["CPUExecutionProvider"])
        self.io = {
            **{i.name: ("input", i) for i in self.session.get_inputs()},
            **{o.name: ("output", o) for o in self.session.get_outputs()},
        }
        self.num_io_tensors = len(self.io)
        self.runs = 0

    def get_tensor_name(self, index: int) -> str:
        return list(self.io)[index]

    def get_tensor_mode(self, name: str) -> str:
        return self.io[name][0]

    def get_tensor_dtype(self, name: str) -> str:
        return ORT_TYPES[self.io[name][1].type]

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else -1 for d in self.io[name][1].shape)

    def get_tensor_profile_shape(self, name: str, profile_index: int) -> list[tuple[int, ...]]:
        assert profile_index == 0
        return [tuple(s) for s in self.profile[name]]

    def create_execution_context(self) -> OnnxBackedContext:
        return OnnxBackedContext(self)


class OnnxBackedContext:
    def __init__(self, engine: OnnxBackedEngine) -> None:
        self.engine = engine
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.addresses: dict[str, int] = {}
        self.results: dict[str, np.ndarray] | None = None

    def set_input_shape(self, name: str, shape: tuple) -> bool:
        low, _, high = self.engine.profile[name]
        if not all(lo <= d <= hi for lo, d, hi in zip(low, shape, high, strict=True)):
            return False  # TensorRT refuses a shape outside the profile
        self.shapes[name] = tuple(shape)
        self.results = None
        return True

    def set_tensor_address(self, name: str, memory: int) -> bool:
        self.addresses[name] = memory
        return True

    def get_tensor_shape(self, name: str) -> tuple[int, ...]:
        if self.engine.get_tensor_mode(name) == "input":
            return self.shapes[name]
        # TensorRT infers output shapes from the input shapes; the stand-in runs the graph to know them.
        return self._run()[name].shape

    def execute_async_v3(self, stream_handle: int) -> bool:
        for name, array in self._run().items():
            np.copyto(self._view(name, array.shape), array)
        self.results = None
        self.engine.runs += 1
        return True

    def _run(self) -> dict[str, np.ndarray]:
        if self.results is None:
            feeds = {name: self._view(name, shape).copy() for name, shape in self.shapes.items()}
            names = [o.name for o in self.engine.session.get_outputs()]
            self.results = dict(zip(names, self.engine.session.run(names, feeds), strict=True))
        return self.results

    def _view(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        dtype = np.dtype(NUMPY_TYPES[self.engine.get_tensor_dtype(name)])
        count = int(np.prod(shape))
        if count == 0:
            return np.empty(shape, dtype)
        buffer = (ctypes.c_char * (count * dtype.itemsize)).from_address(self.addresses[name])
        return np.frombuffer(buffer, dtype).reshape(shape)


# --- CPU tests against the stand-in --------------------------------------------------------------------


def install_fake_tensorrt(patch: pytest.MonkeyPatch) -> OnnxBackedTensorRT:
    """The stand-in as `tensorrt`, a GPU to build for, and no CUDA stream (its engines live in CPU memory)."""
    fake = OnnxBackedTensorRT()
    patch.setitem(sys.modules, "tensorrt", fake)
    patch.setattr(te, "gpu_identity", lambda: H100)
    patch.setattr(torch.cuda, "current_stream", lambda device=None: types.SimpleNamespace(cuda_stream=0))
    return fake


def tensorrt_build(checkpoint: Path, repo: Path, *options: str) -> list[str]:
    """build-engines arguments for a tensorrt target of the tiny checkpoint."""
    return [
        "--checkpoint",
        str(checkpoint),
        "--output",
        str(repo),
        *PROFILE_ARGS,
        "--target",
        "tensorrt",
        *options,
    ]


@pytest.fixture(scope="module")
def fake_tensorrt() -> OnnxBackedTensorRT:
    patch = pytest.MonkeyPatch()
    yield install_fake_tensorrt(patch)
    patch.undo()


def write_loras(folder: Path, checkpoint: Path) -> Path:
    write_tiny_lora(folder / "ink.safetensors", checkpoint, "kohya", seed=1)
    write_tiny_lora(folder / "paper.safetensors", checkpoint, "peft", seed=2)
    return folder


@pytest.fixture(scope="module")
def lora_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_loras(tmp_path_factory.mktemp("trt-loras"), tiny_checkpoint)


@pytest.fixture(scope="module")
def plan_repository(fake_tensorrt, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("trt-lora") / "repo"
    options = ["--lora", "--lora-max-rank", str(MAX_RANK), "--timing-cache", str(repo.parent / "tc")]
    assert build_cli.main(tensorrt_build(tiny_checkpoint, repo, *options)) == 0
    return repo


def _set(folder: Path, *uses: tuple[str, float]) -> str:
    return encode_set([LoraUse(file, file_version(folder / file), multiplier) for file, multiplier in uses])


def test_the_build_makes_branch_plans_with_bounded_ranks_hosted_by_our_model(plan_repository):
    for engine, plans in {
        TEXT_ENCODER: ["1/model.plan"],
        UNET: ["1/model.plan", "1/lora/model.plan"],
    }.items():
        folder = plan_repository / engine
        assert {str(p.relative_to(folder)) for p in folder.rglob("model.plan")} == set(plans)
        config = repository.read_config(folder)
        assert config.backend == "python" and not config.platform
        assert [g.kind for g in config.instance_group] == [mc.ModelInstanceGroup.KIND_GPU]
        assert config.parameters["lora_component"].string_value == engine
        assert (folder / "1" / "model.py").read_text() == (
            repository.SOURCES / "engine" / "1" / "model.py"
        ).read_text()
        assert {"lora"} <= {t.name for t in config.input}
    for engine in ("vae_decoder", "vae_encoder"):
        config = repository.read_config(plan_repository / engine)
        assert (
            config.platform == "tensorrt_plan" and not (plan_repository / engine / "1" / "model.py").exists()
        )

    branch = te.read_plan_record(plan_repository / UNET / "1" / "lora" / "model.plan.json")
    plain = te.read_plan_record(plan_repository / UNET / "1" / "model.plan.json")
    assert branch.precision == plain.precision == "fp16"
    rank_ranges = {
        (r["min"][1], r["opt"][1], r["max"][1])
        for n, r in branch.profiles[0].items()
        if n.endswith(".lora_down")
    }
    assert rank_ranges == {(1, min(lora_branch.OPT_RANK, MAX_RANK), MAX_RANK)}
    assert not any(n.endswith(".lora_down") for n in plain.profiles[0])
    manifest = PipelineManifest.read(plan_repository / PIPELINE / "1" / PIPELINE_MANIFEST)
    assert manifest.lora_max_rank == MAX_RANK and manifest.device == "cuda"


def test_hosted_plans_run_mixed_lora_rows_as_each_alone(
    fake_tensorrt, plan_repository, lora_dir, tiny_checkpoint
):
    """Rows with no LoRA, one and two share one run of the branch plan, each as it runs alone; a run with no
    LoRA row uses the plain plan; the factors are placed once per set, as the engine's tensors."""
    sessions = PlanSessions(plan_repository / UNET / "1", torch.device("cpu"), UNET, lora_dir)
    plain_engine, branch_engine = fake_tensorrt.engines[-2:]
    assert sessions.feeder is not None and sessions.feeder.store.max_rank == MAX_RANK
    rng = np.random.default_rng(0)
    feeds = {
        "sample": rng.standard_normal((3, 4, 8, 8)).astype(np.float32),
        "timestep": np.array([[10.0], [500.0], [900.0]], np.float32),
        "encoder_hidden_states": rng.standard_normal((3, 77, 32)).astype(np.float32),
    }
    keys = [
        "",
        _set(lora_dir, ("ink.safetensors", 0.8)),
        _set(lora_dir, ("ink.safetensors", 1.0), ("paper.safetensors", -0.5)),
    ]
    sessions.check(keys)
    [mixed] = sessions.run(feeds, keys)
    assert branch_engine.runs == 1 and plain_engine.runs == 0
    alone = [
        sessions.run({k: v[i : i + 1] for k, v in feeds.items()}, [key])[0] for i, key in enumerate(keys)
    ]
    assert plain_engine.runs == 1  # the row without LoRA, alone
    np.testing.assert_allclose(mixed, np.concatenate(alone), atol=2e-3)
    assert (
        np.abs(mixed[1] - mixed[0]).max() > 1e-3 and np.abs(mixed[2] - mixed[1]).max() > 1e-3
    )  # they differ
    compiled = sessions.feeder.store.compiled(keys[1])
    assert all(
        isinstance(low.down, torch.Tensor) and isinstance(low.up, torch.Tensor) for low in compiled.values()
    )


def test_the_text_encoder_plan_is_its_branch_plan(fake_tensorrt, plan_repository, lora_dir):
    sessions = PlanSessions(plan_repository / TEXT_ENCODER / "1", torch.device("cpu"), TEXT_ENCODER, lora_dir)
    assert sessions.plain is None and sessions.branched is not None
    ids = np.tile(np.arange(77, dtype=np.int32), (2, 1))
    feeds = {"input_ids": ids, "clip_skip": np.ones((2, 1), np.int32)}
    [with_lora] = sessions.run(feeds, ["", _set(lora_dir, ("ink.safetensors", 1.0))])
    assert np.abs(with_lora[1] - with_lora[0]).max() > 1e-4


def test_a_set_over_the_plans_rank_is_refused_before_it_runs(fake_tensorrt, plan_repository, lora_dir):
    sessions = PlanSessions(plan_repository / UNET / "1", torch.device("cpu"), UNET, lora_dir)
    four = _set(
        lora_dir,
        ("ink.safetensors", 1.0),
        ("paper.safetensors", 1.0),
        ("ink.safetensors", 0.5),
        ("paper.safetensors", 0.5),
    )
    with pytest.raises(lora.LoraError, match=rf"rank 16 .* maximum {MAX_RANK}; .*--lora-max-rank"):
        sessions.check(["", four])


def test_the_pipeline_refuses_tags_over_the_engines_rank(plan_repository, lora_dir):
    from python_backend.conditioning import resolve_loras
    from python_backend.pipeline import PipelineAssets
    from python_backend.request import InvalidInput

    assets = PipelineAssets.load(plan_repository / PIPELINE / "1", lora_dir)
    text, applied = resolve_loras(assets, "a cat <lora:ink:1> <lora:paper:0.5>")
    assert applied.unet and applied.text_encoder
    with pytest.raises(
        InvalidInput, match=r"<lora:ink:1> <lora:paper:1> <lora:ink:0.5> <lora:paper:0.5>: .*rank 16"
    ):
        resolve_loras(assets, "a cat <lora:ink:1> <lora:paper:1> <lora:ink:0.5> <lora:paper:0.5>")
