"""Stopping a generation early and keeping its images (A1111's interrupt and skip): the core decodes the
latents it reached, `pipeline_control` reaches a running request of another process, and the gateway's
/progress, /interrupt and /skip behave as A1111's for the real `webuiapi` client."""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import webuiapi

from build_engines import cli as build_cli
from client import GenerationError, StableDiffusionClient
from client.api import GenerateOptions
from python_backend.jobs import STALE_AFTER_S, JobBoard, job_id_from_input
from python_backend.pipeline import Interrupted, Progress, _to_rgb, generate
from python_backend.request import GenerationRequest, InvalidInput
from services.gateway.app import GatewayConfig
from tests.conftest import PROFILE_ARGS
from tests.test_gateway import running_gateway
from tests.triton_server import TritonServer

LONG = 150  # steps: a generation that runs long enough to be stopped in the middle
SIZE = 128


def _stop_at(step: int, seen: dict[int, Any]) -> Any:
    def on_step(progress: Progress) -> None:
        seen[progress.step] = progress.latents.clone()
        if progress.step == step:
            raise Interrupted

    return on_step


@pytest.mark.parametrize("scheduler", ["Euler a", "dpmpp_2m"])
def test_interrupted_core_answers_the_latents_it_reached_decoded(engines, assets, scheduler):
    request = GenerationRequest(
        prompt="a cat", width=64, height=64, num_inference_steps=8, num_images=2, seed=5, scheduler=scheduler
    )
    seen: dict[int, Any] = {}
    result = generate(request, engines, assets, _stop_at(3, seen))
    assert sorted(seen) == [1, 2, 3]  # no step after the one that interrupted
    scale = assets.manifest.geometry.vae_scaling_factor
    expected = _to_rgb(engines.decode_latents(seen[3] / scale))
    np.testing.assert_array_equal(result.images, expected)
    assert result.info["interrupted"] is True
    assert any("after step 3 of 8" in w for w in result.info["warnings"])
    full = generate(request, engines, assets)
    assert "interrupted" not in full.info and not np.array_equal(full.images, result.images)


def test_interrupting_the_first_pass_leaves_the_hires_fix_out(engines, assets):
    request = GenerationRequest(
        prompt="a cat", width=64, height=64, num_inference_steps=4, seed=5, enable_hr=True, hr_scale=2.0
    )
    result = generate(request, engines, assets, _stop_at(2, {}))
    assert result.images.shape[1:3] == (64, 64)  # the first pass's size: the second never ran
    assert "hr_scale" not in result.info and result.info["width"] == 64
    second_pass = generate(request, engines, assets, _stop_at(6, {}))  # steps 5..8 are the second pass
    assert second_pass.images.shape[1:3] == (128, 128) and second_pass.info["hr_scale"] == 2.0


def test_job_board_stops_only_running_jobs(tmp_path):
    board = JobBoard(tmp_path / "jobs")
    assert board.request_stop("job-1") is False  # not running (yet): nothing to stop
    with board.running("job-1") as job:
        assert job.stop_requested() is None
        assert board.request_stop("job-1", "skip") is True
        assert job.stop_requested() == "skip"
    assert list((tmp_path / "jobs").iterdir()) == []  # a finished job leaves nothing
    assert board.request_stop("job-1") is False
    with board.running("job-1") as job:  # an id used again starts without the old stop
        assert job.stop_requested() is None


def test_job_board_sweeps_stops_whose_job_is_gone(tmp_path):
    board = JobBoard(tmp_path)
    stale = tmp_path / "gone.stop"  # a stop written just as its job ended
    stale.write_text("interrupt")
    fresh = tmp_path / "new.stop"
    fresh.write_text("interrupt")
    old = time.time() - STALE_AFTER_S - 1
    os.utime(stale, (old, old))
    board.sweep()
    assert not stale.exists() and fresh.exists()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (np.array([b"../etc/passwd"], dtype=np.object_), "letters, digits"),
        (np.array([b"x" * 129], dtype=np.object_), "1 to 128"),
        (np.array([b"a", b"b"], dtype=np.object_), "exactly one value"),
    ],
)
def test_bad_job_ids_name_the_field(value, problem):
    with pytest.raises(InvalidInput, match=f"^job_id: .*{problem}"):
        job_id_from_input(value)


