"""AUTOMATIC1111 (stable-diffusion-webui) prompt semantics, as pure functions.

A prompt means here what it means in A1111: `(word)`, `[word]` and `(word:1.3)` weight tokens, `BREAK`
starts a new 75-token chunk, and a prompt longer than 75 tokens becomes several chunks that the text
encoder encodes one at a time and the UNet sees concatenated. Mirrors `parse_prompt_attention`
(modules/prompt_parser.py), `tokenize_line` (modules/sd_hijack_clip.py) and the "Original" emphasis
(modules/sd_emphasis.py); the code is our own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from python_backend.shapes import TOKENS_PER_CHUNK

if TYPE_CHECKING:
    from transformers import CLIPTokenizer

CHUNK_TOKENS = TOKENS_PER_CHUNK - 2  # prompt tokens per chunk, between BOS and EOS
COMMA_BACKTRACK = 20  # A1111's default `comma_padding_backtrack`
ROUND_MULTIPLIER = 1.1
SQUARE_MULTIPLIER = 1 / 1.1
BREAK = ("BREAK", -1.0)  # the marker parse_attention yields for the word BREAK

# A small explicit scanner rather than a grammar (lark): A1111 is a regex scanner plus bracket stacks, and
# its edge cases (unclosed brackets apply to the rest, stray closers are text, a lone `\` vanishes) are
# natural here but awkward in a grammar.
_PIECE = re.compile(
    r"""
    \\(?P<escaped>[()\[\]\\]?)          # \( \) \[ \] \\ give the character; a lone \ gives nothing
    | (?P<open>[(\[])
    | :\s*(?P<weight>[+-]?[.\d]+)\s*\)  # closes a ( with an explicit weight
    | (?P<close>[)\]])
    | [^\\()\[\]:]+ | :                 # text; a ':' that starts no weight is text too
    """,
    re.VERBOSE,
)
_BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def parse_attention(text: str) -> list[tuple[str, float]]:
    """Split a prompt into (text, weight) runs exactly as A1111's `parse_prompt_attention` does.

    Brackets multiply the weight of everything inside them; one left open applies to the rest of the
    prompt; a closer with nothing to close is text. Adjacent runs of equal weight are merged, `BREAK` gives
    the `BREAK` marker, and an empty prompt gives [("", 1.0)]. Raises ValueError for a weight like `(a:1.2.3)`
    (where A1111 fails too).
    """
    texts: list[str] = []
    weights: list[float] = []
    open_round: list[int] = []  # index of the first run inside each open bracket
    open_square: list[int] = []

    def scale_from(start: int, factor: float) -> None:
        # Multiplying run by run, in A1111's order, gives bit-identical weights (1.5730000000000004).
        for i in range(start, len(weights)):
            weights[i] *= factor

    for match in _PIECE.finditer(text):
        piece = match.group()
        if match.group("escaped") is not None:
            texts.append(match.group("escaped"))
            weights.append(1.0)
        elif match.group("open") == "(":
            open_round.append(len(texts))
        elif match.group("open") == "[":
            open_square.append(len(texts))
        elif match.group("weight") is not None and open_round:
            scale_from(open_round.pop(), _weight(match.group("weight"), piece))
        elif piece == ")" and open_round:
            scale_from(open_round.pop(), ROUND_MULTIPLIER)
        elif piece == "]" and open_square:
            scale_from(open_square.pop(), SQUARE_MULTIPLIER)
        else:
            for i, part in enumerate(_BREAK_WORD.split(piece)):
                if i:
                    texts.append(BREAK[0])
                    weights.append(BREAK[1])
                texts.append(part)
                weights.append(1.0)
    # Brackets never closed: all round ones first, then all square ones, as A1111 applies them.
    for start in open_round:
        scale_from(start, ROUND_MULTIPLIER)
    for start in open_square:
        scale_from(start, SQUARE_MULTIPLIER)

    runs: list[tuple[str, float]] = []
    for run_text, weight in zip(texts, weights, strict=True):
        if runs and runs[-1][1] == weight:
            runs[-1] = (runs[-1][0] + run_text, runs[-1][1])
        else:
            runs.append((run_text, weight))
    return runs or [("", 1.0)]


def _weight(number: str, piece: str) -> float:
    try:
        return float(number)
    except ValueError:
        raise ValueError(f"has an attention weight that is not a number: {piece!r}") from None


@dataclass(frozen=True)
class TextualInversion:
    """An embedding the text encoder's vocabulary was extended with (build_engines.embeddings)."""

    name: str
    name_ids: tuple[int, ...]  # what its name tokenizes to: the prompt tokens it replaces
    vector_ids: tuple[int, ...]  # its vectors' ids in the extended vocabulary
    hash: str  # A1111's short hash, for infotext's "TI hashes"


