"""The per-sample LoRA branch (issue 15; design: docs/lora.md): every module a kohya LoRA/LoCon can
target computes `base(x) + up_n(down_n(x))`, where down_n, up_n are row n's low-rank factors, fed to the graph
as inputs. Requests with different LoRA sets, or none, can then share one engine run.

Per target (a Linear or Conv2d found by `list_targets`), the branch graph takes two inputs:

- f"{path}.lora_down" [N, R, in, *kernel] (Linear: kernel = (); Conv2d: (kh, kw), the conv weight layout)
- f"{path}.lora_up"   [N, out, R]         (all scales folded in)

N is the engine's batch axis and R the target's own dynamic axis f"{path}.rank" (rows of one run share R per
target: the host pads shorter stacks with zeros; R = 0, empty tensors, is a run where no row uses the target).
The branch is exactly ΔW = up @ down.reshape(R, -1) applied unmerged: for a Conv2d, down is a conv with the
base conv's stride, padding and dilation and up a 1x1 conv.
"""

from __future__ import annotations

import functools
import json
import operator
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from build_engines.onnx_export import (
    CHECK_SIZES,
    MAX_ABS_DIFF,
    ExportError,
    ExportResult,
    _Fp16,
    _save_checked,
    _torch_export,
    export_key,
    kept_export,
    sample_inputs,
)
from python_backend.adapters import DOWN_SUFFIX
from python_backend.shapes import TEXT_ENCODER, UNET, EngineSpec, TensorSpec
from python_backend.trt_sessions import MIN_RANK

BRANCH_FORMAT = 1  # bump when the branch's graph changes, so cached branch exports are redone

# kohya-ss/sd-scripts networks/lora.py (SD 1.x): every Linear and Conv2d inside a module of these classes.
# LoRA proper targets Transformer2DModel (all its Linears and 1x1 convs: proj_in/proj_out); LoCon (conv_dim)
# adds the ResNet blocks (3x3 convs, the 1x1 shortcut, time_emb_proj) and the down/upsampler convs.
TARGET_PARENTS = {
    "unet": ("Transformer2DModel", "ResnetBlock2D", "Downsample2D", "Upsample2D"),
    # transformers 4 names the attention class by its implementation; kohya lists those names too.
    "text_encoder": ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP"),
}
# The engine each component's branch graph is exported for, and that engine's batch axis.
ENGINE_OF = {"unet": UNET, "text_encoder": TEXT_ENCODER}
BATCH_AXIS = {UNET: "guided_batch", TEXT_ENCODER: "text_rows"}
# Rank of every target when tracing, and when checking the export (distinct, so that R is proven dynamic).
TRACE_RANK = 2
CHECK_RANK = 3
# TensorRT plans bound each layer's rank (build-engines --lora-max-rank): the ranks of a request's LoRAs add
# up at a layer, and 128 takes two rank-64 LoRAs or four of rank 32, the common sizes. Plans are tuned for
# one LoRA of rank 32.
DEFAULT_MAX_RANK = 128
OPT_RANK = 32


@dataclass(frozen=True)
class BranchTarget:
    """One module the branch wraps: `path` as diffusers (or transformers, under the text transformer) names
    it, and its base weight's shape [out, in, *kernel]."""

    component: str
    path: str
    weight_shape: tuple[int, ...]

    @property
    def down_name(self) -> str:
        return f"{self.path}.lora_down"

    @property
    def up_name(self) -> str:
        return f"{self.path}.lora_up"

    @property
    def rank_axis(self) -> str:
        return f"{self.path}.rank"

    @property
    def kernel(self) -> tuple[int, ...]:
        return self.weight_shape[2:]

    def down_shape(self, batch: int, rank: int) -> tuple[int, ...]:
        return (batch, rank, self.weight_shape[1], *self.kernel)

    def up_shape(self, batch: int, rank: int) -> tuple[int, ...]:
        return (batch, self.weight_shape[0], rank)


