"""TensorRT engine builds: shape math, sidecar checks, the build's calls into TensorRT, and a real build."""

from __future__ import annotations

import enum
import sys
import types
from pathlib import Path

import pytest

from build_engines import tensorrt_engine as te
from build_engines.tensorrt_engine import BuildOptions, GpuIdentity, PlanRecord
from python_backend.shapes import (
    TEXT_ENCODER,
    UNET,
    VAE_DECODER,
    VAE_ENCODER,
    ModelGeometry,
    Profile,
    engine_specs,
)

SPECS = engine_specs(ModelGeometry())
PROFILE = Profile.square(64, 512, 1024, max_batch=4, max_prompt_chunks=1)
H100 = GpuIdentity("NVIDIA H100 80GB HBM3", "9.0")
A10G = GpuIdentity("NVIDIA A10G", "8.6")


# --- Shapes -------------------------------------------------------------------------------------------


def test_profile_shapes_unet():
    shapes = te.profile_shapes(SPECS[UNET], PROFILE)
    assert shapes["sample"] == ((1, 4, 8, 8), (2, 4, 64, 64), (8, 4, 128, 128))
    assert shapes["timestep"] == ((1, 1), (2, 1), (8, 1))
    assert shapes["encoder_hidden_states"] == ((1, 77, 768), (2, 77, 768), (8, 77, 768))


def test_profile_shapes_text_encoder_and_vae():
    # One row per prompt chunk of prompt and negative prompt (1 chunk here), however many images.
    assert te.profile_shapes(SPECS[TEXT_ENCODER], PROFILE) == {
        "input_ids": ((1, 77), (2, 77), (2, 77)),
        "clip_skip": ((1, 1), (2, 1), (2, 1)),
    }
    # --max-batch 1 with 3-chunk prompts: 6 rows (a guided 3-chunk prompt), not 2 x max_batch.
    one_image = Profile.square(64, 512, 1024, max_batch=1, max_prompt_chunks=3)
    assert te.profile_shapes(SPECS[TEXT_ENCODER], one_image)["input_ids"] == ((1, 77), (2, 77), (6, 77))
    assert te.profile_shapes(SPECS[VAE_DECODER], PROFILE) == {
        "latent": ((1, 4, 8, 8), (1, 4, 64, 64), (4, 4, 128, 128))
    }
    assert te.profile_shapes(SPECS[VAE_ENCODER], PROFILE) == {
        "image": ((1, 3, 64, 64), (1, 3, 512, 512), (4, 3, 1024, 1024))
    }


def test_profile_shapes_longer_prompts_widen_the_text_sequence():
    shapes = te.profile_shapes(SPECS[UNET], Profile(max_prompt_chunks=3))
    assert [s[1] for s in shapes["encoder_hidden_states"]] == [77, 77, 231]


def test_static_profile_fixes_the_image_size():
    static = Profile.static(512, 768, max_batch=2, opt_batch=2)
    unet = te.profile_shapes(SPECS[UNET], static)
    assert unet["sample"] == ((1, 4, 96, 64), (4, 4, 96, 64), (4, 4, 96, 64))
    assert unet["timestep"] == ((1, 1), (4, 1), (4, 1))
    assert unet["encoder_hidden_states"] == ((1, 77, 768), (4, 77, 768), (4, 231, 768))  # 3 prompt chunks
    assert te.profile_shapes(SPECS[VAE_DECODER], static) == {
        "latent": ((1, 4, 96, 64), (2, 4, 96, 64), (2, 4, 96, 64))
    }
    assert te.profile_shapes(SPECS[VAE_ENCODER], static)["image"][2] == (2, 3, 768, 512)


def test_network_inputs_must_match_the_spec():
    shapes = te.profile_shapes(SPECS[UNET], PROFILE)
    good = {"sample": (-1, 4, -1, -1), "timestep": (-1, 1), "encoder_hidden_states": (-1, -1, 768)}
    te.check_network_inputs(UNET, shapes, good)

    renamed = {**{k: v for k, v in good.items() if k != "timestep"}, "t": (-1,)}
    with pytest.raises(te.EngineBuildError, match=r"missing \['timestep'\], unexpected \['t'\]"):
        te.check_network_inputs(UNET, shapes, renamed)
    with pytest.raises(te.EngineBuildError, match="input 'sample' has rank 3 in the ONNX file but 4"):
        te.check_network_inputs(UNET, shapes, {**good, "sample": (-1, 4, -1)})
    with pytest.raises(te.EngineBuildError, match="input 'sample' axis 0 is fixed at 2 .* needs 1..8"):
        te.check_network_inputs(UNET, shapes, {**good, "sample": (2, 4, -1, -1)})


