"""sha256 digests of checkpoint files and folders, read in 16 MiB pieces (checkpoints are gigabytes)."""

from __future__ import annotations

import hashlib
from pathlib import Path

_PIECE = 1 << 24


def _update(digest: hashlib._Hash, path: Path) -> None:
    with path.open("rb") as stream:
        while piece := stream.read(_PIECE):
            digest.update(piece)


def file_sha256(path: Path) -> str:
    """The file's sha256, hex (A1111 hashes model, VAE and embedding files so)."""
    digest = hashlib.sha256()
    _update(digest, path)
    return digest.hexdigest()


def digest_folder(folder: Path) -> str:
    """sha256 over a checkpoint component folder's file names and bytes."""
    digest = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(f.relative_to(folder)).encode())
        _update(digest, f)
    return digest.hexdigest()
