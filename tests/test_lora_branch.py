"""The per-sample LoRA branch (build_engines.lora_branch) on the tiny checkpoint: one heterogeneous batch
equals, row by row, the base model with that row's ΔW merged into its weights; the exported branch graph
equals the plain graph at R = 0 and the torch branch model otherwise."""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel

from build_engines import onnx_export
from build_engines.lora_branch import (
    BranchedModel,
    BranchTarget,
    branch_spec,
    delta_weight,
    export_branch,
    list_targets,
    random_factors,
)
from build_engines.tiny_checkpoint import component_configs
from python_backend.shapes import UNET, engine_specs

# Row 0 uses no LoRA (zeros), row 1 a rank-2 LoRA zero-padded to the batch's rank 4, row 2 a rank-4 one.
RANKS = [0, 2, 4]
DOWNSAMPLER = "down_blocks.0.downsamplers.0.conv"  # a LoCon target with stride 2


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> Iterator[None]:
    # Tiny matmuls on 2 shared cores: torch's threads contending with other work make them 100x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def unet_inputs(batch: int, seed: int = 0) -> list[torch.Tensor]:
    """sample, timestep, encoder_hidden_states for the tiny UNet: 8x16 latents (odd downsampled sizes)."""
    g = torch.Generator().manual_seed(seed)
    return [
        torch.randn(batch, 4, 8, 16, generator=g),
        torch.rand(batch, 1, generator=g) * 999,
        torch.randn(batch, 77, 32, generator=g),
    ]


def feed(inputs: list[torch.Tensor]) -> dict[str, np.ndarray]:
    names = ("sample", "timestep", "encoder_hidden_states")
    return {name: x.numpy() for name, x in zip(names, inputs, strict=True)}


def merged(
    model: nn.Module, targets: list[BranchTarget], factors: dict[str, np.ndarray], row: int
) -> nn.Module:
    """A copy of `model` with row `row`'s ΔW = up @ down added to each target's weight."""
    copied = copy.deepcopy(model)
    root = getattr(copied, "text_model", copied)
    with torch.no_grad():
        for t in targets:
            delta = delta_weight(factors[t.down_name][row], factors[t.up_name][row])
            root.get_submodule(t.path).weight += torch.from_numpy(delta)
    return copied


def factor_tensors(targets: list[BranchTarget], factors: dict[str, np.ndarray]) -> list[torch.Tensor]:
    return [torch.from_numpy(factors[name]) for t in targets for name in (t.down_name, t.up_name)]


@pytest.fixture(scope="module")
def unet(tiny_checkpoint: Path) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(tiny_checkpoint, subfolder="unet").eval()


def test_targets_follow_kohya_on_sd1_architecture() -> None:
    """v1-4's architecture (on the meta device: no weights): kohya's "create LoRA for U-Net: 192 modules"
    and "for Text Encoder: 72 modules", plus LoCon's convs, shortcuts, time projections and samplers."""
    configs = component_configs(full_size=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs["unet"])
        text = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    targets = list_targets(unet, "unet")
    lora = [t for t in targets if ".attentions." in t.path]
    assert len(lora) == 192
    kinds = Counter(t.path.rsplit(".", 1)[-1] for t in targets if t not in lora)
    # 22 ResNet blocks (conv1, conv2, time_emb_proj); 14 change width (conv_shortcut): the 12 up blocks' (skip
    # connections concatenated) and 2 down; 3 down- and 3 upsamplers. 278 in all, kohya's count with conv_dim.
    assert kinds == {"conv1": 22, "conv2": 22, "time_emb_proj": 22, "conv_shortcut": 14, "conv": 6}
    assert len(targets) == 278
    by_path = {t.path: t for t in targets}
    assert by_path["down_blocks.0.attentions.0.proj_in"].weight_shape == (320, 320, 1, 1)
    assert by_path["mid_block.attentions.0.transformer_blocks.0.attn2.to_k"].weight_shape == (1280, 768)
    assert by_path["up_blocks.1.upsamplers.0.conv"].weight_shape == (1280, 1280, 3, 3)
    text_targets = list_targets(text, "text_encoder")
    assert len(text_targets) == 72
    assert text_targets[0].path.startswith("encoder.layers.0.")  # no "text_model." prefix
    assert Counter(t.path.rsplit(".", 1)[-1] for t in text_targets) == {
        name: 12 for name in ("q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2")
    }


def test_unet_branch_rows_equal_merged_weights(unet: UNet2DConditionModel) -> None:
    targets = list_targets(unet, "unet")
    assert any(t.path == DOWNSAMPLER for t in targets)
    factors = random_factors(targets, RANKS, seed=3)
    inputs = unet_inputs(len(RANKS))
    branched = BranchedModel(onnx_export._UNet(copy.deepcopy(unet)), "unet")
    with torch.inference_mode():
        out = branched(*inputs, *factor_tensors(targets, factors))
        plain = onnx_export._UNet(unet)(*inputs)
    assert float((out[0] - plain[0]).abs().max()) == 0.0  # zeros: the base model exactly
    assert float((out[1:] - plain[1:]).abs().max()) > 1e-2  # the LoRAs change the other rows
    for row in range(len(RANKS)):
        reference = onnx_export._UNet(merged(unet, targets, factors, row))
        with torch.inference_mode():
            expected = reference(*(x[row : row + 1] for x in inputs))
        assert float((out[row : row + 1] - expected).abs().max()) <= 1e-4, row


