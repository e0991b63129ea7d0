"""diffusers' own StableDiffusionPipeline as the reference for parity tests."""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path
from typing import Any

import diffusers
import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from PIL import Image

# Images must match diffusers' to within this, per pixel (uint8).
TOLERANCE = 2


@cache
def _pipeline(checkpoint: Path, pipeline_class: str) -> StableDiffusionPipeline:
    pipe = getattr(diffusers, pipeline_class).from_pretrained(checkpoint, safety_checker=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_images(
    checkpoint: Path,
    prompt: str,
    *,
    negative_prompt: str = "",
    steps: int,
    guidance_scale: float,
    seed: int,
    scheduler: str,
    num_images: int = 1,
    pipeline_class: str = "StableDiffusionPipeline",
    **call_kwargs: Any,
) -> np.ndarray:
    """uint8 [N, H, W, 3] from diffusers with one CPU generator per image (seed + i).

    `call_kwargs` go to the pipeline call (width/height for text-to-image, image/strength for img2img).
    `scheduler` is a diffusers class name, set up the way diffusers documents: `from_config` of the
    checkpoint's scheduler config.
    """
    pipe = _pipeline(checkpoint, pipeline_class)
    pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    images = pipe(
        prompt,
        negative_prompt=negative_prompt,
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        num_images_per_prompt=num_images,
        generator=[torch.Generator("cpu").manual_seed(seed + i) for i in range(num_images)],
        output_type="np",
        **call_kwargs,
    ).images
    return (images * 255).round().astype(np.uint8)


def max_pixel_diff(a: np.ndarray, b: np.ndarray) -> int:
    assert a.shape == b.shape, (a.shape, b.shape)
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def png_bytes(image: Image.Image) -> bytes:
    """An image as the PNG file bytes a client sends."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def smooth_picture(width: int = 96, height: int = 64) -> Image.Image:
    """A fixed test picture: smooth colour fields (VAE-friendly), the same on every run."""
    cells = np.random.default_rng(0).integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
    return Image.fromarray(cells).resize((width, height), Image.Resampling.BILINEAR)
