"""python_backend/lora.py: LoRA files in A1111/kohya and diffusers/PEFT layouts compile to the ΔW diffusers'
own load_lora_weights + fuse_lora merges into the tiny checkpoint (per weight, and the same set of weights);
files we cannot serve are refused naming the file; alias and hash are A1111's."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from build_engines.tiny_checkpoint import component_configs, lora_main, lora_targets, write_tiny_lora
from python_backend.lora import (
    COMPONENTS,
    LoraError,
    LoraFile,
    LowRank,
    Target,
    compile_set,
    delta_weights,
    kohya_names,
    read_lora,
    shapes_from_checkpoint,
    target_shapes,
)

TOLERANCE = 1e-5  # fp32, max abs difference per weight element


@pytest.fixture(scope="module")
def shapes(tiny_checkpoint: Path) -> dict[Target, tuple[int, ...]]:
    return shapes_from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="module")
def loras(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("loras")
    return {
        "kohya": write_tiny_lora(folder / "kohya.safetensors", tiny_checkpoint, "kohya", conv=False),
        "locon": write_tiny_lora(folder / "locon.safetensors", tiny_checkpoint, "kohya", seed=1),
        "peft": write_tiny_lora(folder / "peft.safetensors", tiny_checkpoint, "peft", seed=2),
    }


def _pipeline(checkpoint: Path) -> Any:
    from diffusers import StableDiffusionPipeline

    return StableDiffusionPipeline.from_pretrained(checkpoint)


def _state(pipe: Any) -> dict[str, dict[str, torch.Tensor]]:
    return {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in COMPONENTS}


def _fused_deltas(pipe: Any, base: dict[str, dict[str, torch.Tensor]]) -> dict[Target, np.ndarray]:
    """Every weight diffusers changed, as (fused - base), after fuse_lora + unload_lora_weights."""
    pipe.unload_lora_weights()  # keeps the fused weights, drops the LoRA layers
    changed: dict[Target, np.ndarray] = {}
    for component in COMPONENTS:
        fused = getattr(pipe, component).state_dict()
        assert fused.keys() == base[component].keys()
        for key, value in fused.items():
            if not torch.equal(value, base[component][key]):
                assert key.endswith(".weight"), key  # no LoRA here trains biases
                changed[Target(component, key.removesuffix(".weight"))] = (
                    value - base[component][key]
                ).numpy()
    return changed


def diffusers_deltas(checkpoint: Path, files: Sequence[Path], weights: Sequence[Any] | None = None):
    pipe = _pipeline(checkpoint)
    base = _state(pipe)
    names = [f"lora{i}" for i in range(len(files))]
    for name, file in zip(names, files, strict=True):
        pipe.load_lora_weights(str(file), adapter_name=name)
    if weights is not None:
        pipe.set_adapters(names, adapter_weights=list(weights))
    pipe.fuse_lora(adapter_names=names)
    return _fused_deltas(pipe, base)


def assert_same_deltas(ours: dict[Target, np.ndarray], theirs: dict[Target, np.ndarray]) -> None:
    assert ours.keys() == theirs.keys(), sorted(ours.keys() ^ theirs.keys())[:5]
    worst = max(theirs, key=lambda t: float(np.abs(ours[t] - theirs[t]).max()))
    assert float(np.abs(ours[worst] - theirs[worst]).max()) <= TOLERANCE, worst
    assert all(float(np.abs(d).max()) > 1e-3 for d in theirs.values())  # the comparison is not of zeros


# ----------------------------------------------------------------------------------- parity with diffusers


@pytest.mark.parametrize("kind", ["kohya", "locon", "peft"])
def test_one_lora_compiles_to_what_diffusers_fuses(
    kind: str, loras: dict[str, Path], shapes, tiny_checkpoint: Path
) -> None:
    lora = read_lora(loras[kind], shapes)
    assert {t.component for t in lora.modules} == set(COMPONENTS)
    if kind == "locon":  # 3x3 downs with 1x1 ups besides the attention layers
        assert any(m.down.shape[2:] == (3, 3) for m in lora.modules.values())
    ours = delta_weights(compile_set([(lora, 1.0, 1.0)]))
    assert_same_deltas(ours, diffusers_deltas(tiny_checkpoint, [loras[kind]]))


def test_two_loras_with_multipliers_concatenate_along_the_rank(
    loras: dict[str, Path], shapes, tiny_checkpoint: Path
) -> None:
    first, second = read_lora(loras["locon"], shapes), read_lora(loras["peft"], shapes)
    compiled = compile_set([(first, 0.7, 0.7), (second, -0.4, -0.4)])
    target = Target("unet", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k")
    ranks = first.modules[target].down.shape[0], second.modules[target].down.shape[0]
    assert compiled[target].down.shape[0] == compiled[target].up.shape[1] == sum(ranks)
    theirs = diffusers_deltas(tiny_checkpoint, [loras["locon"], loras["peft"]], [0.7, -0.4])
    assert_same_deltas(delta_weights(compiled), theirs)


def test_text_encoder_and_unet_multipliers_apply_separately(
    loras: dict[str, Path], shapes, tiny_checkpoint: Path
) -> None:
    # A1111's <lora:name:te:unet>; diffusers: per-component adapter weights.
    entries = [(read_lora(loras["kohya"], shapes), 0.3, 0.8), (read_lora(loras["peft"], shapes), 1.2, -0.5)]
    weights = [{"unet": 0.8, "text_encoder": 0.3}, {"unet": -0.5, "text_encoder": 1.2}]
    theirs = diffusers_deltas(tiny_checkpoint, [loras["kohya"], loras["peft"]], weights)
    assert_same_deltas(delta_weights(compile_set(entries)), theirs)


def test_zero_multiplier_leaves_the_component_out(loras: dict[str, Path], shapes) -> None:
    compiled = compile_set([(read_lora(loras["kohya"], shapes), 0.0, 1.0)])
    assert compiled and {t.component for t in compiled} == {"unet"}


def test_peft_alpha_from_diffusers_adapter_metadata(shapes, tiny_checkpoint: Path, tmp_path: Path) -> None:
    """A LoRA diffusers saved with its LoraConfig (lora_alpha != r, an alpha_pattern) scales as diffusers'."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    pipe = _pipeline(tiny_checkpoint)
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1"],
        alpha_pattern={"attn2.to_k": 2},
        init_lora_weights=False,  # random B, so ΔW != 0
    )
    torch.manual_seed(0)
    pipe.unet.add_adapter(config)
    StableDiffusionPipeline.save_lora_weights(
        tmp_path,
        unet_lora_layers=get_peft_model_state_dict(pipe.unet),
        unet_lora_adapter_metadata=config.to_dict(),
        weight_name="trained.safetensors",
    )
    file = tmp_path / "trained.safetensors"
    lora = read_lora(file, shapes)
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    assert lora.modules[Target("unet", f"{block}.attn2.to_k")].scale == 2 / 4
    assert lora.modules[Target("unet", f"{block}.attn1.to_q")].scale == 8 / 4
    assert_same_deltas(
        delta_weights(compile_set([(lora, 1.0, 1.0)])), diffusers_deltas(tiny_checkpoint, [file])
    )


