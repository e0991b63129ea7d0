"""Conditioning: the prompts' CLIP embeddings, in A1111's prompt syntax, with the prompt's LoRAs.

(emphasis:1.2) weights, prompts of several 77-token chunks encoded chunk by chunk, textual inversions by
name, and `<lora:...>` tags, whose text-encoder set applies to both prompts as A1111's merged weights do.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from python_backend import extra_networks, prompts
from python_backend.lora_library import AppliedLoras, apply_tags
from python_backend.request import InvalidInput
from python_backend.stages import Run

if TYPE_CHECKING:
    from python_backend.pipeline import PipelineAssets

# A transformers tokenizer sets its backend's truncation/padding state on every call: one call at a time
# (requests are generated in several threads of one process).
_TOKENIZER_LOCK = threading.Lock()


@dataclass(frozen=True)
class Conditioning:
    embeddings: torch.Tensor  # a row per UNet row: [unconditional..., conditional...] under guidance
    unet_lora: str  # the prompt's LoRA set for the UNet, which every step applies
    textual_inversions: dict[str, str]  # the ones the prompts used: name → hash
    lora_hashes: dict[str, str]
    clip_skip: int

    def info(self) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self.textual_inversions:  # A1111's "TI hashes"
            info.update(embeddings=self.textual_inversions)
        if self.lora_hashes:  # A1111's "Lora hashes"
            info.update(loras=self.lora_hashes)
        if self.clip_skip > 1:  # A1111 writes "Clip skip" only then
            info.update(clip_skip=self.clip_skip)
        return info


def resolve_loras(assets: PipelineAssets, prompt: str) -> tuple[str, AppliedLoras]:
    """The prompt without its `<lora:...>` tags, and the LoRAs they ask for. Only the prompt's: A1111 reads
    no tags in the negative prompt (there a tag is text)."""
    try:
        text, tags = extra_networks.parse_extra_networks(prompt)
        return text, apply_tags(assets.loras, tags)
    except ValueError as e:  # LoraError is one
        raise InvalidInput("prompt", str(e)) from None


def encode_prompts(run: Run, assets: PipelineAssets, prompt: str, loras: AppliedLoras) -> Conditioning:
    """Each image's embeddings, the unconditional (negative) prompt's first under guidance, as diffusers."""
    request, device = run.request, run.device
    texts = {"negative_prompt": request.negative_prompt, "prompt": prompt}
    fields = ["negative_prompt", "prompt"] if run.guided else ["prompt"]
    chunks = [_chunks(assets, texts[f], f) for f in fields]
    if run.guided:
        chunks = list(prompts.pad_to_same_length(*chunks))
    ids = torch.from_numpy(np.concatenate([c.ids for c in chunks])).to(device)
    encoded = run.engines.encode_text(ids, request.clip_skip, loras.text_encoder)
    per_prompt = encoded.split([c.count for c in chunks])
    weighted = [
        prompts.apply_weights(e, torch.from_numpy(c.weights).to(device))
        for e, c in zip(per_prompt, chunks, strict=True)
    ]
    used = {e.name: e.hash for c in chunks for e in c.embeddings}
    return Conditioning(
        embeddings=torch.cat(weighted).repeat_interleave(request.num_images, dim=0),
        unet_lora=loras.unet,
        textual_inversions=dict(sorted(used.items())),
        lora_hashes=loras.hashes,
        clip_skip=request.clip_skip,
    )


def _chunks(assets: PipelineAssets, text: str, field: str) -> prompts.PromptChunks:
    try:
        with _TOKENIZER_LOCK:
            return prompts.tokenize_chunks(
                assets.tokenizer, text, assets.manifest.profile.max_prompt_chunks, assets.embeddings
            )
    except ValueError as e:
        raise InvalidInput(field, str(e)) from None
