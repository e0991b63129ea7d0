"""Client for the Stable Diffusion `pipeline` model on Triton: a Python API and the `sd-client` CLI."""

from client.api import ControlNetUnit, GenerationError, GenerationResult, StableDiffusionClient
from client.infotext import format_infotext, parse_infotext, read_infotext, request_from_infotext, save_png

__all__ = [
    "ControlNetUnit",
    "GenerationError",
    "GenerationResult",
    "StableDiffusionClient",
    "format_infotext",
    "parse_infotext",
    "read_infotext",
    "request_from_infotext",
    "save_png",
]
