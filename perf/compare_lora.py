"""perf.compare --loras: LoRA per request served vs diffusers with the same LoRAs fused; one run, one machine.

    python -m perf.compare --checkpoint DIR --loras 0,1,3 [--lora-rank 16] [--size 64] [--steps 4]
                           [--repeats 3] [--concurrency 4] [--rounds 3] [--out FILE.md]

Writes max(k) random kohya LoRA files (LoCon convs included) for the checkpoint into the work folder, as
sd-tiny-lora does (build_engines.tiny_checkpoint.write_tiny_lora), builds the repository with `--lora`
(seeded with a copy of the plain repository's exports when perf.compare made one before), starts the server
with that folder as `--lora-dir`, and for each k times the same request with k `<lora:NAME:MULT>` tags:

    (a) diffusers' StableDiffusionPipeline, eager, with those k LoRAs loaded and fused into its weights
        (separate text-encoder and UNet multipliers; a fresh pipeline per k), on the prompt without tags
    (c) our pipeline served by Triton, the prompt with the tags (the LoRAs applied as per-row branches)

interleaved as perf.compare's contestants (one warm-up call each, then --repeats rounds; medians). The served
image must be within 2/255 of diffusers' fused one, else the exit code is 1. k = 0 on this repository is what
a request without LoRA pays on a LoRA-capable server. Then served throughput at --concurrency: every client
with one shared LoRA set vs each client a set of its own (mixed). See perf/README.md.

A mode of its own (not added to perf.compare's contestants): the --lora server holds a second copy of the
UNet's weights, and the in-process core with LoRA a third and fourth; beside diffusers that does not fit the
full-size architecture in 24 GB. The in-process core is therefore not measured here.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import gc
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

from perf.compare import (
    SETTLE_S,
    TOLERANCE,
    Measurement,
    Settings,
    _diffusers_call,
    build_repository,
    checkpoint_scheduler,
    count_rows,
    machine,
    measure,
    publish,
    served_call,
    served_many,
    start_server,
    throughput,
)

# (text-encoder, UNet) multipliers of a request's i-th LoRA: distinct, one negative, one with the two apart.
MULTIPLIERS = ((0.8, 0.8), (-0.5, -0.5), (0.4, 0.7), (0.6, 0.6), (0.3, -0.4))
MAX_LORAS = len(MULTIPLIERS)
LORA_REPOSITORY = "repository-lora"  # in the work folder, beside perf.compare's plain "repository"
LORA_FOLDER = "loras"


@dataclass(frozen=True)
class Lora:
    name: str  # the file's stem, as prompts name it
    file: Path
    te: float
    unet: float

    @property
    def tag(self) -> str:
        multipliers = f"{self.te:g}" if self.te == self.unet else f"{self.te:g}:{self.unet:g}"
        return f"<lora:{self.name}:{multipliers}>"


@dataclass
class LoraRun:
    """One LoRA count: (a) diffusers with them fused, (c) served with their tags."""

    loras: list[Lora]
    prompt: str  # served (c)'s, with the tags
    diffusers: Measurement
    served: Measurement

    @property
    def count(self) -> int:
        return len(self.loras)


def parse_counts(text: str) -> list[int]:
    """--loras: distinct LoRA counts, each 0..MAX_LORAS, in the order given."""
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or len(set(counts)) != len(counts) or not all(0 <= k <= MAX_LORAS for k in counts):
        raise ValueError(f"--loras: distinct counts from 0 to {MAX_LORAS}, comma-separated, got {text!r}")
    return counts


def write_loras(checkpoint: Path, folder: Path, count: int, rank: int) -> list[Lora]:
    """`count` random kohya LoRA files for the checkpoint (seeds 0, 1, ...), with MULTIPLIERS in order."""
    from build_engines.tiny_checkpoint import write_tiny_lora

    loras = []
    for i, (te, unet) in enumerate(MULTIPLIERS[:count]):
        file = write_tiny_lora(folder / f"perf_lora_{i}.safetensors", checkpoint, "kohya", rank=rank, seed=i)
        loras.append(Lora(file.stem, file, te, unet))
    return loras


def tagged(prompt: str, loras: list[Lora]) -> str:
    return " ".join([prompt, *(lora.tag for lora in loras)])


def lora_repository(checkpoint: Path, work_dir: Path) -> Path:
    """The checkpoint's repository built with --lora; a first build copies the plain repository's exports."""
    repo, plain = work_dir / LORA_REPOSITORY, work_dir / "repository"
    if not repo.exists() and plain.is_dir():
        shutil.copytree(plain, repo, ignore=shutil.ignore_patterns("__pycache__"))
    return build_repository(checkpoint, work_dir, LORA_REPOSITORY, "--lora")


def diffusers_fused(s: Settings, loras: list[Lora]) -> Measurement:
    """(a) with `loras` fused: load_lora_weights, set_adapters with each one's te/unet multipliers, fuse_lora,
    then unload_lora_weights (which keeps the fused weights), as tests/test_lora_serving.py's reference."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(s.checkpoint, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    if loras:
        names = [lora.name for lora in loras]
        for lora in loras:
            pipe.load_lora_weights(str(lora.file), adapter_name=lora.name)
        pipe.set_adapters(names, adapter_weights=[{"text_encoder": x.te, "unet": x.unet} for x in loras])
        pipe.fuse_lora(adapter_names=names)
        pipe.unload_lora_weights()
    return Measurement("a", f"diffusers eager, {len(loras)} LoRA(s) fused", _diffusers_call(pipe, s))