def test_ldm_block_names_map_like_diffusers(
    loras: dict[str, Path], shapes, tiny_checkpoint: Path, tmp_path: Path
) -> None:
    """`lora_unet_input_blocks_1_1_proj_in` (the original UNet's names): diffusers maps them with
    _maybe_map_sgm_blocks_to_diffusers when given the UNet config (SD 1.x's load_lora_weights does not pass
    it, so it is called here as SDXL's loader does)."""
    from diffusers import StableDiffusionPipeline

    names = kohya_names(shapes)
    ldm_name = {}
    for name, target in names.items():
        if target.component == "unet" and name != "lora_unet_" + target.path.replace(".", "_"):
            ldm_name[target] = name
    renamed = {}
    for key, value in load_file(str(loras["kohya"])).items():
        module, _, part = key.partition(".")
        if module.startswith("lora_unet_"):
            renamed[f"{ldm_name[names[module]]}.{part}"] = value
    assert any(k.startswith("lora_unet_input_blocks_1_1_") for k in renamed)
    file = tmp_path / "ldm.safetensors"
    save_file(renamed, str(file))

    pipe = _pipeline(tiny_checkpoint)
    base = _state(pipe)
    state_dict, alphas = StableDiffusionPipeline.lora_state_dict(str(file), unet_config=pipe.unet.config)
    StableDiffusionPipeline.load_lora_into_unet(
        state_dict, alphas, pipe.unet, adapter_name="ldm", _pipeline=pipe
    )
    pipe.fuse_lora(adapter_names=["ldm"])
    ours = delta_weights(compile_set([(read_lora(file, shapes), 1.0, 1.0)]))
    assert_same_deltas(ours, _fused_deltas(pipe, base))


