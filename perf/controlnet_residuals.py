"""What taking ControlNet residuals costs a UNet call that has none, ONNX Runtime on CPU: one run, one
machine, the variants interleaved (issue 16: a request without ControlNet may pay at most 3%).

    python -m perf.controlnet_residuals --checkpoint DIR [--size 512] [--batch 2] [--rounds 5]
                                        [--work-dir DIR] [--out FILE.md]

Exports (or reuses) the checkpoint's plain UNet graph and the graph that adds ControlNet residuals to the
skip connections and middle block (build_engines.controlnet), opens both with the engines' session options
and times one UNet call per variant per round:

    (a) the plain graph       (b) the residual graph fed zero residuals: a batch where no row has ControlNet
    (c) the residual graph fed random residuals (what a ControlNet request's UNet call costs, for reference)

A --work-dir shared with perf.lora_branch reuses its plain graph (`plain/`). See perf/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from perf.compare import SETTLE_S, is_full_size, machine, publish
from perf.lora_branch import TEXT_TOKENS, Variant, base_feed, measure, onnx_bytes, open_session, percentile

BUDGET = 0.03  # issue 16: at full size, 256 and 512 px
PLAIN, CONTROLLED = "plain", "controlled"


def export(checkpoint: Path, work_dir: Path) -> dict[str, Path]:
    """The plain and residual UNet graphs (reused when up to date), by name."""
    from build_engines.controlnet import export_controlled_unet
    from build_engines.digests import digest_folder
    from build_engines.onnx_export import ModuleLoader, export_engine, read_geometry
    from python_backend.shapes import UNET, engine_specs

    geometry = read_geometry(checkpoint)
    digest = digest_folder(checkpoint / "unet")
    loader = ModuleLoader(checkpoint)
    started = time.perf_counter()
    plain = export_engine(engine_specs(geometry)[UNET], lambda: loader.module(UNET), digest, work_dir / PLAIN)
    controlled = export_controlled_unet(loader, geometry, digest, work_dir / CONTROLLED, "fp32")
    print(
        f"perf.controlnet_residuals: graphs {'reused' if plain.reused else 'exported'}, "
        f"{'reused' if controlled.reused else 'exported'} ({time.perf_counter() - started:.0f} s)",
        flush=True,
    )
    return {PLAIN: plain.path, CONTROLLED: controlled.path}


def variants(geometry: Any, base: dict[str, np.ndarray]) -> list[Variant]:
    from python_backend.shapes import control_residuals, with_scaled_latents

    batch, latent = base["sample"].shape[0], base["sample"].shape[2]
    sizes = with_scaled_latents({"guided_batch": batch, "latent_height": latent, "latent_width": latent})
    rng = np.random.default_rng(1)
    zeros, noise = {}, {}
    for t in control_residuals(geometry):
        shape = tuple(sizes[d] if isinstance(d, str) else d for d in t.dims)
        zeros[t.name] = np.zeros(shape, np.float32)
        noise[t.name] = rng.standard_normal(shape, dtype=np.float32) * 0.1
    return [
        Variant("a", "plain UNet graph", base, PLAIN),
        Variant("b", "residual graph, zero residuals (no row has ControlNet)", {**base, **zeros}, CONTROLLED),
        Variant("c", "residual graph, random residuals (a ControlNet row)", {**base, **noise}, CONTROLLED),
    ]


def report(
    args: argparse.Namespace, runs: list[Variant], diffs: dict[str, float], files: dict[str, int]
) -> str:
    a, b = runs[0], runs[1]
    full = is_full_size(args.checkpoint)
    latent = args.size // 8
    overhead = b.median_s / a.median_s - 1
    paired = [tb / ta - 1 for ta, tb in zip(a.latencies_s, b.latencies_s, strict=True)]
    spread = (percentile(a.latencies_s, 75) - percentile(a.latencies_s, 25)) / a.median_s
    within = overhead <= BUDGET
    residual_bytes = sum(x.nbytes for k, x in b.feed.items() if k not in a.feed)
    lines = [
        f"# perf.controlnet_residuals: {args.checkpoint.name}, UNet at {args.size}×{args.size} px, "
        f"batch {args.batch}",
        "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine().items()),
        "",
        f"Settings: checkpoint `{args.checkpoint}` ({'SD v1 architecture' if full else 'not SD v1 size'}); "
        f"one UNet call: batch {args.batch}, latent {latent}×{latent}, text {TEXT_TOKENS} tokens; ONNX "
        "Runtime CPU with the served engines' session options; 1 warm-up call each, then "
        f"{args.rounds} rounds of one timed call per variant (order rotating, {SETTLE_S} s apart). ONNX "
        "files: " + ", ".join(f"{name} {n / 2**20:.0f} MiB" for name, n in files.items()) + ".",
        "",
        "| variant | median s | ÷ (a) − 1 | min s | max s | timed calls (s) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for v in runs:
        calls = ", ".join(f"{t:.3f}" for t in v.latencies_s)
        lines.append(
            f"| ({v.key}) {v.name} | {v.median_s:.3f} | {v.median_s / a.median_s - 1:+.2%} | "
            f"{min(v.latencies_s):.3f} | {max(v.latencies_s):.3f} | {calls} |"
        )
    verdict = f"within the {BUDGET:.0%} budget" if within else f"**over** the {BUDGET:.0%} budget"
    lines += [
        "",
        f"- no-ControlNet cost, median (b) ÷ median (a) − 1: **{overhead:+.2%}** ({verdict}"
        + ("" if full else "; the budget is judged at full size only")
        + ")",
        f"- per round, (b) ÷ (a) − 1 of the same round: median {statistics.median(paired):+.2%}, "
        f"interquartile {percentile(paired, 25):+.2%} to {percentile(paired, 75):+.2%}",
        f"- noise: (a)'s own interquartile range is {spread:.1%} of its median",
        f"- (b)'s output vs (a)'s: max abs difference {diffs['b']:.1e}",
        f"- residual inputs per call: {residual_bytes / 2**20:.1f} MiB",
        "",
    ]
    return "\n".join(lines) + "\n"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m perf.controlnet_residuals", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--checkpoint", type=Path, required=True, help="diffusers SD v1.x checkpoint folder")
    parser.add_argument("--size", type=int, default=512, help="image side, pixels (default 512)")
    parser.add_argument(
        "--batch", type=int, default=2, help="UNet rows per call (default 2: one guided image)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per variant (default 5)")
    parser.add_argument(
        "--work-dir", type=Path, help="where the graphs go (default: under ~/.cache/sd-triton/perf)"
    )
    parser.add_argument("--out", type=Path, help="write the report here as Markdown")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.checkpoint = args.checkpoint.resolve()
    digest = hashlib.sha256(str(args.checkpoint).encode()).hexdigest()[:8]
    from services.serve import default_cache_dir

    work_dir = args.work_dir or default_cache_dir() / "perf" / f"{args.checkpoint.name}-{digest}-unet-graphs"
    paths = export(args.checkpoint, work_dir)
    files = {name: onnx_bytes(path) for name, path in paths.items()}

    from build_engines.onnx_export import read_geometry

    geometry = read_geometry(args.checkpoint)
    runs = variants(geometry, base_feed(geometry, args.batch, args.size // 8))
    sessions = {name: open_session(path) for name, path in paths.items()}
    diffs = measure(sessions, runs, args.rounds, label="perf.controlnet_residuals")
    text = report(args, runs, diffs, files)
    publish(text, args.out, "perf.controlnet_residuals")
    return 0


if __name__ == "__main__":
    sys.exit(main())