def mixed_sets(loras: list[Lora], clients: int) -> list[list[Lora]]:
    """One LoRA per client, each client's set its own: the files in turn, multipliers 0.5, 0.6, ..."""
    return [
        [dataclasses.replace(loras[i % len(loras)], te=0.5 + i / 10, unet=0.5 + i / 10)]
        for i in range(clients)
    ]


@dataclass
class Results:
    loras: list[Lora]  # the files written, in tag order
    runs: list[LoraRun]  # one per LoRA count
    throughputs: dict[str, float]  # images/s, "shared" and "mixed"; empty at concurrency < 2
    server_pss: int  # bytes, after the last count's timed calls


def run(s: Settings, counts: list[int], rank: int, work_dir: Path) -> Results:
    from client import StableDiffusionClient

    loras = write_loras(s.checkpoint, work_dir / LORA_FOLDER, max(1, *counts), rank)
    repo = lora_repository(s.checkpoint, work_dir)
    runs: list[LoraRun] = []
    throughputs: dict[str, float] = {}
    with contextlib.ExitStack() as stack:  # stops the server however the run ends
        url, pid = start_server(repo, stack, work_dir / LORA_FOLDER)
        client = stack.enter_context(StableDiffusionClient(url))
        for k in counts:
            prompt = tagged(s.prompt, loras[:k])
            a = diffusers_fused(s, loras[:k])
            c = Measurement(
                "c", "ours served", functools.partial(served_call, client, s, prompt), server_pid=pid
            )
            measure([a, c], s.repeats)
            a.call = c.call = None  # the fused pipeline's weights go before the next count's are loaded
            gc.collect()
            runs.append(LoraRun(loras[:k], prompt, a, c))
            print(f"perf.compare: {k} LoRA(s): (a) {a.median_s:.3f} s, (c) {c.median_s:.3f} s", flush=True)
        if s.concurrency > 1:
            n = s.concurrency
            shared = [tagged(s.prompt, loras[:1])] * n
            mixed = [tagged(s.prompt, one) for one in mixed_sets(loras, n)]
            for name, prompts in (("shared", shared), ("mixed", mixed)):

                def many(clients: int, first_seed: int, prompts: list[str] = prompts) -> None:
                    served_many(url, s, prompts[:clients], first_seed)

                throughputs[name] = throughput(Measurement("c", name, many=many), n, s.rounds)
                print(f"perf.compare: {name} LoRA sets at concurrency {n}: {throughputs[name]:.3f} images/s")
    return Results(loras, runs, throughputs, runs[-1].served.server_pss)