# --- Sidecar and runtime checks -----------------------------------------------------------------------


def _record(version: str = "10.3.0.26", gpu: GpuIdentity = A10G) -> PlanRecord:
    return PlanRecord(
        tensorrt_version=version,
        gpu=gpu,
        precision="fp16",
        builder={"optimization_level": 3, "workspace_bytes": None, "refittable": False},
        profiles=[{"timestep": {"min": [1, 1], "opt": [2, 1], "max": [8, 1]}}],
        onnx_sha256={"model.onnx": "0" * 64},
    )


def test_plan_record_round_trips_through_json(tmp_path):
    sidecar = tmp_path / te.SIDECAR_FILE
    sidecar.write_text(_record().to_json())
    assert te.read_plan_record(sidecar) == _record()
    sidecar.write_text("{not json")
    assert te.read_plan_record(sidecar) is None
    assert te.read_plan_record(tmp_path / "missing.json") is None


def test_plan_matches_its_own_runtime():
    assert te.plan_mismatch(_record(), "10.3.0", A10G) is None
    assert te.plan_mismatch(_record(), "10", A10G) is None  # a bare libnvinfer.so.10 cannot tell more
    assert te.plan_mismatch(_record(), "10.3.0.26", GpuIdentity(" nvidia  a10g", "8.6")) is None


def test_plan_mismatch_refuses_another_gpu_model_of_the_same_capability():
    """TensorRT loads it with a warning ("not recommended ... or even cause errors"); users see failures."""
    reason = te.plan_mismatch(_record(), "10.3.0.26", GpuIdentity("NVIDIA RTX A6000", "8.6"))
    assert reason == (
        "engine built with TensorRT 10.3.0 for NVIDIA A10G (8.6); this server has TensorRT 10.3.0 on "
        "NVIDIA RTX A6000 (8.6): rebuild the engines with build-engines --target tensorrt inside the serving "
        "container"
    )


def test_plan_mismatch_explains_another_tensorrt():
    reason = te.plan_mismatch(_record(), "10.8.0.43", A10G)
    assert reason == (
        "engine built with TensorRT 10.3.0 for NVIDIA A10G (8.6); this server has TensorRT 10.8.0 on "
        "NVIDIA A10G (8.6): rebuild the engines with build-engines --target tensorrt inside the serving "
        "container"
    )


def test_plan_mismatch_explains_another_gpu():
    reason = te.plan_mismatch(_record(), "10.3.0.26", H100)
    assert reason is not None
    assert reason.startswith("engine built with TensorRT 10.3.0 for NVIDIA A10G (8.6); this server has ")
    assert "TensorRT 10.3.0 on NVIDIA H100 80GB HBM3 (9.0): rebuild the engines" in reason


def test_libnvinfer_version_from_library_files(tmp_path):
    empty, libs = tmp_path / "empty", tmp_path / "lib"
    empty.mkdir()
    libs.mkdir()
    (libs / "libnvinfer.so.10.3.0").write_bytes(b"")
    (libs / "libnvinfer.so.10").symlink_to("libnvinfer.so.10.3.0")
    (libs / "libnvinfer_plugin.so.10.9.0").write_bytes(b"")
    assert te.libnvinfer_version([tmp_path / "absent", empty, libs]) == "10.3.0"
    assert te.libnvinfer_version([empty]) is None


def test_libnvinfer_version_is_the_most_specific_across_folders(tmp_path):
    """A bare libnvinfer.so.10 first on the path (pip's libs wheel ships no links) names only the major
    version; the full one comes from another folder's file, or a link's target, that agrees with it."""
    bare, system, other = tmp_path / "bare", tmp_path / "system", tmp_path / "other"
    for folder in (bare, system, other):
        folder.mkdir()
    (bare / "libnvinfer.so.10").write_bytes(b"")
    (system / "libnvinfer.so.10").symlink_to("libnvinfer.so.10.8.0")
    (system / "libnvinfer.so.10.8.0").write_bytes(b"")
    (other / "libnvinfer.so.9.2.0").write_bytes(b"")  # another major version: not the one loaded
    assert te.libnvinfer_version([bare, other, system]) == "10.8.0"
    assert te.libnvinfer_version([bare, other]) == "10"
    assert te.libnvinfer_version([other, system]) == "9.2.0"  # the first folder sets the release

    linked = tmp_path / "linked"  # only a link whose target lives elsewhere
    linked.mkdir()
    (linked / "libnvinfer.so.10").symlink_to(system / "libnvinfer.so.10.8.0")
    assert te.libnvinfer_version([linked]) == "10.8.0"


