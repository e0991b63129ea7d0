"""LoRA sets inside an engine process: named per request, compiled once, kept in an LRU by bytes, and fed
per sample to the engine's low-rank branch (build_engines/lora_branch.py).

A request's set travels with each of its engine calls as one string per batch row (`LORA_INPUT`: JSON,
"" for none), so that Triton's dynamic batcher can put rows of different sets, and rows with none, into
one engine run. The engine process compiles a set the first time it sees it (python_backend/lora.py) and
keeps it while memory allows. A compiled set is never modified, only dropped from the cache, so a run
that holds one is never changed under; a set dropped between two steps of a request is compiled again
from the same file version, to the same arrays.

No torch and no onnxruntime here: numpy only, shared by the Triton engine models and the in-process
engines of tests and benchmarks. An engine on the GPU (python_backend/trt_runtime.py) keeps its compiled sets
on the device: it gives the store a `place` function and the feeder a `zeros` one, and arrays of its own
(anything with numpy's shape, nbytes and slice assignment) flow through the same code.
"""

from __future__ import annotations

import json
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from python_backend import lora

LORA_INPUT = "lora"  # the engine models' per-row input: the row's LoRA set (`encode_set`), "" for none
DOWN_SUFFIX = ".lora_down"  # branch graph inputs: f"{path}{DOWN_SUFFIX}" [N, R, in, *kernel]
UP_SUFFIX = ".lora_up"  # ... and f"{path}{UP_SUFFIX}" [N, out, R]
DEFAULT_CACHE_BYTES = 2 * 2**30
LORA_CACHE_ENV = "SD_LORA_CACHE_BYTES"  # sd-serve --lora-cache-mb: the compiled sets one engine process keeps
# engine → the component whose LoRA layers it applies
COMPONENT_OF = {"unet": lora.UNET, "text_encoder": lora.TEXT_ENCODER}
MAX_RANK_HINT = "build the engines with a larger build-engines --lora-max-rank, or use fewer or smaller LoRAs"

Run = Callable[[dict[str, Any]], list[Any]]  # one graph's run: feeds by input name → outputs in order


@dataclass(frozen=True)
class LoraUse:
    """One LoRA of a set, for one component: which file (and which version of it), at what multiplier."""

    file: str  # relative to the LoRA folder
    version: str  # `file_version` when the pipeline checked the file: a file replaced since is refused
    multiplier: float


def file_version(path: Path) -> str:
    stat = path.stat()
    return f"{stat.st_size}-{stat.st_mtime_ns}"


def encode_set(uses: Sequence[LoraUse]) -> str:
    """The canonical text of a set: equal sets, equal strings (the cache key)."""
    if not uses:
        return ""
    return json.dumps([[u.file, u.version, u.multiplier] for u in uses], separators=(",", ":"))


def decode_set(text: str) -> tuple[LoraUse, ...]:
    """ValueError for anything `encode_set` does not write."""
    if not text:
        return ()
    try:
        items = json.loads(text)
        uses = tuple(LoraUse(str(f), str(v), float(m)) for f, v, m in items)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{LORA_INPUT}: not a LoRA set: {text[:80]!r}") from e
    if not all(math.isfinite(u.multiplier) for u in uses):
        raise ValueError(f"{LORA_INPUT}: a multiplier is not a finite number: {text[:80]!r}")
    return uses


@dataclass(frozen=True)
class BranchTarget:
    """One layer's low-rank branch in an engine graph, from the graph's input shapes."""

    path: str
    in_shape: tuple[int, ...]  # (in, *kernel): down is [N, R, *in_shape]
    out: int  # up is [N, out, R]

    @property
    def base_shape(self) -> tuple[int, ...]:
        return (self.out, *self.in_shape)


