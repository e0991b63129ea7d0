"""`sd-tiny-checkpoint`: deterministic random-weight SD v1.x checkpoints that diffusers loads and runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from build_engines import clip_vocab, tiny_checkpoint
from build_engines.tiny_checkpoint import component_configs, main, write_tiny_checkpoint

CAT_IDS = [49406, 320, 1125, 539, 320, 2368, 49407]


def _make(tmp_path_factory: pytest.TempPathFactory, name: str, **kwargs) -> Path:
    if clip_vocab.find_clip_bpe_file() is None:
        pytest.skip("open-clip-torch is not installed: pip install --no-deps open-clip-torch")
    return write_tiny_checkpoint(tmp_path_factory.mktemp(name), **kwargs)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _make(tmp_path_factory, "tiny")


@pytest.fixture(scope="module")
def pipe(checkpoint: Path):
    from diffusers import StableDiffusionPipeline

    pipeline = StableDiffusionPipeline.from_pretrained(checkpoint)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_gives_identical_files_and_another_seed_other_weights(
    checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    reference = _files(checkpoint)
    assert _files(_make(tmp_path_factory, "tiny_again")) == reference

    other = _files(_make(tmp_path_factory, "tiny_seed1", seed=1))
    assert other.keys() == reference.keys()
    weights = [name for name in reference if name.endswith(".safetensors")]
    assert sorted(weights) == [
        "text_encoder/model.safetensors",
        "unet/diffusion_pytorch_model.safetensors",
        "vae/diffusion_pytorch_model.safetensors",
    ]
    assert all(other[name] != reference[name] for name in weights)
    assert all(other[name] == reference[name] for name in reference if name not in weights)


def test_tokenizer_is_clips(checkpoint: Path) -> None:
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(checkpoint / "tokenizer")
    assert len(tokenizer) == 49408
    assert tokenizer.model_max_length == 77
    assert tokenizer("a photo of a cat").input_ids == CAT_IDS
    padded = tokenizer("a photo of a cat", padding="max_length", max_length=tokenizer.model_max_length)
    assert padded.input_ids == CAT_IDS + [49407] * (77 - len(CAT_IDS))

    # vocab.json and merges.txt on their own (what transformers 4's CLIPTokenizer reads) agree.
    tokenizer_dir = checkpoint / "tokenizer"
    from_files = CLIPTokenizer(str(tokenizer_dir / "vocab.json"), str(tokenizer_dir / "merges.txt"))
    assert from_files("a photo of a cat").input_ids == CAT_IDS
    vocab = json.loads((tokenizer_dir / "vocab.json").read_text(encoding="utf-8"))
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407 and len(vocab) == 49408
    assert (vocab["!"], vocab["a</w>"], vocab["Ā"], vocab["in"]) == (0, 320, 188, 512)


def test_scheduler_config_is_v1_4s(checkpoint: Path) -> None:
    config = json.loads((checkpoint / "scheduler" / "scheduler_config.json").read_text())
    assert config["_class_name"] == "PNDMScheduler"
    expected = {
        "beta_schedule": "scaled_linear",
        "beta_start": 0.00085,
        "beta_end": 0.012,
        "num_train_timesteps": 1000,
        "steps_offset": 1,
        "skip_prk_steps": True,
        "set_alpha_to_one": False,
        "clip_sample": False,
        "trained_betas": None,
    }
    assert {key: config[key] for key in expected} == expected


def test_model_index_matches_what_diffusers_writes(checkpoint: Path, pipe, tmp_path: Path) -> None:
    pipe.save_config(tmp_path)
    written_by_diffusers = json.loads((tmp_path / "model_index.json").read_text())
    written_by_diffusers.pop("_name_or_path")
    assert json.loads((checkpoint / "model_index.json").read_text()) == written_by_diffusers


def test_structure_like_v1_4(pipe) -> None:
    assert pipe.safety_checker is None
    assert pipe.vae_scale_factor == 8
    assert len(pipe.vae.encoder.down_blocks) == 4
    assert sum(block.downsamplers is not None for block in pipe.unet.down_blocks) == 3
    assert pipe.unet.config.in_channels == 4
    assert pipe.unet.config.sample_size * pipe.vae_scale_factor == 64  # the pipeline's default size


@pytest.mark.parametrize(("width", "height"), [(64, 64), (96, 64)])
def test_pipeline_generates(pipe, width: int, height: int) -> None:
    # 96 px -> 12 latents -> 6, 3, 2: the UNet takes forward_upsample_size, as v1-4 does off multiples of 64.
    result = pipe(
        "a photo of a cat",
        width=width,
        height=height,
        num_inference_steps=3,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    image = result.images
    assert image.shape == (1, height, width, 3)
    assert np.isfinite(image).all()


def test_inpainting_checkpoint_generates(tmp_path_factory: pytest.TempPathFactory) -> None:
    from diffusers import StableDiffusionInpaintPipeline
    from PIL import Image

    out = _make(tmp_path_factory, "tiny_inpaint", inpainting=True)
    index = json.loads((out / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionInpaintPipeline"
    pipe = StableDiffusionInpaintPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.in_channels == 9

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
    mask = np.zeros((64, 64), dtype=np.uint8)
    mask[16:48, 16:48] = 255
    result = pipe(
        "a photo of a cat",
        image=image,
        mask_image=Image.fromarray(mask),
        width=64,
        height=64,
        num_inference_steps=3,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    )
    assert result.images.shape == (1, 64, 64, 3)
    assert np.isfinite(result.images).all()


def test_missing_open_clip_exits_with_install_hint(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tiny_checkpoint, "find_clip_bpe_file", lambda: None)
    out = tmp_path / "ckpt"
    with pytest.raises(SystemExit) as exit_info:
        main([str(out)])
    message = exit_info.value.code
    assert isinstance(message, str)  # sys.exit(str): printed on stderr with exit status 1, no traceback
    assert "pip install --no-deps open-clip-torch" in message
    assert not out.exists()


def test_finder_reports_missing_open_clip(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(clip_vocab.importlib.util, "find_spec", lambda name: None)
    assert clip_vocab.find_clip_bpe_file() is None


def test_bytes_to_unicode_is_a_printable_bijection() -> None:
    table = clip_vocab.bytes_to_unicode()
    assert sorted(table) == list(range(256))
    assert list(table)[:3] == [ord("!"), ord('"'), ord("#")]  # CLIP's order: ids 0, 1, 2
    assert len(set(table.values())) == 256
    assert all(c.isprintable() and not c.isspace() for c in table.values())
    assert table[ord("a")] == "a" and table[ord(" ")] == "Ġ"


def test_full_size_configs_are_v1_4s() -> None:
    configs = component_configs(full_size=True)
    unet, vae, text = configs["unet"], configs["vae"], configs["text_encoder"]
    assert unet["block_out_channels"] == (320, 640, 1280, 1280)
    assert (unet["layers_per_block"], unet["attention_head_dim"], unet["cross_attention_dim"]) == (2, 8, 768)
    assert (unet["sample_size"], unet["in_channels"], unet["out_channels"]) == (64, 4, 4)
    assert component_configs(full_size=True, inpainting=True)["unet"]["in_channels"] == 9
    assert vae["block_out_channels"] == (128, 256, 512, 512)
    assert (vae["layers_per_block"], vae["sample_size"], vae["latent_channels"]) == (2, 512, 4)
    assert vae["scaling_factor"] == 0.18215
    assert (text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"]) == (768, 12, 12)
    assert (text["intermediate_size"], text["projection_dim"], text["hidden_act"]) == (
        3072,
        768,
        "quick_gelu",
    )
    assert (text["vocab_size"], text["max_position_embeddings"]) == (49408, 77)


def test_full_size_configs_build_v1_4s_parameter_counts() -> None:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    configs = component_configs(full_size=True)
    with torch.device("meta"):  # shapes only: no GBs of weights
        models = {
            "unet": UNet2DConditionModel(**configs["unet"]),
            "vae": AutoencoderKL(**configs["vae"]),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**configs["text_encoder"])),
        }
    counts = {name: sum(p.numel() for p in model.parameters()) for name, model in models.items()}
    # CompVis/stable-diffusion-v1-4's parameter counts.
    assert counts == {"unet": 859_520_964, "vae": 83_653_863, "text_encoder": 123_060_480}