def test_older_diffusers_key_forms_read_as_peft(loras: dict[str, Path], shapes, tmp_path: Path) -> None:
    """diffusers 0.2x wrote `.lora.down.weight`, `.lora_linear_layer.down.weight` and attention processors'
    `processor.to_q_lora.down.weight`; they name the same layers as lora_A/lora_B."""
    renamed = {}
    for key, value in load_file(str(loras["peft"])).items():
        part = "down" if key.endswith(".lora_A.weight") else "up"
        module = key.removesuffix(".lora_A.weight").removesuffix(".lora_B.weight")
        if module.startswith("text_encoder."):
            renamed[f"{module}.lora_linear_layer.{part}.weight"] = value
        elif ".attn1.to_" in module:
            attention, proj = (
                module.rsplit(".", 1) if not module.endswith("to_out.0") else (module[:-9], "to_out")
            )
            renamed[f"{attention}.processor.{proj}_lora.{part}.weight"] = value
        else:
            renamed[f"{module}.lora.{part}.weight"] = value
    file = tmp_path / "old.safetensors"
    save_file(renamed, str(file))
    old = delta_weights(compile_set([(read_lora(file, shapes), 1.0, 1.0)]))
    new = delta_weights(compile_set([(read_lora(loras["peft"], shapes), 1.0, 1.0)]))
    assert old.keys() == new.keys()
    assert all(np.array_equal(old[t], new[t]) for t in new)


# ------------------------------------------------------------------------ A1111 semantics beyond diffusers


