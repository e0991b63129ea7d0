"""Concurrent requests share UNet runs (Triton's dynamic batcher), and Triton's response cache answers a
repeated request: both through a real tritonserver, proved by Triton's own statistics."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import tritonclient.grpc as grpcclient

from build_engines import cli as build_cli
from build_engines import repository
from client import StableDiffusionClient
from tests.conftest import CPU_TARGETS, PROFILE_ARGS, cpu_repository
from tests.triton_server import TritonServer

pytestmark = pytest.mark.integration

PROMPT = "a lighthouse in a storm"
CONCURRENT = 4
BATCH_DELAY_MS = 20
# Different step counts and schedulers: the requests are at different timesteps when their UNet calls meet.
REQUESTS = [
    {"seed": 11, "steps": 8, "scheduler": "Euler a"},
    {"seed": 12, "steps": 9, "scheduler": "DDIM"},
    {"seed": 13, "steps": 10, "scheduler": "DPM++ 2M Karras"},
    {"seed": 14, "steps": 11, "scheduler": "PNDM"},
]


@pytest.fixture(scope="module", params=CPU_TARGETS)
def server(request: pytest.FixtureRequest, tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory):
    """A batching server on each CPU target: the onnx target's and the openvino target's."""
    built = cpu_repository(request)
    repo = tmp_path_factory.mktemp("batching") / "repo"
    shutil.copytree(built, repo)  # the exports are reused: only the configs are rewritten
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(repo), *PROFILE_ARGS, "--response-cache"]
    args += ["--target", request.param]
    # A batch window: on a busy 2-core machine the requests' per-step Python work (one GIL in the pipeline
    # process) can outlast a tiny UNet run, so that with no window their calls settle into a convoy, each
    # sent just after the one before has run, and never meet.
    serving = ["--max-concurrent-requests", str(CONCURRENT), "--unet-batch-delay", str(BATCH_DELAY_MS)]
    assert build_cli.main([*args, *serving]) == 0
    unet = repository.read_config(repo / "unet").dynamic_batching
    assert unet.max_queue_delay_microseconds == BATCH_DELAY_MS * 1000
    with TritonServer(repo, extra_args=["--cache-config=local,size=67108864"]) as running:
        yield running


def _stats(server: TritonServer, model: str):
    return grpcclient.InferenceServerClient(server.grpc_url).get_inference_statistics(model).model_stats[0]


def _generate(server: TritonServer, stream: bool = False, **request):
    client = StableDiffusionClient(server.grpc_url)
    # on_progress sends the request to the decoupled `pipeline_stream`, which Triton never caches
    on_progress = (lambda status, preview: None) if stream else None
    return client.generate(PROMPT, width=128, height=128, on_progress=on_progress, **request)


def test_concurrent_requests_share_unet_runs_and_match_their_solo_images(server):
    start_solo = _stats(server, "unet")
    solo = [np.asarray(_generate(server, stream=True, **r).images[0]) for r in REQUESTS]
    before = _stats(server, "unet")
    solo_calls = before.inference_stats.success.count - start_solo.inference_stats.success.count
    assert before.execution_count - start_solo.execution_count == solo_calls  # one at a time: no sharing

    results: list[np.ndarray | None] = [None] * len(REQUESTS)
    start = threading.Barrier(len(REQUESTS))

    def run(i: int) -> None:
        start.wait()
        results[i] = np.asarray(_generate(server, **REQUESTS[i]).images[0])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(REQUESTS))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    after = _stats(server, "unet")

    requests = after.inference_stats.success.count - before.inference_stats.success.count
    executions = after.execution_count - before.execution_count
    assert requests == solo_calls  # the same UNet calls (guided: 2 rows each) ...
    assert executions < requests, (executions, requests)  # ... in fewer runs: some carried several
    for i, image in enumerate(results):
        assert image is not None, f"request {i} did not finish"
        assert np.abs(image.astype(int) - solo[i].astype(int)).max() == 0, REQUESTS[i]


def test_repeated_request_is_answered_from_the_response_cache(server):
    request = {"seed": 5, "steps": 3, "scheduler": "Euler"}
    before, unet_before = _stats(server, "pipeline"), _stats(server, "unet")
    first = _generate(server, **request)
    again = _generate(server, **request)
    after, unet_after = _stats(server, "pipeline"), _stats(server, "unet")

    assert after.inference_stats.cache_miss.count - before.inference_stats.cache_miss.count == 1
    assert after.inference_stats.cache_hit.count - before.inference_stats.cache_hit.count == 1
    assert unet_after.inference_stats.success.count - unet_before.inference_stats.success.count == 3
    assert np.array_equal(np.asarray(first.images[0]), np.asarray(again.images[0]))
    assert first.info == again.info
    # Another seed is another request: generated, not served from the cache.
    other = _generate(server, **{**request, "seed": 6})
    assert not np.array_equal(np.asarray(first.images[0]), np.asarray(other.images[0]))