def test_refine_version():
    assert te.refine_version("10", "10.8.0", "10.8.0.43", "9.2.0", None) == "10.8.0.43"
    assert te.refine_version("10.8", "10.3.0") == "10.8"  # disagrees: kept
    assert te.refine_version(None, "10.8.0") is None


def test_gpu_identity_prefers_nvidia_smi(monkeypatch):
    """The sidecar's GPU name must be the one sd-serve's check reads (nvidia-smi), not torch's."""
    monkeypatch.setattr(te, "nvidia_smi_gpu", lambda: A10G)
    monkeypatch.setattr(te, "_torch_gpu", lambda: GpuIdentity("NVIDIA A10G MIG 1g.6gb", "8.6"))
    assert te.gpu_identity() == A10G
    monkeypatch.setattr(te, "nvidia_smi_gpu", lambda: None)
    assert te.gpu_identity() == GpuIdentity("NVIDIA A10G MIG 1g.6gb", "8.6")


def test_unavailable_without_the_tensorrt_module(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", None)  # makes `import tensorrt` raise ImportError
    with pytest.raises(te.TensorRTUnavailable, match="nvcr.io/nvidia/tritonserver:<yy.mm>-py3") as raised:
        te.check_tensorrt_available()
    assert raised.value.__suppress_context__  # `from None`: the CLI prints one line, no chained traceback


def test_unavailable_with_only_type_stubs(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", types.ModuleType("tensorrt"))
    with pytest.raises(te.TensorRTUnavailable, match="only type stubs.*and a CUDA GPU"):
        te.check_tensorrt_available()


def test_unavailable_without_a_gpu(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorrt", FakeTensorRT({}))
    monkeypatch.setattr(te, "gpu_identity", lambda: None)
    with pytest.raises(te.TensorRTUnavailable, match="no CUDA GPU is visible"):
        te.check_tensorrt_available()


# --- The build, against a stand-in for the tensorrt module --------------------------------------------


class FakeTensorRT(types.ModuleType):
    """Stand-in for the `tensorrt` module, because TensorRT cannot be installed here.

    PyPI's `tensorrt` packages download the libraries from NVIDIA's index at install time, which these
    machines cannot reach. This fake records the calls build_engine makes (the part of the API it uses,
    named as in TensorRT 10.x/11's Python API) so they can be asserted; test_real_tensorrt_build runs
    the real thing where TensorRT and a GPU exist.
    """

    __version__ = "10.13.0.35"

    class NetworkDefinitionCreationFlag(enum.IntEnum):
        STRONGLY_TYPED = 1

    class BuilderFlag(enum.IntEnum):
        REFIT = 5

    class MemoryPoolType(enum.IntEnum):
        WORKSPACE = 0

    class Logger:
        WARNING = 2

        def __init__(self, min_severity: int = 2) -> None:
            self.min_severity = min_severity

    def __init__(self, network_inputs: dict[str, tuple[int, ...]]) -> None:
        super().__init__("tensorrt")
        self.network_inputs = network_inputs
        self.parse_errors: tuple[str, ...] = ()
        self.foreign_timing_cache = False  # set_timing_cache refuses a non-empty cache (another GPU)
        # create_timing_cache gives None for these blobs (a truncated file; whether TensorRT 10.8 gives None
        # or an empty cache is not documented: both must work).
        self.unreadable_timing_caches: set[bytes] = set()
        self.fail_build = False
        self.builders: list[FakeBuilder] = []
        self.parsed_files: list[str] = []

    def Builder(self, logger: FakeTensorRT.Logger) -> FakeBuilder:
        self.builders.append(FakeBuilder(self))
        return self.builders[-1]

    def OnnxParser(self, network: FakeNetwork, logger: FakeTensorRT.Logger) -> FakeParser:
        return FakeParser(self, network)

    @staticmethod
    def Dims(shape: list[int]) -> tuple[int, ...]:
        return tuple(shape)


class FakeTensor:
    def __init__(self, name: str, shape: tuple[int, ...]) -> None:
        self.name, self.shape = name, shape


class FakeNetwork:
    def __init__(self, flags: int, inputs: dict[str, tuple[int, ...]]) -> None:
        self.flags = flags
        self.inputs = [FakeTensor(name, shape) for name, shape in inputs.items()]
        self.num_inputs = len(self.inputs)

    def get_input(self, index: int) -> FakeTensor:
        return self.inputs[index]


class FakeParser:
    def __init__(self, trt: FakeTensorRT, network: FakeNetwork) -> None:
        self.trt = trt
        self.num_errors = 0

    def parse_from_file(self, model: str) -> bool:
        self.trt.parsed_files.append(model)
        self.num_errors = len(self.trt.parse_errors)
        return not self.trt.parse_errors

    def get_error(self, index: int) -> str:
        return self.trt.parse_errors[index]


class FakeTimingCache:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def serialize(self) -> bytes:
        return self.data + b"+timed"  # a build adds its timings


class FakeProfile:
    def __init__(self) -> None:
        self.shapes: dict[str, tuple[tuple[int, ...], ...]] = {}

    def set_shape(self, input: str, min: tuple[int, ...], opt: tuple[int, ...], max: tuple[int, ...]) -> None:
        self.shapes[input] = (min, opt, max)


class FakeConfig:
    def __init__(self, trt: FakeTensorRT) -> None:
        self.trt = trt
        self.builder_optimization_level = 3
        self.flags: list[FakeTensorRT.BuilderFlag] = []
        self.pool_limits: dict[FakeTensorRT.MemoryPoolType, int] = {}
        self.profiles: list[FakeProfile] = []
        self.caches_created: list[bytes] = []
        self.timing_cache: FakeTimingCache | None = None

    def set_flag(self, flag: FakeTensorRT.BuilderFlag) -> None:
        self.flags.append(flag)

    def set_memory_pool_limit(self, pool: FakeTensorRT.MemoryPoolType, pool_size: int) -> None:
        self.pool_limits[pool] = pool_size

    def add_optimization_profile(self, profile: FakeProfile) -> int:
        self.profiles.append(profile)
        return len(self.profiles) - 1

    def create_timing_cache(self, serialized_timing_cache: bytes) -> FakeTimingCache | None:
        self.caches_created.append(bytes(serialized_timing_cache))
        if bytes(serialized_timing_cache) in self.trt.unreadable_timing_caches:
            return None
        return FakeTimingCache(bytes(serialized_timing_cache))

    def set_timing_cache(self, cache: FakeTimingCache, ignore_mismatch: bool) -> bool:
        if not isinstance(cache, FakeTimingCache):  # the binding takes ITimingCache const&
            raise TypeError("set_timing_cache(): incompatible function arguments")
        assert ignore_mismatch is False
        if self.trt.foreign_timing_cache and cache.data:
            return False
        self.timing_cache = cache
        return True


class FakeBuilder:
    def __init__(self, trt: FakeTensorRT) -> None:
        self.trt = trt
        self.network: FakeNetwork | None = None
        self.config = FakeConfig(trt)

    def create_network(self, flags: int = 0) -> FakeNetwork:
        self.network = FakeNetwork(flags, self.trt.network_inputs)
        return self.network

    def create_builder_config(self) -> FakeConfig:
        return self.config

    def create_optimization_profile(self) -> FakeProfile:
        return FakeProfile()

    def build_serialized_network(self, network: FakeNetwork, config: FakeConfig) -> bytes | None:
        assert network is self.network and config is self.config
        return None if self.trt.fail_build else b"serialized engine"


UNET_INPUTS = {"sample": (-1, 4, -1, -1), "timestep": (-1, 1), "encoder_hidden_states": (-1, -1, 768)}


@pytest.fixture
def fake_trt(monkeypatch) -> FakeTensorRT:
    fake = FakeTensorRT(UNET_INPUTS)
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    monkeypatch.setattr(te, "gpu_identity", lambda: H100)
    return fake


@pytest.fixture
def unet_onnx(tmp_path) -> Path:
    path = tmp_path / "onnx" / "model.onnx"
    path.parent.mkdir()
    path.write_bytes(b"graph")
    path.with_name("model.onnx.data").write_bytes(b"weights")
    return path


def test_build_calls_tensorrt_as_documented(fake_trt, unet_onnx, tmp_path):
    shapes = te.profile_shapes(SPECS[UNET], PROFILE)
    cache = tmp_path / "timing.cache"
    options = BuildOptions(optimization_level=5, workspace_bytes=8 << 30)
    result = te.build_engine(
        unet_onnx,
        SPECS[UNET],
        shapes,
        tmp_path / "plan",
        precision="fp16",
        options=options,
        timing_cache=cache,
    )

    assert fake_trt.parsed_files == [str(unet_onnx)]  # by path, so TensorRT finds the external data
    (builder,) = fake_trt.builders
    assert builder.network is not None and builder.network.flags == 1 << 1  # STRONGLY_TYPED only
    config = builder.config
    assert config.builder_optimization_level == 5
    assert config.pool_limits == {FakeTensorRT.MemoryPoolType.WORKSPACE: 8 << 30}
    assert config.flags == []  # no REFIT, and never a precision flag
    (profile,) = config.profiles
    assert profile.shapes == shapes
    assert config.caches_created == [b""]  # no cache file yet: a fresh one
    assert cache.read_bytes() == b"+timed"

    assert not result.reused and result.plan == tmp_path / "plan" / "model.plan"
    assert result.plan.read_bytes() == b"serialized engine"
    assert not result.plan.with_name("model.plan.partial").exists()
    recorded = te.read_plan_record(tmp_path / "plan" / "model.plan.json")
    assert recorded == result.record
    assert recorded.tensorrt_version == "10.13.0.35" and recorded.gpu == H100
    assert recorded.precision == "fp16"
    assert recorded.builder == {"optimization_level": 5, "workspace_bytes": 8 << 30, "refittable": False}
    assert recorded.profiles == [
        {
            "sample": {"min": [1, 4, 8, 8], "opt": [2, 4, 64, 64], "max": [8, 4, 128, 128]},
            "timestep": {"min": [1, 1], "opt": [2, 1], "max": [8, 1]},
            "encoder_hidden_states": {"min": [1, 77, 768], "opt": [2, 77, 768], "max": [8, 77, 768]},
        }
    ]
    assert set(recorded.onnx_sha256) == {"model.onnx", "model.onnx.data"}


def test_second_identical_build_is_skipped(fake_trt, unet_onnx, tmp_path):
    def build(**kwargs: object) -> te.EngineBuildResult:
        shapes = te.profile_shapes(SPECS[UNET], Profile.static(512, 512, max_batch=1))
        return te.build_engine(unet_onnx, SPECS[UNET], shapes, tmp_path / "plan", precision="fp16", **kwargs)

    assert not build().reused
    assert build().reused and len(fake_trt.builders) == 1
    assert not build(options=BuildOptions(refittable=True)).reused  # other builder options: rebuild
    assert fake_trt.builders[-1].config.flags == [FakeTensorRT.BuilderFlag.REFIT]
    unet_onnx.with_name("model.onnx.data").write_bytes(b"new weights")
    assert not build(options=BuildOptions(refittable=True)).reused  # other weights: rebuild
    assert len(fake_trt.builders) == 3


def test_timing_cache_round_trip(fake_trt, unet_onnx, tmp_path):
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"earlier")
    shapes = te.profile_shapes(SPECS[UNET], PROFILE)
    te.build_engine(unet_onnx, SPECS[UNET], shapes, tmp_path / "a", precision="fp16", timing_cache=cache)
    te.build_engine(unet_onnx, SPECS[UNET], shapes, tmp_path / "b", precision="fp16", timing_cache=cache)
    assert [b.config.caches_created for b in fake_trt.builders] == [[b"earlier"], [b"earlier+timed"]]
    assert cache.read_bytes() == b"earlier+timed+timed"


def test_timing_cache_from_another_gpu_is_replaced(fake_trt, unet_onnx, tmp_path, capsys):
    fake_trt.foreign_timing_cache = True
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"other gpu")
    shapes = te.profile_shapes(SPECS[UNET], PROFILE)
    te.build_engine(unet_onnx, SPECS[UNET], shapes, tmp_path / "a", precision="fp16", timing_cache=cache)
    assert fake_trt.builders[0].config.caches_created == [b"other gpu", b""]
    assert cache.read_bytes() == b"+timed"
    assert f"build-engines: warning: the timing cache {cache} cannot be used (from another GPU" in (
        capsys.readouterr().err
    )


def test_damaged_timing_cache_is_replaced(fake_trt, unet_onnx, tmp_path, capsys):
    """A truncated file for which TensorRT gives no cache (None): the build starts a fresh one."""
    fake_trt.unreadable_timing_caches = {b"trunc"}
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"trunc")
    shapes = te.profile_shapes(SPECS[UNET], PROFILE)
    result = te.build_engine(
        unet_onnx, SPECS[UNET], shapes, tmp_path / "a", precision="fp16", timing_cache=cache
    )
    config = fake_trt.builders[0].config
    assert config.caches_created == [b"trunc", b""]
    assert config.timing_cache is not None and config.timing_cache.data == b""
    assert result.plan.read_bytes() == b"serialized engine"
    assert cache.read_bytes() == b"+timed"  # the damaged file is replaced by this build's cache
    err = capsys.readouterr().err
    assert f"the timing cache {cache} cannot be used (damaged); starting a fresh one, saved after" in err


