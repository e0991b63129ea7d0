"""LoRA per request through a real tritonserver (sd-serve --lora-dir): images match diffusers' pipeline with
the same LoRAs fused, requests with different LoRA sets (and none) share UNet runs and still give the image
each gives alone, nothing leaks into a later request, and bad tags or files are INVALID_ARGUMENT naming
them."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import torch
from safetensors.numpy import save_file

from build_engines import cli as build_cli
from build_engines.tiny_checkpoint import write_tiny_lora
from client import GenerationError, StableDiffusionClient
from python_backend.extra_networks import parse_extra_networks
from tests.conftest import CPU_TARGETS, INT8_ARGS, PROFILE_ARGS, cpu_repository
from tests.parity import TOLERANCE, max_pixel_diff
from tests.triton_server import TritonServer, concurrent_unet_runs

pytestmark = pytest.mark.integration

PROMPT = "a lighthouse in a storm"
SIZE, STEPS, SEED = 64, 4, 7
SCHEDULER = ("Euler", "EulerDiscreteScheduler")  # A1111's name, diffusers' class
CONCURRENT = 4


@pytest.fixture(scope="module")
def lora_dir(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("lora-dir")
    write_tiny_lora(folder / "ink.safetensors", tiny_checkpoint, "kohya", seed=1)  # LoCon convs too
    write_tiny_lora(folder / "paper.safetensors", tiny_checkpoint, "peft", seed=2, output_name="paper_style")
    return folder


@pytest.fixture(scope="module", params=CPU_TARGETS)
def server(
    request: pytest.FixtureRequest,
    tiny_checkpoint: Path,
    lora_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
):
    """LoRAs served on each CPU target."""
    built = cpu_repository(request)
    repo = tmp_path_factory.mktemp("lora-serving") / "repo"
    shutil.copytree(built, repo)  # the exports are reused: only the configs are rewritten
    args = [
        "--checkpoint",
        str(tiny_checkpoint),
        "--output",
        str(repo),
        "--target",
        request.param,
        *PROFILE_ARGS,
    ]
    # A batch window, so that the concurrent requests' UNet calls meet however busy the machine is.
    serving = ["--max-concurrent-requests", str(CONCURRENT), "--unet-batch-delay", "20"]
    assert build_cli.main([*args, *serving, "--lora"]) == 0
    with TritonServer(repo, serve_args=["--lora-dir", str(lora_dir)]) as running:
        yield running


def _generate(server: TritonServer, prompt: str, seed: int = SEED) -> tuple[np.ndarray, Any]:
    result = StableDiffusionClient(server.grpc_url).generate(
        prompt, width=SIZE, height=SIZE, steps=STEPS, scheduler=SCHEDULER[0], seed=seed
    )
    return np.asarray(result.images[0]), result


def _fused_reference(checkpoint: Path, lora_dir: Path, prompt: str, files: dict[str, tuple[float, float]]):
    """diffusers' StableDiffusionPipeline with the LoRAs loaded and fused (te and unet weights apart), on the
    prompt without its tags; its own pipeline object (fusing changes the weights)."""
    import diffusers

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(checkpoint, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, SCHEDULER[1]).from_config(pipe.scheduler.config)
    names = []
    for i, file in enumerate(files):
        names.append(f"lora{i}")
        pipe.load_lora_weights(str(lora_dir / file), adapter_name=names[-1])
    weights = [{"text_encoder": te, "unet": unet} for te, unet in files.values()]
    pipe.set_adapters(names, adapter_weights=weights)
    pipe.fuse_lora(adapter_names=names)
    pipe.unload_lora_weights()  # keeps the fused weights
    images = pipe(
        parse_extra_networks(prompt)[0],
        num_inference_steps=STEPS,
        guidance_scale=7.5,
        width=SIZE,
        height=SIZE,
        generator=[torch.Generator("cpu").manual_seed(SEED)],
        output_type="np",
    ).images
    return (images[0] * 255).round().astype(np.uint8)


@pytest.mark.parametrize(
    ("tags", "files"),
    [
        ("<lora:ink:1>", {"ink.safetensors": (1.0, 1.0)}),
        # two LoRAs, one by its alias, with separate text-encoder and UNet multipliers
        (
            "<lora:ink:0.6> <lora:paper_style:-0.4:0.9>",
            {"ink.safetensors": (0.6, 0.6), "paper.safetensors": (-0.4, 0.9)},
        ),
    ],
)
def test_served_loras_match_diffusers_with_them_fused(server, tiny_checkpoint, lora_dir, tags, files):
    plain, _ = _generate(server, PROMPT)
    served, result = _generate(server, f"{PROMPT} {tags}")
    reference = _fused_reference(tiny_checkpoint, lora_dir, f"{PROMPT} {tags}", files)
    assert max_pixel_diff(served, reference) <= TOLERANCE
    assert max_pixel_diff(served, plain) > 20  # the LoRAs changed the image
    names = [t.name for t in parse_extra_networks(tags)[1]]
    assert list(result.info["loras"]) == names and all(len(h) == 12 for h in result.info["loras"].values())
    hashes = ", ".join(f"{n}: {h}" for n, h in result.info["loras"].items())
    assert f'Lora hashes: "{hashes}"' in result.infotexts()[0]
    assert result.info["prompt"] == f"{PROMPT} {tags}"  # the infotext keeps the tags, as A1111's


def test_mixed_lora_sets_share_unet_runs_and_give_their_solo_images(server):
    prompts = [
        PROMPT,
        f"{PROMPT} <lora:ink:1>",
        f"{PROMPT} <lora:ink:1><lora:paper:0.8>",
        f"{PROMPT} <lora:paper:0.5>",
    ]
    solo = [_generate(server, p)[0] for p in prompts]
    assert len({img.tobytes() for img in solo}) == len(prompts)

    jobs = [lambda p=p: _generate(server, p)[0] for p in prompts]
    results, calls, runs = concurrent_unet_runs(server.grpc_url, jobs, timeout=120)
    assert calls == len(prompts) * STEPS
    assert runs < calls, (runs, calls)  # runs carried rows of different LoRA sets
    for i, image in enumerate(results):
        assert image is not None, f"request {i} did not finish"
        assert max_pixel_diff(image, solo[i]) <= 1, prompts[i]


def test_a_request_without_lora_after_one_with_gives_the_plain_image(server):
    plain, _ = _generate(server, PROMPT, seed=11)
    with_lora, _ = _generate(server, f"{PROMPT} <lora:ink:1.5>", seed=11)
    again, result = _generate(server, PROMPT, seed=11)
    assert max_pixel_diff(with_lora, plain) > 20
    assert np.array_equal(again, plain) and "loras" not in result.info


def test_a_file_added_while_serving_is_found_and_listed(server, lora_dir):
    client = StableDiffusionClient(server.grpc_url)
    assert {(e["name"], e["alias"]) for e in client.loras()} >= {("ink", "ink"), ("paper", "paper_style")}
    shutil.copy(lora_dir / "ink.safetensors", lora_dir / "ink_copy.safetensors")
    try:
        copied, _ = _generate(server, f"{PROMPT} <lora:ink_copy:1>")
        original, _ = _generate(server, f"{PROMPT} <lora:ink:1>")
        assert np.array_equal(copied, original)
        assert "ink_copy" in {e["name"] for e in client.loras(refresh=True)}
    finally:
        (lora_dir / "ink_copy.safetensors").unlink()


@pytest.mark.parametrize(
    ("tag", "message"),
    [
        ("<lora:nothing:1>", "<lora:nothing:1>: unknown LoRA 'nothing'"),
        ("<lora:ink:abc>", "<lora:ink:abc>' with a multiplier that is not a finite number"),
        ("<lora:ink:nan>", "not a finite number"),
        ("<lora:broken:1>", "broken.safetensors"),
        ("<lora:sdxl:1>", "SDXL"),
        ("<hypernet:x:1>", "only <lora:...> extra networks are supported"),
    ],
)
def test_bad_lora_tags_and_files_are_invalid_arguments_naming_them(server, lora_dir, tag, message):
    (lora_dir / "broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    sdxl = {"lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": np.zeros((4, 32), np.float32)}
    save_file(sdxl, str(lora_dir / "sdxl.safetensors"))
    client = StableDiffusionClient(server.grpc_url, retries=0)
    with pytest.raises(GenerationError) as refused:
        client.generate(f"{PROMPT} {tag}", width=SIZE, height=SIZE, steps=STEPS)
    assert refused.value.is_invalid_argument, refused.value
    assert str(refused.value).startswith("prompt: ") and message in str(refused.value)
    assert client.is_ready()


def test_the_gateway_lists_loras_and_applies_tags_as_a1111(server, lora_dir):
    import webuiapi

    from services.gateway.app import GatewayConfig
    from tests.test_gateway import running_gateway

    with running_gateway(GatewayConfig(triton_url=server.grpc_url)) as gateway:
        listed = requests.get(f"{gateway}/sdapi/v1/loras", timeout=30).json()
        paper = next(e for e in listed if e["name"] == "paper")
        assert paper["alias"] == "paper_style" and paper["path"] == str(lora_dir / "paper.safetensors")
        assert paper["metadata"]["ss_output_name"] == "paper_style"
        assert requests.post(f"{gateway}/sdapi/v1/refresh-loras", timeout=30).status_code == 200
        host, port = gateway.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port))
        result = api.txt2img(
            prompt=f"{PROMPT} <lora:paper_style:0.7>",
            width=SIZE,
            height=SIZE,
            steps=STEPS,
            seed=SEED,
            sampler_name=SCHEDULER[0],
            cfg_scale=7.5,
        )
        direct, _ = _generate(server, f"{PROMPT} <lora:paper_style:0.7>")
        assert np.array_equal(np.asarray(result.image.convert("RGB")), direct)
        assert 'Lora hashes: "paper_style: ' in result.info["infotexts"][0]
        bad = requests.post(
            f"{gateway}/sdapi/v1/txt2img", json={"prompt": "<lora:missing:1>", "width": SIZE, "height": SIZE}
        )
        assert bad.status_code == 422 and "unknown LoRA 'missing'" in bad.text


def test_a_killed_unet_process_comes_back_and_applies_loras_again(server):
    """kill -9 of the UNet's stub (the OOM killer's way) loses its compiled LoRA sets; once sd-serve has
    reloaded it, the same LoRA request compiles them again and gives the same image."""
    import os
    import signal
    import time

    from tests.test_reliability import RECOVERY_S, stub_of

    prompt = f"{PROMPT} <lora:ink:0.8><lora:paper:0.3>"
    before, _ = _generate(server, prompt)
    os.kill(stub_of(server, "unet").pid, signal.SIGKILL)
    killed = time.monotonic()
    while time.monotonic() - killed < RECOVERY_S:
        try:
            after, _ = _generate(server, prompt)
            break
        except GenerationError as e:
            assert e.is_retryable, e  # UNAVAILABLE while the UNet is reloaded, nothing else
            time.sleep(0.5)
    else:
        pytest.fail(f"no LoRA request succeeded {RECOVERY_S} s after killing the UNet:\n{server.log()}")
    assert np.array_equal(after, before)


def test_int8_hybrid_serves_loras_within_the_int8_budget(
    int8_repository, tiny_checkpoint, lora_dir, tmp_path
):
    """--precision int8-hybrid with --lora, served: the UNet keeps its calibrated IR, the LoRA branch graphs
    get int8 weights with f32 activations (build_engines/openvino_int8.py), and a request's LoRA is applied
    as diffusers fuses it, within the int8 quality budget's image floor for the tiny checkpoint."""
    from perf.quality import BUDGETS, TINY, psnr_ssim

    repo = tmp_path / "repo"
    shutil.copytree(int8_repository, repo)  # the plain UNet's calibrated IR is kept
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(repo), *INT8_ARGS, *PROFILE_ARGS, "--lora"]
    assert build_cli.main(args) == 0
    assert (repo / "unet" / "1" / "lora" / "model.xml").exists()
    tags, files = "<lora:ink:0.6> <lora:paper_style:-0.4:0.9>", {"ink.safetensors": (0.6, 0.6)}
    files["paper.safetensors"] = (-0.4, 0.9)
    with TritonServer(repo, serve_args=["--lora-dir", str(lora_dir)]) as server:
        plain, _ = _generate(server, PROMPT)
        served, _ = _generate(server, f"{PROMPT} {tags}")
    reference = _fused_reference(tiny_checkpoint, lora_dir, f"{PROMPT} {tags}", files)
    psnr, ssim = psnr_ssim(reference, served)
    floor = BUDGETS["int8"].images[TINY]
    print(f"int8-hybrid with LoRAs served, vs diffusers with them fused: PSNR {psnr:.2f} dB, SSIM {ssim:.4f}")
    assert psnr >= floor.psnr_min_db and ssim >= floor.ssim_min, (psnr, ssim)
    assert max_pixel_diff(served, plain) > 20  # the LoRAs changed the image
