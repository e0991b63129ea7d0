"""Fuzz every operation /openapi.json lists with schemathesis, against sd-gateway in front of a real
tritonserver (tiny checkpoint): no answer is a 5xx, every answer is the JSON its schema documents, and the
gateway still generates afterwards.

The operations come from the live schema, not from a list here: a route added to the gateway is fuzzed too.

Checks, and why these:
- not_a_server_error: the point. With Triton up, a 5xx is a gateway bug (503 would mean Triton refused).
- content_type_conformance and response_schema_conformance: clients json-decode every answer and read the
  documented fields (`images`, `info`, an error's `detail`), and code generators trust /openapi.json.
  A1111's own schema is loose (dicts of Any) where ours is; where it is typed, what we answer must match.
Left out: status_code_conformance (FastAPI answers 400 to a body that is not JSON, as A1111 does, and
documents no 400), positive_data_acceptance (a schema-valid 513 px width is rightly refused: the engines'
profile and the pipeline's rules are not in the schema, by design of A1111's API), negative_data_rejection
(the models are lenient as A1111's: 12.5 for an int field is taken as 12, unknown keys are ignored).

Bounded work: the repository's profile is 64..256 px, batch 4 (conftest), so most fuzzed generation requests
are refused at once with 422. So that the path through Triton is fuzzed as well, half the generation bodies
(chosen by a checksum of the body, so runs repeat) get their size and work fields folded into a small valid
range (64..80 px, 1..3 steps, batches of 1..2), every other field as fuzzed. Generation is derandomized:
the same cases every run.
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Iterator
from typing import Any

import pytest
import requests
import schemathesis
import tritonclient.grpc as grpcclient
from schemathesis.checks import content_type_conformance, not_a_server_error, response_schema_conformance

from services.gateway.app import GatewayConfig, create_app
from tests.test_gateway import running_gateway
from tests.triton_server import TritonServer

pytestmark = pytest.mark.integration

EXAMPLES_PER_OPERATION = 40  # fuzzing phase; the coverage phase adds its own boundary cases
CHECKS = [not_a_server_error, content_type_conformance, response_schema_conformance]
GENERATION_PATHS = ("/sdapi/v1/txt2img", "/sdapi/v1/img2img")
# Integer fields folded into range, as (lowest, count): field value v becomes lowest + v % count.
SMALL_WORK = {
    "width": (64, 3),
    "height": (64, 3),
    "steps": (1, 3),
    "batch_size": (1, 2),
    "n_iter": (1, 2),
    "hr_second_pass_steps": (0, 3),
    "hr_resize_x": (0, 1),
    "hr_resize_y": (0, 1),
}


@pytest.fixture(scope="module")
def triton(model_repository) -> Iterator[TritonServer]:
    with TritonServer(model_repository) as server:
        yield server


@pytest.fixture(scope="module")
def gateway(triton: TritonServer) -> Iterator[str]:
    with running_gateway(GatewayConfig(triton_url=triton.grpc_url)) as url:
        yield url


def openapi() -> dict[str, Any]:
    """The gateway's /openapi.json: it does not depend on Triton, so it is known when tests are collected
    (the test below checks that the live gateway serves the same)."""
    return create_app(GatewayConfig()).openapi()


CONFIG = {
    "seed": 13,
    "generation": {
        "max-examples": EXAMPLES_PER_OPERATION,
        "deterministic": True,
        "database": "none",  # no .hypothesis/ replaying past failures: every run the same cases
        "mode": "all",  # schema-invalid bodies too: they must be refused, never crash
    },
    "phases": {"examples": {"enabled": False}, "stateful": {"enabled": False}},
}
# One test per operation. Not `schemathesis.pytest.from_fixture` (a schema loaded from the live gateway):
# schemathesis 4.32's lazy schemas set a pytest node attribute that pytest 9.2 no longer has.
schema = schemathesis.openapi.from_dict(openapi(), config=schemathesis.Config.from_dict(CONFIG))


def small_work(body: Any) -> Any:
    """Half the generation bodies (by checksum) with their size and work fields folded into small valid
    values; enable_hr's scale kept to at most 2 (64 px to 128)."""
    if not isinstance(body, dict) or zlib.crc32(json.dumps(body, sort_keys=True).encode()) % 2:
        return body
    folded = dict(body)
    for name, (lowest, count) in SMALL_WORK.items():
        value = folded.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            folded[name] = lowest + (value % count) * (8 if name in ("width", "height") else 1)
    scale = folded.get("hr_scale")
    if isinstance(scale, int | float) and not isinstance(scale, bool) and abs(scale) > 2:
        folded["hr_scale"] = 2.0
    return folded


@schema.parametrize()
def test_no_fuzzed_request_gets_a_server_error(case: schemathesis.Case, gateway: str) -> None:
    if case.operation.path in GENERATION_PATHS:
        case.body = small_work(case.body)
    case.call_and_validate(base_url=gateway, checks=CHECKS, timeout=120)


def test_gateway_still_generates_after_the_fuzzing(gateway: str, triton: TritonServer) -> None:
    assert requests.get(f"{gateway}/openapi.json").json() == openapi()  # what was fuzzed is what it serves
    # The folded bodies reached the pipeline: the fuzzing went through Triton, not only through validation.
    # (The gateway generates through the streaming model, whose progress drives /progress.)
    stats = grpcclient.InferenceServerClient(triton.grpc_url).get_inference_statistics("pipeline_stream")
    generated = stats.model_stats[0].inference_stats.success.count
    print(f"pipeline_stream requests that succeeded during the fuzzing: {generated}")
    assert generated >= 20
    # Fuzzed POST /options may have left odd (valid) defaults behind: set the one a generation reads.
    assert (
        requests.post(f"{gateway}/sdapi/v1/options", json={"CLIP_stop_at_last_layers": 1}).status_code == 200
    )
    body = {"prompt": "a lighthouse", "seed": 1, "steps": 2, "width": 64, "height": 64}
    answer = requests.post(f"{gateway}/sdapi/v1/txt2img", json=body, timeout=120)
    assert answer.status_code == 200, answer.text[:500]
    result = answer.json()
    assert len(result["images"]) == 1 and json.loads(result["info"])["all_seeds"] == [1]