def test_without_any_timing_cache_the_build_goes_on(fake_trt, unet_onnx, tmp_path, capsys):
    fake_trt.unreadable_timing_caches = {b"", b"earlier"}
    cache = tmp_path / "timing.cache"
    cache.write_bytes(b"earlier")
    shapes = te.profile_shapes(SPECS[UNET], PROFILE)
    result = te.build_engine(
        unet_onnx, SPECS[UNET], shapes, tmp_path / "a", precision="fp16", timing_cache=cache
    )
    assert result.plan.read_bytes() == b"serialized engine"
    assert fake_trt.builders[0].config.timing_cache is None
    assert cache.read_bytes() == b"earlier"  # nothing to save: the file is left as it was
    assert "TensorRT gave no timing cache; building without one" in capsys.readouterr().err


def test_timing_cache_is_replaced_atomically(fake_trt, unet_onnx, tmp_path, monkeypatch):
    """Killed between writing and renaming (simulated: the rename fails), the old cache stays whole."""
    cache = tmp_path / "cache" / "timing.cache"
    cache.parent.mkdir()
    cache.write_bytes(b"earlier")

    def killed(src: object, dst: object) -> None:
        raise OSError("killed before the rename")

    monkeypatch.setattr(te.os, "replace", killed)
    shapes = te.profile_shapes(SPECS[UNET], PROFILE)
    with pytest.raises(OSError, match="killed before the rename"):
        te.build_engine(unet_onnx, SPECS[UNET], shapes, tmp_path / "a", precision="fp16", timing_cache=cache)
    assert cache.read_bytes() == b"earlier"
    assert [p.name for p in cache.parent.iterdir()] == ["timing.cache"]  # no partial file left behind


