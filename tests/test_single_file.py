"""Single-file checkpoints (A1111's layout): the tiny checkpoint written as one file reads back, through
diffusers' own single-file loading, to the folder's exact weights; the key mapping is diffusers' converters'
inverse at v1's full size too; files that are not SD v1.x checkpoints are refused naming the file."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from build_engines import cli as build_cli
from build_engines import repository
from build_engines.single_file import (
    ARCHITECTURE_KEY,
    TEXT_PREFIX,
    UNET_PREFIX,
    SingleFileError,
    architecture,
    convert_to_diffusers,
    read_state_dict,
    to_original_layout,
)
from build_engines.tiny_checkpoint import (
    component_configs,
    write_single_file_checkpoint,
    write_tiny_checkpoint,
)
from client.api import GenerationResult as ClientResult
from python_backend.engines import OnnxRuntimeEngines
from python_backend.pipeline import PipelineAssets, generate
from python_backend.request import GenerationRequest
from tests.conftest import PROFILE_ARGS
from tests.parity import TOLERANCE, diffusers_images, max_pixel_diff
from tests.triton_server import PROJECT_ROOT

WEIGHTS = {
    "unet": "diffusion_pytorch_model.safetensors",
    "vae": "diffusion_pytorch_model.safetensors",
    "text_encoder": "model.safetensors",
}


def _same_weights(a: Path, b: Path) -> None:
    for component, file in WEIGHTS.items():
        left, right = load_file(str(a / component / file)), load_file(str(b / component / file))
        assert set(left) == set(right), component
        unequal = [k for k in left if not torch.equal(left[k], right[k])]
        assert not unequal, (component, unequal[:5])


@pytest.fixture(scope="module")
def single_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_single_file_checkpoint(tmp_path_factory.mktemp("single") / "tiny-sd.safetensors", seed=0)


def test_single_file_reads_back_to_the_folders_weights(single_file, tiny_checkpoint, tmp_path):
    state, metadata = read_state_dict(single_file)
    assert any(k.startswith(UNET_PREFIX + "input_blocks.") for k in state)  # A1111's layout
    assert any(k.startswith(TEXT_PREFIX + "text_model.") for k in state)
    assert json.loads(metadata[ARCHITECTURE_KEY])["unet"]["block_out_channels"] == [32, 32, 64, 64]
    converted = convert_to_diffusers(single_file, tmp_path / "converted")
    _same_weights(converted, tiny_checkpoint)


def test_inpainting_single_file_is_detected_from_its_tensors(tiny_inpainting_checkpoint, tmp_path):
    path = write_single_file_checkpoint(tmp_path / "inpaint.safetensors", seed=0, inpainting=True)
    state, metadata = read_state_dict(path)
    assert state[UNET_PREFIX + "input_blocks.0.0.weight"].shape[1] == 9
    converted = convert_to_diffusers(path, tmp_path / "converted")
    assert json.loads((converted / "model_index.json").read_text())["_class_name"] == (
        "StableDiffusionInpaintPipeline"
    )
    _same_weights(converted, tiny_inpainting_checkpoint)


def test_pickled_ckpt_is_read_without_running_code(single_file, tiny_checkpoint, tmp_path):
    ckpt = tmp_path / "tiny-sd.ckpt"
    state, metadata = read_state_dict(single_file)
    torch.save({"state_dict": state}, ckpt)  # as A1111-era .ckpt files nest it
    assert read_state_dict(ckpt)[0].keys() == state.keys()
    # A .ckpt carries no metadata, so it is taken for v1's architecture, which the tiny tensors do not fit:
    # refused naming the file and the sizes (a real v1.x .ckpt fits).
    with pytest.raises(
        SingleFileError, match=r"tiny-sd\.ckpt: the tensors do not fit SD v1\.x's architecture"
    ):
        convert_to_diffusers(ckpt, tmp_path / "out")


class _Payload:
    def __reduce__(self):  # what a malicious pickle does: call something on load
        return (print, ("this pickle ran code",))


def test_a_pickle_that_needs_code_is_refused_naming_the_file(tmp_path):
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "extra": _Payload()}, path)
    with pytest.raises(SingleFileError, match=r"evil\.ckpt: this pickle needs more than tensors"):
        read_state_dict(path)


def test_malformed_and_foreign_files_are_refused_naming_them(tmp_path, single_file):
    broken = tmp_path / "broken.safetensors"
    broken.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all")
    with pytest.raises(SingleFileError, match=r"broken\.safetensors: not a readable safetensors file"):
        read_state_dict(broken)
    sd2 = tmp_path / "sd2.safetensors"
    save_file(
        {
            "cond_stage_model.model.positional_embedding": torch.zeros(77, 1024),
            UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(320, 4, 3, 3),
        },
        str(sd2),
    )
    with pytest.raises(SingleFileError, match=r"sd2\.safetensors: not an SD v1\.x checkpoint"):
        architecture(sd2, *read_state_dict(sd2))
    vae_only = tmp_path / "vae.safetensors"
    save_file({"encoder.conv_in.weight": torch.zeros(1)}, str(vae_only))
    with pytest.raises(SingleFileError, match=r"vae\.safetensors: not an SD v1\.x checkpoint"):
        architecture(vae_only, *read_state_dict(vae_only))


@pytest.mark.parametrize("in_channels", [4, 9])
def test_a_file_without_metadata_is_v1_with_its_own_input_channels(tmp_path, in_channels):
    state = {
        UNET_PREFIX + "input_blocks.0.0.weight": torch.zeros(320, in_channels, 3, 3),
        TEXT_PREFIX + "text_model.embeddings.position_embedding.weight": torch.zeros(77, 768),
    }
    configs = architecture(tmp_path / "v1.safetensors", state, {})
    expected = component_configs(full_size=True, inpainting=in_channels == 9)
    assert configs == expected


def test_key_mapping_is_the_inverse_of_diffusers_converters_at_full_size():
    # On the meta device: v1's full architecture without its gigabytes.
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint, convert_ldm_vae_checkpoint

    configs = component_configs(full_size=True)
    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**configs["unet"]), AutoencoderKL(**configs["vae"])
    original = to_original_layout(unet.state_dict(), vae.state_dict(), {}, configs)
    for model, back in (
        (unet, convert_ldm_unet_checkpoint(original, unet.config)),
        (vae, convert_ldm_vae_checkpoint(original, vae.config)),
    ):
        state = model.state_dict()
        assert set(back) == set(state)
        assert all(back[k].shape == state[k].shape for k in state)


# --- build-engines from a single file, and with another VAE ---------------------------------------------

BLOCK_NETWORK = """
import socket
from pathlib import Path