def test_text_encoder_branch_rows_equal_merged_weights(tiny_checkpoint: Path) -> None:
    text = CLIPTextModel.from_pretrained(tiny_checkpoint, subfolder="text_encoder").eval()
    targets = list_targets(text, "text_encoder")
    factors = random_factors(targets, RANKS, seed=4, scale=0.5)
    ids = torch.randint(0, 49406, (len(RANKS), 77), generator=torch.Generator().manual_seed(0))
    clip_skip = torch.tensor([[1], [2], [1]])
    branched = BranchedModel(onnx_export._TextEncoder(copy.deepcopy(text)), "text_encoder")
    with torch.inference_mode():
        out = branched(ids, clip_skip, *factor_tensors(targets, factors))
    for row in range(len(RANKS)):
        reference = onnx_export._TextEncoder(merged(text, targets, factors, row))
        with torch.inference_mode():
            expected = reference(ids[row : row + 1], clip_skip[row : row + 1])
        assert float((out[row : row + 1] - expected).abs().max()) <= 1e-4, row


@pytest.fixture(scope="module")
def exported(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The tiny UNet's plain export and branch export, and the torch branch model."""
    out = tmp_path_factory.mktemp("lora-branch")
    geometry = onnx_export.read_geometry(tiny_checkpoint)
    loader = onnx_export.ModuleLoader(tiny_checkpoint)
    spec = engine_specs(geometry)[UNET]
    plain = onnx_export.export_engine(spec, lambda: loader.module(UNET), "tiny", out / "plain")
    module = BranchedModel(onnx_export.ModuleLoader(tiny_checkpoint).module(UNET), "unet")
    branch = export_branch(module, spec, "tiny", out / "branch")
    assert branch.max_abs_diff < 1e-4 and not branch.reused
    assert export_branch(module, spec, "tiny", out / "branch").reused
    return {
        "plain": ort.InferenceSession(str(plain.path), providers=["CPUExecutionProvider"]),
        "branch": ort.InferenceSession(str(branch.path), providers=["CPUExecutionProvider"]),
        "branch_path": branch.path,
        "targets": module.targets,
        "module": module,
        "geometry": geometry,
    }


def run(session: ort.InferenceSession, inputs: dict[str, np.ndarray]) -> np.ndarray:
    [out] = session.run(["noise_pred"], inputs)
    return np.asarray(out)


def test_onnx_branch_at_rank_0_equals_plain_graph(exported: dict) -> None:
    inputs = feed(unet_inputs(2))
    empty = random_factors(exported["targets"], [0, 0])
    assert all(a.size == 0 for a in empty.values())
    assert (
        np.max(np.abs(run(exported["branch"], {**inputs, **empty}) - run(exported["plain"], inputs))) <= 1e-5
    )


def test_onnx_branch_equals_torch_branch(exported: dict) -> None:
    targets: list[BranchTarget] = exported["targets"]
    inputs = unet_inputs(len(RANKS), seed=1)
    factors = random_factors(targets, RANKS, seed=5)
    with torch.inference_mode():
        expected = exported["module"](*inputs, *factor_tensors(targets, factors)).numpy()
    assert np.max(np.abs(run(exported["branch"], {**feed(inputs), **factors}) - expected)) <= 1e-4


def test_onnx_branch_ranks_per_target(exported: dict, unet: UNet2DConditionModel) -> None:
    """Only the stride-2 downsampler conv carries a LoRA (rank 2); every other target has R = 0. The graph
    equals the base model with that ΔW merged, for the row that has it."""
    targets: list[BranchTarget] = exported["targets"]
    factors = random_factors(targets, [0, 0])
    [target] = [t for t in targets if t.path == DOWNSAMPLER]
    one = random_factors([target], [2, 0], seed=6, scale=1.0)
    inputs = unet_inputs(2, seed=2)
    plain = run(exported["plain"], feed(inputs))
    got = run(exported["branch"], {**feed(inputs), **factors, **one})
    assert np.max(np.abs(got[1] - plain[1])) <= 1e-5  # row 1: rank 2 of zeros
    reference = onnx_export._UNet(merged(unet, [target], one, row=0))
    with torch.inference_mode():
        expected = reference(*(x[:1] for x in inputs)).numpy()
    assert np.max(np.abs(got[:1] - expected)) <= 1e-4
    assert np.max(np.abs(got[:1] - plain[:1])) > 1e-3


def test_branch_graph_declares_contract_inputs(exported: dict) -> None:
    import onnx

    graph = onnx.load(str(exported["branch_path"]), load_external_data=False).graph
    targets: list[BranchTarget] = exported["targets"]
    spec = branch_spec(engine_specs(exported["geometry"])[UNET], [])
    declared = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in graph.input
    }
    assert list(declared)[: len(spec.inputs)] == [t.name for t in spec.inputs]
    conv = next(t for t in targets if t.path == DOWNSAMPLER)
    assert declared[conv.down_name] == ["guided_batch", f"{DOWNSAMPLER}.rank", 32, 3, 3]
    assert declared[conv.up_name] == ["guided_batch", 32, f"{DOWNSAMPLER}.rank"]
    assert len(declared) == len(spec.inputs) + 2 * len(targets)
