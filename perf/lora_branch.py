"""What the per-sample LoRA branch (build_engines.lora_branch) costs a UNet call, ONNX Runtime on CPU: one
run, one machine, every variant interleaved.

    python -m perf.lora_branch --checkpoint DIR [--size 512] [--batch 2] [--rounds 5] [--ranks 32,96]
                               [--work-dir DIR] [--out FILE.md]

Exports (or reuses) the checkpoint's plain UNet graph (build_engines.onnx_export, as build-engines does) and
its branch graph, opens both with the engines' session options, and times one UNet call per variant per
round:

    (a) the plain graph                    (b) the branch graph at R = 0: a batch where no row uses LoRA
    (c) R = 32 on every target             (d) R = 96 on every target (three rank-32 LoRAs)
    (e) R = 32 on the attention targets only, R = 0 on LoCon's (a LoRA trained without conv_dim)
    (f) the plain graph with the options that sharing weights between sessions needs (`untransformed_options`)

and measures, each in a fresh process, the resident memory of the sessions alone, together, and together
with their common weights shared (SessionOptions.add_initializer). See perf/README.md.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import hashlib
import multiprocessing
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from perf.compare import SETTLE_S, is_full_size, machine, publish

BUDGET = 0.03  # issue 15: the branch may cost a no-LoRA request at most this much, full-size, 256 and 512 px
TEXT_TOKENS = 77
# The sessions the variants run on: the plain and branch graphs, and the plain one opened with
# `untransformed_options`.
PLAIN, BRANCH, PLAIN_UNTRANSFORMED = "plain", "branch", "plain-untransformed"
SHARED_MIN_SIZE = 1024  # elements: the weights that the shared-memory probe shares


@dataclass
class Variant:
    key: str
    name: str
    feed: dict[str, np.ndarray] = field(repr=False)
    session: str  # PLAIN, BRANCH or PLAIN_UNTRANSFORMED
    latencies_s: list[float] = field(default_factory=list)

    @property
    def median_s(self) -> float:
        return statistics.median(self.latencies_s)


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def onnx_bytes(model: Path) -> int:
    return sum(f.stat().st_size for f in model.parent.glob("model.onnx*") if not f.name.endswith(".json"))


def export(checkpoint: Path, work_dir: Path) -> tuple[dict[str, Path], list[Any]]:
    """The plain and branch UNet graphs (reused when up to date), by name; the branch targets."""
    from build_engines.digests import digest_folder
    from build_engines.lora_branch import BranchedModel, export_branch
    from build_engines.onnx_export import ModuleLoader, export_engine, read_geometry
    from python_backend.shapes import UNET, engine_specs

    geometry = read_geometry(checkpoint)
    digest = digest_folder(checkpoint / "unet")
    loader = ModuleLoader(checkpoint)
    started = time.perf_counter()
    plain = export_engine(
        engine_specs(geometry)[UNET], lambda: loader.module(UNET), digest, work_dir / "plain"
    )
    print(f"perf.lora_branch: plain UNet graph {'reused' if plain.reused else 'exported'}", flush=True)
    # The plain export is done with the module first: the branch wraps the same UNet in place.
    model = BranchedModel(loader.module(UNET), "unet")
    branch = export_branch(model, engine_specs(geometry)[UNET], digest, work_dir / BRANCH)
    print(
        f"perf.lora_branch: branch UNet graph {'reused' if branch.reused else 'exported'} "
        f"({time.perf_counter() - started:.0f} s, ONNX Runtime vs torch {branch.max_abs_diff:.1e})",
        flush=True,
    )
    return {PLAIN: plain.path, BRANCH: branch.path}, model.targets  # the torch modules go with this frame


def open_session(path: Path, options: Any = None) -> Any:
    import onnxruntime as ort

    from python_backend.ort_options import session_options

    # The served engine models' options: one thread per core, no memory arena, no spinning.
    return ort.InferenceSession(
        str(path), options or session_options(spinning=False), providers=["CPUExecutionProvider"]
    )


def base_feed(geometry: Any, batch: int, latent: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    channels, hidden = geometry.unet_in_channels, geometry.text_hidden_size
    return {
        "sample": rng.standard_normal((batch, channels, latent, latent), dtype=np.float32),
        "timestep": rng.uniform(0, 999, (batch, 1)).astype(np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, TEXT_TOKENS, hidden), dtype=np.float32),
    }


def variants(targets: Sequence[Any], base: dict[str, np.ndarray], ranks: Sequence[int]) -> list[Variant]:
    """(a)–(f) of the module's docstring, each with its feed (the same base inputs)."""
    from build_engines.lora_branch import random_factors

    batch = len(base["sample"])
    attention = [t for t in targets if ".attentions." in t.path]
    locon = [t for t in targets if ".attentions." not in t.path]
    no_lora = {**base, **random_factors(targets, [0] * batch)}
    out = [
        Variant("a", "plain UNet graph", base, PLAIN),
        Variant("b", "branch graph, R = 0 (no row uses LoRA)", no_lora, BRANCH),
    ]
    for key, rank in zip("cd", ranks, strict=False):
        factors = random_factors(targets, [rank] * batch, seed=rank)
        name = f"branch graph, R = {rank} on all {len(targets)} targets"
        out.append(Variant(key, name, {**base, **factors}, BRANCH))
    if ranks:
        rank = ranks[0]
        factors = {**random_factors(attention, [rank] * batch, seed=1), **random_factors(locon, [0] * batch)}
        name = (
            f"branch graph, R = {rank} on the {len(attention)} attention targets, 0 on LoCon's {len(locon)}"
        )
        out.append(Variant("e", name, {**base, **factors}, BRANCH))
    name = "plain UNet graph, no pre-packing, no level-3 optimizations (what shared weights need)"
    out.append(Variant("f", name, base, PLAIN_UNTRANSFORMED))
    return out


