"""perf/inputs/*.json are valid pipeline requests; perf.sweep parses perf_analyzer 2.51's CSV and, against a
real server, writes one CSV row per concurrency level and a PNG plot."""

from __future__ import annotations

import csv
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from build_engines import cli as build_cli
from perf import sweep
from python_backend.request import REQUEST_INPUTS, request_from_inputs
from python_backend.shapes import ModelGeometry, Profile
from services.serve import free_ports
from tests.triton_server import PROJECT_ROOT, TritonServer

INPUTS = PROJECT_ROOT / "perf" / "inputs"

# perf_analyzer 2.51's `-f` file from `--concurrency-range 1:3 --verbose-csv` against the tiny pipeline
# (tiny.json), verbatim: no newline after the last row.
REAL_CSV = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
    "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency,"
    "Avg latency,request/response,response wait\n"
    "1,14.6353,9,178,42,50,66963,667,9,67944,88359,90255,98233,67921,18,67865\n"
    "2,17.6522,9,330,128,48,110178,787,4,106882,145133,151357,162840,111488,13,111439\n"
    "3,20.9795,9,348,106,49,140638,878,4,141813,186379,212850,225352,142035,13,141965"
)
# The same run's file without --verbose-csv: no Avg latency.
REAL_CSV_NOT_VERBOSE = (
    "Concurrency,Inferences/Second,Client Send,Network+Server Send/Recv,Server Queue,Server Compute Input,"
    "Server Compute Infer,Server Compute Output,Client Recv,p50 latency,p90 latency,p95 latency,p99 latency\n"
    "1,16.6156,9,166,35,44,59120,663,4,55113,77974,93776,119999\n"
    "2,18.3068,10,516,133,46,107966,837,4,108701,142176,149798,165225"
)


# ------------------------------------------------------------------------------------------------
# Input data


def _json_type_ok(value: Any, dtype: type[np.generic]) -> bool:
    if dtype is np.object_:
        return isinstance(value, str)
    if dtype is np.bool_:
        return isinstance(value, bool)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    if dtype is np.float32:
        return True
    bits = {np.int32: 32, np.int64: 64}[dtype]
    return isinstance(value, int) and -(2 ** (bits - 1)) <= value < 2 ** (bits - 1)


def _as_triton_inputs(entry: dict[str, Any]) -> dict[str, np.ndarray]:
    """The tensors the pipeline model gets from perf_analyzer for one entry (BYTES arrive as bytes)."""
    return {
        name: np.array(
            [v.encode() if isinstance(v, str) else v for v in values], dtype=REQUEST_INPUTS[name]
        ).reshape(1)
        for name, values in entry.items()
    }


def _default_build_profile(tiny_checkpoint: Path) -> Profile:
    return build_cli.parse_args(["--checkpoint", str(tiny_checkpoint), "--output", "unused"]).profile


@pytest.mark.parametrize("name", ["txt2img.json", "tiny.json"])
def test_input_data_are_valid_pipeline_requests(name, assets, tiny_checkpoint):
    """Every key a pipeline input of the right JSON type, one value each; every entry accepted by the
    pipeline's own validation: txt2img.json by a default build of a v1.x checkpoint, tiny.json by the
    tiny repository the tests serve."""
    if name == "txt2img.json":
        profile, text_layers = _default_build_profile(tiny_checkpoint), ModelGeometry().text_layers
    else:
        profile, text_layers = assets.manifest.profile, assets.manifest.geometry.text_layers
    entries = sweep.data_entries(INPUTS / name)
    assert len({tuple(entry) for entry in entries}) == 1, "perf_analyzer should get the same inputs each time"
    for entry in entries:
        for key, values in entry.items():
            assert key in REQUEST_INPUTS, f"{name}: {key!r} is not a pipeline input"
            assert isinstance(values, list) and len(values) == 1, (
                f"{name}: {key} must be one value (dims [1])"
            )
            assert _json_type_ok(values[0], REQUEST_INPUTS[key]), f"{name}: {key}={values[0]!r}"
        request = request_from_inputs(_as_triton_inputs(entry))
        request.validate(profile, assets.max_steps, text_layers)
        assert request.seed >= 0, "fixed seeds: every sweep sends the same work"


def test_tiny_input_data_mirror_txt2img():
    """tiny.json is txt2img.json at the tiny model's size and step counts."""
    full, tiny = (sweep.data_entries(INPUTS / name) for name in ("txt2img.json", "tiny.json"))
    size_and_steps = ("width", "height", "num_inference_steps")

    def rest(entries):
        return [{k: v for k, v in entry.items() if k not in size_and_steps} for entry in entries]

    assert rest(tiny) == rest(full)
    assert {(e["width"][0], e["height"][0]) for e in tiny} == {(64, 64)}
    assert all(4 <= e["num_inference_steps"][0] <= 8 for e in tiny)
    assert len({(e["width"][0], e["height"][0]) for e in full}) >= 3
    assert all(20 <= e["num_inference_steps"][0] <= 30 for e in full)


