"""Textual-inversion embeddings (A1111's `embeddings/` folder) read at build time.

Where the lookup happens, and why: the text-encoder engine's vocabulary is extended at build time. Each
embedding's vectors become new rows of CLIP's token-embedding table (ids from the tokenizer's vocabulary
size on), exported into the ONNX graph and so into a TensorRT plan like any other weight; the pipeline
replaces an embedding's name in a prompt with those ids (python_backend.prompts). The engine keeps its
interface (token ids in, hidden states out), nothing is looked up on the host per request, and TensorRT
needs no new input; adding embeddings means rebuilding the text encoder, the cheapest engine.

Formats, as A1111 reads them: `.pt` (A1111's training output: `string_to_param` holds one [n, D] tensor),
`.bin` (a diffusers concept: {token: [D]}), `.safetensors` (one tensor, e.g. `emb_params` [n, D]). The
name is the file's stem. A width D other than the text encoder's (an SD 2.x or SDXL file) is refused.
"""

from __future__ import annotations

import hashlib
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from build_engines.digests import file_sha256
from build_engines.single_file import SingleFileError
from python_backend.prompts import CHUNK_TOKENS

SUFFIXES = (".pt", ".bin", ".safetensors")


@dataclass(frozen=True)
class Embedding:
    name: str
    vectors: torch.Tensor  # [n, D]
    sha256: str

    @property
    def short_hash(self) -> str:
        return self.sha256[:12]  # A1111's `shorthash` for embeddings (and LoRAs): 12 hex digits


def read_embedding(path: Path, width: int) -> Embedding:
    """One embedding file; SingleFileError naming it when it is malformed or of another width."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            data: Any = load_file(str(path))
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise SingleFileError(f"{path}: this pickle needs more than tensors to load ({e})") from None
    except Exception as e:  # torch and safetensors raise several kinds for a corrupt file
        raise SingleFileError(
            f"{path}: not a readable embedding file ({str(e).splitlines()[0][:200]})"
        ) from None
    vectors = _vectors(path, data)
    if vectors.ndim == 1:
        vectors = vectors.unsqueeze(0)
    if vectors.ndim != 2 or vectors.shape[0] < 1 or not torch.is_floating_point(vectors):
        raise SingleFileError(f"{path}: expected [vectors, width] floats, got {list(vectors.shape)}")
    if vectors.shape[0] > CHUNK_TOKENS:
        raise SingleFileError(f"{path}: {vectors.shape[0]} vectors; a prompt chunk holds {CHUNK_TOKENS}")
    if vectors.shape[1] != width:
        raise SingleFileError(
            f"{path}: vectors of width {vectors.shape[1]}, but the text encoder's is {width} (an embedding "
            "for another model family, e.g. SD 2.x at 1024)"
        )
    if not torch.isfinite(vectors).all():
        raise SingleFileError(f"{path}: holds values that are not finite")
    return Embedding(path.stem, vectors.detach().float().contiguous(), file_sha256(path))


def _vectors(path: Path, data: Any) -> torch.Tensor:
    if isinstance(data, dict) and "string_to_param" in data:  # A1111's own .pt
        params = data["string_to_param"]
        params = getattr(params, "_parameters", params)
        if not isinstance(params, dict) or len(params) != 1:
            raise SingleFileError(f"{path}: expected one tensor in string_to_param")
        return next(iter(params.values()))
    if isinstance(data, dict) and "clip_l" in data and "clip_g" in data:
        raise SingleFileError(f"{path}: an SDXL embedding (clip_l + clip_g); this is an SD v1.x model")
    if isinstance(data, dict) and len(data) == 1 and isinstance(next(iter(data.values())), torch.Tensor):
        return next(iter(data.values()))  # a diffusers concept {token: vector}, or safetensors' one tensor
    raise SingleFileError(f"{path}: neither an A1111 embedding (string_to_param) nor a one-tensor file")


def read_embeddings(folder: Path, width: int) -> list[Embedding]:
    """Every embedding file in `folder` (and below, as A1111 walks it), sorted by name; names must be
    unique."""
    if not folder.is_dir():
        raise SingleFileError(f"{folder}: not a folder")
    files = sorted(p for p in folder.rglob("*") if p.suffix in SUFFIXES and p.is_file() and p.stat().st_size)
    embeddings = [read_embedding(p, width) for p in files]
    seen: dict[str, Path] = {}
    for embedding, path in zip(embeddings, files, strict=True):
        if embedding.name in seen:
            raise SingleFileError(
                f"{path}: a second embedding named {embedding.name!r} (also {seen[embedding.name]})"
            )
        seen[embedding.name] = path
    return sorted(embeddings, key=lambda e: e.name.lower())


def digest(embeddings: list[Embedding]) -> str:
    """What the text-encoder export depends on besides the checkpoint (its cache key)."""
    return hashlib.sha256("".join(f"{e.name}:{e.sha256}" for e in embeddings).encode()).hexdigest()


def token_table(embeddings: list[Embedding], vocab_size: int, tokenize: Any) -> dict[str, Any]:
    """embeddings.json: for each name, the token ids its name tokenizes to (what a prompt is matched
    against, as A1111 does), the ids of its vectors in the extended vocabulary, and its hash."""
    table, next_id = {}, vocab_size
    for e in embeddings:
        count = int(e.vectors.shape[0])
        table[e.name] = {
            "name_ids": list(tokenize(e.name)),
            "vector_ids": list(range(next_id, next_id + count)),
            "hash": e.short_hash,
        }
        next_id += count
    return table
