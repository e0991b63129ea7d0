"""One engine's ONNX Runtime sessions, with or without LoRA branches: one source for the served engine models
(model_repository/onnx_runtime) and the in-process engines (python_backend.engines.OnnxRuntimeEngines).

An engine folder holds `model.onnx`, and for a LoRA-capable text encoder or UNet (build-engines --lora) the
graph with LoRA branches: the text encoder's `model.onnx` is that graph itself (it runs once per request, its
branches' cost is small), while the UNet keeps its plain graph for runs where no row uses LoRA and has the
branch graph beside it in `lora/model.onnx`: on ONNX Runtime, branches with no factors (R = 0) still cost a
full-size UNet call about 3% at 512 px, more than a request without LoRA should pay (perf/README.md).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from python_backend.adapters import DEFAULT_CACHE_BYTES, AdapterStore, BranchFeeder, branch_targets
from python_backend.ort_options import session_options

LORA_GRAPH = Path("lora") / "model.onnx"  # the UNet's branch graph, beside its plain model.onnx


class EngineSessions:
    """`folder`: the engine's version folder (where model.onnx is). `component`: the LoRA component its
    branches apply ("unet", "text_encoder"), None for an engine without. `lora_dir`: the LoRA folder."""

    def __init__(
        self,
        folder: Path,
        component: str | None = None,
        lora_dir: Path | None = None,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        threads: int = 0,
        spinning: bool = True,
    ) -> None:
        options = session_options(threads, spinning)
        providers = ["CPUExecutionProvider"]
        self.plain = ort.InferenceSession(str(folder / "model.onnx"), options, providers=providers)
        self.outputs = [o.name for o in self.plain.get_outputs()]
        self.branched: ort.InferenceSession | None = None
        self.feeder: BranchFeeder | None = None
        if component is None:
            return
        if (folder / LORA_GRAPH).exists():
            self.branched = ort.InferenceSession(str(folder / LORA_GRAPH), options, providers=providers)
        elif branch_targets((i.name, i.shape) for i in self.plain.get_inputs()):
            self.branched, self.plain = self.plain, None  # type: ignore[assignment]  # one graph: branches
        if self.branched is not None:
            targets = branch_targets((i.name, i.shape) for i in self.branched.get_inputs())
            self.feeder = BranchFeeder(AdapterStore(lora_dir, component, targets, cache_bytes))

    def check(self, keys: Sequence[str]) -> None:
        """Compile the sets `keys` name (cached), before a run: LoraError (a ValueError) for one that cannot
        be, so that a served batch fails only the request that sent it."""
        feeder = self._feeder_for(keys)
        for key in set(keys):
            if feeder is not None:
                feeder.store.compiled(key)

    def run(self, feeds: dict[str, np.ndarray], keys: Sequence[str]) -> list[np.ndarray]:
        """The engine's outputs for `feeds`, row n with the LoRA set keys[n] ("" for none). The feeder
        compiles (or finds cached) each row's set itself: no separate check on this per-step path."""
        if self.plain is not None and not any(keys):
            return self.plain.run(self.outputs, feeds)  # type: ignore[no-any-return]
        feeder = self._feeder_for(keys)
        assert self.branched is not None and feeder is not None
        return self.branched.run(self.outputs, {**feeds, **feeder.feeds(keys)})  # type: ignore[no-any-return]

    def _feeder_for(self, keys: Sequence[str]) -> BranchFeeder | None:
        if any(keys) and self.feeder is None:
            raise ValueError(
                "this engine has no LoRA branches (build the repository with build-engines --lora)"
            )
        return self.feeder
