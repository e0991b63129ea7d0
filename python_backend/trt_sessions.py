"""One engine's TensorRT plans run in our own process (a Triton python model), with or without LoRA branches.

Triton's tensorrt backend runs a plan as it is; a LoRA set per batch row needs each run's factors chosen and
fed by our code, so a TensorRT repository built with --lora hosts its text encoder and UNet here, with the
same layout and routing as ONNX Runtime (python_backend/ort_sessions.py): `model.plan`, and for the UNet the
branch plan beside it in `lora/model.plan`, used only for runs with a LoRA row. The text encoder's
`model.plan` is its branch plan.

What crosses into and out of a run is small (latents and text embeddings: under a MiB per image) and comes
as numpy, as Triton hands it over. The LoRA factors are large (up to hundreds of MiB per set): each compiled
set is copied to the GPU once, kept there within the LoRA cache's bytes, and a run's branch inputs are
assembled from those copies on the GPU, never copied from the host per step.

A branch plan's profile bounds each layer's rank (build-engines --lora-max-rank); a set over it is refused
before it runs. The profile starts at rank 1 rather than at empty tensors: a layer no row uses gets one rank
of zeros, which adds nothing.

`tensorrt` is imported inside functions, so that this module imports (for its types and tests) anywhere.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from python_backend.adapters import (
    DEFAULT_CACHE_BYTES,
    DOWN_SUFFIX,
    AdapterStore,
    BranchFeeder,
    LoraEngine,
    Run,
    branch_targets,
)

if TYPE_CHECKING:
    from tensorrt import ICudaEngine

PLAN = Path("model.plan")
LORA_PLAN = Path("lora") / "model.plan"  # the UNet's branch plan, beside its plain model.plan
MIN_RANK = 1  # the branch plans' profile minimum: TensorRT inputs here are never empty


class EngineLoadError(RuntimeError):
    """A plan that TensorRT cannot load here; the message says which and what to do."""


class TensorRTPlan:
    """A deserialized plan, one execution context, run on `device`'s current CUDA stream: the stream torch
    orders its own work and allocations on, so inputs made before a run and outputs read after it need no
    other synchronisation."""

    def __init__(self, path: Path, device: torch.device) -> None:
        import tensorrt as trt

        self.path = path
        self.device = device
        self._runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))  # must outlive the engine
        engine: ICudaEngine | None = self._runtime.deserialize_cuda_engine(path.read_bytes())
        if engine is None:
            raise EngineLoadError(
                f"TensorRT cannot load {path} (its log above says why); rebuild the engines with "
                "build-engines --target tensorrt on this server's GPU and TensorRT"
            )
        self.engine = engine
        self.context = engine.create_execution_context()
        names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
        self.inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        dtypes = {
            trt.float32: torch.float32,
            trt.float16: torch.float16,
            trt.int32: torch.int32,
            trt.int64: torch.int64,
            trt.bool: torch.bool,
        }
        self.dtypes = {n: dtypes[engine.get_tensor_dtype(n)] for n in names}

    def input_shapes(self) -> dict[str, tuple[int, ...]]:
        """Each input's shape in the plan, -1 for a dynamic axis."""
        return {n: _dims(self.engine.get_tensor_shape(n)) for n in self.inputs}

    def max_shape(self, name: str) -> tuple[int, ...]:
        """The largest shape the plan's (only) profile takes for input `name`."""
        _, _, largest = self.engine.get_tensor_profile_shape(name, 0)
        return _dims(largest)

    def run(self, feeds: Mapping[str, torch.Tensor | np.ndarray]) -> list[torch.Tensor]:
        """The outputs (on the device) for `feeds` (numpy arrays or tensors, anywhere: moved and cast to
        what the plan takes)."""
        held = []  # the inputs must live until the run is enqueued; torch frees them in stream order after
        for name in self.inputs:
            value = feeds[name]
            tensor = torch.from_numpy(value) if isinstance(value, np.ndarray) else value
            tensor = tensor.to(self.device, self.dtypes[name]).contiguous()
            held.append(tensor)
            if not self.context.set_input_shape(name, tuple(tensor.shape)):
                raise ValueError(
                    f"{self.path}: input {name} of shape {list(tensor.shape)} is outside the plan"
                )
            self.context.set_tensor_address(name, tensor.data_ptr())
        outputs = []
        for name in self.outputs:
            shape = _dims(self.context.get_tensor_shape(name))
            tensor = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, tensor.data_ptr())
            outputs.append(tensor)
        if not self.context.execute_async_v3(torch.cuda.current_stream(self.device).cuda_stream):
            raise RuntimeError(f"{self.path}: TensorRT failed to run the plan (its log above says why)")
        return outputs


def _dims(dims: object) -> tuple[int, ...]:
    return tuple(int(dims[i]) for i in range(len(dims)))  # type: ignore[index, arg-type]  # trt.Dims


class PlanSessions(LoraEngine):
    """`folder`: the engine's version folder (where model.plan is); `component`, `lora_dir`, `cache_bytes`:
    as python_backend.ort_sessions.EngineSessions. Runs take and give numpy arrays."""

    def __init__(
        self,
        folder: Path,
        device: torch.device,
        component: str | None = None,
        lora_dir: Path | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
    ) -> None:
        plain = TensorRTPlan(folder / PLAN, device)
        self.outputs = plain.outputs
        self.plain = _on_host(plain)
        if component is None:
            return
        branched = None
        if (folder / LORA_PLAN).exists():
            branched = TensorRTPlan(folder / LORA_PLAN, device)
        elif branch_targets(plain.input_shapes().items()):
            branched, self.plain = plain, None  # one plan: branches
        if branched is None:
            return
        targets = branch_targets(branched.input_shapes().items())
        max_rank = min(branched.max_shape(name)[1] for name in branched.inputs if name.endswith(DOWN_SUFFIX))
        store = AdapterStore(
            lora_dir,
            component,
            targets,
            cache_bytes,
            max_rank=max_rank,
            place=lambda array: torch.from_numpy(array).to(device),
        )
        self.branched = _on_host(branched)
        self.feeder = BranchFeeder(
            store, zeros=lambda shape: torch.zeros(shape, device=device), min_rank=MIN_RANK
        )


def _on_host(plan: TensorRTPlan) -> Run:
    """A Run over `plan` giving numpy outputs (Triton's python backend hands the model numpy inputs)."""
    return lambda feeds: [t.cpu().numpy() for t in plan.run(feeds)]
