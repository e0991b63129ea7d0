"""Time what sd-gateway adds to a request: the same txt2img sent straight to Triton with the project's client
(gRPC) and through the gateway's /sdapi/v1/txt2img (HTTP), interleaved; one run, one machine.

    python -m perf.gateway_overhead --checkpoint DIR [--size 64] [--steps 4] [--repeats 30] [--out FILE.md]
    python -m perf.gateway_overhead --triton-url HOST:PORT [--gateway-url http://HOST:PORT] [...]

With --checkpoint it builds (or reuses, in perf.compare's work folder) the checkpoint's ONNX repository and
starts tritonserver; without --gateway-url it starts `sd-gateway` as its own process, as deployed. One warm-up
call each, then `--repeats` rounds of one call per path, the order alternating, each call SETTLE_S after the
previous one ended; the medians and p90s are reported, and the overhead. See perf/README.md.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime
import hashlib
import io
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
from PIL import Image

from client import StableDiffusionClient
from client.api import GenerationResult
from perf.compare import SETTLE_S, build_repository, checkpoint_scheduler, is_full_size, machine, publish
from services.serve import ServeOptions, TritonProcess, default_cache_dir, free_ports

# The project's targets (issue 13): the gateway adds at most this share to a request's latency.
TARGET_TINY = 0.02  # tiny checkpoint
TARGET_FULL_SIZE = 0.01  # SD v1's architecture, 256 px


@dataclass
class Route:
    name: str
    call: Callable[[], Any] = field(repr=False)  # one request; its answer, as received
    image: Callable[[Any], np.ndarray] = field(repr=False)  # an answer's image, decoded after the clock
    latencies_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.latencies_s)

    @property
    def p90_s(self) -> float:
        return percentile(self.latencies_s, 90)


def percentile(values: list[float], p: int) -> float:
    """The p-th percentile, interpolated between the two nearest values (numpy's default method)."""
    return float(np.percentile(values, p))


def direct(client: StableDiffusionClient, request: dict[str, Any]) -> Route:
    """(a) the project's client straight to Triton over gRPC, one channel for the whole run (as a program
    using the client API would)."""

    def call() -> GenerationResult:
        return client.generate(
            request["prompt"],
            negative_prompt="",
            seed=request["seed"],
            steps=request["steps"],
            guidance_scale=request["cfg_scale"],
            width=request["width"],
            height=request["height"],
        )

    def image(result: GenerationResult) -> np.ndarray:
        return np.asarray(result.images[0].convert("RGB"))

    return Route("(a) client → Triton (gRPC)", call, image)


def through_gateway(session: requests.Session, gateway_url: str, request: dict[str, Any]) -> Route:
    """(b) A1111's txt2img through sd-gateway over HTTP, one keep-alive connection (as A1111 clients hold
    one). Timed to the parsed JSON: decoding the PNG is the client's own work."""
    url = f"{gateway_url}/sdapi/v1/txt2img"

    def call() -> dict[str, Any]:
        response = session.post(url, json=request, timeout=3600)
        response.raise_for_status()
        answer: dict[str, Any] = response.json()
        return answer

    def image(answer: dict[str, Any]) -> np.ndarray:
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB"))

    return Route("(b) HTTP → sd-gateway → Triton (gRPC)", call, image)


def measure(routes: list[Route], repeats: int) -> bool:
    """One warm-up call each, then `repeats` rounds of one timed call each, the order alternating (a b, b a,
    ...) so that neither always runs first after the pause; a burst of load hits both alike. Returns
    whether the two warm-up answers hold the same image."""
    first, second = (r.image(r.call()) for r in routes)
    for n in range(repeats):
        for route in routes if n % 2 == 0 else routes[::-1]:
            time.sleep(SETTLE_S)
            started = time.perf_counter()
            route.call()
            route.latencies_s.append(time.perf_counter() - started)
    return np.array_equal(first, second)


@contextlib.contextmanager
def gateway_process(triton_url: str) -> Any:
    """`sd-gateway` on a free port, its own process (it shares no CPU time slice with this one); yields its
    URL."""
    [port] = free_ports(1)
    command = [sys.executable, "-m", "services.gateway.cli", "--triton-url", triton_url, "--port", str(port)]
    process = subprocess.Popen([*command, "--log-level", "warning"], stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                requests.get(f"{url}/openapi.json", timeout=1).raise_for_status()
                break
            except requests.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    sys.exit(f"perf.gateway_overhead: sd-gateway did not start (exit code {process.poll()})")
                time.sleep(0.1)
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


def report(args: argparse.Namespace, routes: list[Route], same_image: bool, target: float | None) -> str:
    a, b = routes
    overhead = b.median_s / a.median_s - 1
    # Per round: b − a of the same round, which cancels load that lasted the round.
    diffs = [tb - ta for ta, tb in zip(a.latencies_s, b.latencies_s, strict=True)]
    diff_median = statistics.median(diffs)
    q1, q3 = percentile(diffs, 25), percentile(diffs, 75)
    spread = (percentile(a.latencies_s, 75) - percentile(a.latencies_s, 25)) / a.median_s
    source = f"checkpoint `{args.checkpoint}`" if args.checkpoint else f"Triton at {args.triton_url}"
    scheduler = checkpoint_scheduler(args.checkpoint) if args.checkpoint else "the model's default"
    lines = [
        f"# perf.gateway_overhead: {args.checkpoint.name if args.checkpoint else args.triton_url}, "
        f"{args.size}×{args.size}, {args.steps} steps",
        "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine().items()),
        "",
        f"Settings: {source}; prompt {args.prompt!r}, negative prompt '', seed {args.seed}, "
        f"{args.size}×{args.size}, {args.steps} steps, guidance {args.guidance}, scheduler {scheduler}; "
        f"1 image per call; 1 warm-up call each, then {args.repeats} rounds of one timed call per path "
        f"(order alternating, {SETTLE_S} s apart); (b) timed to the parsed JSON.",
        "",
        "| path | median s | p90 s | min s | max s | timed calls (s) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for p in routes:
        calls = ", ".join(f"{t:.3f}" for t in p.latencies_s)
        lines.append(
            f"| {p.name} | {p.median_s:.4f} | {p.p90_s:.4f} | {min(p.latencies_s):.4f} | "
            f"{max(p.latencies_s):.4f} | {calls} |"
        )
    if target is None:
        verdict = "no target given"
    elif overhead <= target:
        verdict = f"target ≤ {target:.0%}: met"
    else:
        verdict = f"target ≤ {target:.0%}: **missed** by {overhead - target:.1%}"
    lines += [
        "",
        f"- gateway overhead, median (b) ÷ median (a) − 1: **{overhead:+.2%}** ({verdict})",
        f"- p90 (b) ÷ p90 (a) − 1: {b.p90_s / a.p90_s - 1:+.2%}",
        f"- per round, (b) − (a): median {diff_median * 1000:+.1f} ms "
        f"({diff_median / a.median_s:+.2%} of (a)'s median), interquartile {q1 * 1000:+.1f} to "
        f"{q3 * 1000:+.1f} ms",
        f"- noise: (a)'s own interquartile range is {spread:.1%} of its median; an overhead well inside "
        "it is not resolved by this run",
        f"- same image both ways: {'yes' if same_image else '**no**'}",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m perf.gateway_overhead", description=__doc__.split("\n\n")[0]
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="diffusers SD v1.x checkpoint: build and serve it")
    source.add_argument("--triton-url", help="a running Triton's gRPC HOST:PORT, serving the pipeline")
    parser.add_argument("--gateway-url", help="a running sd-gateway in front of it (default: start one)")
    parser.add_argument("--size", type=int, default=64, help="image side, pixels (default 64)")
    parser.add_argument("--steps", type=int, default=4, help="inference steps (default 4)")
    parser.add_argument("--repeats", type=int, default=30, help="timed calls per path (default 30)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--prompt", default="a photo of an astronaut riding a horse on mars")
    parser.add_argument(
        "--target",
        type=float,
        help=f"overhead judged against, as a fraction (default with --checkpoint: {TARGET_FULL_SIZE} for "
        f"SD v1's architecture, {TARGET_TINY} otherwise; none with --triton-url)",
    )
    parser.add_argument(
        "--work-dir",
        type=Path,
        help="where the model repository is built (default: perf.compare's folder for the checkpoint)",
    )
    parser.add_argument("--out", type=Path, help="write the report here as Markdown")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    target = args.target
    request = {
        "prompt": args.prompt,
        "negative_prompt": "",
        "seed": args.seed,
        "steps": args.steps,
        "cfg_scale": args.guidance,
        "width": args.size,
        "height": args.size,
        "batch_size": 1,
    }
    with contextlib.ExitStack() as stack:  # stops what it started however the run ends
        triton_url = args.triton_url
        if args.checkpoint:
            args.checkpoint = args.checkpoint.resolve()
            if target is None:
                target = TARGET_FULL_SIZE if is_full_size(args.checkpoint) else TARGET_TINY
            digest = hashlib.sha256(str(args.checkpoint).encode()).hexdigest()[:8]
            work_dir = args.work_dir or default_cache_dir() / "perf" / f"{args.checkpoint.name}-{digest}"
            repo = build_repository(args.checkpoint, work_dir)
            http_port, grpc_port, metrics_port = free_ports(3)
            options = ServeOptions(
                repo.resolve(), http_port=http_port, grpc_port=grpc_port, metrics_port=metrics_port
            )
            stack.enter_context(TritonProcess(options, echo_log=False)).wait_ready(timeout=900)
            triton_url = f"127.0.0.1:{grpc_port}"
        gateway_url = args.gateway_url or stack.enter_context(gateway_process(triton_url))
        client = stack.enter_context(StableDiffusionClient(triton_url))
        session = stack.enter_context(requests.Session())
        routes = [direct(client, request), through_gateway(session, gateway_url, request)]
        same_image = measure(routes, args.repeats)
    for p in routes:
        print(f"perf.gateway_overhead: {p.name}: median {p.median_s:.4f} s, p90 {p.p90_s:.4f} s")
    text = report(args, routes, same_image, target)
    publish(text, args.out, "perf.gateway_overhead")
    return 0


if __name__ == "__main__":
    sys.exit(main())
