"""perf.compare --controlnets: ControlNet units served vs diffusers' ControlNet pipeline; one run and machine.

    python -m perf.compare --checkpoint DIR --controlnets 0,1,2 [--size 64] [--steps 4] [--repeats 3]
                           [--out FILE.md]

Writes two random ControlNets for the checkpoint's UNet into the work folder (kept there for later runs),
builds the repository with `--controlnet cn0=... --controlnet cn1=...` (seeded with a copy of the plain
repository's exports when perf.compare made one before), starts the server, and for each k times the same
request with the first k units (weights WEIGHTS, control maps made from fixed seeds at the request's size,
"Just Resize"):

    (a) diffusers eager: StableDiffusionControlNetPipeline with those k ControlNets, images and scales
        (k = 0: the plain StableDiffusionPipeline); a fresh pipeline per k
    (c) our pipeline served by Triton, the request with the k units

interleaved as perf.compare's contestants (one warm-up call each, then --repeats rounds; medians). The served
image must be within 2/255 of diffusers', else the exit code is 1. k = 0 on this repository is a request
without ControlNet on a ControlNet-capable server: its UNet takes zero residuals. The report also says how far
the units moved the served image from the k = 0 one, and the machine's 1-minute load average at the start,
after each k and at the end (timings taken under load from elsewhere are not comparable).

A mode of its own, as --loras: the in-process core is not measured (diffusers with two full-size ControlNets
and the server with theirs already hold two copies of ≈ 6 GB of weights), nor throughput.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import gc
import io
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from build_engines.controlnet import V1_EMBEDDING_WIDTHS, write_tiny_controlnet
from perf.compare import (
    SETTLE_S,
    TOLERANCE,
    Measurement,
    Settings,
    _diffusers_call,
    build_repository,
    checkpoint_scheduler,
    count_rows,
    is_full_size,
    machine,
    measure,
    publish,
    served_call,
    start_server,
)

if TYPE_CHECKING:
    from PIL import Image

    from client import ControlNetUnit

# A request's i-th unit: its ControlNet is cn{i}, its weight WEIGHTS[i], its control map made from seed i + 1.
WEIGHTS = (0.8, 0.5)
MAX_CONTROLNETS = len(WEIGHTS)
# In the work folder, beside perf.compare's plain "repository":
CONTROLNET_REPOSITORY = "repository-controlnet"
CONTROLNET_FOLDER = "controlnets"


@dataclass(frozen=True)
class ControlNet:
    name: str  # as built: build-engines --controlnet NAME=DIR, engine controlnet_NAME
    folder: Path  # diffusers ControlNetModel folder
    weight: float
    image_seed: int


@dataclass
class ControlNetRun:
    """One unit count: (a) diffusers' ControlNet pipeline, (c) served with the units."""

    controlnets: list[ControlNet]
    diffusers: Measurement
    served: Measurement
    load_after: float  # 1-minute load average once the count's timed calls ended

    @property
    def count(self) -> int:
        return len(self.controlnets)


def parse_counts(text: str) -> list[int]:
    """--controlnets: distinct unit counts, each 0..MAX_CONTROLNETS, in the order given."""
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or len(set(counts)) != len(counts) or not all(0 <= k <= MAX_CONTROLNETS for k in counts):
        raise ValueError(
            f"--controlnets: distinct counts from 0 to {MAX_CONTROLNETS}, comma-separated, got {text!r}"
        )
    return counts


def load_average() -> float:
    """The machine's 1-minute load average."""
    return os.getloadavg()[0]


def write_controlnets(checkpoint: Path, folder: Path) -> list[ControlNet]:
    """cn0, cn1, ... (seeds 0, 1, ...) in `folder`, written once: a folder there is complete (renamed into
    place when written) and kept, so that the repository's exports of them stay up to date."""
    controlnets = []
    for i, weight in enumerate(WEIGHTS):
        out = folder / f"cn{i}"
        if not out.is_dir():
            folder.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryDirectory(dir=folder) as tmp:
                write_tiny_controlnet(Path(tmp) / "cn", checkpoint, seed=i)
                (Path(tmp) / "cn").rename(out)
        controlnets.append(ControlNet(out.name, out, weight, image_seed=i + 1))
    return controlnets