def test_bad_action_names_the_field(tmp_path):
    with pytest.raises(InvalidInput, match="^action: expected one of interrupt, skip"):
        JobBoard(tmp_path).request_stop("job", "pause")


# --- against a real tritonserver ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def triton(model_repository: Path) -> Iterator[TritonServer]:
    with TritonServer(model_repository) as server:
        yield server


def _run_in_thread(target: Any) -> tuple[threading.Thread, dict[str, Any]]:
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["result"] = target()
        except Exception as exc:  # surfaced by the test's assertions
            out["error"] = exc

    thread = threading.Thread(target=run)
    thread.start()
    return thread, out


def _wait_for(condition: Any, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


@pytest.mark.integration
@pytest.mark.parametrize("streaming", [False, True])
def test_client_stop_ends_a_running_request_with_its_images(triton, streaming):
    options = GenerateOptions("a cat", steps=LONG, width=SIZE, height=SIZE, seed=9, scheduler="Euler a")
    steps: list[int] = []
    job = f"test-{int(streaming)}-{time.monotonic_ns()}"
    with StableDiffusionClient(triton.grpc_url) as control:
        assert control.stop(job) is False  # nothing runs under that id yet

        def generate() -> Any:
            with StableDiffusionClient(triton.grpc_url) as client:
                on_progress = (lambda status, preview: steps.append(status["step"])) if streaming else None
                return client.run(options, on_progress, job_id=job)

        thread, out = _run_in_thread(generate)
        # Unary requests report no progress: stop once the job is known to be running.
        _wait_for(lambda: len(steps) >= 3 if streaming else control.stop(job))
        if streaming:
            assert control.stop(job) is True
        thread.join(timeout=120)
    assert "error" not in out, out.get("error")
    result = out["result"]
    assert result.info["interrupted"] is True and len(result.images) == 1
    [warning] = [w for w in result.info["warnings"] if w.startswith("interrupted after step")]
    stopped_at = int(warning.split()[3])
    assert stopped_at < LONG
    if streaming:
        assert stopped_at <= steps[-1] + 1  # it stopped at the step after the one reported last, at most


@pytest.mark.integration
def test_bad_job_id_and_action_answer_invalid_argument(triton):
    with StableDiffusionClient(triton.grpc_url) as client:
        with pytest.raises(GenerationError, match="^job_id: ") as bad_id:
            client.run(GenerateOptions("a cat", steps=2, width=64, height=64), job_id="no spaces")
        assert bad_id.value.is_invalid_argument
        with pytest.raises(GenerationError, match="^action: ") as bad_action:
            client.stop("job", "pause")
        assert bad_action.value.is_invalid_argument


# --- the gateway ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def api(triton: TritonServer) -> Iterator[webuiapi.WebUIApi]:
    with running_gateway(GatewayConfig(triton_url=triton.grpc_url)) as url:
        host, port = url.removeprefix("http://").split(":")
        yield webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a")


def _txt2img(
    api: webuiapi.WebUIApi, steps: int = LONG, **options: Any
) -> tuple[threading.Thread, dict[str, Any]]:
    return _run_in_thread(
        lambda: api.txt2img(prompt="a cat", steps=steps, width=SIZE, height=SIZE, seed=21, **options)
    )


@pytest.mark.integration
def test_progress_follows_a_generation_then_reports_idle(api):
    assert api.get_progress()["state"]["job_count"] == 0
    api.set_options({"show_progress_every_n_steps": 2})
    try:
        thread, out = _txt2img(api, n_iter=2)
        polled = []
        _wait_for(lambda: polled.append(api.get_progress()) or polled[-1]["state"]["sampling_step"] >= 6)
        busy = polled[-1]
        assert busy["state"]["job"] == "scripts_txt2img" and busy["state"]["job_count"] == 2
        assert busy["state"]["sampling_steps"] == LONG and busy["state"]["job_no"] == 0
        assert 0.01 < busy["progress"] < 0.5 and busy["eta_relative"] > 0
        assert busy["current_image"] is not None  # a preview every 2 steps
        skipped = api.session.get(f"{api.baseurl}/progress", params={"skip_current_image": "true"}).json()
        assert skipped["current_image"] is None and skipped["state"]["job_count"] == 2
        api.interrupt()
        thread.join(timeout=120)
    finally:
        api.set_options({"show_progress_every_n_steps": 10})
    assert "error" not in out, out.get("error")
    idle = api.get_progress()  # what webuiapi's util_wait_for_ready waits for
    assert idle["progress"] == 0 and idle["state"]["job_count"] == 0 and idle["state"]["job"] == ""


@pytest.mark.integration
def test_interrupt_answers_200_with_the_partial_image_and_makes_no_more_batches(api):
    thread, out = _txt2img(api, n_iter=3)
    _wait_for(lambda: api.get_progress()["state"]["sampling_step"] >= 3)
    assert api.interrupt() == {}
    thread.join(timeout=120)
    assert "error" not in out, out.get("error")
    result = out["result"]
    assert len(result.images) == 1  # the first batch, partly denoised; the other two never started
    assert result.images[0].size == (SIZE, SIZE)
    assert any(w.startswith("interrupted after step") for w in result.info["warnings"])
    assert result.info["all_seeds"] == [21]


@pytest.mark.integration
def test_skip_ends_the_current_batch_and_goes_on_with_the_next(api):
    thread, out = _txt2img(api, n_iter=2, steps=40)
    _wait_for(lambda: api.get_progress()["state"]["sampling_step"] >= 3)
    response = api.session.post(f"{api.baseurl}/skip")
    assert response.status_code == 200 and response.json() is None  # A1111 answers null
    thread.join(timeout=120)
    assert "error" not in out, out.get("error")
    result = out["result"]
    assert len(result.images) == 2 and result.info["all_seeds"] == [21, 22]
    stopped = [w for w in result.info["warnings"] if w.startswith("interrupted after step")]
    assert len(stopped) == 1  # only the first batch was cut short


@pytest.mark.integration
def test_interrupt_with_nothing_running_is_harmless(api):
    assert api.interrupt() == {}
    result = api.txt2img(prompt="a cat", steps=3, width=64, height=64, seed=1)
    assert len(result.images) == 1 and not any("interrupted" in w for w in result.info["warnings"])


@pytest.mark.integration
def test_interrupt_reaches_a_generation_still_queued(model_repository, tiny_checkpoint, tmp_path_factory):
    """One worker: the second request waits in Triton's queue when /interrupt comes, so its stop finds no
    running job; the gateway asks again at the job's first progress report, and it stops at once."""
    repo = tmp_path_factory.mktemp("one-worker") / "repo"
    shutil.copytree(model_repository, repo)  # the exports are reused: only the configs are rewritten
    args = ["--checkpoint", str(tiny_checkpoint), "--output", str(repo), *PROFILE_ARGS]
    assert build_cli.main([*args, "--max-concurrent-requests", "1"]) == 0
    with TritonServer(repo) as server, running_gateway(GatewayConfig(triton_url=server.grpc_url)) as url:
        host, port = url.removeprefix("http://").split(":")
        api = webuiapi.WebUIApi(host=host, port=int(port), sampler="Euler a")
        first, first_out = _txt2img(api)
        _wait_for(lambda: api.get_progress()["state"]["sampling_step"] >= 2)
        second, second_out = _txt2img(api)
        _wait_for(lambda: _waiting_for_a_worker(server) == 1)  # the second request, held in execute
        assert api.interrupt() == {}
        first.join(timeout=120)
        second.join(timeout=120)
    for out in (first_out, second_out):
        assert "error" not in out, out.get("error")
        [warning] = [w for w in out["result"].info["warnings"] if w.startswith("interrupted after step")]
        assert int(warning.split()[3]) < 10  # far short of LONG: both stopped early


def _waiting_for_a_worker(server: TritonServer) -> float:
    text = requests.get(server.metrics_url, timeout=10).text
    found = re.search(r'^sd_requests_waiting\{model="pipeline_stream"\} (\S+)$', text, re.MULTILINE)
    return float(found[1]) if found else 0.0
