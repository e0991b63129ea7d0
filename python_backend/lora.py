"""LoRA files, as A1111 users have them, compiled into the low-rank form the engines' LoRA branches take.

The design: docs/lora.md. A file is read once into per-layer (down, up, scale)
triples (`read_lora`), checked against the target model's weight shapes; a request's LoRA set becomes one
`LowRank` per targeted layer (`compile_set`), several files concatenated along the rank axis with their
multipliers and alpha/rank scales folded into `up`. ΔW = multiplier × alpha / rank × up @ down, the formula
of A1111 (extensions-builtin/Lora network.py) and of diffusers/PEFT.

numpy and safetensors only: this runs inside engine processes that never import torch.

Layouts read:
- kohya/A1111 (`lora_unet_<path with underscores>.lora_down.weight`, `.lora_up.weight`, `.alpha`,
  `lora_te_text_model_<path>...`), LoCon convolutions included, `lora_mid` (CP decomposition) folded into
  `down`; UNet names in diffusers' block naming or in the original (LDM/"compvis") one
  (`lora_unet_input_blocks_1_1_proj_in`).
- diffusers/PEFT (`unet.<path>.lora_A.weight` / `.lora_B.weight`, `text_encoder.<path>...`, the older
  `.lora.down.weight` / `.lora_linear_layer.down.weight` / attention-processor forms), scaled like diffusers
  does: by `lora_adapter_metadata` (PEFT's lora_alpha / r) or `.alpha` entries when present, else 1.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import safetensors
from safetensors import safe_open

UNET = "unet"
TEXT_ENCODER = "text_encoder"
COMPONENTS = (UNET, TEXT_ENCODER)

# transformers 4 saves CLIPTextModel's weights under this prefix, transformers 5 does not; no target has it.
TEXT_MODEL_PREFIX = "text_model."

Shape = tuple[int, ...]


class LoraError(ValueError):
    """A LoRA file that cannot be used with this model; the message names the file and what is wrong."""


class Target(NamedTuple):
    """One Linear/Conv2d weight a LoRA changes: the component ("unet" or "text_encoder") and the module's
    dotted path in it as diffusers/transformers name it, e.g. ("unet", "mid_block.resnets.0.conv1")."""

    component: str
    path: str


class LowRank(NamedTuple):
    """ΔW = (up @ down.reshape(R, -1)).reshape(out, in, *kernel), float32.

    down: [R, in, *kernel] (Linear: no kernel axes; Conv2d: the conv weight's (kh, kw)); up: [out, R] with
    every scale folded in. R may differ per target and may be 0 in a batch without LoRA."""

    down: np.ndarray
    up: np.ndarray


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One layer of one file: ΔW = scale × up @ down (before the request's multiplier)."""

    down: np.ndarray  # [R, in, *kernel] float32
    up: np.ndarray  # [out, R] float32
    scale: float  # alpha / rank (kohya, A1111), PEFT's lora_alpha / r, or 1


@dataclass(frozen=True, eq=False)
class LoraFile:
    """A LoRA file read and checked against one model's shapes."""

    path: Path
    name: str  # the file's stem: what `<lora:name:...>` refers to in A1111
    alias: str  # ss_output_name from the file's metadata, else the name (A1111's alias)
    hash: str  # A1111's hash: sshs_model_hash from the metadata, else the addnet hash (sha256 hex)
    metadata: dict[str, str] = field(repr=False)
    modules: dict[Target, LoraModule] = field(repr=False)

    @property
    def shorthash(self) -> str:
        """What A1111 writes to infotext's `Lora hashes: "name: shorthash"` (first 12 hex digits)."""
        return self.hash[:12]


# ---------------------------------------------------------------------------------------------- model shapes


def target_shapes(component: str, weight_shapes: Mapping[str, Iterable[int]]) -> dict[Target, Shape]:
    """The LoRA-able weights among a component's state-dict shapes: every Linear ([out, in]) and Conv2d
    ([out, in, kh, kw]) `.weight`, keyed by module path. The text encoder's embeddings are lookup tables,
    not Linear layers, and are left out."""
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {COMPONENTS}, got {component!r}")
    shapes: dict[Target, Shape] = {}
    for key, dims in weight_shapes.items():
        shape = tuple(int(d) for d in dims)
        if not key.endswith(".weight") or len(shape) not in (2, 4):
            continue
        path = key.removesuffix(".weight")
        if component == TEXT_ENCODER:
            path = path.removeprefix(TEXT_MODEL_PREFIX)
            if path.startswith("embeddings."):
                continue
        shapes[Target(component, path)] = shape
    return shapes


def shapes_from_checkpoint(checkpoint: str | Path) -> dict[Target, Shape]:
    """Target shapes of a diffusers checkpoint folder, from its safetensors headers (no weights loaded)."""
    folder = Path(checkpoint)
    shapes: dict[Target, Shape] = {}
    for component in COMPONENTS:
        files = sorted((folder / component).glob("*.safetensors"))
        if not files:
            raise FileNotFoundError(
                f"{folder / component}: no .safetensors weights to read LoRA targets from"
            )
        weight_shapes: dict[str, Shape] = {}
        for file in files:
            with safe_open(str(file), framework="np") as f:
                for key in f.keys():
                    weight_shapes[key] = tuple(f.get_slice(key).get_shape())
        shapes.update(target_shapes(component, weight_shapes))
    return shapes


# ------------------------------------------------------------------------------------------------ file bytes


def addnet_hash(data: bytes) -> str:
    """A1111's hash of a .safetensors LoRA (modules/hashes.py addnet_hash_safetensors, from kohya-ss
    sd-scripts): sha256 of the bytes after the header, i.e. after the 8-byte header length and the JSON header
    it counts, so that editing the metadata keeps the hash."""
    header_length = int.from_bytes(data[:8], "little")
    return hashlib.sha256(memoryview(data)[8 + header_length :]).hexdigest()


def _to_float32(dtype: str, shape: list[int], raw: bytes | bytearray) -> np.ndarray:
    if dtype == "BF16":
        # bfloat16 is the top half of a float32 (numpy has no bfloat16 type).
        bits = np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    numpy_types = {"F16": "<f2", "F32": "<f4", "F64": "<f8"}
    if dtype not in numpy_types:
        raise ValueError(f"dtype {dtype} (floating-point tensors expected)")
    return np.frombuffer(raw, dtype=numpy_types[dtype]).astype(np.float32).reshape(shape)


def _load(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], bytes]:
    """The file's tensors as float32, its metadata and its bytes."""
    if path.suffix.lower() != ".safetensors":
        raise LoraError(
            f"LoRA {path}: only .safetensors files are read (pickled .pt/.ckpt files can run code)"
        )
    try:
        data = path.read_bytes()
    except OSError as e:
        raise LoraError(f"LoRA {path}: cannot read the file: {e}") from e
    try:
        entries = safetensors.deserialize(data)
        header_length = int.from_bytes(data[:8], "little")
        metadata = json.loads(data[8 : 8 + header_length]).get("__metadata__") or {}
    except (safetensors.SafetensorError, ValueError) as e:
        raise LoraError(f"LoRA {path}: not a readable .safetensors file ({e})") from e
    tensors: dict[str, np.ndarray] = {}
    for key, entry in entries:
        try:
            tensor = _to_float32(entry["dtype"], entry["shape"], entry["data"])
        except ValueError as e:
            raise LoraError(f"LoRA {path}: tensor {key} has {e}") from e
        if not np.isfinite(tensor).all():
            raise LoraError(f"LoRA {path}: tensor {key} has non-finite values (inf or NaN)")
        tensors[key] = tensor
    return tensors, {str(k): str(v) for k, v in metadata.items()}, data


