"""Textual-inversion embeddings (build-engines --embeddings): A1111's file formats, parity with diffusers'
`load_textual_inversion`, A1111's matching and chunking rules, info and infotext, refusals at build time."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from PIL import Image
from safetensors.torch import save_file

from build_engines import cli as build_cli
from build_engines.embeddings import read_embedding
from build_engines.single_file import SingleFileError
from client.api import GenerationResult as ClientResult
from python_backend import prompts
from python_backend.engines import OnnxRuntimeEngines
from python_backend.pipeline import PipelineAssets, generate
from python_backend.request import GenerationRequest
from services.gateway.app import GatewayConfig
from tests.conftest import PROFILE_ARGS
from tests.parity import TOLERANCE, max_pixel_diff
from tests.test_gateway import running_gateway
from tests.triton_server import TritonServer

WIDTH = 32  # the tiny text encoder's


def _vectors(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, WIDTH, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def embeddings_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One file per format A1111 reads: its own .pt, a diffusers concept .bin, a one-tensor .safetensors."""
    folder = tmp_path_factory.mktemp("embeddings")
    a1111 = {
        "string_to_token": {"*": 265},
        "string_to_param": {"*": torch.nn.Parameter(_vectors(3, 1))},
        "name": "EasyNeg",
        "step": 1000,
    }
    torch.save(a1111, folder / "EasyNeg.pt")
    torch.save({"<shiny>": _vectors(1, 2)[0]}, folder / "shiny.bin")
    save_file({"emb_params": _vectors(2, 3)}, str(folder / "oldstyle.safetensors"))
    return folder