class EmbeddingIndex:
    """Embeddings by the first token of their name, longer names first: A1111's `ids_lookup`. A name is
    matched by its tokens, so one inside a longer word (which tokenizes differently) is not replaced."""

    def __init__(self, embeddings: Iterable[TextualInversion]) -> None:
        self._by_first: dict[int, list[TextualInversion]] = {}
        for e in sorted(embeddings, key=lambda e: len(e.name_ids), reverse=True):
            self._by_first.setdefault(e.name_ids[0], []).append(e)

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> EmbeddingIndex:
        """From build_engines.embeddings' embeddings.json."""
        return cls(
            TextualInversion(name, tuple(e["name_ids"]), tuple(e["vector_ids"]), e["hash"])
            for name, e in table.items()
        )

    def at(self, tokens: Sequence[int], i: int) -> TextualInversion | None:
        for e in self._by_first.get(tokens[i], ()):
            if tuple(tokens[i : i + len(e.name_ids)]) == e.name_ids:
                return e
        return None


@dataclass(frozen=True, eq=False)
class PromptChunks:
    """One prompt as k text-encoder inputs: ids int32 [k, 77] (BOS, 75 tokens padded with EOS, EOS) and
    the weight of each token, float32 [k, 77] (1.0 for BOS, EOS and padding); and the embeddings used."""

    ids: np.ndarray
    weights: np.ndarray
    embeddings: tuple[TextualInversion, ...] = ()

    @property
    def count(self) -> int:
        return int(self.ids.shape[0])