# ----------------------------------------------------------------------------------------------- key layouts

# Key parts of network types other than LoRA/LoCon (the module types A1111's networks.py and LyCORIS know).
# Their ΔW is not one low-rank product, so the engines' branch cannot apply them.
UNSUPPORTED_TYPES = {
    "hada_w1_a": "LoHa",
    "hada_w1_b": "LoHa",
    "hada_w2_a": "LoHa",
    "hada_w2_b": "LoHa",
    "hada_t1": "LoHa",
    "hada_t2": "LoHa",
    "lokr_w1": "LoKr",
    "lokr_w1_a": "LoKr",
    "lokr_w1_b": "LoKr",
    "lokr_w2": "LoKr",
    "lokr_w2_a": "LoKr",
    "lokr_w2_b": "LoKr",
    "lokr_t2": "LoKr",
    "on_input": "(IA)^3",
    "oft_blocks": "OFT",
    "oft_diag": "OFT",
    "oft_R": "BOFT",
    "a1": "GLoRA",
    "a2": "GLoRA",
    "b1": "GLoRA",
    "b2": "GLoRA",
    "diff": "a full weight difference (LyCORIS 'full')",
    "diff_b": "a full weight difference (LyCORIS 'full')",
    "w_norm": "a norm-layer network (LyCORIS 'norm')",
    "b_norm": "a norm-layer network (LyCORIS 'norm')",
    "dora_scale": "DoRA",
    "lora_magnitude_vector": "DoRA",
}
UNSUPPORTED_HINT = (
    "only LoRA and LoCon (low-rank lora_up/lora_down pairs) are served; merge it into the checkpoint, or "
    "extract a LoRA/LoCon from a merged model (e.g. kohya-ss sd-scripts networks/extract_lora_from_models.py)"
)

