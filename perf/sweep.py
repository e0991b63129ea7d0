"""Throughput and latency percentiles of a served model against concurrency, measured by perf_analyzer.

    python -m perf.sweep --url HOST:8001 --input-data perf/inputs/txt2img.json --concurrency 1:4 \\
        [--model pipeline] [--out perf/results/sweep-NAME] [--request-count K] [-- PERF_ANALYZER_ARGS...]

perf_analyzer runs once per concurrency level, over gRPC, with count windows (`--measurement-mode
count_windows`): a window closes once it holds K completed requests, however long they take, where time
windows would close empty on multi-second requests (perf_analyzer 2.51 puts no deadline on its gRPC
requests either). Each level is its own run, so one that cannot be stabilized is reported and the others
are still measured. Writes `<out>.csv` (one row per level),
`<out>.png` (throughput and p50/p95 latency against concurrency) and `<out>.log` (perf_analyzer's own
output), and prints a table. See perf/README.md.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import datetime
import io
import json
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from matplotlib.figure import Figure

from perf.perf_analyzer import PerfAnalyzerCommand, PerfAnalyzerNotFound, find_perf_analyzer

# A window's requests vary in size and scheduler, so their mean latency moves more between windows than
# perf_analyzer's default 10% allows.
DEFAULT_STABILITY_PERCENTAGE = 25
DEFAULT_MAX_TRIALS = 20
MIN_WINDOW_REQUESTS = 4

# Columns perf_analyzer 2.51's `-f` CSV must have (with --verbose-csv, without --percentile); its times
# are in microseconds. Its server columns are absent when it gets no server statistics.
REQUIRED_COLUMNS = (
    "Concurrency",
    "Inferences/Second",
    "p50 latency",
    "p90 latency",
    "p95 latency",
    "p99 latency",
    "Avg latency",
)
CACHE_COLUMN = "Server Cache Hit"  # written only when the model's response cache is on


@dataclass(frozen=True)
class Level:
    """One concurrency level's measurement: a row of `<out>.csv`."""

    concurrency: int
    infer_per_s: float
    images_per_s: float
    p50_ms: float
    p90_ms: float
    p95_ms: float
    p99_ms: float
    avg_ms: float
    server_queue_ms: float | None
    server_compute_input_ms: float | None
    server_compute_infer_ms: float | None
    server_compute_output_ms: float | None
    client_send_ms: float | None
    network_server_send_recv_ms: float | None
    client_recv_ms: float | None
    window_requests: int  # --measurement-request-count used

    @property
    def server_compute_ms(self) -> float | None:
        parts = (self.server_compute_input_ms, self.server_compute_infer_ms, self.server_compute_output_ms)
        return None if None in parts else sum(p or 0 for p in parts)


@dataclass(frozen=True)
class Settings:
    url: str
    model: str
    input_data: Path
    concurrency: list[int]
    out: Path
    request_count: int | None  # None: default_request_count
    stability_percentage: float = DEFAULT_STABILITY_PERCENTAGE
    max_trials: int = DEFAULT_MAX_TRIALS
    level_timeout_s: float | None = None  # None: wait for perf_analyzer as long as it takes
    extra_args: tuple[str, ...] = ()

    def output(self, suffix: str) -> Path:
        return self.out.with_name(self.out.name + suffix)  # not with_suffix: OUT may hold a dot


@dataclass
class SweepResult:
    levels: list[Level]
    failed: dict[int, str]  # concurrency -> why perf_analyzer measured nothing
    response_cache: bool  # the model has Triton's response cache on


# ------------------------------------------------------------------------------------------------
# Input data


def data_entries(path: Path) -> list[dict[str, Any]]:
    """The `data` list of a perf_analyzer --input-data JSON file (one entry per request)."""
    content = json.loads(path.read_text())
    entries = content.get("data") if isinstance(content, dict) else None
    if not isinstance(entries, list) or not entries:
        raise ValueError(f"{path}: needs a non-empty 'data' list, one entry per request")
    return entries


def images_per_request(entries: list[dict[str, Any]]) -> float:
    """The mean `num_images` (1, the pipeline's default, where absent): perf_analyzer sends the entries
    in turn, so over whole cycles each is sent equally often."""
    return statistics.fmean(int(entry.get("num_images", [1])[0]) for entry in entries)