def control_image(size: int, seed: int) -> Image.Image:
    """A size × size control map: 8 × 8 random black and white blocks (sharp edges, as a canny map has)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 2, (8, 8), dtype=np.uint8) * 255
    pixels = np.kron(blocks, np.ones((-(-size // 8),) * 2, np.uint8))[:size, :size]
    return Image.fromarray(np.repeat(pixels[:, :, None], 3, axis=2))


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def controlnet_repository(checkpoint: Path, work_dir: Path, controlnets: list[ControlNet]) -> Path:
    """The checkpoint's repository built with every ControlNet; a first build copies the plain repository's
    exports (text encoder, VAE)."""
    repo, plain = work_dir / CONTROLNET_REPOSITORY, work_dir / "repository"
    if not repo.exists() and plain.is_dir():
        shutil.copytree(plain, repo, ignore=shutil.ignore_patterns("__pycache__"))
    args = [a for net in controlnets for a in ("--controlnet", f"{net.name}={net.folder}")]
    return build_repository(checkpoint, work_dir, CONTROLNET_REPOSITORY, *args)


def diffusers_controlnet(s: Settings, controlnets: list[ControlNet]) -> Measurement:
    """(a) StableDiffusionControlNetPipeline with `controlnets` (one: the model itself; several: a list, which
    diffusers runs as a MultiControlNetModel), their control maps and weights; none: the plain pipeline."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, StableDiffusionPipeline

    name = f"diffusers eager, {len(controlnets)} ControlNet(s)"
    if not controlnets:
        pipe = StableDiffusionPipeline.from_pretrained(s.checkpoint, safety_checker=None)
        pipe.set_progress_bar_config(disable=True)
        return Measurement("a", name, _diffusers_call(pipe, s))
    nets = [ControlNetModel.from_pretrained(net.folder) for net in controlnets]
    images = [control_image(s.size, net.image_seed) for net in controlnets]
    weights = [net.weight for net in controlnets]
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        s.checkpoint, controlnet=nets if len(nets) > 1 else nets[0], safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    one = len(nets) == 1
    call = _diffusers_call(
        pipe,
        s,
        image=images[0] if one else images,
        controlnet_conditioning_scale=weights[0] if one else weights,
    )
    return Measurement("a", name, call)


def units(s: Settings, controlnets: list[ControlNet]) -> tuple[ControlNetUnit, ...]:
    """The served request's ControlNet units: each map at the request's size, "Just Resize" (so the map the
    server makes is the image), module "none", Balanced, the whole pass."""
    from client import ControlNetUnit as Unit

    return tuple(
        Unit(
            net.name,
            _png(control_image(s.size, net.image_seed)),
            weight=net.weight,
            resize_mode="Just Resize",
        )
        for net in controlnets
    )


@dataclass
class Results:
    controlnets: list[ControlNet]  # the ControlNets written and built, in unit order
    runs: list[ControlNetRun]  # one per unit count
    server_pss: int  # bytes, after the last count's timed calls
    load_start: float  # 1-minute load averages
    load_end: float


def run(s: Settings, counts: list[int], work_dir: Path) -> Results:
    from client import StableDiffusionClient

    load_start = load_average()
    controlnets = write_controlnets(s.checkpoint, work_dir / CONTROLNET_FOLDER)
    repo = controlnet_repository(s.checkpoint, work_dir, controlnets)
    runs: list[ControlNetRun] = []
    with contextlib.ExitStack() as stack:  # stops the server however the run ends
        url, pid = start_server(repo, stack)
        client = stack.enter_context(StableDiffusionClient(url))
        for k in counts:
            nets = controlnets[:k]
            a = diffusers_controlnet(s, nets)
            c = Measurement(
                "c",
                "ours served",
                functools.partial(served_call, client, s, s.prompt, controlnets=units(s, nets)),
                server_pid=pid,
            )
            measure([a, c], s.repeats)
            a.call = c.call = None  # this count's diffusers pipeline goes before the next one's is loaded
            gc.collect()
            runs.append(ControlNetRun(nets, a, c, load_average()))
            print(
                f"perf.compare: {k} ControlNet(s): (a) {a.median_s:.3f} s, (c) {c.median_s:.3f} s, "
                f"load average {runs[-1].load_after:.2f}",
                flush=True,
            )
    return Results(controlnets, runs, runs[-1].served.server_pss, load_start, load_average())