KOHYA_PARTS = {"lora_down.weight": "down", "lora_up.weight": "up", "lora_mid.weight": "mid", "alpha": "alpha"}

# diffusers/PEFT key endings: the module path is what comes before them.
PEFT_PARTS = {
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".lora.down.weight": "down",  # diffusers' LoRACompatibleLinear/Conv (0.2x)
    ".lora.up.weight": "up",
    ".lora_linear_layer.down.weight": "down",  # diffusers' text-encoder patching (0.2x)
    ".lora_linear_layer.up.weight": "up",
    ".alpha": "alpha",
}
# diffusers' attention-processor LoRAs (≤ 0.20): "<attention>.processor.to_q_lora.down.weight".
PROCESSOR_KEY = re.compile(
    r"(?P<attention>.+)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<part>down|up)\.weight"
)


def _unsupported(path: Path, key: str) -> None:
    """Raise if the key belongs to a network type we cannot serve."""
    if key.startswith("bundle_emb."):
        raise LoraError(
            f"LoRA {path}: bundled textual-inversion embeddings ({key}) are not supported; save them as an "
            "embedding file instead"
        )
    for token in key.split("."):
        if token in UNSUPPORTED_TYPES:
            raise LoraError(
                f"LoRA {path}: {UNSUPPORTED_TYPES[token]} is not supported (key {key}): {UNSUPPORTED_HINT}"
            )


def _ldm_path(path: str, layers_per_block: int, up_blocks_with_attention: set[int]) -> str | None:
    """The original (LDM) UNet's name of a diffusers UNet module, as A1111's own model names it
    (`down_blocks.0.attentions.1.proj_in` → `input_blocks.2.1.proj_in`); None when it has none."""
    parts = path.split(".")
    resnet_parts = {"conv1": "in_layers.2", "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1"}
    resnet_parts["conv_shortcut"] = "skip_connection"
    single = {
        "conv_in": "input_blocks.0.0",
        "conv_out": "out.2",
        "time_embedding.linear_1": "time_embed.0",
        "time_embedding.linear_2": "time_embed.2",
    }
    if path in single:
        return single[path]
    if parts[0] == "mid_block" and len(parts) >= 4:
        block = {("resnets", "0"): "0", ("attentions", "0"): "1", ("resnets", "1"): "2"}.get(
            (parts[1], parts[2])
        )
        if block is None:
            return None
        prefix, kind, rest = f"middle_block.{block}", parts[1], parts[3:]
    elif parts[0] in ("down_blocks", "up_blocks") and len(parts) >= 5:
        b, kind, i, rest = int(parts[1]), parts[2], int(parts[3]), parts[4:]
        per_block = layers_per_block + 1  # down: resnets + downsampler; up: one resnet more
        if parts[0] == "down_blocks":
            if kind == "downsamplers":
                return f"input_blocks.{(b + 1) * per_block}.0.op" if rest == ["conv"] else None
            prefix = f"input_blocks.{1 + b * per_block + i}.{0 if kind == 'resnets' else 1}"
        else:
            if kind == "upsamplers":
                inner = 2 if b in up_blocks_with_attention else 1
                return (
                    f"output_blocks.{b * per_block + layers_per_block}.{inner}.conv"
                    if rest == ["conv"]
                    else None
                )
            prefix = f"output_blocks.{b * per_block + i}.{0 if kind == 'resnets' else 1}"
    else:
        return None
    if kind == "resnets":
        name = resnet_parts.get(".".join(rest))
        return None if name is None else f"{prefix}.{name}"
    return f"{prefix}.{'.'.join(rest)}"