def default_request_count(concurrency: int, entries: int) -> int:
    """Requests per count window: at least one of each entry (windows then hold the same mix of sizes and
    schedulers, so they agree), and twice the concurrency (each window sees the load in steady state)."""
    return max(MIN_WINDOW_REQUESTS, entries, 2 * concurrency)


def parse_concurrency(text: str) -> list[int]:
    """`1:4` (start:end[:step], end included, as perf_analyzer's --concurrency-range) or `1,2,4,8`."""
    try:
        if ":" in text:
            parts = [int(part) for part in text.split(":")]
            if len(parts) not in (2, 3):
                raise ValueError
            start, end, step = (*parts, 1)[:3]
            if step < 1:
                raise ValueError
            values = list(range(start, end + 1, step))
        else:
            values = [int(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected START:END[:STEP] or a list like 1,2,4; got {text!r}"
        ) from None
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} has no concurrency level (END below START?)")
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"concurrency levels must be >= 1, got {text!r}")
    return sorted(set(values))


# ------------------------------------------------------------------------------------------------
# perf_analyzer


def perf_analyzer_args(s: Settings, concurrency: int, request_count: int, csv_path: Path) -> list[str]:
    return [
        "-m",
        s.model,
        "-u",
        s.url,
        "-i",
        "grpc",
        "--input-data",
        str(s.input_data),
        "--concurrency-range",
        str(concurrency),
        "--measurement-mode",
        "count_windows",
        "--measurement-request-count",
        str(request_count),
        "--stability-percentage",
        f"{s.stability_percentage:g}",
        "--max-trials",
        str(s.max_trials),
        "-f",
        str(csv_path),
        "--verbose-csv",  # adds Avg latency
        *s.extra_args,
    ]


def parse_perf_analyzer_csv(text: str, images_per_request: float, window_requests: int) -> list[Level]:
    """The levels in perf_analyzer's `-f` CSV (written with --verbose-csv, without --percentile), sorted by
    concurrency (perf_analyzer sorts them by throughput); times converted to milliseconds."""
    rows = list(csv.DictReader(io.StringIO(text)))
    header = list(rows[0]) if rows else text.splitlines()[:1]
    missing = [c for c in REQUIRED_COLUMNS if c not in header]
    if missing or not rows:
        raise ValueError(f"unexpected perf_analyzer CSV: no {missing or 'rows'} (header: {header})")
    levels = []
    for row in rows:
        infer_per_s = float(row["Inferences/Second"])
        levels.append(
            Level(
                concurrency=int(row["Concurrency"]),
                infer_per_s=infer_per_s,
                images_per_s=infer_per_s * images_per_request,
                p50_ms=_ms(row, "p50 latency"),
                p90_ms=_ms(row, "p90 latency"),
                p95_ms=_ms(row, "p95 latency"),
                p99_ms=_ms(row, "p99 latency"),
                avg_ms=_ms(row, "Avg latency"),
                server_queue_ms=_ms_if_any(row, "Server Queue"),
                server_compute_input_ms=_ms_if_any(row, "Server Compute Input"),
                server_compute_infer_ms=_ms_if_any(row, "Server Compute Infer"),
                server_compute_output_ms=_ms_if_any(row, "Server Compute Output"),
                client_send_ms=_ms_if_any(row, "Client Send"),
                network_server_send_recv_ms=_ms_if_any(row, "Network+Server Send/Recv"),
                client_recv_ms=_ms_if_any(row, "Client Recv"),
                window_requests=window_requests,
            )
        )
    return sorted(levels, key=lambda level: level.concurrency)


def _ms(row: dict[str, str], column: str) -> float:
    return float(row[column]) / 1000


def _ms_if_any(row: dict[str, str], column: str) -> float | None:
    return float(row[column]) / 1000 if row.get(column) else None


def uses_response_cache(text: str) -> bool:
    return CACHE_COLUMN in text.partition("\n")[0].split(",")


