"""Variation seeds (A1111's): each image's initial noise moved toward that of its variation seed by slerp,
so a strength near 0 gives images near the seed's, near 1 near the variation seed's."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from python_backend.request import GenerationRequest
from python_backend.stages import Feature, seeded_generators


@dataclass(frozen=True)
class VariationSeeds(Feature):
    subseeds: list[int]  # image i's: the request's subseed + i
    strength: float

    @classmethod
    def for_request(cls, request: GenerationRequest) -> VariationSeeds | None:
        if request.subseed_strength == 0:
            return None
        first = request.subseed if request.subseed >= 0 else secrets.randbelow(2**32)
        return cls([first + i for i in range(request.num_images)], request.subseed_strength)

    def noise(self, noise: torch.Tensor) -> torch.Tensor:
        generators = seeded_generators(self.subseeds)
        subnoise = randn_tensor(noise.shape, generator=generators, device=noise.device, dtype=torch.float32)
        return torch.stack([_slerp(self.strength, a, b) for a, b in zip(noise, subnoise, strict=True)])

    def info(self) -> dict[str, Any]:
        return {"subseeds": self.subseeds, "subseed_strength": self.strength}


def _slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation of two [C, H, W] noises, normalised along dim 1 as A1111's `slerp`."""
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    dot = (low_unit * high_unit).sum(1)
    if dot.mean() > 0.9995:  # nearly parallel: A1111 mixes linearly (with its weights this way round)
        return low * t + high * (1 - t)
    omega = torch.acos(dot)
    sin_omega = torch.sin(omega)
    return (torch.sin((1 - t) * omega) / sin_omega).unsqueeze(1) * low + (
        torch.sin(t * omega) / sin_omega
    ).unsqueeze(1) * high
