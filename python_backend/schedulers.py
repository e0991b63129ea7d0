"""Scheduler names: ours, A1111's, and the diffusers class (plus config overrides) behind each.

A scheduler is built per request from the checkpoint's scheduler config, so requests never share
mutable scheduler state. diffusers is imported only when one is built: listing names stays cheap.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from functools import cache
from typing import Any


@dataclass(frozen=True)
class SchedulerChoice:
    name: str
    a1111: str  # A1111's sampler label, written to infotext and accepted as an alias
    diffusers_class: str
    overrides: dict[str, Any] = field(default_factory=dict)


SCHEDULERS: tuple[SchedulerChoice, ...] = (
    SchedulerChoice("pndm", "PLMS", "PNDMScheduler"),
    SchedulerChoice("ddim", "DDIM", "DDIMScheduler"),
    SchedulerChoice("ddpm", "DDPM", "DDPMScheduler"),
    SchedulerChoice("euler", "Euler", "EulerDiscreteScheduler"),
    SchedulerChoice("euler_a", "Euler a", "EulerAncestralDiscreteScheduler"),
    SchedulerChoice("heun", "Heun", "HeunDiscreteScheduler"),
    SchedulerChoice("lms", "LMS", "LMSDiscreteScheduler"),
    SchedulerChoice("lms_karras", "LMS Karras", "LMSDiscreteScheduler", {"use_karras_sigmas": True}),
    SchedulerChoice("dpm2", "DPM2", "KDPM2DiscreteScheduler"),
    SchedulerChoice("dpm2_a", "DPM2 a", "KDPM2AncestralDiscreteScheduler"),
    SchedulerChoice("dpmpp_2m", "DPM++ 2M", "DPMSolverMultistepScheduler"),
    SchedulerChoice(
        "dpmpp_2m_karras", "DPM++ 2M Karras", "DPMSolverMultistepScheduler", {"use_karras_sigmas": True}
    ),
    SchedulerChoice(
        "dpmpp_2m_sde", "DPM++ 2M SDE", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}
    ),
    SchedulerChoice(
        "dpmpp_2m_sde_karras",
        "DPM++ 2M SDE Karras",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True},
    ),
    SchedulerChoice("unipc", "UniPC", "UniPCMultistepScheduler"),
    SchedulerChoice("deis", "DEIS", "DEISMultistepScheduler"),
)
# DPM++ SDE (DPMSolverSDEScheduler) is left out: it needs the torchsde package.

_BY_KEY = {key: s for s in SCHEDULERS for key in (s.name, s.a1111.lower())}


class UnknownScheduler(ValueError):
    pass


def choice_for_class(class_name: str) -> SchedulerChoice:
    """The plain choice for a checkpoint's own scheduler class (its `_class_name`)."""
    for s in SCHEDULERS:
        if s.diffusers_class == class_name and not s.overrides:
            return s
    raise UnknownScheduler(f"the checkpoint's scheduler {class_name} is not supported")


def lookup(name: str) -> SchedulerChoice:
    """Our name or an A1111 label, case-insensitive; `UnknownScheduler` lists the valid names."""
    choice = _BY_KEY.get(name.strip().lower())
    if choice is None:
        names = ", ".join(f"{s.name} ({s.a1111})" for s in SCHEDULERS)
        raise UnknownScheduler(f"unknown scheduler {name!r}; valid names: {names}")
    return choice


def build(choice: SchedulerChoice, config: dict[str, Any]) -> Any:
    """A fresh diffusers scheduler from the checkpoint's config plus the choice's overrides."""
    import diffusers

    cls = getattr(diffusers, choice.diffusers_class)
    return cls.from_config(config, **choice.overrides)


@cache
def step_accepts(class_name: str) -> frozenset[str]:
    """Which of `generator` / `eta` this class's `step` takes (as diffusers' pipelines check)."""
    import diffusers

    params = inspect.signature(getattr(diffusers, class_name).step).parameters
    return frozenset(p for p in ("generator", "eta") if p in params)