def tokenize_chunks(
    tokenizer: CLIPTokenizer,
    text: str,
    max_chunks: int | None = None,
    embeddings: EmbeddingIndex | None = None,
) -> PromptChunks:
    """Tokenize a prompt into 75-token chunks with per-token weights, as A1111's `tokenize_line` does.

    Each weighted run is tokenized on its own. `BREAK` pads the current chunk and starts a new one. When a
    chunk fills up within COMMA_BACKTRACK tokens after a comma, the tokens after that comma move to the next
    chunk, so the phrase they belong to is not split. An embedding's name becomes its vectors' ids, which
    stay together in one chunk, weighted as the run they are in. A prompt with no attention syntax that fits
    in 75 tokens gives exactly `tokenizer(text, padding="max_length", max_length=77)`'s ids. Raises
    ValueError (worded to follow the field name) when the prompt needs more than `max_chunks` chunks.
    """
    runs = parse_attention(text)
    # verbose=False: prompts over 77 tokens are expected here, not worth the tokenizer's warning.
    tokenized = tokenizer([t for t, _ in runs], add_special_tokens=False, verbose=False).input_ids
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.convert_tokens_to_ids(",</w>")

    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1  # position of the last comma in the current chunk
    token_count = 0
    used: list[TextualInversion] = []

    def close_chunk() -> None:
        nonlocal ids, weights, last_comma
        pad = CHUNK_TOKENS - len(ids)
        chunks.append(([bos, *ids, *[eos] * pad, eos], [1.0, *weights, *[1.0] * pad, 1.0]))
        ids, weights, last_comma = [], [], -1

    for tokens, run in zip(tokenized, runs, strict=True):
        if run == BREAK:
            close_chunk()
            continue
        i = 0
        while i < len(tokens):
            token = tokens[i]
            if token == comma:
                last_comma = len(ids)
            elif (
                len(ids) == CHUNK_TOKENS and last_comma != -1 and CHUNK_TOKENS - last_comma <= COMMA_BACKTRACK
            ):
                # Full within COMMA_BACKTRACK tokens of a comma: move what follows it to the next chunk.
                cut = last_comma + 1
                moved_ids, moved_weights = ids[cut:], weights[cut:]
                del ids[cut:], weights[cut:]
                close_chunk()
                ids, weights = moved_ids, moved_weights
            if len(ids) == CHUNK_TOKENS:
                close_chunk()
            embedding = embeddings.at(tokens, i) if embeddings is not None else None
            if embedding is None:
                replaced, i = [token], i + 1
            else:
                replaced, i = list(embedding.vector_ids), i + len(embedding.name_ids)
                if len(ids) + len(replaced) > CHUNK_TOKENS:  # an embedding is never split across chunks
                    close_chunk()
                used.append(embedding)
            ids += replaced
            weights += [run[1]] * len(replaced)
            token_count += len(replaced)
    if ids or not chunks:
        close_chunk()

    if max_chunks is not None and len(chunks) > max_chunks:
        raise ValueError(
            f"is {token_count} tokens in {len(chunks)} chunks; the engines accept at most {max_chunks} "
            f"chunk{'s' if max_chunks > 1 else ''} ({max_chunks * CHUNK_TOKENS} tokens)"
        )
    return PromptChunks(
        ids=np.array([c[0] for c in chunks], dtype=np.int32),
        weights=np.array([c[1] for c in chunks], dtype=np.float32),
        embeddings=tuple(dict.fromkeys(used)),
    )


def pad_to_same_length(a: PromptChunks, b: PromptChunks) -> tuple[PromptChunks, PromptChunks]:
    """Give both prompts (positive and negative) the larger chunk count by appending empty chunks.

    Needed because both halves of the classifier-free-guidance batch go through the UNet together; A1111
    does the same with its "Pad prompt/negative prompt" option (appending the encoded empty prompt).
    """
    count = max(a.count, b.count)
    return _with_empty_chunks(a, count), _with_empty_chunks(b, count)


def _with_empty_chunks(chunks: PromptChunks, count: int) -> PromptChunks:
    missing = count - chunks.count
    bos, eos = chunks.ids[0, 0], chunks.ids[0, -1]  # every chunk starts with BOS and ends with EOS
    empty = np.full((missing, TOKENS_PER_CHUNK), eos, dtype=np.int32)
    empty[:, 0] = bos
    return PromptChunks(
        ids=np.concatenate([chunks.ids, empty]),
        weights=np.concatenate([chunks.weights, np.ones((missing, TOKENS_PER_CHUNK), dtype=np.float32)]),
        embeddings=chunks.embeddings,
    )


def apply_weights(embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weight one prompt's encoded chunks [k, 77, D] by weights [k, 77]; returns [1, 77·k, D].

    A1111's "Original" emphasis: multiply each token's embedding by its weight, then rescale so the mean
    equals the one before weighting. A1111 encodes and weights one chunk at a time, so the mean is kept per
    chunk. Chunks are then concatenated along the sequence, as the UNet's cross-attention takes them.
    """
    original_mean = embeddings.mean(dim=(1, 2), keepdim=True)
    weighted = embeddings * weights.to(embeddings.device).unsqueeze(-1)
    new_mean = weighted.mean(dim=(1, 2), keepdim=True)
    # A mean of exactly 0 (a final LayerNorm without bias, as in random-weight checkpoints) would be 0/0.
    weighted = weighted * torch.where(new_mean == 0, 1.0, original_mean / new_mean)
    return weighted.to(embeddings.dtype).reshape(1, -1, embeddings.shape[-1])