def measure(
    sessions: dict[str, Any], variants: list[Variant], rounds: int, label: str = "perf.lora_branch"
) -> dict[str, float]:
    """One warm-up call each, then `rounds` rounds of one timed call per variant, the order rotating by one
    each round (a b c …, b c … a, …) so that none is always first after the pause; SETTLE_S between calls.
    Returns, for each variant, the largest difference of its warm-up output from (a)'s."""
    outputs = [sessions[v.session].run(["noise_pred"], v.feed)[0] for v in variants]
    diffs = {v.key: float(np.max(np.abs(out - outputs[0]))) for v, out in zip(variants, outputs, strict=True)}
    for n in range(rounds):
        for v in variants[n % len(variants) :] + variants[: n % len(variants)]:
            time.sleep(SETTLE_S)
            started = time.perf_counter()
            sessions[v.session].run(["noise_pred"], v.feed)
            v.latencies_s.append(time.perf_counter() - started)
        print(
            f"{label}: round {n + 1}/{rounds}: "
            + ", ".join(f"({v.key}) {v.latencies_s[-1]:.3f} s" for v in variants),
            flush=True,
        )
    return diffs


def untransformed_options() -> Any:
    """The engines' session options, less what rewrites weights into per-session copies: MLAS pre-packing
    and level-3 optimizations (the NCHWc conv layout). Only weights a session uses as they are can be
    shared with SessionOptions.add_initializer."""
    import onnxruntime as ort

    from python_backend.ort_options import session_options

    options = session_options(spinning=False)
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    options.add_session_config_entry("session.disable_prepacking", "1")
    return options