def measure_level(
    command: PerfAnalyzerCommand, s: Settings, concurrency: int, entries: list[dict[str, Any]], log: TextIO
) -> tuple[Level | None, bool, str]:
    """One perf_analyzer run at `concurrency`: (the level or None, response cache on, why it failed)."""
    request_count = s.request_count or default_request_count(concurrency, len(entries))
    with tempfile.TemporaryDirectory(prefix="perf-sweep-") as tmp:
        csv_path = Path(tmp) / "perf_analyzer.csv"
        args = [str(command.executable), *perf_analyzer_args(s, concurrency, request_count, csv_path)]
        log.write(f"$ {' '.join(args)}\n")
        log.flush()
        try:
            run = subprocess.run(
                args,
                env=command.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                encoding="utf-8",
                errors="replace",
                timeout=s.level_timeout_s,
            )
        except subprocess.TimeoutExpired as e:  # subprocess.run has killed it
            output = e.output if isinstance(e.output, str) else (e.output or b"").decode("utf-8", "replace")
            log.write(f"{output}\n[killed after {s.level_timeout_s:g} s]\n\n")
            return None, False, f"no result within --level-timeout {s.level_timeout_s:g} s"
        log.write(f"{run.stdout}\n[exit code {run.returncode}]\n\n")
        if run.returncode != 0 or not csv_path.is_file():
            lines = [line.strip() for line in run.stdout.splitlines() if line.strip()]
            return None, False, f"perf_analyzer exit code {run.returncode}: {' / '.join(lines[-2:])}"
        text = csv_path.read_text()
    (level,) = parse_perf_analyzer_csv(text, images_per_request(entries), request_count)
    return level, uses_response_cache(text), ""


def sweep(s: Settings, command: PerfAnalyzerCommand) -> SweepResult:
    """Measure every level, write `<out>.log`, `<out>.csv` and `<out>.png`."""
    entries = data_entries(s.input_data)
    s.out.parent.mkdir(parents=True, exist_ok=True)
    result = SweepResult([], {}, response_cache=False)
    with open(s.output(".log"), "w", encoding="utf-8") as log:
        for concurrency in s.concurrency:
            print(f"perf.sweep: concurrency {concurrency} ...", file=sys.stderr, flush=True)
            level, cache, failure = measure_level(command, s, concurrency, entries, log)
            result.response_cache |= cache
            if level is None:
                result.failed[concurrency] = failure
                print(f"perf.sweep: concurrency {concurrency}: {failure}", file=sys.stderr, flush=True)
            else:
                result.levels.append(level)
    if result.levels:
        write_csv(result.levels, s.output(".csv"))
        plot(result.levels, s.output(".png"), title=f"{s.model} · {s.input_data.name} · {s.url}")
    return result


# ------------------------------------------------------------------------------------------------
# Output


def write_csv(levels: list[Level], path: Path) -> None:
    fields = [f.name for f in dataclasses.fields(Level)]
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for level in levels:
            writer.writerow(
                {k: "" if v is None else round(v, 4) for k, v in dataclasses.asdict(level).items()}
            )


def plot(levels: list[Level], path: Path, title: str) -> None:
    """Throughput (left) and latency percentiles (right) against concurrency."""
    x = [level.concurrency for level in levels]
    figure = Figure(figsize=(11, 4.5), layout="constrained")
    throughput, latency = figure.subplots(1, 2)
    throughput.plot(x, [level.infer_per_s for level in levels], "o-", label="requests/s")
    if any(level.images_per_s != level.infer_per_s for level in levels):
        throughput.plot(x, [level.images_per_s for level in levels], "s--", label="images/s")
    throughput.set(xlabel="concurrency", ylabel="per second", title="throughput", ylim=(0, None))
    seconds = max(level.p95_ms for level in levels) >= 2000  # multi-second requests read better in s
    scale, unit = (1000, "s") if seconds else (1, "ms")
    for name, style in (("p50", "o-"), ("p95", "^-")):
        latency.plot(x, [getattr(level, f"{name}_ms") / scale for level in levels], style, label=name)
    latency.set(xlabel="concurrency", ylabel=unit, title="latency", ylim=(0, None))
    for axes in (throughput, latency):
        axes.set_xticks(x)
        axes.grid(alpha=0.3)
        axes.legend()
    figure.suptitle(title)
    figure.savefig(path, dpi=100)


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:,.1f}"


