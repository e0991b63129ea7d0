"""Long prompts through a real tritonserver built with `--max-batch 1`: every prompt of 1..--max-prompt-chunks
75-token chunks is served, guided and unguided, and a longer one is INVALID_ARG naming the field.

The text encoder gets one row per 77-token chunk of prompt and negative prompt, whatever the image count;
a repository whose text encoder only took 2 x --max-batch rows answered a two-chunk guided prompt with
INTERNAL ("text_encoder: inference request batch-size must be <= 2").
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from build_engines import cli as build_cli
from client import GenerationError, StableDiffusionClient
from python_backend import prompts
from python_backend.engines import OnnxRuntimeEngines
from python_backend.pipeline import PipelineAssets, generate
from python_backend.request import GenerationRequest
from python_backend.shapes import TEXT_ENCODER
from tests.parity import max_pixel_diff
from tests.triton_server import TritonServer

pytestmark = pytest.mark.integration

MAX_PROMPT_CHUNKS = 3
SIZE = 64
STEPS = 2
SEED = 77


def words(chunks: int) -> str:
    """A prompt of exactly `chunks` 75-token chunks: "cat" is one token, 75 of them fill a chunk."""
    return " ".join(["cat"] * (75 * (chunks - 1) + 1))


@pytest.fixture(scope="module")
def repository(
    model_repository: Path, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    repo = tmp_path_factory.mktemp("long-prompts") / "repo"
    shutil.copytree(model_repository, repo)  # the exports are reused: only the configs are rewritten
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(repo), "--static", f"{SIZE}x{SIZE}"]
    assert build_cli.main([*args, "--max-batch", "1", "--max-prompt-chunks", str(MAX_PROMPT_CHUNKS)]) == 0
    return repo


@pytest.fixture(scope="module")
def server(repository: Path):
    with TritonServer(repository) as running:
        yield running


@pytest.fixture(scope="module")
def in_process(repository: Path):
    """The same core on in-process ONNX Runtime: what the served images must equal."""
    assets = PipelineAssets.load(repository / "pipeline" / "1")
    engines = OnnxRuntimeEngines(repository, assets.manifest.geometry)

    def run(**fields) -> np.ndarray:
        request = GenerationRequest(width=SIZE, height=SIZE, num_inference_steps=STEPS, seed=SEED, **fields)
        return generate(request, engines, assets).images

    return run


def test_prompt_helper_makes_the_chunks_it_says(repository):
    tokenizer = PipelineAssets.load(repository / "pipeline" / "1").tokenizer
    for chunks in range(1, MAX_PROMPT_CHUNKS + 2):
        assert prompts.tokenize_chunks(tokenizer, words(chunks)).count == chunks


def _text_encoder_batch_sizes(server: TritonServer) -> dict[int, int]:
    """Triton's own count of text encoder runs per batch size (rows per call)."""
    stats = grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics(TEXT_ENCODER)
    return {b.batch_size: b.compute_infer.count for b in stats.model_stats[0].batch_stats}


@pytest.mark.parametrize("guidance", [1.0, 7.5], ids=["unguided", "guided"])
@pytest.mark.parametrize("chunks", range(1, MAX_PROMPT_CHUNKS + 1))
def test_every_prompt_length_the_build_allows_is_served(server, in_process, chunks, guidance):
    before = _text_encoder_batch_sizes(server)
    result = StableDiffusionClient(server.grpc_url).generate(
        words(chunks), steps=STEPS, guidance_scale=guidance, seed=SEED, width=SIZE, height=SIZE
    )
    served = np.stack([np.asarray(image) for image in result.images])
    assert served.shape == (1, SIZE, SIZE, 3)
    assert max_pixel_diff(served, in_process(prompt=words(chunks), guidance_scale=guidance)) <= 1
    # One text encoder call with a row per chunk, of the negative prompt too when guided (padded to as many).
    rows = chunks * (2 if guidance > 1 else 1)
    after = _text_encoder_batch_sizes(server)
    assert after.get(rows, 0) - before.get(rows, 0) == 1, (before, after)


def test_a_long_negative_prompt_is_served(server, in_process):
    negative = words(MAX_PROMPT_CHUNKS)  # the positive prompt is padded to its chunk count: 2 x 3 rows
    result = StableDiffusionClient(server.grpc_url).generate(
        "a cat", negative_prompt=negative, steps=STEPS, seed=SEED, width=SIZE, height=SIZE
    )
    served = np.stack([np.asarray(image) for image in result.images])
    assert max_pixel_diff(served, in_process(prompt="a cat", negative_prompt=negative)) <= 1


@pytest.mark.parametrize(
    ("field", "guidance"), [("prompt", 1.0), ("prompt", 7.5), ("negative_prompt", 7.5)]
)  # unguided requests do not encode the negative prompt (as diffusers), so do not check it
def test_a_prompt_longer_than_the_build_allows_is_invalid_arg(server, field, guidance):
    fields = {"prompt": "a cat", field: words(MAX_PROMPT_CHUNKS + 1)}
    with pytest.raises(GenerationError) as raised:
        StableDiffusionClient(server.grpc_url).generate(
            fields.pop("prompt"), **fields, steps=STEPS, guidance_scale=guidance, width=SIZE, height=SIZE
        )
    assert raised.value.is_invalid_argument, raised.value
    assert raised.value.message.startswith(f"{field}: "), raised.value.message
    assert f"the engines accept at most {MAX_PROMPT_CHUNKS}" in raised.value.message