# ------------------------------------------------------------------------------------------------
# perf_analyzer's CSV


def test_parse_real_perf_analyzer_csv():
    levels = sweep.parse_perf_analyzer_csv(REAL_CSV, images_per_request=2.0, window_requests=8)
    assert [level.concurrency for level in levels] == [1, 2, 3]
    first = levels[0]
    assert first.infer_per_s == pytest.approx(14.6353)
    assert first.images_per_s == pytest.approx(29.2706)
    assert (first.p50_ms, first.p90_ms, first.p95_ms, first.p99_ms, first.avg_ms) == pytest.approx(
        (67.944, 88.359, 90.255, 98.233, 67.921)
    )
    assert (first.server_queue_ms, first.server_compute_infer_ms) == pytest.approx((0.042, 66.963))
    assert first.server_compute_ms == pytest.approx(0.050 + 66.963 + 0.667)
    assert (first.client_send_ms, first.network_server_send_recv_ms, first.client_recv_ms) == pytest.approx(
        (0.009, 0.178, 0.009)
    )
    assert first.window_requests == 8
    assert not sweep.uses_response_cache(REAL_CSV)


def test_parse_names_missing_columns():
    with pytest.raises(ValueError, match="Avg latency"):
        sweep.parse_perf_analyzer_csv(REAL_CSV_NOT_VERBOSE, images_per_request=1.0, window_requests=8)


def test_concurrency_and_window_defaults():
    assert sweep.parse_concurrency("1:4") == [1, 2, 3, 4]
    assert sweep.parse_concurrency("2:8:2") == [2, 4, 6, 8]
    assert sweep.parse_concurrency("4,1,2") == [1, 2, 4]
    for bad in ("0:2", "3:1", "1:2:0", "a", "1:2:3:4"):
        with pytest.raises(Exception, match="concurrency|expected"):
            sweep.parse_concurrency(bad)
    assert sweep.default_request_count(1, entries=8) == 8
    assert sweep.default_request_count(6, entries=8) == 12
    assert sweep.default_request_count(1, entries=1) == sweep.MIN_WINDOW_REQUESTS


# ------------------------------------------------------------------------------------------------
# A real sweep


@pytest.fixture(scope="module")
def server(model_repository: Path):
    with TritonServer(model_repository) as running:
        yield running


@pytest.mark.integration
def test_sweep_against_served_pipeline(server, tmp_path):
    out = tmp_path / "sweep"
    argv = [
        f"--url={server.grpc_url}",
        f"--input-data={INPUTS / 'tiny.json'}",
        "--concurrency=1:2",
        "--request-count=4",
        "--stability-percentage=50",  # 2 shared cores: the test checks the mechanics, not the numbers
        "--level-timeout=120",
        f"--out={out}",
    ]
    assert sweep.main(argv) == 0

    rows = list(csv.DictReader(out.with_suffix(".csv").open()))
    assert [int(row["concurrency"]) for row in rows] == [1, 2]
    for row in rows:
        assert float(row["infer_per_s"]) > 0
        assert float(row["images_per_s"]) == pytest.approx(float(row["infer_per_s"]))  # one image each
        assert float(row["p95_ms"]) >= float(row["p50_ms"]) > 0
        assert float(row["server_compute_infer_ms"]) > 0
        assert int(row["window_requests"]) == 4

    # The CSV agrees with what perf_analyzer printed for each level.
    log = out.with_suffix(".log").read_text()
    printed_p50_us = [int(us) for us in re.findall(r"p50 latency: (\d+) usec", log)]
    assert [float(row["p50_ms"]) for row in rows] == pytest.approx([us / 1000 for us in printed_p50_us])

    png = out.with_suffix(".png")
    assert png.stat().st_size > 10_000
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.width >= 800 and image.height >= 300
        image.verify()


def test_sweep_reports_unreachable_server(tmp_path, capsys):
    out = tmp_path / "sweep"
    (port,) = free_ports(1)
    argv = [
        f"--url=127.0.0.1:{port}",
        f"--input-data={INPUTS / 'tiny.json'}",
        "--concurrency=1",
        f"--out={out}",
    ]
    assert sweep.main(argv) == 1
    assert "no measurement at concurrency 1" in capsys.readouterr().err
    assert not out.with_suffix(".csv").exists()
    assert "failed to get model metadata" in out.with_suffix(".log").read_text()