def kohya_names(shapes: Mapping[Target, Shape]) -> dict[str, Target]:
    """kohya/A1111 module names of the model's targets. kohya writes the diffusers path with `.` → `_`, which
    cannot be split back (`to_q`, `conv_shortcut`), so names are matched against the model's own modules;
    the UNet's LDM ("compvis") names are included."""
    unet_paths = [t.path for t in shapes if t.component == UNET]
    resnets = [int(p.split(".")[3]) for p in unet_paths if p.startswith("down_blocks.0.resnets.")]
    layers_per_block = max(resnets, default=0) + 1
    up_attention = {int(p.split(".")[1]) for p in unet_paths if re.match(r"up_blocks\.\d+\.attentions\.", p)}
    names: dict[str, Target] = {}
    for target in shapes:
        if target.component == UNET:
            candidates = [target.path]
            ldm = _ldm_path(target.path, layers_per_block, up_attention)
            if ldm is not None:
                candidates.append(ldm)
            keys = ["lora_unet_" + c.replace(".", "_") for c in candidates]
        else:
            keys = ["lora_te_" + (TEXT_MODEL_PREFIX + target.path).replace(".", "_")]
        for key in keys:
            if names.setdefault(key, target) != target:
                raise ValueError(f"two layers share the kohya name {key}: {names[key]} and {target}")
    return names


