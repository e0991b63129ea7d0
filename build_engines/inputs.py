"""What build-engines reads, made into one diffusers folder: a diffusers checkpoint folder or a single file
(A1111's), optionally with another VAE; and the names and hashes A1111 reports for them.

A single file is converted into a temporary folder; a VAE override gets a temporary folder whose other
components link to the checkpoint's files. The checkpoint itself is never written to.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from build_engines.digests import digest_folder, file_sha256
from build_engines.single_file import SUFFIXES, SingleFileError, convert_to_diffusers, read_state_dict

CHECKPOINT_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")
VAE_PREFIX = "first_stage_model."  # a VAE cut out of a full checkpoint keeps it
_ORIGINAL_VAE_KEY = "encoder.conv_in.weight"
_DIFFUSERS_VAE_KEY = "encoder.down_blocks.0.resnets.0.conv1.weight"


@dataclass(frozen=True)
class PreparedCheckpoint:
    folder: Path  # diffusers layout
    model_name: str  # A1111's "Model": the file's stem or the folder's name
    model_hash: str  # A1111's "Model hash": sha256 of the file, first 10 hex digits (a folder: of its parts)
    vae_name: str = ""  # A1111's "VAE" (the override's file name); "" for the checkpoint's own
    vae_hash: str = ""  # A1111's "VAE hash"


def folder_hash(folder: Path) -> str:
    """A diffusers checkpoint's hash: sha256 over its UNet, VAE and text encoder folders' digests."""
    digests = "".join(digest_folder(folder / c) for c in ("text_encoder", "unet", "vae"))
    return hashlib.sha256(digests.encode()).hexdigest()[:10]


def check_checkpoint(path: Path) -> None:
    """SingleFileError unless `path` is a diffusers folder or a single file of a known kind."""
    if path.is_dir():
        missing = [p for p in CHECKPOINT_PARTS if not (path / p).exists()]
        if missing:
            raise SingleFileError(f"{path}: not a diffusers checkpoint folder: no {', '.join(missing)}")
    elif not path.is_file():
        raise SingleFileError(f"{path}: no such file or folder")
    elif path.suffix not in SUFFIXES:
        raise SingleFileError(f"{path}: expected a diffusers folder or a {'/'.join(SUFFIXES)} file")


@contextmanager
def prepare(checkpoint: Path, vae: Path | None = None) -> Iterator[PreparedCheckpoint]:
    """The checkpoint as a diffusers folder (temporary where it had to be made) for the duration."""
    check_checkpoint(checkpoint)
    with tempfile.TemporaryDirectory(prefix="build-engines-") as scratch:
        if checkpoint.is_dir():
            folder, name, model_hash = checkpoint, checkpoint.name, folder_hash(checkpoint)
        else:
            folder = convert_to_diffusers(checkpoint, Path(scratch) / "checkpoint")
            name, model_hash = checkpoint.stem, file_sha256(checkpoint)[:10]
        if vae is None:
            yield PreparedCheckpoint(folder, name, model_hash)
            return
        with_vae = Path(scratch) / "with-vae"
        vae_name, vae_hash = replace_vae(folder, vae, with_vae)
        yield PreparedCheckpoint(with_vae, name, model_hash, vae_name, vae_hash)


def replace_vae(checkpoint: Path, vae: Path, out: Path) -> tuple[str, str]:
    """`out`: `checkpoint` with `vae` (an A1111 `.safetensors`/`.pt`/`.ckpt` VAE file, or a diffusers
    AutoencoderKL folder) as its VAE, the other parts' files linked. Returns A1111's VAE name and hash."""
    from diffusers import AutoencoderKL

    out.mkdir(parents=True)
    for part in CHECKPOINT_PARTS:
        source = checkpoint / part
        if part == "vae":
            continue
        if source.is_dir():
            shutil.copytree(source, out / part, copy_function=os.symlink)
        else:
            (out / part).symlink_to(source.resolve())
    # The checkpoint's VAE config: its scaling factor stays (A1111 keeps the model's when swapping VAEs).
    config = AutoencoderKL.load_config(checkpoint / "vae")
    if vae.is_dir():
        source = vae / "vae" if (vae / "vae" / "config.json").is_file() else vae
        if not (source / "config.json").is_file():
            raise SingleFileError(f"{vae}: not a diffusers AutoencoderKL folder (no config.json)")
        model = AutoencoderKL.from_pretrained(source)
        if model.config.latent_channels != config["latent_channels"]:
            raise SingleFileError(
                f"{vae}: a VAE of {model.config.latent_channels} latent channels; the checkpoint's has "
                f"{config['latent_channels']}"
            )
        model.register_to_config(scaling_factor=config["scaling_factor"])
        name, digest = vae.name, digest_folder(source)
    elif vae.is_file():
        state, _ = read_state_dict(vae)
        state = {k.removeprefix(VAE_PREFIX): t for k, t in state.items()}
        if _DIFFUSERS_VAE_KEY not in state and _ORIGINAL_VAE_KEY not in state:
            raise SingleFileError(f"{vae}: not a VAE (no {_ORIGINAL_VAE_KEY} or {_DIFFUSERS_VAE_KEY})")
        try:
            if _DIFFUSERS_VAE_KEY in state:
                model = AutoencoderKL.from_config(config)
                model.load_state_dict(state, strict=True)
            else:  # A1111's (original) layout, converted by diffusers
                model = AutoencoderKL.from_single_file(
                    state, config=str(checkpoint), subfolder="vae", local_files_only=True
                )
        except (RuntimeError, ValueError) as e:
            problem = str(e).splitlines()[0][:300]
            raise SingleFileError(f"{vae}: does not fit the checkpoint's VAE: {problem}") from None
        name, digest = vae.name, file_sha256(vae)
    else:
        raise SingleFileError(f"{vae}: no such file or folder")
    model.save_pretrained(out / "vae", safe_serialization=True)
    return name, digest[:10]
