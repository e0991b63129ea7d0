"""A1111's extra-network tags in a prompt: `<lora:NAME:MULT>` and its forms.

A1111 (modules/extra_networks.py `parse_prompt`) removes every `<kind:args>` tag from the prompt before
the prompt is parsed for attention, so a tag inside brackets leaves the brackets' text and weight as they
were. Its Lora extension (extensions-builtin/Lora/extra_networks_lora.py) reads the arguments as
`NAME[:TE_MULT[:UNET_MULT[:DYN]]]`, or named as `te=`, `unet=`, `dyn=`: the text-encoder multiplier
defaults to 1 and the UNet's to the text encoder's. `lyco` is A1111's other name for `lora`. The code is
our own.

Unlike A1111, which logs and skips a tag it cannot use, a tag we cannot honour is an error naming it: a
request must not silently generate something other than what it asked for.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

_TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111's re_extra_net
LORA_KINDS = frozenset({"lora", "lyco"})


@dataclass(frozen=True)
class LoraTag:
    name: str  # the file stem or the file's alias (its `ss_output_name` metadata)
    te_multiplier: float
    unet_multiplier: float
    tag: str  # as written, for messages

    @property
    def identity(self) -> tuple[str, float, float]:
        return (self.name, self.te_multiplier, self.unet_multiplier)


def parse_extra_networks(prompt: str) -> tuple[str, list[LoraTag]]:
    """The prompt without its tags, and its LoRA tags in order. ValueError names a tag that is not a
    LoRA tag, has no name, has a multiplier that is not a finite number, or asks for `dyn` (kohya's
    dynamic rank, which A1111 applies and we do not)."""
    tags: list[LoraTag] = []

    def take(match: re.Match[str]) -> str:
        tags.append(_lora_tag(match.group(1), match.group(2), match.group()))
        return ""

    return _TAG.sub(take, prompt), tags


def _lora_tag(kind: str, args: str, tag: str) -> LoraTag:
    if kind not in LORA_KINDS:
        raise ValueError(f"has the tag {tag!r}: only <lora:...> extra networks are supported; remove it")
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in args.split(":"):
        key, equals, value = item.partition("=")
        if equals:
            named[key.strip()] = value
        else:
            positional.append(item)
    unknown = sorted(set(named) - {"te", "unet", "dyn"})
    if unknown:
        raise ValueError(f"has the tag {tag!r} with unknown arguments {unknown}; use te= and unet=")
    if "dyn" in named or len(positional) > 3:
        raise ValueError(f"has the tag {tag!r} with a dynamic rank (dyn), which is not supported; remove it")
    name = positional[0].strip() if positional else ""
    if not name:
        raise ValueError(f"has the tag {tag!r} without a LoRA name; write <lora:NAME:MULTIPLIER>")
    te = _multiplier(named.get("te", positional[1] if len(positional) > 1 else "1"), tag)
    unet = _multiplier(named.get("unet", positional[2] if len(positional) > 2 else None), tag, default=te)
    return LoraTag(name, te, unet, tag)


def _multiplier(text: str | None, tag: str, default: float = 1.0) -> float:
    if text is None:
        return default
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise ValueError(
            f"has the tag {tag!r} with a multiplier that is not a finite number: {text.strip()!r}"
        )
    return value