def component_root(model: nn.Module, component: str) -> nn.Module:
    """The module target paths are relative to: the UNet itself; CLIP's text transformer (transformers 4
    keeps it under `text_model`, transformers 5 on the model itself)."""
    if component == "text_encoder":
        root: nn.Module = getattr(model, "text_model", model)
        return root
    if component != "unet":
        raise ValueError(f"no LoRA targets in component {component!r}")
    return model


def list_targets(model: nn.Module, component: str) -> list[BranchTarget]:
    """Every Linear/Conv2d a kohya LoRA or LoCon can target in `model` (a UNet2DConditionModel or
    CLIPTextModel), in module order. Modules already wrapped by `add_branches` count as their base."""
    root = component_root(model, component)
    parents = TARGET_PARENTS[component]
    targets: list[BranchTarget] = []
    seen: set[str] = set()
    for parent_path, parent in root.named_modules():
        if type(parent).__name__ not in parents:
            continue
        for child_path, child in parent.named_modules():
            if isinstance(child, LoraBranch):
                child = child.base
            elif not isinstance(child, (nn.Linear, nn.Conv2d)) or child_path.endswith(".base"):
                continue
            path = f"{parent_path}.{child_path}"
            if path not in seen:
                seen.add(path)
                targets.append(BranchTarget(component, path, tuple(child.weight.shape)))
    return targets