def _write(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> Path:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def _kohya_pair(rng: np.random.Generator, shape: tuple[int, ...], rank: int) -> tuple[np.ndarray, np.ndarray]:
    out_features, in_features, *kernel = shape
    down = rng.standard_normal((rank, in_features, *kernel)).astype(np.float32)
    up = rng.standard_normal((out_features, rank, *([1, 1] if kernel else []))).astype(np.float32)
    return down, up


def test_per_layer_alpha_and_missing_alpha_follow_a1111(shapes, tmp_path: Path) -> None:
    """ΔW = multiplier × alpha / rank × up @ down per layer (A1111 network.py calc_scale); no alpha: scale 1.
    (diffusers 0.42 ignores per-layer alphas of attention projections that differ from the file's most
    common alpha, so the generated files use one alpha per layer kind and this is checked by formula.)"""
    rng = np.random.default_rng(0)
    q = Target("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q")
    v = Target("unet", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_v")
    fc1 = Target("text_encoder", "encoder.layers.1.mlp.fc1")
    tensors, alphas = {}, {q: 1.0, v: 3.0, fc1: None}
    pairs = {t: _kohya_pair(rng, shapes[t], 4) for t in alphas}
    for target, alpha in alphas.items():
        prefix = "lora_unet_" if target.component == "unet" else "lora_te_text_model_"
        name = prefix + target.path.replace(".", "_")
        tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = pairs[target]
        if alpha is not None:
            tensors[f"{name}.alpha"] = np.array(alpha, dtype=np.float32)
    lora = read_lora(_write(tmp_path / "alphas.safetensors", tensors), shapes)
    deltas = delta_weights(compile_set([(lora, 0.5, 2.0)]))
    for target, alpha in alphas.items():
        multiplier = 0.5 if target.component == "text_encoder" else 2.0
        scale = 1.0 if alpha is None else alpha / 4
        down, up = pairs[target]
        np.testing.assert_allclose(deltas[target], multiplier * scale * (up @ down), rtol=1e-5, atol=1e-6)


def test_cp_decomposed_locon_folds_lora_mid_into_down(shapes, tmp_path: Path) -> None:
    """LyCORIS LoCon with lora_mid (CP/Tucker): 1x1 down, 3x3 mid, 1x1 up, applied in sequence (A1111
    network_lora.py); the compiled branch (3x3 down, then 1x1 up) gives the same convolution output."""
    rng = np.random.default_rng(1)
    target = Target("unet", "down_blocks.1.resnets.0.conv1")
    out_features, in_features, kh, kw = shapes[target]
    down = rng.standard_normal((3, in_features, 1, 1)).astype(np.float32)
    mid = rng.standard_normal((3, 3, kh, kw)).astype(np.float32)
    up = rng.standard_normal((out_features, 3, 1, 1)).astype(np.float32)
    name = "lora_unet_down_blocks_1_resnets_0_conv1"
    tensors = {f"{name}.lora_down.weight": down, f"{name}.lora_mid.weight": mid, f"{name}.lora_up.weight": up}
    lora = read_lora(_write(tmp_path / "cp.safetensors", tensors), shapes)
    branch = compile_set([(lora, 1.0, 1.0)])[target]
    assert branch.down.shape == (3, in_features, kh, kw) and branch.up.shape == (out_features, 3)

    conv = torch.nn.functional.conv2d
    x = torch.from_numpy(rng.standard_normal((1, in_features, 9, 7)).astype(np.float32))
    sequential = conv(
        conv(conv(x, torch.from_numpy(down)), torch.from_numpy(mid), padding=1), torch.from_numpy(up)
    )
    compiled = conv(
        conv(x, torch.from_numpy(branch.down), padding=1), torch.from_numpy(branch.up)[:, :, None, None]
    )
    torch.testing.assert_close(compiled, sequential, rtol=1e-4, atol=1e-4)
    merged = conv(x, torch.from_numpy(delta_weights({target: branch})[target]), padding=1)
    torch.testing.assert_close(merged, sequential, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_files_read_as_float32(
    dtype: torch.dtype, loras: dict[str, Path], shapes, tmp_path: Path
) -> None:
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    half = {k: v.to(dtype) for k, v in load_torch(str(loras["kohya"])).items()}
    file = tmp_path / f"{str(dtype).split('.')[-1]}.safetensors"
    save_torch(half, str(file))
    lora = read_lora(file, shapes)
    target = Target("text_encoder", "encoder.layers.0.self_attn.q_proj")
    expected = half["lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight"].float().numpy()
    assert lora.modules[target].down.dtype == np.float32
    assert np.array_equal(lora.modules[target].down, expected)


def test_low_rank_form_matches_the_contract(loras: dict[str, Path], shapes) -> None:
    compiled = compile_set([(read_lora(loras["locon"], shapes), 1.0, 1.0)])
    for target, branch in compiled.items():
        assert isinstance(branch, LowRank) and branch.down.dtype == branch.up.dtype == np.float32
        base = shapes[target]
        rank = branch.down.shape[0]
        assert branch.down.shape == (rank, *base[1:]) and branch.up.shape == (base[0], rank)


# ------------------------------------------------------------------------------------------------ refusals


def _refused(path: Path, shapes, *fragments: str) -> str:
    with pytest.raises(LoraError) as info:
        read_lora(path, shapes)
    message = str(info.value)
    assert str(path) in message
    for fragment in fragments:
        assert fragment in message
    return message


def test_lycoris_types_are_refused_with_what_to_do(shapes, tmp_path: Path) -> None:
    module = "lora_unet_down_blocks_0_attentions_0_proj_in"
    loha = {f"{module}.{part}": np.ones((2, 32), np.float32) for part in ("hada_w1_a", "hada_w1_b")}
    loha[f"{module}.alpha"] = np.array(1.0, np.float32)
    _refused(_write(tmp_path / "loha.safetensors", loha), shapes, "LoHa is not supported", "LoRA/LoCon")
    lokr = {f"{module}.lokr_w1": np.ones((4, 4), np.float32)}
    _refused(_write(tmp_path / "lokr.safetensors", lokr), shapes, "LoKr is not supported")
    dora = {f"{module}.dora_scale": np.ones((32, 1), np.float32)}
    _refused(_write(tmp_path / "dora.safetensors", dora), shapes, "DoRA is not supported")


def test_other_architectures_are_refused(shapes, tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    # SDXL's kohya keys name two text encoders.
    sdxl = {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": np.ones(
            (4, 768), np.float32
        )
    }
    _refused(_write(tmp_path / "sdxl.safetensors", sdxl), shapes, "SDXL")
    # SD 2.x: a 1024-wide text encoder (the tiny model's is 32 wide).
    name = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    sd2 = {f"{name}.lora_down.weight": rng.standard_normal((4, 1024)).astype(np.float32)}
    sd2[f"{name}.lora_up.weight"] = rng.standard_normal((1024, 4)).astype(np.float32)
    _refused(_write(tmp_path / "sd2.safetensors", sd2), shapes, name, "another model")
    # A 3x3 LoCon down on a layer whose weight is 1x1.
    name = "lora_unet_down_blocks_0_attentions_0_proj_in"
    conv = {f"{name}.lora_down.weight": np.ones((4, 32, 3, 3), np.float32)}
    conv[f"{name}.lora_up.weight"] = np.ones((32, 4, 1, 1), np.float32)
    _refused(_write(tmp_path / "kernel.safetensors", conv), shapes, name, "do not fit")


def test_layers_the_model_does_not_have_are_refused(shapes, tmp_path: Path) -> None:
    name = "lora_unet_down_blocks_7_attentions_0_proj_in"
    tensors = {f"{name}.lora_down.weight": np.ones((4, 32), np.float32)}
    _refused(_write(tmp_path / "missing.safetensors", tensors), shapes, name, "has no layer")
    peft = {"unet.down_blocks.0.attentions.0.proj_nowhere.lora_A.weight": np.ones((4, 32), np.float32)}
    _refused(_write(tmp_path / "peft.safetensors", peft), shapes, "proj_nowhere")
    other = {"transformer.single_blocks.0.linear1.lora_A.weight": np.ones((4, 32), np.float32)}
    _refused(_write(tmp_path / "flux.safetensors", other), shapes, "unknown key", "not an SD 1.x LoRA")
    half = {
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight": np.ones((4, 32, 1, 1), np.float32)
    }
    _refused(_write(tmp_path / "half.safetensors", half), shapes, "needs both")


def test_unreadable_files_are_refused(loras: dict[str, Path], shapes, tmp_path: Path) -> None:
    data = loras["kohya"].read_bytes()
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    _refused(truncated, shapes, "not a readable .safetensors file")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file at all")
    _refused(garbage, shapes, "not a readable .safetensors file")
    _refused(tmp_path / "absent.safetensors", shapes, "cannot read")
    pickle = tmp_path / "old.pt"
    pickle.write_bytes(b"\x80\x04")
    _refused(pickle, shapes, ".safetensors")


def test_non_finite_values_are_refused(loras: dict[str, Path], shapes, tmp_path: Path) -> None:
    tensors = load_file(str(loras["kohya"]))
    key = "lora_unet_mid_block_attentions_0_proj_out.lora_up.weight"
    tensors[key][0, 0] = np.nan
    _refused(_write(tmp_path / "nan.safetensors", tensors), shapes, key, "non-finite")
    tensors = load_file(str(loras["kohya"]))
    tensors["lora_unet_mid_block_attentions_0_proj_out.alpha"] = np.array(np.inf, np.float32)
    _refused(_write(tmp_path / "inf.safetensors", tensors), shapes, "non-finite")


@pytest.mark.parametrize("multipliers", [(float("nan"), 1.0), (1.0, float("inf"))])
def test_non_finite_multipliers_are_refused(multipliers, loras: dict[str, Path], shapes) -> None:
    lora = read_lora(loras["kohya"], shapes)
    with pytest.raises(LoraError, match="multiplier must be finite") as info:
        compile_set([(lora, *multipliers)])
    assert str(loras["kohya"]) in str(info.value)


# ---------------------------------------------------------------------------------------- names and hashes


def test_name_alias_and_addnet_hash(tiny_checkpoint: Path, shapes, tmp_path: Path) -> None:
    plain = read_lora(write_tiny_lora(tmp_path / "style-v2.safetensors", tiny_checkpoint), shapes)
    assert (plain.name, plain.alias) == ("style-v2", "style-v2")
    file = write_tiny_lora(tmp_path / "style-v3.safetensors", tiny_checkpoint, output_name="My Style")
    named = read_lora(file, shapes)
    assert (named.name, named.alias) == ("style-v3", "My Style")

    # kohya/A1111's "addnet" hash: sha256 of what follows the 8-byte header length and the JSON header.
    data = file.read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    assert data[8:9] == b"{" and data[header_end - 1 : header_end] in (b"}", b" ")
    expected = hashlib.sha256(data[header_end:]).hexdigest()
    assert named.hash == expected and named.shorthash == expected[:12]
    assert plain.hash == expected  # same tensors, other metadata: the same hash
    assert hashlib.sha256(data).hexdigest() != expected


def test_hash_from_metadata_wins(tiny_checkpoint: Path, shapes, tmp_path: Path) -> None:
    """A1111 takes sshs_model_hash from the metadata when a trainer stored it."""
    tensors = load_file(str(write_tiny_lora(tmp_path / "a.safetensors", tiny_checkpoint)))
    file = _write(tmp_path / "b.safetensors", tensors, {"sshs_model_hash": "ab" * 32})
    assert read_lora(file, shapes).shorthash == "ab" * 6


# ----------------------------------------------------------------------------------- model shapes, writers


def test_target_names_of_full_size_sd1() -> None:
    """kohya's SD 1.5 LoRA: 192 UNet and 72 text-encoder layers; LDM block names of known layers."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = component_configs(full_size=True)
    with torch.device("meta"):
        unet = UNet2DConditionModel(**configs["unet"])
        text_encoder = CLIPTextModel(CLIPTextConfig(**configs["text_encoder"]))
    shapes = target_shapes("unet", {k: v.shape for k, v in unet.state_dict().items()})
    shapes.update(target_shapes("text_encoder", {k: v.shape for k, v in text_encoder.state_dict().items()}))
    targets = lora_targets(shapes, conv=False)
    assert sum(t.component == "unet" for t in targets) == 192
    assert sum(t.component == "text_encoder" for t in targets) == 72

    names = kohya_names(shapes)
    assert names["lora_te_text_model_encoder_layers_11_mlp_fc2"] == Target(
        "text_encoder", "encoder.layers.11.mlp.fc2"
    )
    ldm = {
        "input_blocks_1_1_proj_in": "down_blocks.0.attentions.0.proj_in",
        "input_blocks_2_1_transformer_blocks_0_attn1_to_out_0": (
            "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_out.0"
        ),
        "input_blocks_3_0_op": "down_blocks.0.downsamplers.0.conv",
        "input_blocks_4_0_skip_connection": "down_blocks.1.resnets.0.conv_shortcut",
        "input_blocks_11_0_emb_layers_1": "down_blocks.3.resnets.1.time_emb_proj",
        "middle_block_1_proj_in": "mid_block.attentions.0.proj_in",
        "middle_block_1_transformer_blocks_0_attn2_to_k": (
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k"
        ),
        "middle_block_2_out_layers_3": "mid_block.resnets.1.conv2",
        "output_blocks_2_1_conv": "up_blocks.0.upsamplers.0.conv",
        "output_blocks_5_2_conv": "up_blocks.1.upsamplers.0.conv",
        "output_blocks_11_1_proj_out": "up_blocks.3.attentions.2.proj_out",
        "output_blocks_9_0_in_layers_2": "up_blocks.3.resnets.0.conv1",
    }
    for name, path in ldm.items():
        assert names["lora_unet_" + name] == Target("unet", path), name
        assert names["lora_unet_" + path.replace(".", "_")] == Target("unet", path)


def test_text_encoder_shapes_without_transformers_4_prefix() -> None:
    shapes = target_shapes(
        "text_encoder",
        {
            "text_model.encoder.layers.0.self_attn.q_proj.weight": (768, 768),
            "text_model.encoder.layers.0.self_attn.q_proj.bias": (768,),
            "text_model.embeddings.token_embedding.weight": (49408, 768),
            "text_model.final_layer_norm.weight": (768,),
        },
    )
    assert shapes == {Target("text_encoder", "encoder.layers.0.self_attn.q_proj"): (768, 768)}


def test_tiny_lora_files_are_deterministic_and_change_weights_visibly(
    tiny_checkpoint: Path, shapes, tmp_path: Path
) -> None:
    from safetensors import safe_open

    for layout in ("kohya", "peft"):
        a = write_tiny_lora(tmp_path / f"a-{layout}.safetensors", tiny_checkpoint, layout, rank=8, seed=3)
        b = write_tiny_lora(tmp_path / f"b-{layout}.safetensors", tiny_checkpoint, layout, rank=8, seed=3)
        c = write_tiny_lora(tmp_path / f"c-{layout}.safetensors", tiny_checkpoint, layout, rank=8, seed=4)
        # Tensors and A1111's hash repeat; the header does not (safetensors writes metadata in random order).
        tensors = [load_file(str(f)) for f in (a, b, c)]
        assert tensors[0].keys() == tensors[1].keys() == tensors[2].keys()
        assert all(np.array_equal(tensors[0][k], tensors[1][k]) for k in tensors[0])
        assert not any(
            np.array_equal(tensors[0][k], tensors[2][k]) for k in tensors[0] if k.endswith("weight")
        )
        assert read_lora(a, shapes).hash == read_lora(b, shapes).hash != read_lora(c, shapes).hash
    deltas = delta_weights(compile_set([(read_lora(a, shapes), 1.0, 1.0)]))
    weights = {}
    for component, file in (("unet", "diffusion_pytorch_model"), ("text_encoder", "model")):
        with safe_open(str(tiny_checkpoint / component / f"{file}.safetensors"), "np") as f:
            weights.update({Target(component, k.removesuffix(".weight")): f.get_tensor(k) for k in f.keys()})
    ratios = [np.linalg.norm(d) / np.linalg.norm(weights[t]) for t, d in deltas.items()]
    assert 0.2 < min(ratios) and max(ratios) < 2.0, (min(ratios), max(ratios))


def test_sd_tiny_lora_cli(
    tiny_checkpoint: Path, shapes, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "cli.safetensors"
    lora_main(
        [str(tiny_checkpoint), str(out), "--layout", "kohya", "--rank", "2", "--no-conv", "--alias", "x"]
    )
    assert "wrote" in capsys.readouterr().out
    lora: LoraFile = read_lora(out, shapes)
    assert lora.alias == "x"
    assert {m.down.shape[0] for m in lora.modules.values()} == {2}
    assert not any(".resnets." in t.path for t in lora.modules)
    with pytest.raises(SystemExit):
        lora_main([str(tiny_checkpoint), str(tmp_path / "wrong.pt")])
    assert lora.metadata["ss_output_name"] == "x"