def _blocked(*args, **kwargs):
    Path({tried!r}).write_text(repr(args))
    raise OSError("network access during an offline build")

socket.socket.connect = _blocked
socket.create_connection = _blocked
socket.getaddrinfo = _blocked
"""


def run_offline(
    tmp_path: Path, code: str, *args: str, who: str = "the build"
) -> subprocess.CompletedProcess[str]:
    """`python -c code args` in a process whose sockets refuse to connect; the test fails if it tried."""
    site = tmp_path / "site"
    site.mkdir(exist_ok=True)
    tried = tmp_path / "network-tried"
    (site / "sitecustomize.py").write_text(BLOCK_NETWORK.format(tried=str(tried)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(PROJECT_ROOT)])}
    env.pop("HF_HUB_OFFLINE", None)  # no help from the hub client's own offline switch
    done = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600
    )
    assert not tried.exists(), f"{who} tried the network: {tried.read_text()}"
    return done


def _build_offline(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """build-engines with the network blocked."""
    code = "import sys; from build_engines.cli import main; sys.exit(main(sys.argv[1:]))"
    return run_offline(tmp_path, code, *args, *PROFILE_ARGS)


def _images(repository: Path, **request: Any) -> tuple[np.ndarray, dict[str, Any]]:
    assets = PipelineAssets.load(repository / "pipeline" / "1")
    engines = OnnxRuntimeEngines(repository, assets.manifest.geometry)
    defaults = {"prompt": "a cat", "width": 64, "height": 64, "num_inference_steps": 4, "seed": 3}
    result = generate(GenerationRequest(**(defaults | request)), engines, assets)
    return result.images, result.info


def test_build_from_a_single_file_offline_matches_the_folder_build(single_file, model_repository, tmp_path):
    repo = tmp_path / "repo"
    done = _build_offline(tmp_path, "--checkpoint", str(single_file), "--output", str(repo))
    assert done.returncode == 0, done.stderr[-3000:]
    images, info = _images(repo, scheduler="Euler a", guidance_scale=6.0)
    expected, expected_info = _images(model_repository, scheduler="Euler a", guidance_scale=6.0)
    np.testing.assert_array_equal(images, expected)
    # A1111's names for a single file: its stem, and the sha256 of the file.
    assert info["model"] == "tiny-sd" and expected_info["model"] == "tiny-sd"
    assert info["model_hash"] == hashlib.sha256(single_file.read_bytes()).hexdigest()[:10]


def _a1111_vae_file(checkpoint: Path, out: Path) -> Path:
    """The checkpoint's VAE as an A1111 VAE file: the original layout, no prefix."""
    configs = component_configs()
    vae = load_file(str(checkpoint / "vae" / WEIGHTS["vae"]))
    state = to_original_layout({}, vae, {}, configs)
    save_file({k.removeprefix("first_stage_model."): v.contiguous() for k, v in state.items()}, str(out))
    return out


