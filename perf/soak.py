"""Soak: `sd-serve` under concurrent random requests, a share of them malformed, for a fixed time.

    python -m perf.soak --repository REPO --concurrency 8 --duration 600 --malformed 0.25 \
        --sizes 64,96,128 --out perf/results/soak-tiny.md

Starts `sd-serve` on REPO (the real launcher, supervision included), sends requests from `concurrency`
threads (each its own gRPC channel) until `duration` seconds have passed, then stops the server with
SIGTERM as an orchestrator would. Valid requests draw size, steps, scheduler, guidance and image count
at random; malformed ones (every `1/malformed`-th on average) are each a different kind of bad input.
A share `interrupts` of the valid ones carry a job id and are stopped through `pipeline_control` after a
random delay: they must still answer with their images (interrupted, or done before the stop). With
`--lora-dir` (a repository built with `build-engines --lora`), a share `loras` of the valid prompts carry
one or two `<lora:...>` tags of that folder's files at random multipliers, so that the engines' LoRA caches
and mixed-set batches are soaked too. On a repository built with `build-engines --controlnet`, a share
`controlnets` of the valid requests carry one or two ControlNet units (random control maps, weights, windows,
modes and preprocessors), and malformed ones bad units.

It fails (exit 1) on any of: a valid request that did not succeed, a malformed one not answered
INVALID_ARGUMENT, an interrupted one answering anything but its images, a job left marked running,
sd-serve restarting or reloading anything (a process died), a crash in the kernel log
(a segfault of tritonserver or a stub), sd-serve not exiting 0 on SIGTERM, a process left behind, or
server memory growing more than `max_growth` between the end of the warm-up and the end of the run (the
private memory, USS, of tritonserver and its stubs: their PSS, also reported, moves whenever another
process maps the same libraries). Prints errors by status, p50/p99 latency, images/s and memory over
time, and writes them to `out` (Markdown, with the JSON beside it).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import datetime
import io
import json
import math
import os
import queue
import random
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from client.api import CONTROL_MODEL, triton_inputs
from python_backend.control import CONTROL_MODES, unit_inputs
from python_backend.request import CONTROL_INPUTS, REQUEST_INPUTS
from python_backend.shapes import JOBS_DIR_ENV, PIPELINE, PIPELINE_MANIFEST, PipelineManifest
from services import supervisor
from tests.triton_server import TritonServer

SCHEDULERS = ("pndm", "ddim", "euler", "Euler a", "DPM++ 2M Karras", "unipc", "lms", "heun")
# Each a different way to get it wrong: (what, the inputs to change).
MALFORMED: tuple[tuple[str, dict[str, Any]], ...] = (
    ("width not a multiple of 8", {"width": 65}),
    ("zero steps", {"num_inference_steps": 0}),
    ("NaN guidance", {"guidance_scale": float("nan")}),
    ("unknown scheduler", {"scheduler": "no-such-sampler"}),
    ("too many images", {"num_images": 99}),
    ("invalid UTF-8 prompt", {"prompt": b"\xff\xfe a cat"}),
    ("negative seed", {"seed": -5}),
    ("image that is not an image", {"image": b"not a png at all"}),
    ("job id that is not a file name", {"job_id": "../../etc/passwd"}),
    ("unknown LoRA", {"prompt": "a cat <lora:no-such-lora:1>"}),
    ("LoRA multiplier not a number", {"prompt": "a cat <lora:any:abc>"}),
    ("unknown ControlNet", {"controlnet_0_model": "no-such-controlnet", "controlnet_0_image": b"x"}),
    ("ControlNet unit without its image", {"controlnet_0_model": "any", "controlnet_0_weight": 0.5}),
)
INPUT_TYPES = REQUEST_INPUTS | CONTROL_INPUTS | unit_inputs(8)
CONTROL_MODULES = ("none", "canny", "invert")


@dataclass
class SoakSettings:
    repository: Path
    concurrency: int = 8
    duration_s: float = 600.0
    malformed: float = 0.25  # share of requests that are malformed
    interrupts: float = 0.1  # share of valid requests stopped early through pipeline_control
    sizes: tuple[int, ...] = (64, 96, 128)
    max_steps: int = 12
    max_images: int = 2
    warmup_s: float = 30.0  # memory growth: the last quarter of the samples after it vs the first
    max_growth: float = 0.05
    memory_every_s: float = 5.0
    grace_period_s: float = 60.0
    seed: int = 0
    lora_dir: Path | None = None  # sd-serve --lora-dir; its files' stems are drawn for <lora:...> tags
    loras: float = 0.3  # share of valid prompts with LoRA tags (with lora_dir)
    controlnets: float = 0.3  # share of valid requests with ControlNet units (on a --controlnet repository)


@dataclass
class SoakResult:
    settings: dict[str, Any]
    requests: dict[str, int] = field(default_factory=dict)  # "valid OK", "malformed INVALID_ARGUMENT", ...
    failures: list[str] = field(default_factory=list)  # what broke the run, one line each
    latency_p50_s: float = math.nan
    latency_p99_s: float = math.nan
    images_per_s: float = 0.0
    memory: list[tuple[float, int, int]] = field(default_factory=list)  # (seconds since start, USS, PSS)
    memory_growth: float = math.nan
    exit_code: int | None = None
    examples: dict[str, str] = field(default_factory=dict)  # one error message per outcome

    @property
    def ok(self) -> bool:
        return not self.failures


def valid_request(
    rng: random.Random, s: SoakSettings, loras: Sequence[str] = (), controlnets: Sequence[str] = ()
) -> dict[str, Any]:
    prompt = rng.choice(["a red bicycle", "(a cat:1.2) on a [sofa]", "a lighthouse, BREAK, night"])
    if loras and rng.random() < s.loras:
        chosen = rng.sample(loras, rng.randint(1, min(2, len(loras))))
        prompt += "".join(f" <lora:{name}:{rng.choice([-0.5, 0.4, 1.0])}>" for name in chosen)
    units: dict[str, Any] = {}
    if controlnets and rng.random() < s.controlnets:
        for i in range(rng.randint(1, 2)):
            start = rng.choice([0.0, 0.0, 0.3])
            units |= {
                f"controlnet_{i}_model": rng.choice(controlnets),
                f"controlnet_{i}_image": control_map_png(rng, rng.choice(s.sizes)),
                f"controlnet_{i}_weight": rng.choice([0.5, 1.0, 1.5]),
                f"controlnet_{i}_guidance_start": start,
                f"controlnet_{i}_guidance_end": rng.choice([start, 0.8, 1.0]),
                f"controlnet_{i}_control_mode": rng.choice(CONTROL_MODES),
                f"controlnet_{i}_module": rng.choice(CONTROL_MODULES),
            }
    return units | {
        "prompt": prompt,
        "negative_prompt": rng.choice(["", "blurry"]),
        "width": rng.choice(s.sizes),
        "height": rng.choice(s.sizes),
        "num_inference_steps": rng.randint(1, s.max_steps),
        "guidance_scale": rng.choice([1.0, 5.0, 7.5]),
        "scheduler": rng.choice(SCHEDULERS),
        "num_images": rng.randint(1, s.max_images),
        "seed": rng.randrange(2**31),
    }


def control_map_png(rng: random.Random, side: int) -> bytes:
    """A blocky black-and-white control map, `side` pixels square (fitted to the request's size by the unit's
    resize mode)."""
    cells = np.array([[rng.choice((0, 255)) for _ in range(8)] for _ in range(8)], np.uint8)
    image = Image.fromarray(cells).resize((side, side), Image.Resampling.NEAREST).convert("RGB")
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _arrays(inputs: dict[str, Any]) -> list[tuple[str, np.ndarray]]:
    return [(name, np.array([value], dtype=INPUT_TYPES[name])) for name, value in inputs.items()]


def _failure(e: Exception) -> tuple[str, str]:
    """(status, message) of what tritonclient raised."""
    status = getattr(e, "status", lambda: None)() or type(e).__name__
    message = getattr(e, "message", lambda: None)() or str(e)
    return str(status).removeprefix("StatusCode."), message


def send(client: Any, grpc: Any, inputs: dict[str, Any]) -> tuple[str, str, int]:
    """(status, error message, images) of one request to `pipeline`."""
    try:
        result = client.infer("pipeline", triton_inputs(grpc, _arrays(inputs)))
    except Exception as e:  # InferenceServerException: its status is the outcome
        return *_failure(e), 0
    return "OK", "", len(result.as_numpy("images"))


def send_and_stop(
    client: Any, grpc: Any, inputs: dict[str, Any], job_id: str, delay_s: float
) -> tuple[str, str, int]:
    """`send` with a job id, stopped through pipeline_control after `delay_s` (until found or answered);
    status "INTERRUPTED" when the answer says it stopped early."""
    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    arrays = _arrays({**inputs, "job_id": job_id})
    client.async_infer(
        "pipeline", triton_inputs(grpc, arrays), lambda result, error: answers.put((result, error))
    )
    stop = triton_inputs(grpc, _arrays({"job_id": job_id}))
    time.sleep(delay_s)
    while answers.empty():  # a job still queued is not found yet: ask again
        try:
            if client.infer(CONTROL_MODEL, stop).as_numpy("found")[0]:
                break
        except Exception as e:
            return *_failure(e), 0
        time.sleep(0.05)
    result, error = answers.get()
    if error is not None:
        return *_failure(error), 0
    info = json.loads(result.as_numpy("info")[0])
    return "INTERRUPTED" if info.get("interrupted") else "OK", "", len(result.as_numpy("images"))


def server_memory(server_pid: int) -> tuple[int, int]:
    """(USS, PSS) of tritonserver and its python stubs, bytes: private pages, and private plus each one's
    share of the pages it shares with other processes."""
    pids = [server_pid, *(stub.pid for stub in supervisor.child_stubs(server_pid))]
    uss = pss = 0
    for pid in pids:
        with contextlib.suppress(OSError):
            fields = {
                line.split(":")[0]: int(line.split()[1]) * 1024
                for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
            }
            uss += fields.get("Private_Clean", 0) + fields.get("Private_Dirty", 0)
            pss += fields.get("Pss", 0)
    return uss, pss


def kernel_crashes(pids: set[int]) -> list[str] | None:
    """Kernel log lines reporting a segfault (or other fatal signal) of one of `pids`; None when the
    kernel log cannot be read here (it needs root or CAP_SYSLOG)."""
    try:
        fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
    except OSError:
        return None
    lines = []
    try:
        while True:
            try:
                record = os.read(fd, 8192).decode(errors="replace")
            except BlockingIOError:
                break
            except OSError:  # EPIPE: a record was overwritten while reading; go on with the next
                continue
            message = record.split(";", 1)[-1].strip()
            if ("segfault" in message or "general protection" in message or "trap" in message) and any(
                f"[{pid}]" in message for pid in pids
            ):
                lines.append(message)
    finally:
        os.close(fd)
    return lines


def run(settings: SoakSettings, log: Callable[[str], None] = print) -> SoakResult:
    import tritonclient.grpc as grpc

    s = settings
    result = SoakResult({k: str(v) if isinstance(v, Path) else v for k, v in asdict(s).items()})
    jobs_dir = Path(tempfile.mkdtemp(prefix="soak-jobs-"))
    loras = sorted(p.stem for p in s.lora_dir.rglob("*.safetensors")) if s.lora_dir else []
    controlnets = PipelineManifest.read(s.repository / PIPELINE / "1" / PIPELINE_MANIFEST).controlnets
    lora_args = [f"--lora-dir={s.lora_dir}"] if s.lora_dir else []
    server = TritonServer(
        s.repository,
        serve_args=[f"--grace-period={s.grace_period_s}", *lora_args],
        env={**os.environ, JOBS_DIR_ENV: str(jobs_dir)},  # the run's job files, to check for leftovers
    ).start()
    seen_pids: set[int] = set()
    outcomes: collections.Counter[str] = collections.Counter()
    latencies: list[float] = []
    images = 0
    lock = threading.Lock()
    started = time.monotonic()
    end = started + s.duration_s

    def client_loop(index: int) -> None:
        nonlocal images
        rng = random.Random(s.seed * 1000 + index)
        with grpc.InferenceServerClient(server.grpc_url) as client:
            while time.monotonic() < end:
                inputs = valid_request(rng, s, loras, controlnets)
                kind = "valid"
                t0 = time.monotonic()
                if rng.random() < s.malformed:
                    what, change = rng.choice(MALFORMED)
                    inputs |= change
                    kind = f"malformed ({what})"
                    status, message, count = send(client, grpc, inputs)
                elif rng.random() < s.interrupts:
                    kind = "stopped early"
                    job_id = f"soak-{index}-{rng.randrange(2**32)}"
                    status, message, count = send_and_stop(client, grpc, inputs, job_id, rng.uniform(0, 1))
                else:
                    status, message, count = send(client, grpc, inputs)
                elapsed = time.monotonic() - t0
                outcome = f"{kind} {status}"
                with lock:
                    outcomes[outcome] += 1
                    if message:
                        result.examples.setdefault(outcome, message[:300])
                    if kind == "valid" and status == "OK":
                        latencies.append(elapsed)
                        images += count
                    elif kind == "stopped early" and status in ("OK", "INTERRUPTED") and count > 0:
                        images += count
                    elif not kind.startswith("malformed") or status != "INVALID_ARGUMENT":
                        result.failures.append(f"{kind} request answered {status}: {message[:200]}")

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(s.concurrency)]
    try:
        for thread in threads:
            thread.start()
        next_sample = started
        while any(thread.is_alive() for thread in threads):
            now = time.monotonic()
            pid = server.triton_pid()
            if pid is not None:
                seen_pids |= {pid, *(stub.pid for stub in supervisor.child_stubs(pid))}
                if now >= next_sample:
                    result.memory.append((round(now - started, 1), *server_memory(pid)))
                    _, uss, pss = result.memory[-1]
                    log(
                        f"soak: {now - started:5.0f} s  {sum(outcomes.values())} requests  "
                        f"USS {uss / 2**20:.0f} MiB, PSS {pss / 2**20:.0f} MiB"
                    )
                    next_sample += s.memory_every_s
            time.sleep(0.5)
        duration = time.monotonic() - started
        result.exit_code = server.stop(s.grace_period_s + 60)
    finally:
        server.kill()
    time.sleep(0.5)  # let the kernel log catch up with the exits

    result.requests = dict(sorted(outcomes.items()))
    if latencies:
        result.latency_p50_s = statistics.median(latencies)
        result.latency_p99_s = float(np.percentile(latencies, 99))
    result.images_per_s = images / duration
    after_warmup = [uss for t, uss, _ in result.memory if t >= s.warmup_s]
    if len(after_warmup) >= 4:  # the first and last quarters' medians: one sample moves by a few %
        quarter = len(after_warmup) // 4
        first, last = statistics.median(after_warmup[:quarter]), statistics.median(after_warmup[-quarter:])
        result.memory_growth = last / first - 1
        if result.memory_growth > s.max_growth:
            result.failures.append(
                f"server memory grew {result.memory_growth:.1%} after the warm-up (limit {s.max_growth:.0%})"
            )
    result.failures += [f"sd-serve's log: {line}" for line in server_troubles(server.log())]
    crashes = kernel_crashes(seen_pids)
    if crashes is None:
        log("soak: the kernel log is not readable here: segfaults of stubs go unnoticed")
    else:
        result.failures += [f"kernel: {line}" for line in crashes]
    if result.exit_code != 0:
        result.failures.append(f"sd-serve exited with {result.exit_code} on SIGTERM (expected 0)")
    if server.left_behind:
        result.failures.append("processes of sd-serve's group outlived it")
    if left := sorted(p.name for p in jobs_dir.glob("*.running")):
        result.failures.append(f"jobs left marked running after the server stopped: {left[:5]}")
    return result


def server_troubles(log: str) -> list[str]:
    """Lines of sd-serve's output (tritonserver's log included) that say a process crashed or died."""
    signs = ("Signal (11)", "Non-graceful termination", "restarting tritonserver", "reloading it")
    return [line for line in log.splitlines() if any(sign in line for sign in signs)]


def report(result: SoakResult) -> str:
    s = result.settings
    lines = [
        f"# Soak: {s['repository']}",
        "",
        f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; concurrency {s['concurrency']}, "
        f"{s['duration_s']:g} s, {s['malformed']:.0%} malformed, {s['interrupts']:.0%} of the valid stopped "
        f"early, sizes {s['sizes']}, up to {s['max_steps']} "
        f"steps and {s['max_images']} images; {os.cpu_count()} cores.",
        "",
        f"**{'PASSED' if result.ok else 'FAILED'}**"
        + ("" if result.ok else f": {len(result.failures)} failure(s)"),
        "",
        "| outcome | requests | example message |",
        "|---|---|---|",
    ]
    lines += [f"| {k} | {n} | {result.examples.get(k, '')} |" for k, n in result.requests.items()]
    lines += [
        "",
        f"- valid requests: p50 {result.latency_p50_s:.2f} s, p99 {result.latency_p99_s:.2f} s; "
        f"{result.images_per_s:.2f} images/s",
        f"- server memory (USS, tritonserver + stubs) growth after the {s['warmup_s']:g} s warm-up: "
        f"{result.memory_growth:+.1%}",
        f"- sd-serve exit code on SIGTERM: {result.exit_code}",
        "",
        "| t (s) | USS (MiB) | PSS (MiB) |",
        "|---|---|---|",
        *(f"| {t:g} | {uss / 2**20:.0f} | {pss / 2**20:.0f} |" for t, uss, pss in result.memory),
    ]
    if result.failures:
        lines += ["", "## Failures", "", *(f"- {f}" for f in result.failures[:50])]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m perf.soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument("--concurrency", type=int, default=SoakSettings.concurrency)
    parser.add_argument("--duration", type=float, default=SoakSettings.duration_s, metavar="SECONDS")
    parser.add_argument("--malformed", type=float, default=SoakSettings.malformed, metavar="SHARE")
    parser.add_argument(
        "--interrupts",
        type=float,
        default=SoakSettings.interrupts,
        metavar="SHARE",
        help="share of valid requests stopped early through pipeline_control (default %(default)s)",
    )
    parser.add_argument("--sizes", default="64,96,128", help="image sides to draw from (default %(default)s)")
    parser.add_argument("--max-steps", type=int, default=SoakSettings.max_steps)
    parser.add_argument("--warmup", type=float, default=SoakSettings.warmup_s, metavar="SECONDS")
    parser.add_argument(
        "--lora-dir",
        type=Path,
        help="LoRA files for sd-serve --lora-dir; a share of prompts name them (the repository built with "
        "--lora)",
    )
    parser.add_argument("--loras", type=float, default=SoakSettings.loras, metavar="SHARE")
    parser.add_argument(
        "--controlnets",
        type=float,
        default=SoakSettings.controlnets,
        metavar="SHARE",
        help="share of valid requests with ControlNet units, on a repository built with --controlnet",
    )
    parser.add_argument("--out", type=Path, help="write the report here (Markdown; JSON beside it)")
    args = parser.parse_args(argv)
    settings = SoakSettings(
        args.repository,
        concurrency=args.concurrency,
        duration_s=args.duration,
        malformed=args.malformed,
        interrupts=args.interrupts,
        sizes=tuple(int(size) for size in args.sizes.split(",")),
        max_steps=args.max_steps,
        warmup_s=args.warmup,
        lora_dir=args.lora_dir,
        loras=args.loras,
        controlnets=args.controlnets,
    )
    result = run(settings)
    text = report(result)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(asdict(result), indent=2, default=str) + "\n")
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