def report(s: Settings, results: Results, rank: int) -> tuple[str, bool]:
    """The Markdown report and whether every served image matched diffusers' fused one within TOLERANCE."""
    loras, runs, throughputs = results.loras, results.runs, results.throughputs
    rows, parity_ok = count_rows(runs, "LoRA", "diffusers fused")
    lines = [
        f"# perf.compare --loras: {s.checkpoint.name}, {s.size}×{s.size}, {s.steps} steps",
        "",
        f"Date: {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine().items()),
        "",
        f"Settings: checkpoint `{s.checkpoint}`; prompt {s.prompt!r} plus the tags, negative prompt '', seed "
        f"{s.seed}, {s.size}×{s.size}, {s.steps} steps, guidance {s.guidance}, "
        f"scheduler {s.scheduler or checkpoint_scheduler(s.checkpoint) + ' (the checkpoint’s)'}; 1 image per "
        f"call; per LoRA count 1 warm-up call each, then {s.repeats} rounds of one timed call per contestant "
        f"(interleaved, {SETTLE_S} s apart); medians. Repository built with `--lora`, served with "
        "`--lora-dir`.",
        "",
        f"LoRA files: random kohya LoRAs (sd-tiny-lora's, LoCon convs included), rank {rank} (3x3 convs "
        f"rank {max(1, rank // 2)}), seeds 0, 1, ...; the k-LoRA request's tags are the first k of "
        + ", ".join(f"`{lora.tag}`" for lora in loras)
        + ". (a) fuses the same files with the same text-encoder and UNet multipliers.",
        "",
        *rows,
        "",
    ]
    if any(r.count == 0 for r in runs):
        lines.append(
            "- 0 LoRAs: a request without LoRA on a LoRA-capable server (its UNet runs take the plain graph "
            "unless batched with LoRA rows); compare with (c) of perf.compare on the plain repository"
        )
    lines.append(
        "- diffusers with LoRAs fused runs the base architecture: its time should not change with the count; "
        "ours applies each LoRA as a low-rank branch at every step"
    )
    if throughputs:
        shared, mixed = throughputs["shared"], throughputs["mixed"]
        lines.append(
            f"- served throughput at concurrency {s.concurrency}: one shared LoRA set "
            f"(`{loras[0].tag}` in every request) {shared:.3f} images/s, "
            f"mixed (each client one LoRA set of its own: "
            + ", ".join(f"`{x[0].tag}`" for x in mixed_sets(loras, s.concurrency))
            + f") {mixed:.3f} images/s: **mixed ÷ shared {mixed / shared:.2f}×** ({s.rounds} one-image "
            "requests per client after a warm-up round, distinct seeds)"
        )
    lines += [
        f"- server memory, PSS after the timed calls summed over tritonserver and its stubs: "
        f"{results.server_pss / 2**20:,.1f} MiB",
        f"- served images within {TOLERANCE}/255 of diffusers' with the LoRAs fused: "
        f"{'yes' if parity_ok else '**NO**'}",
    ]
    return "\n".join(lines) + "\n", parity_ok


def main(s: Settings, counts: list[int], rank: int, work_dir: Path, out: Path | None) -> int:
    text, parity_ok = report(s, run(s, counts, rank, work_dir), rank)
    publish(text, out, "perf.compare")
    if not parity_ok:
        print(
            f"perf.compare: served LoRA images differ from diffusers' fused ones by > {TOLERANCE}/255",
            file=sys.stderr,
        )
    return 0 if parity_ok else 1
