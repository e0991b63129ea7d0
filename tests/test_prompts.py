"""A1111 prompt semantics: attention parsing, 75-token chunks, padding and weighting."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import CLIPTokenizer

from python_backend.prompts import (
    apply_weights,
    pad_to_same_length,
    parse_attention,
    tokenize_chunks,
)

BOS, EOS, COMMA = 49406, 49407, 267  # CLIP's ids for <|startoftext|>, <|endoftext|>, ","


@pytest.fixture(scope="module")
def tokenizer(tiny_checkpoint: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(tiny_checkpoint / "tokenizer")


# Every example of the docstring of A1111's parse_prompt_attention (modules/prompt_parser.py), verbatim.
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("normal text", [("normal text", 1.0)]),
        ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
        ("(unbalanced", [("unbalanced", 1.1)]),
        ("\\(literal\\]", [("(literal]", 1.0)]),
        ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
        (
            "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
            [
                ("a ", 1.0),
                ("house", 1.5730000000000004),
                (" ", 1.1),
                ("on", 1.0),
                (" a ", 1.1),
                ("hill", 0.55),
                (", sun, ", 1.1),
                ("sky", 1.4641000000000006),
                (".", 1.1),
            ],
        ),
    ],
)
def test_parse_attention_matches_a1111_docstring(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_attention(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # Nesting multiplies; an explicit weight replaces the 1.1 of its own bracket only.
        ("((a))", [("a", 1.2100000000000002)]),
        ("[[a]]", [("a", 0.8264462809917354)]),
        ("(a [b] c:1.5)", [("a ", 1.5), ("b", 1.3636363636363635), (" c", 1.5)]),
        ("(a: 1.5 )", [("a", 1.5)]),
        ("(a:-1)", [("a", -1.0)]),
        # Unclosed brackets apply to the rest of the prompt.
        ("x [a", [("x ", 1.0), ("a", 0.9090909090909091)]),
        ("([a", [("a", 1.0)]),
        # Escapes; a lone backslash disappears.
        ("\\(a\\) \\[b\\] \\\\ c", [("(a) [b] \\ c", 1.0)]),
        ("a\\b", [("ab", 1.0)]),
        # Closers with nothing to close, a ':' outside a weight and a weight that is not one are text.
        ("a) b] c", [("a) b] c", 1.0)]),
        ("a:1.5) b: c", [("a:1.5) b: c", 1.0)]),
        ("(a:1e5)", [("a:1e5", 1.1)]),
        # BREAK: the uppercase word on its own; the whitespace around it goes.
        ("a BREAK b", [("a", 1.0), ("BREAK", -1.0), ("b", 1.0)]),
        ("BREAK a", [("", 1.0), ("BREAK", -1.0), ("a", 1.0)]),
        ("a BREAK", [("a", 1.0), ("BREAK", -1.0), ("", 1.0)]),
        ("x BREAK BREAK y", [("x", 1.0), ("BREAK", -1.0), ("", 1.0), ("BREAK", -1.0), ("y", 1.0)]),
        ("a break b, aBREAK, BREAKING", [("a break b, aBREAK, BREAKING", 1.0)]),
        # Inside brackets the marker is weighted too, so it is no longer a BREAK (as in A1111).
        ("(a BREAK b)", [("a", 1.1), ("BREAK", -1.1), ("b", 1.1)]),
        ("", [("", 1.0)]),
        ("()", [("", 1.0)]),
    ],
)
def test_parse_attention_edge_cases(text: str, expected: list[tuple[str, float]]) -> None:
    assert parse_attention(text) == expected


def test_parse_attention_rejects_a_malformed_weight() -> None:
    with pytest.raises(ValueError, match="not a number: ':1.2.3\\)'"):
        parse_attention("(a:1.2.3)")


@pytest.mark.parametrize(
    "text",
    ["", "a photo of an astronaut riding a horse on mars", "a: b, c", " ".join(["cat"] * 75)],
)
def test_plain_prompt_keeps_diffusers_ids(tokenizer: CLIPTokenizer, text: str) -> None:
    chunks = tokenize_chunks(tokenizer, text)
    expected = tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
    assert chunks.ids.dtype == np.int32 and chunks.weights.dtype == np.float32
    assert chunks.ids.tolist() == [expected]
    assert chunks.weights.tolist() == [[1.0] * 77]


def test_weights_follow_tokens(tokenizer: CLIPTokenizer) -> None:
    chunks = tokenize_chunks(tokenizer, "a (cat:1.3) [dog]")
    a, cat, dog = (tokenizer.convert_tokens_to_ids(w + "</w>") for w in ("a", "cat", "dog"))
    assert chunks.ids[0, :5].tolist() == [BOS, a, cat, dog, EOS]
    assert chunks.weights[0, :5].tolist() == pytest.approx([1.0, 1.0, 1.3, 1 / 1.1, 1.0])
    assert (chunks.weights[0, 4:] == 1.0).all()


def test_long_prompt_fills_chunks_of_75(tokenizer: CLIPTokenizer) -> None:
    cat = tokenizer.convert_tokens_to_ids("cat</w>")
    chunks = tokenize_chunks(tokenizer, "cat " * 100)
    assert chunks.count == 2 and chunks.ids.shape == (2, 77)
    assert chunks.ids[0].tolist() == [BOS] + [cat] * 75 + [EOS]
    assert chunks.ids[1].tolist() == [BOS] + [cat] * 25 + [EOS] * 51


def test_comma_backtrack_moves_the_last_phrase(tokenizer: CLIPTokenizer) -> None:
    a, b = (tokenizer.convert_tokens_to_ids(w + "</w>") for w in ("a", "b"))
    # The chunk fills 5 tokens after a comma (<= 20): the 4 tokens after it move to the next chunk.
    near = tokenize_chunks(tokenizer, "a " * 70 + ", " + "b " * 10)
    assert near.ids.tolist() == [
        [BOS] + [a] * 70 + [COMMA] + [EOS] * 5,
        [BOS] + [b] * 10 + [EOS] * 66,
    ]
    # 25 tokens after the comma (> 20): split where the chunk is full.
    far = tokenize_chunks(tokenizer, "a " * 50 + ", " + "b " * 30)
    assert far.ids.tolist() == [
        [BOS] + [a] * 50 + [COMMA] + [b] * 24 + [EOS],
        [BOS] + [b] * 6 + [EOS] * 70,
    ]


def test_break_starts_a_new_chunk(tokenizer: CLIPTokenizer) -> None:
    a, b = (tokenizer.convert_tokens_to_ids(w + "</w>") for w in ("a", "b"))
    assert tokenize_chunks(tokenizer, "a BREAK b").ids.tolist() == [
        [BOS, a] + [EOS] * 75,
        [BOS, b] + [EOS] * 75,
    ]
    assert tokenize_chunks(tokenizer, "a BREAK").count == 1  # nothing after it: no chunk
    assert tokenize_chunks(tokenizer, "BREAK a").ids[0].tolist() == [BOS] + [EOS] * 76  # empty first


def test_max_chunks(tokenizer: CLIPTokenizer) -> None:
    assert tokenize_chunks(tokenizer, "cat " * 150, max_chunks=2).count == 2
    message = "is 180 tokens in 3 chunks; the engines accept at most 2 chunks (150 tokens)"
    with pytest.raises(ValueError, match=message.replace("(", "\\(").replace(")", "\\)")):
        tokenize_chunks(tokenizer, "cat " * 180, max_chunks=2)
    with pytest.raises(ValueError, match="at most 1 chunk \\(75 tokens\\)"):
        tokenize_chunks(tokenizer, "a BREAK b", max_chunks=1)


def test_pad_to_same_length(tokenizer: CLIPTokenizer) -> None:
    short = tokenize_chunks(tokenizer, "a cat")
    long = tokenize_chunks(tokenizer, "cat " * 160)
    padded_short, padded_long = pad_to_same_length(short, long)
    assert padded_short.count == padded_long.count == 3
    assert padded_short.ids[0].tolist() == short.ids[0].tolist()
    assert padded_short.ids[1:].tolist() == [[BOS] + [EOS] * 76] * 2
    assert (padded_short.weights == 1.0).all() and padded_short.weights.dtype == np.float32
    assert padded_short.ids.dtype == np.int32
    assert np.array_equal(padded_long.ids, long.ids) and np.array_equal(padded_long.weights, long.weights)


def test_apply_weights_with_unit_weights_is_the_identity() -> None:
    embeddings = torch.randn(1, 77, 32, generator=torch.Generator().manual_seed(0))
    out = apply_weights(embeddings, torch.ones(1, 77))
    assert torch.equal(out, embeddings.reshape(1, 77, 32))


def test_apply_weights_scales_tokens_and_keeps_each_chunk_mean() -> None:
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.randn(2, 77, 32, generator=generator) + 0.5
    weights = torch.ones(2, 77)
    weights[0, 3] = 1.5
    weights[1, 1:10] = 0.8
    out = apply_weights(embeddings, weights)
    assert out.shape == (1, 154, 32)
    for i in range(2):
        chunk = out[0, 77 * i : 77 * (i + 1)]
        # A1111: z * weights, then z * (original_mean / new_mean), one chunk at a time.
        weighted = embeddings[i] * weights[i].unsqueeze(-1)
        expected = weighted * (embeddings[i].mean() / weighted.mean())
        torch.testing.assert_close(chunk, expected)
        torch.testing.assert_close(chunk.mean(), embeddings[i].mean())


def test_apply_weights_keeps_zero_mean_embeddings_finite():
    # A final LayerNorm without bias (random-weight checkpoints) can give a mean of exactly 0: 0/0 was NaN.
    embeddings = torch.tensor([[[1.0, -1.0], [2.0, -2.0]]])
    weighted = apply_weights(embeddings, torch.tensor([[1.0, 1.5]]))
    assert torch.isfinite(weighted).all()
    assert torch.equal(apply_weights(embeddings, torch.ones(1, 2)), embeddings.reshape(1, 2, 2))