def branch_targets(inputs: Iterable[tuple[str, Sequence[int | str | None]]]) -> dict[str, BranchTarget]:
    """The branch targets of a graph, from its (input name, shape) pairs; other inputs are ignored."""
    shapes = dict(inputs)
    targets = {}
    for name, shape in shapes.items():
        if name.endswith(DOWN_SUFFIX):
            path = name.removesuffix(DOWN_SUFFIX)
            up = shapes[path + UP_SUFFIX]
            in_shape = tuple(int(d) for d in shape[2:])  # type: ignore[arg-type]  # static in the export
            targets[path] = BranchTarget(path, in_shape, int(up[1]))  # type: ignore[arg-type]
    return targets


class AdapterStore:
    """The compiled LoRA sets of one component ("unet" or "text_encoder") of one engine process.

    `root` is the LoRA folder (sd-serve --lora-dir); `shapes` the base weight shape of every branch target,
    against which each file is checked. At most `max_bytes` of compiled sets are kept, least recently used
    dropped first; a set larger than that alone is compiled for the call and not kept. `max_rank`: the
    largest rank a set may have at any layer (a TensorRT engine's profile bounds it), None for any.
    `place` puts each compiled factor where the engine reads it (a GPU engine: on the device), once per set.
    """

    def __init__(
        self,
        root: Path | None,
        component: str,
        targets: Mapping[str, BranchTarget],
        max_bytes: int = DEFAULT_CACHE_BYTES,
        max_rank: int | None = None,
        place: Callable[[np.ndarray], Any] | None = None,
    ) -> None:
        self.root = root
        self.component = component
        self.targets = targets
        self.max_bytes = max_bytes
        self.max_rank = max_rank
        self.place = place
        self._sets: OrderedDict[str, dict[str, lora.LowRank]] = OrderedDict()
        self._bytes: dict[str, int] = {}
        self._lock = threading.Lock()

    @property
    def cached_bytes(self) -> int:
        with self._lock:
            return sum(self._bytes.values())

    def compiled(self, key: str) -> Mapping[str, lora.LowRank]:
        """The set `key` (`encode_set`) names, compiled: target path → LowRank. LoraError (a ValueError)
        when a file is missing, changed since the pipeline checked it, or does not fit this model."""
        if not key:
            return {}
        with self._lock:
            if key in self._sets:
                self._sets.move_to_end(key)
                return self._sets[key]
        compiled = self._compile(decode_set(key))
        size = sum(low.down.nbytes + low.up.nbytes for low in compiled.values())
        with self._lock:
            if size <= self.max_bytes:
                self._sets[key], self._bytes[key] = compiled, size
                while sum(self._bytes.values()) > self.max_bytes:
                    oldest, _ = self._sets.popitem(last=False)
                    del self._bytes[oldest]
        return compiled

    def _compile(self, uses: Sequence[LoraUse]) -> dict[str, lora.LowRank]:
        if self.root is None:
            raise lora.LoraError("this server has no LoRA folder (start it with sd-serve --lora-dir DIR)")
        shapes = {lora.Target(self.component, t.path): t.base_shape for t in self.targets.values()}
        entries = []
        for use in uses:
            path = (self.root / use.file).resolve()
            if not path.is_relative_to(self.root.resolve()) or not path.is_file():
                raise lora.LoraError(f"{use.file}: no such LoRA file in the LoRA folder")
            if file_version(path) != use.version:
                raise lora.LoraError(f"{use.file}: the file changed while the request was running; retry it")
            entries.append((lora.read_lora(path, shapes, [self.component]), use.multiplier, use.multiplier))
        compiled = {
            target.path: low
            for target, low in lora.compile_set(entries).items()
            if target.component == self.component
        }
        for layer, low in compiled.items():
            rank = low.down.shape[0]
            if self.max_rank is not None and rank > self.max_rank:
                files = ", ".join(use.file for use in uses)
                raise lora.LoraError(
                    f"{files}: rank {rank} at {layer}, more than this engine's maximum {self.max_rank}; "
                    f"{MAX_RANK_HINT}"
                )
        if self.place is None:
            return compiled
        place = self.place
        return {path: lora.LowRank(place(low.down), place(low.up)) for path, low in compiled.items()}


