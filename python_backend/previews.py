"""Cheap previews of the latents while denoising: a linear latent → RGB map, no VAE call."""

from __future__ import annotations

import io

import numpy as np
import torch
from PIL import Image

# SD v1.x's 4 latent channels → RGB, a least-squares fit to VAE-decoded colours widely used for
# previews (the same numbers as ComfyUI's and A1111's "approximate" live preview).
LATENT_RGB_FACTORS = torch.tensor(
    [
        [0.3512, 0.2297, 0.3227],
        [0.3250, 0.4974, 0.2350],
        [-0.2829, 0.1762, 0.2721],
        [-0.2120, -0.2616, -0.7177],
    ]
)


def preview_png(latents: torch.Tensor) -> bytes:
    """The first image's latents [N, 4, h, w] as a small PNG (h x w pixels)."""
    rgb = torch.einsum("chw,cr->hwr", latents[0, :4].float().cpu(), LATENT_RGB_FACTORS)
    pixels = ((rgb + 1) / 2).clamp(0, 1).mul(255).round().to(torch.uint8).numpy()
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG")
    return buffer.getvalue()
