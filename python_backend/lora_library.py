"""The server's LoRA folder (sd-serve --lora-dir) as A1111 sees its models/Lora folder: files found by
name (the file stem) or alias (the file's `ss_output_name` metadata), the folder scanned again when a
prompt names a LoRA it does not know, so files added while the server runs are found without a restart.

A1111's rules (extensions-builtin/Lora/networks.py, `list_available_networks` and `load_networks`): every
file is known by its stem and by its alias; an alias two files share is "forbidden" and such a name finds
the file by stem only. Only `.safetensors` files: A1111 also loads pickled `.pt`/`.ckpt` LoRAs, which a
server should not unpickle.
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors import safe_open

from python_backend import lora
from python_backend.adapters import MAX_RANK_HINT, LoraUse, encode_set, file_version
from python_backend.extra_networks import LoraTag
from python_backend.shapes import LORA_DIR_ENV

SUFFIX = ".safetensors"


@dataclass(frozen=True)
class LoraEntry:
    name: str  # the file stem
    alias: str  # ss_output_name, else the name
    file: str  # relative to the folder
    metadata: dict[str, str] = field(repr=False)


class LoraLibrary:
    """`root`: the folder, or None for a server started without one (every LoRA tag is then an error).
    `shapes`: the model's LoRA targets (the engines' branch layers), against which a file is checked.
    `max_rank`: the largest rank a request's LoRAs may add up to at one layer (TensorRT engines bound it:
    build-engines --lora-max-rank), 0 for any."""

    def __init__(
        self, root: Path | None, shapes: Mapping[lora.Target, lora.Shape], max_rank: int = 0
    ) -> None:
        self.root = root
        self.shapes = shapes
        self.max_rank = max_rank
        self._by_name: dict[str, LoraEntry] = {}
        self._by_alias: dict[str, LoraEntry] = {}
        self._forbidden: set[str] = set()
        # (file, version) → (ok, short hash or why, rank per layer)
        self._checked: dict[tuple[str, str], tuple[bool, str, dict[lora.Target, int]]] = {}
        self._lock = threading.Lock()
        self.refresh()

    @classmethod
    def from_environment(cls, shapes: Mapping[lora.Target, lora.Shape]) -> LoraLibrary:
        folder = os.environ.get(LORA_DIR_ENV)
        return cls(Path(folder) if folder else None, shapes)

    def refresh(self) -> None:
        """Scan the folder again (A1111's "Refresh" and /sdapi/v1/refresh-loras)."""
        by_name: dict[str, LoraEntry] = {}
        by_alias: dict[str, LoraEntry] = {}
        forbidden: set[str] = set()
        if self.root is not None and self.root.is_dir():
            for path in sorted(self.root.rglob(f"*{SUFFIX}")):
                entry = _entry(self.root, path)
                by_name[entry.name] = entry
                if entry.alias in by_alias:
                    forbidden.add(entry.alias.lower())
                by_alias[entry.name] = entry
                by_alias[entry.alias] = entry
        with self._lock:
            self._by_name, self._by_alias, self._forbidden = by_name, by_alias, forbidden

    def entries(self) -> list[LoraEntry]:
        with self._lock:
            return list(self._by_name.values())

    def find(self, name: str) -> LoraEntry:
        """The file a prompt's `<lora:NAME:...>` names; the folder is scanned again once if it is not known
        (or its file is gone). LoraError when no file has that name or alias."""
        for attempt in range(2):
            with self._lock:
                table = self._by_name if name.lower() in self._forbidden else self._by_alias
                entry = table.get(name)
            if entry is not None and self.root is not None and (self.root / entry.file).is_file():
                return entry
            if attempt == 0:
                self.refresh()
        where = "this server has no LoRA folder (start it with sd-serve --lora-dir DIR)"
        if self.root is not None:
            where = (
                f"no {SUFFIX} file in the LoRA folder has that name or alias (GET /sdapi/v1/loras lists them)"
            )
        raise lora.LoraError(f"unknown LoRA {name!r}: {where}")

    def check(self, entry: LoraEntry) -> tuple[str, str]:
        """(version, short hash) of the entry's file, read and checked against the model once per file
        version (the engines read it again; this process keeps only the verdict). The version goes into
        `LoraUse`; the short hash is A1111's `Lora hashes` value. LoraError when the file cannot be used."""
        assert self.root is not None
        path = self.root / entry.file
        try:
            version = file_version(path)
        except OSError:
            raise lora.LoraError(f"LoRA {entry.file}: the file is gone from the LoRA folder") from None
        with self._lock:
            verdict = self._checked.get((entry.file, version))
        if verdict is None:
            try:
                read = lora.read_lora(path, self.shapes)
                ranks = {target: module.down.shape[0] for target, module in read.modules.items()}
                verdict = (True, read.shorthash, ranks)
            except lora.LoraError as e:
                verdict = (False, str(e), {})
            with self._lock:
                self._checked[(entry.file, version)] = verdict
        ok, text, _ = verdict
        if not ok:
            raise lora.LoraError(text)
        return version, text

    def check_ranks(self, component: str, uses: list[LoraUse]) -> None:
        """LoraError when `uses` (checked files) add up to more than `max_rank` at a layer of `component`:
        the engines would refuse the set."""
        if not self.max_rank:
            return
        totals: Counter[lora.Target] = Counter()
        with self._lock:
            for use in uses:
                ranks = self._checked[(use.file, use.version)][2]
                totals.update({target: r for target, r in ranks.items() if target.component == component})
        if totals:
            layer, rank = totals.most_common(1)[0]
            if rank > self.max_rank:
                raise lora.LoraError(
                    f"these LoRAs add up to rank {rank} at {component} layer {layer.path}, more than the "
                    f"engines' maximum {self.max_rank}; {MAX_RANK_HINT}"
                )

    def listing(self) -> list[dict[str, Any]]:
        """As A1111's GET /sdapi/v1/loras: name, alias, path, metadata."""
        root = self.root or Path()  # no folder, no entries
        return [
            {"name": e.name, "alias": e.alias, "path": str(root / e.file), "metadata": e.metadata}
            for e in self.entries()
        ]


def _entry(root: Path, path: Path) -> LoraEntry:
    try:
        with safe_open(str(path), framework="np") as f:
            metadata = dict(f.metadata() or {})
    except Exception:  # not a safetensors file: listed, and refused with the reason when a prompt names it
        metadata = {}
    name = path.stem
    return LoraEntry(name, metadata.get("ss_output_name") or name, str(path.relative_to(root)), metadata)


@dataclass(frozen=True)
class AppliedLoras:
    """A request's LoRA tags, resolved: the set each engine applies (python_backend.adapters.encode_set)
    and A1111's `Lora hashes` (the name as the prompt wrote it → the file's short hash)."""

    text_encoder: str = ""
    unet: str = ""
    hashes: dict[str, str] = field(default_factory=dict)


def apply_tags(library: LoraLibrary | None, tags: list[LoraTag]) -> AppliedLoras:
    """LoraError naming the tag when a file cannot be found or used. `library` None: the engines have no
    LoRA branches. A component whose multiplier is 0 leaves that file out of its engine's set."""
    if not tags:
        return AppliedLoras()
    if library is None:
        raise lora.LoraError(
            f"{tags[0].tag}: this model's engines were built without LoRA support; rebuild the repository "
            "with this version of build-engines"
        )
    text_encoder: list[LoraUse] = []
    unet: list[LoraUse] = []
    hashes: dict[str, str] = {}
    for tag in tags:
        try:
            entry = library.find(tag.name)
            version, short_hash = library.check(entry)
        except lora.LoraError as e:
            raise lora.LoraError(f"{tag.tag}: {e}") from None
        for uses, multiplier in ((text_encoder, tag.te_multiplier), (unet, tag.unet_multiplier)):
            if multiplier != 0:
                uses.append(LoraUse(entry.file, version, multiplier))
        # A1111 strips what would break its `name: hash, ...` list.
        hashes.setdefault(tag.name.replace(":", "").replace(",", ""), short_hash)
    try:
        library.check_ranks(lora.TEXT_ENCODER, text_encoder)
        library.check_ranks(lora.UNET, unet)
    except lora.LoraError as e:
        raise lora.LoraError(f"{' '.join(tag.tag for tag in tags)}: {e}") from None
    return AppliedLoras(encode_set(text_encoder), encode_set(unet), hashes)
