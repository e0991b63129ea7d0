"""CLIP's BPE vocabulary as transformers' CLIPTokenizer files, built offline from open-clip-torch's copy.

The hub's openai/clip-vit-large-patch14 tokenizer cannot be downloaded here, but the open-clip-torch wheel
ships the same BPE merges (``bpe_simple_vocab_16e6.txt.gz``); vocab.json and merges.txt follow from it
exactly as CLIP builds its encoder table.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
from pathlib import Path

BPE_FILE_NAME = "bpe_simple_vocab_16e6.txt.gz"
# CLIP keeps the first 49152 - 256 - 2 merges: 2 x 256 byte tokens + merges + 2 special tokens = 49408.
NUM_MERGES = 49152 - 256 - 2
START_OF_TEXT = "<|startoftext|>"
END_OF_TEXT = "<|endoftext|>"
VOCAB_SIZE = 49408


def find_clip_bpe_file() -> Path | None:
    """The BPE file inside the installed open_clip package, or None.

    Only the package's location is looked up: importing open_clip pulls torchvision, which breaks beside a
    local CPU torch.
    """
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / BPE_FILE_NAME
    return path if path.is_file() else None


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character table (whitespace/control bytes moved above 255).

    Its order is part of the vocabulary: printable bytes first, then the shifted ones, as in CLIP.
    """
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    table = {b: chr(b) for b in printable}
    shifted = [b for b in range(256) if b not in table]
    for n, b in enumerate(shifted):
        table[b] = chr(256 + n)
    return table


def clip_vocab_and_merges(bpe_file: Path) -> tuple[dict[str, int], list[str]]:
    """CLIP's token -> id table and its merges ("a b" strings), in CLIP's order."""
    with gzip.open(bpe_file, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    merges = lines[1 : NUM_MERGES + 1]  # line 0 is a version header
    byte_chars = list(bytes_to_unicode().values())
    tokens = [
        *byte_chars,
        *(c + "</w>" for c in byte_chars),
        *(m.replace(" ", "") for m in merges),
        START_OF_TEXT,
        END_OF_TEXT,
    ]
    vocab = {token: i for i, token in enumerate(tokens)}
    if len(vocab) != VOCAB_SIZE:
        raise ValueError(f"{bpe_file}: expected {VOCAB_SIZE} CLIP tokens, got {len(vocab)}")
    return vocab, merges


def write_clip_vocab_files(bpe_file: Path, out_dir: Path) -> tuple[Path, Path]:
    """Write vocab.json and merges.txt (with the header line CLIPTokenizer skips) into out_dir."""
    vocab, merges = clip_vocab_and_merges(bpe_file)
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab_file = out_dir / "vocab.json"
    merges_file = out_dir / "merges.txt"
    vocab_file.write_text(json.dumps(vocab, ensure_ascii=False) + "\n", encoding="utf-8")
    merges_file.write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
    return vocab_file, merges_file
