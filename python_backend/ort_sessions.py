"""One engine's ONNX Runtime sessions, with or without LoRA branches: one source for the served engine models
(model_repository/engine) and the in-process engines (python_backend.engines.OnnxRuntimeEngines).

An engine folder holds `model.onnx`, and for a LoRA-capable text encoder or UNet (build-engines --lora) the
graph with LoRA branches: the text encoder's `model.onnx` is that graph itself (it runs once per request, its
branches' cost is small), while the UNet keeps its plain graph for runs where no row uses LoRA and has the
branch graph beside it in `lora/model.onnx`: on ONNX Runtime, branches with no factors (R = 0) still cost a
full-size UNet call about 3% at 512 px, more than a request without LoRA should pay (perf/README.md).
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from python_backend.adapters import (
    DEFAULT_CACHE_BYTES,
    AdapterStore,
    BranchFeeder,
    LoraEngine,
    Run,
    branch_targets,
)
from python_backend.ort_options import session_options

LORA_GRAPH = Path("lora") / "model.onnx"  # the UNet's branch graph, beside its plain model.onnx


class EngineSessions(LoraEngine):
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
        plain = ort.InferenceSession(str(folder / "model.onnx"), options, providers=providers)
        self.outputs = [o.name for o in plain.get_outputs()]
        self.plain = _runner(plain, self.outputs)
        if component is None:
            return
        branched = None
        if (folder / LORA_GRAPH).exists():
            branched = ort.InferenceSession(str(folder / LORA_GRAPH), options, providers=providers)
        elif branch_targets((i.name, i.shape) for i in plain.get_inputs()):
            branched, self.plain = plain, None  # one graph: branches
        if branched is not None:
            targets = branch_targets((i.name, i.shape) for i in branched.get_inputs())
            self.branched = _runner(branched, self.outputs)
            self.feeder = BranchFeeder(AdapterStore(lora_dir, component, targets, cache_bytes))


def _runner(session: ort.InferenceSession, outputs: list[str]) -> Run:
    return lambda feeds: session.run(outputs, feeds)  # type: ignore[no-any-return]