class LoraBranch(nn.Module):
    """A Linear or Conv2d plus the per-sample low-rank branch. `down`/`up` are set per call (by
    `BranchedModel`); without them the module is its base."""

    def __init__(self, base: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        self.base = base
        self.down: torch.Tensor | None = None
        self.up: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:  # some diffusers code reads a projection's weight for its dtype
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.down is None or self.up is None:
            return y
        if isinstance(self.base, nn.Conv2d):
            return y + _conv_branch(self.base, x, self.down, self.up, y)
        return y + _linear_branch(x, self.down, self.up)


def _linear_branch(x: torch.Tensor, down: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """x [N, T, in] (tokens) or [N, in] (the UNet's time embedding); down [N, R, in]; up [N, out, R]."""
    tokens = x if x.dim() == 3 else x.unsqueeze(1)
    # Batched MatMuls, row n with its own factors. At R = 0 the second one has an empty inner dimension
    # and gives zeros.
    delta = torch.matmul(torch.matmul(tokens, down.transpose(1, 2)), up.transpose(1, 2))  # [N, T, out]
    return delta if x.dim() == 3 else delta.squeeze(1)


def _conv_branch(
    base: nn.Conv2d, x: torch.Tensor, down: torch.Tensor, up: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """conv(x, down_n, base's stride/padding/dilation) then a 1x1 conv with up_n, per row n.

    ONNX's Conv takes one weight for the batch (and its `group` is static, so N convs cannot be folded
    into one grouped conv). Instead one batched MatMul gives, per kernel offset (i, j), z_ij = down[n, :, :,
    i, j] @ x_n at every position; z is zero-padded and each z_ij sliced at its offset with the stride, and
    the slices summed. The padding and slicing act on the R-channel products, not on x: at R = 0 the branch
    copies nothing of x's size. Slice bounds are constants (ends counted from the back), so every spatial
    size stays dynamic.
    """
    if isinstance(base.padding, str) or base.padding_mode != "zeros" or base.groups != 1:
        raise ValueError(f"unsupported conv for a LoRA branch: {base}")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = base.kernel_size, base.stride, base.padding, base.dilation
    n, c, h, w = x.shape
    if (kh, kw, sh, sw, ph, pw) == (1, 1, 1, 1, 0, 0):
        low = torch.matmul(down[:, :, :, 0, 0], x.reshape(n, c, h * w))  # [N, R, HW]
    else:
        # [N, kh, kw, R, C] @ [N, 1, 1, C, HW]: the kh·kw products share x (MatMul broadcasts, no copy).
        z = torch.matmul(down.permute(0, 3, 4, 1, 2), x.reshape(n, 1, 1, c, h * w))
        # R keeps its place (dim 3) in every reshape: ONNX Reshape reads a 0 in the target shape as "copy
        # this dim", which is right only where the input's dim is that same 0.
        z = F.pad(z.reshape(n, kh, kw, z.shape[3], h, w), (pw, pw, ph, ph))
        slices = [
            z[:, i, j, :, i * dh : -(kh - 1 - i) * dh or None : sh, j * dw : -(kw - 1 - j) * dw or None : sw]
            for i in range(kh)
            for j in range(kw)
        ]
        total = functools.reduce(operator.add, slices)
        low = total.reshape(n, total.shape[1], y.shape[2] * y.shape[3])  # [N, R, Ho*Wo]
    return torch.matmul(up, low).reshape(y.shape)  # [N, out, Ho*Wo] → [N, out, Ho, Wo]


def add_branches(model: nn.Module, component: str) -> dict[str, LoraBranch]:
    """Wrap every target of `model` in a LoraBranch, in place; the branches by target path, in
    `list_targets`' order. Idempotent."""
    root = component_root(model, component)
    branches: dict[str, LoraBranch] = {}
    for target in list_targets(model, component):
        module = root.get_submodule(target.path)
        if not isinstance(module, LoraBranch):
            assert isinstance(module, (nn.Linear, nn.Conv2d))
            module = LoraBranch(module)
            root.set_submodule(target.path, module)
        branches[target.path] = module
    return branches


class BranchedModel(nn.Module):
    """An engine's torch module (build_engines.onnx_export's wrapper: inputs as the engine takes them) whose
    component has branches; forward(*engine inputs, then per target down, up) in `targets` order."""

    def __init__(self, engine_module: nn.Module, component: str) -> None:
        super().__init__()
        self.engine_module = engine_module
        inner = getattr(engine_module, "unet" if component == "unet" else "text_encoder")
        self.branches = add_branches(inner, component)
        self.targets = list_targets(inner, component)
        self.component = component

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        count = len(inputs) - 2 * len(self.targets)
        factors = inputs[count:]
        branches = list(self.branches.values())
        try:
            for k, branch in enumerate(branches):
                branch.down, branch.up = factors[2 * k], factors[2 * k + 1]
            out: torch.Tensor = self.engine_module(*inputs[:count])
            return out
        finally:
            for branch in branches:
                branch.down = branch.up = None


def branch_spec(spec: EngineSpec, targets: Sequence[BranchTarget]) -> EngineSpec:
    """`spec` plus the branch inputs of `targets`."""
    batch = BATCH_AXIS[spec.name]
    extra: list[TensorSpec] = []
    for t in targets:
        extra.append(TensorSpec(t.down_name, np.float32, (batch, t.rank_axis, t.weight_shape[1], *t.kernel)))
        extra.append(TensorSpec(t.up_name, np.float32, (batch, t.weight_shape[0], t.rank_axis)))
    return EngineSpec(spec.name, (*spec.inputs, *extra), spec.outputs)


def rank_axes(spec: EngineSpec, max_rank: int) -> dict[str, tuple[int, int, int]]:
    """(min, opt, max) of each rank axis of `spec` (none for a graph without branches), for a TensorRT
    profile: from MIN_RANK, as the runtime never feeds empty factors (python_backend/trt_sessions.py)."""
    axes = {str(t.dims[1]) for t in spec.inputs if t.name.endswith(DOWN_SUFFIX)}
    return dict.fromkeys(sorted(axes), (MIN_RANK, min(OPT_RANK, max_rank), max_rank))


def random_factors(
    targets: Sequence[BranchTarget],
    ranks: Sequence[int],
    seed: int = 0,
    scale: float = 0.1,
) -> dict[str, np.ndarray]:
    """Per-row random factors (row n: a rank-ranks[n] LoRA, zero-padded to max(ranks); rank 0: all zeros),
    sized so that ΔW is about `scale` times a default-initialised weight: big random deltas would make the
    random-weight models' activations explode and every comparison meaningless."""
    rng = np.random.default_rng(seed)
    batch, rank = len(ranks), max(ranks, default=0)
    out: dict[str, np.ndarray] = {}
    for t in targets:
        fan_in = int(np.prod(t.weight_shape[1:]))
        down = np.zeros(t.down_shape(batch, rank), np.float32)
        up = np.zeros(t.up_shape(batch, rank), np.float32)
        for n, r in enumerate(ranks):
            down[n, :r] = rng.standard_normal((r, *t.down_shape(1, 1)[2:])) / np.sqrt(fan_in)
            up[n, :, :r] = rng.standard_normal((t.weight_shape[0], r)) * scale / np.sqrt(max(r, 1) * fan_in)
        out[t.down_name], out[t.up_name] = down, up
    return out


def delta_weight(down: np.ndarray, up: np.ndarray) -> np.ndarray:
    """ΔW = up @ down, in the base weight's layout [out, in, *kernel] (one row's factors)."""
    rank = down.shape[0]
    return (up @ down.reshape(rank, -1)).reshape(up.shape[0], *down.shape[1:])


def export_branch(
    model: BranchedModel, base: EngineSpec, source_digest: str, out_dir: Path, precision: str = "fp32"
) -> ExportResult:
    """Write out_dir/model.onnx: the engine's graph (`base`: build_engines.onnx_export's export of the UNet or
    text encoder, same conventions, `precision` included: fp16 computes in fp16 behind fp32 inputs, factors
    too) with a branch on every target, unless an up-to-date one is there; check it against fp32 torch at
    R = 0 and at R = CHECK_RANK.

    A target at R = 0 still runs its branch, on empty factors: a product of zeros added to the base op's
    output. Putting each branch under an ONNX If on R > 0 was measured and gained nothing on ONNX Runtime
    (the If's other side copies the base output, as costly as the Add it saves; perf/README.md)."""
    engine = base.name
    spec = branch_spec(base, model.targets)
    target, sidecar = out_dir / "model.onnx", out_dir / "model.onnx.json"
    # fp32 keys predate the precision setting: leaving it out keeps their exports
    settings = {"precision": precision} if precision != "fp32" else {}
    key = export_key(spec, source_digest, branch_format=BRANCH_FORMAT, **settings)
    kept = kept_export(out_dir, key)
    if kept is not None:
        return kept

    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("model.onnx*"):
        stale.unlink()
    with tempfile.TemporaryDirectory(dir=out_dir) as tmp:
        raw = Path(tmp) / "model.onnx"
        exported = _Fp16(model, [t.name for t in spec.inputs]) if precision == "fp16" else model
        _torch_export(spec, exported, raw, sizes={t.rank_axis: TRACE_RANK for t in model.targets})
        _save_checked(spec, raw, target)
    diff = check_branch(spec, model, target, ranks=(0, CHECK_RANK))
    if diff > MAX_ABS_DIFF[precision]:
        raise ExportError(
            f"{engine} LoRA branch: {precision} ONNX Runtime differs from fp32 torch by {diff:.2e} "
            f"(limit {MAX_ABS_DIFF[precision]:.0e})"
        )
    sidecar.write_text(json.dumps({"key": key, "max_abs_diff": diff}, indent=2) + "\n")
    return ExportResult(target, diff, reused=False)


def check_branch(spec: EngineSpec, model: BranchedModel, path: Path, ranks: Sequence[int]) -> float:
    """Max abs difference between ONNX Runtime and torch at CHECK_SIZES, for each rank in `ranks` (every row
    of that rank)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    base_inputs = spec.inputs[: len(spec.inputs) - 2 * len(model.targets)]
    inputs = sample_inputs(EngineSpec(spec.name, base_inputs, spec.outputs), CHECK_SIZES, seed=1)
    batch = CHECK_SIZES[BATCH_AXIS[spec.name]]
    diff = 0.0
    for rank in ranks:
        inputs.update(random_factors(model.targets, [rank] * batch, seed=2))
        [got] = session.run([spec.outputs[0].name], inputs)
        with torch.inference_mode():
            expected = model(*(torch.from_numpy(inputs[t.name]) for t in spec.inputs))
        diff = max(diff, float(np.max(np.abs(got - expected.numpy()))))
    return diff