def read_weights(path: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Each initializer of at least SHARED_MIN_SIZE elements in the ONNX file, read on its own from the
    external data file (onnx's loader would keep every weight's bytes in the model proto as well)."""
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load(str(path), load_external_data=False)
    for init in model.graph.initializer:
        count = int(np.prod(init.dims))
        if count < SHARED_MIN_SIZE:  # constants (shapes, slice bounds) stay in the graph
            continue
        if init.data_location == onnx.TensorProto.EXTERNAL:
            where = {e.key: e.value for e in init.external_data}
            dtype = helper.tensor_dtype_to_np_dtype(init.data_type)
            offset = int(where.get("offset", 0))
            array = np.fromfile(path.parent / where["location"], dtype=dtype, count=count, offset=offset)
            yield init.name, array.reshape(tuple(init.dims))
        else:
            yield init.name, numpy_helper.to_array(init)


def memory_probe(paths: list[str], mode: str) -> dict[str, int]:
    """Run in a fresh process: its resident bytes before the sessions and after opening each of `paths`.
    mode "own": each session loads its weights. "shared" / "shared-untransformed": the weights are read once
    (the branch graph's are the plain graph's, under other names: matched by content) and handed to every
    session as OrtValues with SessionOptions.add_initializer; with the engines' options, or
    `untransformed_options`."""
    import onnxruntime as ort

    from python_backend.ort_options import session_options

    result = {"baseline": rss_bytes()}
    by_content: dict[str, Any] = {}
    keep: list[np.ndarray] = []  # an OrtValue made from a numpy array uses its memory: keep them alive
    sessions = []
    for path in map(Path, paths):
        options = (
            untransformed_options() if mode == "shared-untransformed" else session_options(spinning=False)
        )
        if mode != "own":
            for name, array in read_weights(path):
                key = f"{array.dtype}{array.shape}{hashlib.sha1(array.tobytes()).hexdigest()}"
                if key not in by_content:
                    by_content[key] = ort.OrtValue.ortvalue_from_numpy(array)
                    keep.append(array)
                options.add_initializer(name, by_content[key])
            gc.collect()
            result[f"weights read for {path.parent.name}"] = rss_bytes()
        sessions.append(open_session(path, options))
        gc.collect()
        result[f"after {path.parent.name}"] = rss_bytes()
    return result


def probe(paths: list[Path], mode: str) -> dict[str, int]:
    context = multiprocessing.get_context("spawn")  # a clean process: nothing of this one's memory
    with context.Pool(1) as pool:
        result: dict[str, int] = pool.apply(memory_probe, ([str(p) for p in paths], mode))
    return result


def memory(plain: Path, branch: Path) -> list[tuple[str, int, dict[str, int]]]:
    """(what, bytes the sessions hold, the probe's readings) for each layout a host could use."""
    rows = []
    for what, paths, mode in (
        ("plain session alone", [plain], "own"),
        ("branch session alone", [branch], "own"),
        ("plain + branch sessions, each its own weights", [plain, branch], "own"),
        ("plain + branch, weights shared (add_initializer), engines' options", [plain, branch], "shared"),
        (
            "plain + branch, weights shared, no pre-packing, no level-3 optimizations",
            [plain, branch],
            "shared-untransformed",
        ),
    ):
        readings = probe(paths, mode)
        last = list(readings.values())[-1]
        rows.append((what, last - readings["baseline"], readings))
        print(
            f"perf.lora_branch: memory, {what}: {(last - readings['baseline']) / 2**20:.0f} MiB", flush=True
        )
    return rows


def percentile(values: list[float], p: int) -> float:
    return float(np.percentile(values, p))


def report(
    args: argparse.Namespace,
    variants: list[Variant],
    targets: Sequence[Any],
    diffs: dict[str, float],
    files: dict[str, int],
    mem: list[tuple[str, int, dict[str, int]]],
) -> str:
    a = variants[0]
    full = is_full_size(args.checkpoint)
    latent = args.size // 8
    attention = sum(".attentions." in t.path for t in targets)
    lines = [
        f"# perf.lora_branch: {args.checkpoint.name}, UNet at {args.size}×{args.size} px, batch {args.batch}",
        "",
        f"Date: {datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}",
        "",
        "Machine: " + "; ".join(f"{k} {v}" for k, v in machine().items()),
        "",
        f"Settings: checkpoint `{args.checkpoint}` ({'SD v1 architecture' if full else 'not SD v1 size'}); "
        f"one UNet call: batch {args.batch}, latent {latent}×{latent}, text {TEXT_TOKENS} tokens; ONNX "
        "Runtime CPU, python_backend.ort_options.session_options(spinning=False) (the served engines': a "
        f"thread per core, no memory arena); {len(targets)} branch targets ({attention} attention, "
        f"{len(targets) - attention} LoCon), R per target for every row; 1 warm-up call each, then "
        f"{args.rounds} rounds of one timed call per variant (order rotating, {SETTLE_S} s apart).",
        "",
        "| variant | median s | ÷ (a) − 1 | min s | max s | timed calls (s) |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for v in variants:
        calls = ", ".join(f"{t:.3f}" for t in v.latencies_s)
        lines.append(
            f"| ({v.key}) {v.name} | {v.median_s:.3f} | {v.median_s / a.median_s - 1:+.2%} | "
            f"{min(v.latencies_s):.3f} | {max(v.latencies_s):.3f} | {calls} |"
        )
    b = variants[1]
    overhead = b.median_s / a.median_s - 1
    paired = [tb / ta - 1 for ta, tb in zip(a.latencies_s, b.latencies_s, strict=True)]
    spread = (percentile(a.latencies_s, 75) - percentile(a.latencies_s, 25)) / a.median_s
    within = overhead <= BUDGET
    verdict = f"within the {BUDGET:.0%} budget" if within else f"**over** the {BUDGET:.0%} budget"
    lines += [
        "",
        f"- no-LoRA cost, median (b) ÷ median (a) − 1: **{overhead:+.2%}** ({verdict}"
        + ("" if full else "; the budget is judged at full size only")
        + ")",
        f"- per round, (b) ÷ (a) − 1 of the same round: median {statistics.median(paired):+.2%}, "
        f"interquartile {percentile(paired, 25):+.2%} to {percentile(paired, 75):+.2%}",
    ]
    for v in variants[2:]:
        lines.append(f"- ({v.key}) {v.name}: ÷ (a) − 1 = {v.median_s / a.median_s - 1:+.2%}")
    factor_bytes = {
        v.key: sum(x.nbytes for k, x in v.feed.items() if k.endswith(("_down", "_up"))) for v in variants
    }
    lines += [
        f"- noise: (a)'s own interquartile range is {spread:.1%} of its median",
        f"- (b)'s output vs (a)'s: max abs difference {diffs['b']:.1e}",
        "- branch inputs per call: "
        + ", ".join(f"({k}) {n / 2**20:.0f} MiB" for k, n in factor_bytes.items() if k != "a"),
        "",
    ]
    if mem:
        lines += memory_table(files, mem)
    lines += [
        "Verdict: "
        + (
            "the branch graph can serve every batch: feed R = 0 when no row uses LoRA."
            if within
            else "keep a plain session for batches where no row uses LoRA and the branch graph only for "
            "batches where some row does."
        ),
    ]
    return "\n".join(lines) + "\n"


def memory_table(files: dict[str, int], mem: list[tuple[str, int, dict[str, int]]]) -> list[str]:
    lines = [
        "## Memory",
        "",
        "Resident set (VmRSS) of a fresh process after opening the sessions, less its RSS before. ONNX "
        "files: " + ", ".join(f"{name} {n / 2**20:.0f} MiB" for name, n in files.items()) + ".",
        "",
        "| sessions | MiB | ÷ plain alone | readings (MiB, the process's RSS) |",
        "|---|---:|---:|---|",
    ]
    plain_alone = mem[0][1]
    for what, held, readings in mem:
        detail = "; ".join(f"{k} {v / 2**20:.0f}" for k, v in readings.items())
        lines.append(f"| {what} | {held / 2**20:.0f} | {held / plain_alone:.2f} | {detail} |")
    return [*lines, ""]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m perf.lora_branch", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, required=True, help="diffusers SD v1.x checkpoint folder")
    parser.add_argument("--size", type=int, default=512, help="image side, pixels (default 512)")
    parser.add_argument(
        "--batch", type=int, default=2, help="UNet rows per call (default 2: one guided image)"
    )
    parser.add_argument("--rounds", type=int, default=5, help="timed calls per variant (default 5)")
    parser.add_argument(
        "--ranks",
        default="32,96",
        help="ranks of (c) and (d), every target (default 32,96; (e) takes the first)",
    )
    parser.add_argument(
        "--work-dir", type=Path, help="where the graphs go (default: under ~/.cache/sd-triton/perf)"
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory probes")
    parser.add_argument(
        "--variants", default="abcdef", help="which variants to time (default all; (a) and (b) always)"
    )
    parser.add_argument("--out", type=Path, help="write the report here as Markdown")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.checkpoint = args.checkpoint.resolve()
    ranks = [int(r) for r in args.ranks.split(",") if r]
    digest = hashlib.sha256(str(args.checkpoint).encode()).hexdigest()[:8]
    from services.serve import default_cache_dir

    work_dir = args.work_dir or default_cache_dir() / "perf" / f"{args.checkpoint.name}-{digest}-lora-branch"
    paths, targets = export(args.checkpoint, work_dir)
    files = {name: onnx_bytes(path) for name, path in paths.items()}
    mem = [] if args.no_memory else memory(paths[PLAIN], paths[BRANCH])

    from build_engines.onnx_export import read_geometry

    base = base_feed(read_geometry(args.checkpoint), args.batch, args.size // 8)
    runs = [v for v in variants(targets, base, ranks) if v.key in args.variants or v.key in "ab"]
    sessions = {}  # only the variants' (each holds a copy of the weights)
    for name in dict.fromkeys(v.session for v in runs):
        untransformed = name == PLAIN_UNTRANSFORMED
        sessions[name] = open_session(
            paths[PLAIN if untransformed else name], untransformed_options() if untransformed else None
        )
    diffs = measure(sessions, runs, args.rounds)
    text = report(args, runs, targets, diffs, files, mem)
    publish(text, args.out, "perf.lora_branch")
    return 0


if __name__ == "__main__":
    sys.exit(main())