@pytest.fixture(scope="module")
def repository(tiny_checkpoint: Path, embeddings_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    repo = tmp_path_factory.mktemp("repository") / "repo"
    args = ["--checkpoint", str(tiny_checkpoint), "--embeddings", str(embeddings_dir), "--output", str(repo)]
    assert build_cli.main([*args, *PROFILE_ARGS]) == 0
    return repo


@pytest.fixture(scope="module")
def served(repository: Path) -> tuple[PipelineAssets, OnnxRuntimeEngines]:
    assets = PipelineAssets.load(repository / "pipeline" / "1")
    return assets, OnnxRuntimeEngines(repository, assets.manifest.geometry)


def _generate(served: Any, prompt: str, negative: str = "") -> Any:
    assets, engines = served
    size = {"width": 64, "height": 64, "num_inference_steps": 4, "seed": 11, "scheduler": "euler"}
    request = GenerationRequest(prompt=prompt, negative_prompt=negative, **size)
    return generate(request, engines, assets)


FILES = {"EasyNeg": "EasyNeg.pt", "shiny": "shiny.bin", "oldstyle": "oldstyle.safetensors"}


def _diffusers(checkpoint: Path, embeddings_dir: Path, prompt: str, negative: str = "") -> np.ndarray:
    """diffusers with the same files through load_textual_inversion. Its tokens and the prompts are given
    in lower case: CLIP's tokenizer lowercases a prompt anyway (same ids), and under transformers 5 diffusers'
    multi-vector expansion (_maybe_convert_prompt) finds an added token only if it is lower case."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    for name, file in FILES.items():
        pipe.load_textual_inversion(str(embeddings_dir / file), token=name.lower())
    generator = [torch.Generator("cpu").manual_seed(11)]
    size = {"width": 64, "height": 64, "num_inference_steps": 4, "guidance_scale": 7.5}
    images = pipe(
        prompt.lower(), negative_prompt=negative.lower(), generator=generator, output_type="np", **size
    ).images
    return (images * 255).round().astype(np.uint8)


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [
        ("a shiny photo of a cat", ""),  # one vector
        ("a photo of a cat", "EasyNeg, blurry"),  # three vectors, in the negative prompt
        ("oldstyle painting of a shiny cat", "EasyNeg"),  # several at once
    ],
)
def test_images_match_diffusers_load_textual_inversion(
    served, tiny_checkpoint, embeddings_dir, prompt, negative
):
    ours = _generate(served, prompt, negative)
    expected = _diffusers(tiny_checkpoint, embeddings_dir, prompt, negative)
    assert max_pixel_diff(ours.images, expected) <= TOLERANCE
    without = _generate(served, prompt.replace("shiny", "glossy").replace("oldstyle", "old"), "")
    assert max_pixel_diff(ours.images, without.images) > TOLERANCE  # the embeddings did something


def test_info_and_infotext_list_the_embeddings_used(served, embeddings_dir):
    result = _generate(served, "a shiny cat", "EasyNeg")
    hashes = {e.name: e.short_hash for e in (read_embedding(p, WIDTH) for p in embeddings_dir.iterdir())}
    assert result.info["embeddings"] == {"EasyNeg": hashes["EasyNeg"], "shiny": hashes["shiny"]}
    [infotext] = ClientResult([Image.fromarray(result.images[0])], result.info).infotexts()
    assert f'TI hashes: "EasyNeg: {hashes["EasyNeg"]}, shiny: {hashes["shiny"]}"' in infotext
    assert "embeddings" not in _generate(served, "a cat").info


def test_weighted_groups_weight_the_vectors(served):
    plain, weighted = _generate(served, "a shiny cat"), _generate(served, "a (shiny:1.4) cat")
    assert max_pixel_diff(plain.images, weighted.images) > 0
    assert weighted.info["embeddings"] == plain.info["embeddings"]


def test_a_name_inside_a_longer_word_is_not_replaced(served):
    assets, _ = served
    chunks = prompts.tokenize_chunks(assets.tokenizer, "shinyshoes and shiny", 3, assets.embeddings)
    [used] = chunks.embeddings
    assert used.name == "shiny"
    ids = chunks.ids[0].tolist()
    assert ids.count(used.vector_ids[0]) == 1  # only the whole word


def test_an_embedding_is_never_split_across_chunks(served, repository):
    assets, _ = served
    table = json.loads((repository / "pipeline" / "1" / "embeddings.json").read_text())
    vector_ids = table["EasyNeg"]["vector_ids"]
    assert len(vector_ids) == 3
    # 73 one-token words, then a three-vector embedding: it does not fit in the first chunk's 75.
    chunks = prompts.tokenize_chunks(assets.tokenizer, "cat " * 73 + "EasyNeg", 3, assets.embeddings)
    assert chunks.count == 2
    assert chunks.ids[1, 1:4].tolist() == vector_ids
    assert vector_ids[0] not in chunks.ids[0].tolist()


@pytest.mark.parametrize(
    ("write", "problem"),
    [
        (lambda p: save_file({"emb_params": torch.zeros(2, 1024)}, str(p)), "width 1024"),
        (lambda p: p.write_bytes(b"not a checkpoint"), "not a readable embedding file"),
        (lambda p: save_file({"a": torch.zeros(1, WIDTH), "b": torch.zeros(1, WIDTH)}, str(p)), "one-tensor"),
        (
            lambda p: save_file({"clip_l": torch.zeros(1, 768), "clip_g": torch.zeros(1, 1280)}, str(p)),
            "SDXL",
        ),
    ],
)
def test_bad_embeddings_are_refused_naming_the_file(tiny_checkpoint, tmp_path, capsys, write, problem):
    folder = tmp_path / "embeddings"
    folder.mkdir()
    bad = folder / "bad.safetensors"
    write(bad)
    repo = tmp_path / "repo"
    args = ["--checkpoint", str(tiny_checkpoint), "--embeddings", str(folder), "--output", str(repo)]
    assert build_cli.main([*args, *PROFILE_ARGS]) == 1
    [line] = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith(f"build-engines: {bad}: ") and problem in line
    assert not repo.exists()  # refused before anything was written


def test_read_embedding_refuses_a_pickle_that_runs_code(tmp_path):
    class Payload:
        def __reduce__(self):
            return (print, ("ran",))

    path = tmp_path / "evil.pt"
    torch.save({"string_to_param": {"*": torch.zeros(1, WIDTH)}, "x": Payload()}, path)
    with pytest.raises(SingleFileError, match=r"evil\.pt: this pickle needs more than tensors"):
        read_embedding(path, WIDTH)


@pytest.mark.integration
def test_served_through_triton_and_the_gateway(repository: Path):
    """A real tritonserver on the repository, and sd-gateway in front: /embeddings lists them as A1111
    does, and a txt2img using one carries its TI hash in the infotext."""
    with (
        TritonServer(repository) as triton,
        running_gateway(GatewayConfig(triton_url=triton.grpc_url)) as url,
    ):
        listing = requests.get(f"{url}/sdapi/v1/embeddings", timeout=30).json()
        assert listing["skipped"] == {}
        assert {name: (e["vectors"], e["shape"]) for name, e in listing["loaded"].items()} == {
            "EasyNeg": (3, WIDTH),
            "oldstyle": (2, WIDTH),
            "shiny": (1, WIDTH),
        }
        size = {"steps": 3, "width": 64, "height": 64, "seed": 5}
        body = {"prompt": "a (shiny:1.2) cat", "negative_prompt": "EasyNeg", **size}
        answer = requests.post(f"{url}/sdapi/v1/txt2img", json=body, timeout=120)
        assert answer.status_code == 200, answer.text
        [infotext] = json.loads(answer.json()["info"])["infotexts"]
        assert 'TI hashes: "EasyNeg: ' in infotext and ", shiny: " in infotext