def test_parse_errors_are_reported(fake_trt, unet_onnx, tmp_path):
    fake_trt.parse_errors = ("In node 3 (Conv): unsupported", "In node 7 (Resize): bad mode")
    with pytest.raises(te.EngineBuildError, match="could not parse .*\n  In node 3.*\n  In node 7"):
        te.build_engine(
            unet_onnx, SPECS[UNET], te.profile_shapes(SPECS[UNET], PROFILE), tmp_path, precision="fp16"
        )
    assert not (tmp_path / "model.plan").exists()


def test_network_not_matching_the_spec_is_reported(fake_trt, unet_onnx, tmp_path):
    fake_trt.network_inputs = {"sample": (-1, 4, -1, -1)}
    with pytest.raises(te.EngineBuildError, match="unet: the ONNX file's inputs"):
        te.build_engine(
            unet_onnx, SPECS[UNET], te.profile_shapes(SPECS[UNET], PROFILE), tmp_path, precision="fp16"
        )


def test_failed_build_is_reported(fake_trt, unet_onnx, tmp_path):
    fake_trt.fail_build = True
    with pytest.raises(te.EngineBuildError, match="unet: TensorRT failed to build an engine"):
        te.build_engine(
            unet_onnx, SPECS[UNET], te.profile_shapes(SPECS[UNET], PROFILE), tmp_path, precision="fp16"
        )
    assert not (tmp_path / "model.plan").exists() and not (tmp_path / "model.plan.json").exists()