def test_vae_override_matches_diffusers_with_that_vae(tiny_checkpoint, tmp_path):
    other = write_tiny_checkpoint(tmp_path / "other", seed=1)  # its VAE differs from the checkpoint's
    vae_file = _a1111_vae_file(other, tmp_path / "other-vae.safetensors")
    repo = tmp_path / "repo"
    done = _build_offline(
        tmp_path, "--checkpoint", str(tiny_checkpoint), "--vae", str(vae_file), "--output", str(repo)
    )
    assert done.returncode == 0, done.stderr[-3000:]
    images, info = _images(repo, scheduler="Euler a")
    swapped = tmp_path / "swapped"  # diffusers' side: the checkpoint with the other folder's VAE
    shutil.copytree(tiny_checkpoint, swapped)
    shutil.rmtree(swapped / "vae")
    shutil.copytree(other / "vae", swapped / "vae")
    euler_a = "EulerAncestralDiscreteScheduler"
    expected = diffusers_images(
        swapped, "a cat", steps=4, guidance_scale=7.5, seed=3, scheduler=euler_a, width=64, height=64
    )
    assert max_pixel_diff(images, expected) <= TOLERANCE
    own, _ = _images(tiny_checkpoint_repository(tmp_path, tiny_checkpoint), scheduler="Euler a")
    assert max_pixel_diff(images, own) > TOLERANCE  # the VAE made a difference
    assert info["vae"] == "other-vae.safetensors"
    # What sd-gateway's /sdapi/v1/sd-vae lists: the pipeline's config names the VAE.
    config = repository.read_config(repo / "pipeline")
    assert json.loads(config.parameters["checkpoint"].string_value)["vae"] == "other-vae.safetensors"
    assert info["vae_hash"] == hashlib.sha256(vae_file.read_bytes()).hexdigest()[:10]
    [infotext] = ClientResult([Image.fromarray(images[0])], info).infotexts()
    assert f"VAE hash: {info['vae_hash']}, VAE: other-vae.safetensors" in infotext


def tiny_checkpoint_repository(tmp_path: Path, checkpoint: Path) -> Path:
    repo = tmp_path / "own"
    assert build_cli.main(["--checkpoint", str(checkpoint), "--output", str(repo), *PROFILE_ARGS]) == 0
    return repo


@pytest.mark.parametrize("kind", ["not a vae", "wrong latent channels", "missing"])
def test_a_bad_vae_is_refused_naming_the_file(tiny_checkpoint, tmp_path, kind, capsys):
    vae = tmp_path / "bad-vae.safetensors"
    if kind == "not a vae":
        save_file({"something.else": torch.zeros(2)}, str(vae))
    elif kind == "wrong latent channels":
        state = {
            "encoder.conv_in.weight": torch.zeros(32, 3, 3, 3),
            "quant_conv.weight": torch.zeros(16, 16, 1, 1),
        }
        save_file(state, str(vae))
    repo = tmp_path / "repo"
    code = build_cli.main(["--checkpoint", str(tiny_checkpoint), "--vae", str(vae), "--output", str(repo)])
    assert code == 1
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(f"build-engines: {vae}: ")


def test_a_diffusers_vae_folder_gives_the_same_as_its_a1111_file(tiny_checkpoint, tmp_path):
    other = write_tiny_checkpoint(tmp_path / "other", seed=1)
    vae_file = _a1111_vae_file(other, tmp_path / "other-vae.safetensors")
    built = {}
    for kind, vae in (("file", vae_file), ("folder", other / "vae")):
        repo = tmp_path / f"repo-{kind}"
        args = ["--checkpoint", str(tiny_checkpoint), "--vae", str(vae), "--output", str(repo)]
        assert build_cli.main([*args, *PROFILE_ARGS]) == 0
        built[kind] = _images(repo, scheduler="Euler a")
    np.testing.assert_array_equal(built["file"][0], built["folder"][0])
    assert built["folder"][1]["vae"] == "vae" and len(built["folder"][1]["vae_hash"]) == 10


def test_a_bad_checkpoint_file_is_refused_in_one_line_naming_it(tmp_path, capsys):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json")
    repo = tmp_path / "repo"
    assert build_cli.main(["--checkpoint", str(path), "--output", str(repo)]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert (
        line
        == f"build-engines: {path}: not a readable safetensors file" + line.split("safetensors file", 1)[1]
    )
    assert not repo.exists()