def report(s: Settings, results: Results) -> tuple[str, bool]:
    """The Markdown report and whether every served image matched diffusers' within TOLERANCE."""
    runs = results.runs
    load_after = {"load average after": lambda r: f"{r.load_after:.2f}"}
    rows, parity_ok = count_rows(runs, "ControlNet", "diffusers", load_after)
    cores = len(os.sched_getaffinity(0))
    lines = [
        f"# perf.compare --controlnets: {s.checkpoint.name}, {s.size}×{s.size}, {s.steps} steps",
        "",
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine().items()),
        "",
        f"Load: 1-minute load average {results.load_start:.2f} at the start, "
        f"{results.load_end:.2f} at the end "
        f"({cores} usable cores; the start's comes from other processes; the run itself keeps up to "
        f"{cores} threads busy, so a load well above {cores} later means others competed for the cores)",
        "",
        f"Settings: checkpoint `{s.checkpoint}`; prompt {s.prompt!r}, negative prompt '', seed {s.seed}, "
        f"{s.size}×{s.size}, {s.steps} steps, guidance {s.guidance}, "
        f"scheduler {s.scheduler or checkpoint_scheduler(s.checkpoint) + ' (the checkpoint’s)'}; 1 image per "
        f"call; per unit count 1 warm-up call each, then {s.repeats} rounds of one timed call per contestant "
        f"(interleaved, {SETTLE_S} s apart); medians. Repository built with "
        + " ".join(f"`--controlnet {net.name}=…`" for net in results.controlnets)
        + ".",
        "",
        "ControlNets: random, "
        + (
            f"SD v1 ControlNet architecture (control-image encoder {V1_EMBEDDING_WIDTHS})"
            if is_full_size(s.checkpoint)
            else "sd-tiny-controlnet's"
        )
        + ", seeds 0, 1; the k-unit request has the first k of "
        + ", ".join(
            f"`{net.name}` (weight {net.weight:g}, map seed {net.image_seed})" for net in results.controlnets
        )
        + f'; each control map {s.size}×{s.size} black and white blocks, `resize_mode="Just Resize"`, '
        "Balanced, the whole pass. (a) runs diffusers' StableDiffusionControlNetPipeline with the same "
        "ControlNets, maps and weights (`controlnet_conditioning_scale`).",
        "",
        *rows,
        "",
    ]
    if any(r.count == 0 for r in runs):
        lines.append(
            "- 0 ControlNets: a request without a unit on a ControlNet-capable server (its UNet takes zero "
            "residuals), against diffusers' plain StableDiffusionPipeline; compare with (c) of perf.compare "
            "on the plain repository"
        )
    lines += [
        "- each unit runs its ControlNet on the guided batch at every step, in both contestants",
        f"- server memory, PSS after the timed calls summed over tritonserver and its stubs: "
        f"{results.server_pss / 2**20:,.1f} MiB",
        f"- served images within {TOLERANCE}/255 of diffusers': {'yes' if parity_ok else '**NO**'}",
    ]
    return "\n".join(lines) + "\n", parity_ok


def main(s: Settings, counts: list[int], work_dir: Path, out: Path | None) -> int:
    text, parity_ok = report(s, run(s, counts, work_dir))
    publish(text, out, "perf.compare")
    if not parity_ok:
        print(
            f"perf.compare: served ControlNet images differ from diffusers' by > {TOLERANCE}/255",
            file=sys.stderr,
        )
    return 0 if parity_ok else 1
