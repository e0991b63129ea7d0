"""A1111's `<lora:...>` tags: removed from the prompt, read as its Lora extension reads them."""

from __future__ import annotations

import pytest

from python_backend.extra_networks import LoraTag, parse_extra_networks
from python_backend.prompts import parse_attention


@pytest.mark.parametrize(
    ("prompt", "text", "tags"),
    [
        ("a cat", "a cat", []),
        ("a cat <lora:ink:0.8>", "a cat ", [("ink", 0.8, 0.8)]),
        ("<lora:ink>a cat", "a cat", [("ink", 1.0, 1.0)]),
        ("<lora:ink:0.5:1.25>", "", [("ink", 0.5, 1.25)]),
        ("<lora:ink:te=0.5>", "", [("ink", 0.5, 0.5)]),  # unet follows te
        ("<lora:ink:unet=0.3>", "", [("ink", 1.0, 0.3)]),
        ("<lora:ink:0.7:te=0.2>", "", [("ink", 0.2, 0.2)]),  # a named value wins over a positional one
        ("<lyco:ink:-1>", "", [("ink", -1.0, -1.0)]),  # A1111's other name; negative multipliers allowed
        ("<lora:ink:2><lora:paper:0.5> x", " x", [("ink", 2.0, 2.0), ("paper", 0.5, 0.5)]),
        ("<lora:my lora v2: 0.6 >", "", [("my lora v2", 0.6, 0.6)]),
        ("a <b> c", "a <b> c", []),  # not a tag: no colon
    ],
)
def test_tags_are_removed_and_read_as_a1111_reads_them(prompt, text, tags):
    remaining, found = parse_extra_networks(prompt)
    assert remaining == text
    assert [t.identity for t in found] == tags


def test_weighted_syntax_around_a_tag_keeps_working():
    text, tags = parse_extra_networks("(a cat <lora:ink:0.8>:1.3), [dog]")
    assert tags == [LoraTag("ink", 0.8, 0.8, "<lora:ink:0.8>")]
    assert parse_attention(text) == [("a cat ", 1.3), (", ", 1.0), ("dog", 1 / 1.1)]


@pytest.mark.parametrize(
    ("prompt", "message"),
    [
        ("<hypernet:x:1>", "only <lora:...> extra networks are supported"),
        ("<lora::1>", "without a LoRA name"),
        ("<lora:ink:abc>", "not a finite number: 'abc'"),
        ("<lora:ink:nan>", "not a finite number: 'nan'"),
        ("<lora:ink:1e999>", "not a finite number"),
        ("<lora:ink:unet=inf>", "not a finite number: 'inf'"),
        ("<lora:ink:1:1:8>", "dynamic rank"),
        ("<lora:ink:dyn=8>", "dynamic rank"),
        ("<lora:ink:scale=2>", "unknown arguments ['scale']"),
    ],
)
def test_a_tag_that_cannot_be_honoured_is_an_error_naming_it(prompt, message):
    with pytest.raises(ValueError, match="has the tag") as error:
        parse_extra_networks(f"a cat {prompt}")
    assert message in str(error.value) and prompt in str(error.value)