def table(levels: list[Level]) -> str:
    head = (
        "conc",
        "req/s",
        "img/s",
        "p50 ms",
        "p90 ms",
        "p95 ms",
        "p99 ms",
        "avg ms",
        "queue ms",
        "compute ms",
    )
    rows: list[tuple[str, ...]] = [head]
    for level in levels:
        rows.append(
            (
                str(level.concurrency),
                f"{level.infer_per_s:.3f}",
                f"{level.images_per_s:.3f}",
                *(_cell(v) for v in (level.p50_ms, level.p90_ms, level.p95_ms, level.p99_ms, level.avg_ms)),
                _cell(level.server_queue_ms),
                _cell(level.server_compute_ms),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows)


# ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        prog="python -m perf.sweep",
        description=__doc__.split("\n\n")[0],
        epilog="Arguments after `--` go to perf_analyzer as given, e.g. -- --bls-composing-models unet",
    )
    parser.add_argument(
        "--url", required=True, help="the server's gRPC endpoint, HOST:PORT (e.g. 127.0.0.1:8001)"
    )
    parser.add_argument(
        "--input-data", type=Path, required=True, help="perf_analyzer JSON, e.g. perf/inputs/*.json"
    )
    parser.add_argument(
        "--concurrency",
        type=parse_concurrency,
        default=[1, 2, 3, 4],
        help="START:END[:STEP] or 1,2,4 (default 1:4)",
    )
    parser.add_argument("--model", default="pipeline")
    parser.add_argument(
        "--out",
        type=Path,
        help="writes OUT.csv, OUT.png, OUT.log (default perf/results/sweep-MODEL-DATE-TIME)",
    )
    parser.add_argument(
        "--request-count",
        type=int,
        metavar="K",
        help="requests per measurement window (default: the largest of 4, the input's entry count and "
        "2 x concurrency)",
    )
    parser.add_argument(
        "--stability-percentage",
        type=float,
        default=DEFAULT_STABILITY_PERCENTAGE,
        help="largest spread, in %%, of throughput and mean latency over the last 3 windows "
        f"(default {DEFAULT_STABILITY_PERCENTAGE})",
    )
    parser.add_argument(
        "--max-trials",
        type=int,
        default=DEFAULT_MAX_TRIALS,
        help=f"windows per level before giving up on stability (default {DEFAULT_MAX_TRIALS})",
    )
    parser.add_argument(
        "--level-timeout",
        type=float,
        metavar="SECONDS",
        help="give up on a concurrency level after this long (default: no limit)",
    )
    parser.add_argument(
        "--perf-analyzer",
        metavar="PATH",
        help="perf_analyzer to run (a path, or a name on PATH); default: the tritonclient wheel's",
    )
    args = parser.parse_args(argv[:split])
    if args.request_count is not None and args.request_count < 1:
        parser.error("--request-count must be at least 1")
    return args, argv[split + 1 :]


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(list(sys.argv[1:] if argv is None else argv))
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    settings = Settings(
        url=args.url,
        model=args.model,
        input_data=args.input_data,
        concurrency=args.concurrency,
        out=args.out or Path("perf/results") / f"sweep-{args.model}-{stamp}",
        request_count=args.request_count,
        stability_percentage=args.stability_percentage,
        max_trials=args.max_trials,
        level_timeout_s=args.level_timeout,
        extra_args=tuple(extra),
    )
    try:
        data_entries(settings.input_data)
        command = find_perf_analyzer(args.perf_analyzer)
    except (OSError, ValueError, PerfAnalyzerNotFound) as e:
        print(f"perf.sweep: error: {e}", file=sys.stderr)
        return 2
    result = sweep(settings, command)
    log = settings.output(".log")
    if result.levels:
        print(table(result.levels))
        print(f"wrote {settings.output('.csv')}, {settings.output('.png')}, {log}")
    if result.response_cache:
        print(
            f"perf.sweep: warning: {settings.model} has its response cache on: the input data's fixed "
            "seeds make repeated requests cache hits, not generations (build without --response-cache)",
            file=sys.stderr,
        )
    if result.failed:
        levels = ", ".join(map(str, result.failed))
        print(f"perf.sweep: no measurement at concurrency {levels}; see {log}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