class BranchFeeder:
    """The branch inputs of an engine's runs, from each row's set key. Consecutive runs of the same rows
    (the steps of one request, or of the same requests batched again) reuse the last feeds.

    `zeros(shape)` makes a float32 array of zeros where the engine reads its inputs (numpy by default);
    every target gets at least `min_rank` (a TensorRT profile has no empty tensors: zeros add nothing)."""

    def __init__(
        self,
        store: AdapterStore,
        zeros: Callable[[tuple[int, ...]], Any] | None = None,
        min_rank: int = 0,
    ) -> None:
        self.store = store
        self.zeros = zeros or (lambda shape: np.zeros(shape, np.float32))
        self.min_rank = min_rank
        self._last: tuple[tuple[str, ...], dict[str, Any]] | None = None

    def feeds(self, keys: Sequence[str]) -> dict[str, Any]:
        rows = tuple(keys)
        last = self._last
        if last is not None and last[0] == rows:
            return last[1]
        compiled = [self.store.compiled(key) for key in rows]
        feeds = branch_feeds(self.store.targets, compiled, self.zeros, self.min_rank)
        self._last = (rows, feeds)
        return feeds


def branch_feeds(
    targets: Mapping[str, BranchTarget],
    rows: Sequence[Mapping[str, lora.LowRank]],
    zeros: Callable[[tuple[int, ...]], Any] | None = None,
    min_rank: int = 0,
) -> dict[str, Any]:
    """The branch inputs of one engine run: row n's LoRA factors at index n, zero-padded to the largest rank
    among the rows (a zero row adds nothing); `min_rank` (default 0) where no row has the layer."""
    zeros = zeros or (lambda shape: np.zeros(shape, np.float32))
    feeds = {}
    n = len(rows)
    for path, target in targets.items():
        rank = max((row[path].down.shape[0] for row in rows if path in row), default=0)
        rank = max(rank, min_rank)
        down = zeros((n, rank, *target.in_shape))
        up = zeros((n, target.out, rank))
        for i, row in enumerate(rows):
            if path in row:
                r = row[path].down.shape[0]
                down[i, :r] = row[path].down
                up[i, :, :r] = row[path].up
        feeds[path + DOWN_SUFFIX] = down
        feeds[path + UP_SUFFIX] = up
    return feeds


class LoraEngine:
    """One engine's runs with a LoRA set per batch row, on any runtime: `plain` runs the graph without
    branches (None when the engine has only the branch graph), `branched` the graph with them, fed each
    row's factors by `feeder` (both None for an engine without LoRA). Subclasses open the runtime's graphs."""

    outputs: list[str]
    plain: Run | None
    branched: Run | None = None
    feeder: BranchFeeder | None = None

    def check(self, keys: Sequence[str]) -> None:
        """Compile the sets `keys` name (cached), before a run: LoraError (a ValueError) for one that cannot
        be, so that a served batch fails only the request that sent it."""
        feeder = self._feeder_for(keys)
        for key in set(keys):
            if feeder is not None:
                feeder.store.compiled(key)

    def run(self, feeds: dict[str, Any], keys: Sequence[str]) -> list[Any]:
        """The engine's outputs for `feeds`, row n with the LoRA set keys[n] ("" for none). The feeder
        compiles (or finds cached) each row's set itself: no separate check on this per-step path."""
        if self.plain is not None and not any(keys):
            return self.plain(feeds)
        feeder = self._feeder_for(keys)
        assert self.branched is not None and feeder is not None
        return self.branched({**feeds, **feeder.feeds(keys)})

    def _feeder_for(self, keys: Sequence[str]) -> BranchFeeder | None:
        if any(keys) and self.feeder is None:
            raise ValueError(
                "this engine has no LoRA branches (build the repository with build-engines --lora)"
            )
        return self.feeder