def _group_kohya(
    path: Path, tensors: Mapping[str, np.ndarray], names: Mapping[str, Target]
) -> dict[Target, dict[str, Any]]:
    groups: dict[Target, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        module, _, part = key.partition(".")
        if module.startswith(("lora_te1_", "lora_te2_")):
            raise LoraError(f"LoRA {path}: {key} is an SDXL text-encoder key; this model is SD 1.x")
        if part not in KOHYA_PARTS:
            raise LoraError(
                f"LoRA {path}: unknown key {key} (expected {', '.join(KOHYA_PARTS)} after the layer name)"
            )
        target = names.get(module)
        if target is None:
            component = "UNet" if module.startswith("lora_unet_") else "text encoder"
            raise LoraError(f"LoRA {path}: {key}: this SD 1.x model's {component} has no layer {module}")
        group = groups.setdefault(target, {"key": module})
        if group["key"] != module:
            raise LoraError(f"LoRA {path}: {group['key']} and {module} both name layer {target.path}")
        group[KOHYA_PARTS[part]] = tensor
    return groups


def _peft_config(path: Path, metadata: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Per component, the PEFT LoraConfig that diffusers' save_lora_weights stores in the metadata."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        packed = json.loads(raw)
    except ValueError as e:
        raise LoraError(f"LoRA {path}: metadata lora_adapter_metadata is not JSON ({e})") from e
    configs: dict[str, dict[str, Any]] = {}
    for key, value in packed.items():
        component, _, name = str(key).partition(".")
        configs.setdefault(component, {})[name] = value
    return configs


def _peft_scale(path: Path, target: Target, config: Mapping[str, Any], rank: int) -> float:
    """PEFT's scaling of one layer: lora_alpha (or its alpha_pattern entry) / r, or / sqrt(r) with rsLoRA."""
    if config.get("use_dora"):
        raise LoraError(f"LoRA {path}: DoRA is not supported (lora_adapter_metadata): {UNSUPPORTED_HINT}")
    alpha = config.get("lora_alpha")
    # alpha_pattern keys are regular expressions matching the end of a module path, at a dot (PEFT).
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        try:
            if re.fullmatch(rf"(.*\.)?(?:{pattern})", target.path):
                alpha = value
                break
        except re.error as e:
            raise LoraError(f"LoRA {path}: lora_adapter_metadata alpha_pattern {pattern!r}: {e}") from e
    if not isinstance(alpha, (int, float)):
        raise LoraError(
            f"LoRA {path}: lora_adapter_metadata has no numeric lora_alpha for {target.component}"
        )
    return float(alpha) / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _group_peft(
    path: Path, tensors: Mapping[str, np.ndarray], shapes: Mapping[Target, Shape]
) -> dict[Target, dict[str, Any]]:
    groups: dict[Target, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        if component == "text_encoder_2":
            raise LoraError(f"LoRA {path}: {key} is an SDXL text-encoder key; this model is SD 1.x")
        processor = PROCESSOR_KEY.fullmatch(rest)
        if processor:
            proj = processor["proj"] if processor["proj"] != "to_out" else "to_out.0"
            module, part = f"{processor['attention']}.{proj}", processor["part"]
        else:
            ending = next((e for e in PEFT_PARTS if rest.endswith(e)), None)
            if ending is None:
                raise LoraError(f"LoRA {path}: unknown key {key} (expected lora_A/lora_B weights)")
            module, part = rest.removesuffix(ending), PEFT_PARTS[ending]
        if component == TEXT_ENCODER:
            module = module.removeprefix(TEXT_MODEL_PREFIX)
        target = Target(component, module)
        if target not in shapes:
            raise LoraError(f"LoRA {path}: {key}: this SD 1.x model's {component} has no layer {module}")
        group = groups.setdefault(target, {"key": f"{component}.{module}"})
        if part in group:
            raise LoraError(f"LoRA {path}: {key}: a second {part} weight for layer {component}.{module}")
        group[part] = tensor
    return groups


# ---------------------------------------------------------------------------------------------------- reading


def _low_rank(
    path: Path, target: Target, group: Mapping[str, Any], base: Shape
) -> tuple[np.ndarray, np.ndarray]:
    """(down [R, in, *kernel], up [out, R]) of one layer, checked against the base weight's shape."""
    where = f"LoRA {path}: layer {group['key']}"
    if "down" not in group or "up" not in group:
        raise LoraError(f"{where}: needs both a down (lora_down/lora_A) and an up (lora_up/lora_B) weight")
    down, up, mid = group["down"], group["up"], group.get("mid")
    out_features, in_features, kernel = base[0], base[1], base[2:]
    if up.ndim == 4 and up.shape[2:] == (1, 1):
        up = up[:, :, 0, 0]
    if mid is not None:
        # CP decomposition (LyCORIS "use_tucker" LoCon): 1×1 down, mid [R, R, kh, kw], 1×1 up;
        # ΔW[o, i] = Σ up[o, n] mid[n, m] down[m, i], so mid ∘ down is the branch's down.
        if down.ndim != 4 or down.shape[2:] != (1, 1) or mid.ndim != 4 or mid.shape[0] != mid.shape[1]:
            raise LoraError(
                f"{where}: lora_mid {list(mid.shape)}, lora_down {list(down.shape)}: not a CP decomposition"
            )
        if mid.shape[1] != down.shape[0]:
            raise LoraError(f"{where}: lora_mid {list(mid.shape)} does not fit lora_down {list(down.shape)}")
        down = np.einsum("nmkl,mi->nikl", mid, down[:, :, 0, 0])
    rank = down.shape[0] if down.ndim else 0
    expected_down = (rank, in_features, *kernel)
    if down.shape != expected_down or up.shape != (out_features, rank) or rank == 0:
        hint = ""
        if down.ndim >= 2 and up.ndim >= 1 and (down.shape[1] != in_features or up.shape[0] != out_features):
            hint = " (a LoRA for another model, e.g. SD 2.x or SDXL?)"
        expected = f"down [R, {', '.join(map(str, base[1:]))}] and up [{out_features}, R]"
        raise LoraError(
            f"{where}: down {list(down.shape)} and up {list(group['up'].shape)} do not fit the model's "
            f"weight {target.component}:{target.path} {list(base)} (expected {expected}){hint}"
        )
    return np.ascontiguousarray(down, np.float32), np.ascontiguousarray(up, np.float32)


def _component_of(key: str) -> str | None:
    """The component a key of either layout belongs to (None: neither's, refused later)."""
    if key.startswith("lora_unet_"):
        return UNET
    if key.startswith("lora_te_"):
        return TEXT_ENCODER
    head = key.partition(".")[0]
    return head if head in COMPONENTS else None


def _alpha(path: Path, group: Mapping[str, Any]) -> float | None:
    alpha = group.get("alpha")
    if alpha is None:
        return None
    if alpha.size != 1:
        raise LoraError(
            f"LoRA {path}: {group['key']}.alpha must be one number, got shape {list(alpha.shape)}"
        )
    return float(alpha.reshape(()))


def read_lora(
    path: str | Path, shapes: Mapping[Target, Shape], components: Iterable[str] = COMPONENTS
) -> LoraFile:
    """Read a .safetensors LoRA for the model whose Linear/Conv2d weight shapes are `shapes` (see
    `target_shapes`, `shapes_from_checkpoint`). Raises LoraError naming the file and what is wrong.
    Only the layers of `components` are read and checked (an engine process reads its own component's;
    the pipeline has checked the whole file)."""
    path = Path(path)
    tensors, metadata, data = _load(path)
    if not tensors:
        raise LoraError(f"LoRA {path}: the file holds no tensors")
    skipped = set(COMPONENTS) - set(components)
    tensors = {k: v for k, v in tensors.items() if _component_of(k) not in skipped}
    for key in tensors:
        _unsupported(path, key)

    kohya = {k: v for k, v in tensors.items() if k.startswith("lora_")}
    peft = {k: v for k, v in tensors.items() if not k.startswith("lora_")}
    for key in peft:
        if key.partition(".")[0] not in (*COMPONENTS, "text_encoder_2"):
            raise LoraError(
                f"LoRA {path}: unknown key {key}: not an SD 1.x LoRA in kohya/A1111 (lora_unet_*, lora_te_*) "
                "or diffusers (unet.*, text_encoder.*) layout"
            )
    groups = _group_kohya(path, kohya, kohya_names(shapes)) if kohya else {}
    peft_groups = _group_peft(path, peft, shapes) if peft else {}
    both = sorted(groups.keys() & peft_groups.keys())
    if both:
        raise LoraError(f"LoRA {path}: layer {both[0].component}:{both[0].path} appears in both key layouts")
    peft_configs = _peft_config(path, metadata)

    modules: dict[Target, LoraModule] = {}
    for target, group in groups.items():
        down, up = _low_rank(path, target, group, shapes[target])
        alpha = _alpha(path, group)
        # kohya and A1111: no alpha means alpha = rank (scale 1).
        modules[target] = LoraModule(down, up, 1.0 if alpha is None else alpha / down.shape[0])
    for target, group in peft_groups.items():
        down, up = _low_rank(path, target, group, shapes[target])
        alpha = _alpha(path, group)
        config = peft_configs.get(target.component)
        if config is not None:
            scale = _peft_scale(path, target, config, down.shape[0])
        else:
            # diffusers: alphas when the file has them, else PEFT's plain B @ A.
            scale = 1.0 if alpha is None else alpha / down.shape[0]
        modules[target] = LoraModule(down, up, scale)

    for target, module in modules.items():
        if not math.isfinite(module.scale):
            raise LoraError(f"LoRA {path}: layer {target.component}:{target.path} has a non-finite alpha")
    return LoraFile(
        path=path,
        name=path.stem,
        alias=metadata.get("ss_output_name") or path.stem,
        hash=metadata.get("sshs_model_hash") or addnet_hash(data),
        metadata=metadata,
        modules=modules,
    )


# -------------------------------------------------------------------------------------------------- compiling


def compile_set(entries: Iterable[tuple[LoraFile, float, float]]) -> dict[Target, LowRank]:
    """One LowRank per target for a request's LoRA set: entries are (file, te_multiplier, unet_multiplier), as
    A1111's `<lora:name:te:unet>`. Each file's rows are scaled by multiplier × its scale and the files are
    concatenated along R, in entry order. A zero multiplier leaves that file's component out."""
    downs: dict[Target, list[np.ndarray]] = {}
    ups: dict[Target, list[np.ndarray]] = {}
    for lora, te_multiplier, unet_multiplier in entries:
        multipliers = {TEXT_ENCODER: float(te_multiplier), UNET: float(unet_multiplier)}
        for component, multiplier in multipliers.items():
            if not math.isfinite(multiplier):
                raise LoraError(
                    f"LoRA {lora.path}: the {component} multiplier must be finite, got {multiplier}"
                )
        for target, module in lora.modules.items():
            multiplier = multipliers[target.component]
            if multiplier == 0.0:
                continue
            downs.setdefault(target, []).append(module.down)
            ups.setdefault(target, []).append(module.up * np.float32(multiplier * module.scale))
    return {
        target: LowRank(np.concatenate(downs[target], axis=0), np.concatenate(ups[target], axis=1))
        for target in downs
    }


def delta_weights(compiled: Mapping[Target, LowRank]) -> dict[Target, np.ndarray]:
    """ΔW per target in the base weight's layout ([out, in] Linear, [out, in, kh, kw] Conv2d), float32."""
    deltas: dict[Target, np.ndarray] = {}
    for target, (down, up) in compiled.items():
        rank = down.shape[0]
        deltas[target] = (up @ down.reshape(rank, -1)).reshape(up.shape[0], *down.shape[1:])
    return deltas
