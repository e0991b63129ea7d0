from __future__ import annotations

import pytest
from PIL import Image

from client.infotext import format_infotext, parse_infotext, read_infotext, save_png

PARAMS = {
    "Steps": 20,
    "Sampler": "Euler a",
    "CFG scale": 7.5,
    "Seed": 123,
    "Size": "512x512",
    "Model": "stable-diffusion-v1-4",
}
PARSED_PARAMS = {key: str(value) for key, value in PARAMS.items()}


def test_format_writes_a1111_layout() -> None:
    text = format_infotext("a castle, at dusk", "blurry, low quality", PARAMS)
    assert text == (
        "a castle, at dusk\n"
        "Negative prompt: blurry, low quality\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 123, Size: 512x512, Model: stable-diffusion-v1-4"
    )


@pytest.mark.parametrize("negative", ["", None])
def test_format_omits_empty_negative_prompt(negative: str | None) -> None:
    text = format_infotext("a cat", negative, PARAMS)
    assert text.split("\n") == ["a cat", format_infotext("", None, PARAMS)]


def test_format_quotes_values_like_a1111_and_leaves_out_none() -> None:
    params = {
        "Steps": 1,
        "Sampler": "Euler",
        "Seed": 5,
        "Model": "a, b",
        "Hashes": "x: y",
        "Note": "1\n2",
        "Gone": None,
    }
    line = format_infotext("p", None, params).splitlines()[-1]
    assert line == r'Steps: 1, Sampler: Euler, Seed: 5, Model: "a, b", Hashes: "x: y", Note: "1\n2"'


@pytest.mark.parametrize(
    ("prompt", "negative"),
    [
        ("a castle, at dusk", "blurry, low quality"),
        ("(masterpiece:1.2), [style: anime], weight:0.5", "text: watermark, signature"),
        ('a sign saying "open", "closed"', 'no "quotes"'),
        ("first line\nsecond line, with comma\n\nafter an empty line", ""),
        ("prompt", "negative line one\nnegative line two: colon"),
        ("城堡, 夕暮れ — café 🌅", "ぼやけた, низкое качество"),
        ("a cat", ""),
        ("", "only a negative"),
        ("", ""),
        # A prompt line that looks like a params line stays in the prompt when another line follows it.
        ("Steps: 1, Sampler: x, CFG scale: 2\nreal prompt", ""),
        ("back\\slash and trailing backslash\\", "tab\there"),
    ],
)
def test_round_trip(prompt: str, negative: str) -> None:
    assert parse_infotext(format_infotext(prompt, negative, PARAMS)) == (prompt, negative, PARSED_PARAMS)


@pytest.mark.parametrize(
    "value",
    ["", "a, b", "x: y", "multi\nline", 'say "hi"', '"wrapped"', " padded ", "юникод, ✓", 'both "a", b:c\\d'],
)
def test_param_values_round_trip(value: str) -> None:
    params = {**PARAMS, "Model": value}
    assert parse_infotext(format_infotext("p", "n", params))[2]["Model"] == value


def test_parse_a1111_classic() -> None:
    # The example of A1111's own parse_generation_parameters docstring.
    text = (
        "girl with an artist's beret, determined, blue eyes, desert scene, computer monitors, heavy makeup, "
        "by Alphonse Mucha and Charlie Bowater, ((eyeshadow)), (coquettish), detailed, intricate\n"
        "Negative prompt: ugly, fat, obese, chubby, (((deformed))), [blurry], bad anatomy, disfigured, "
        "poorly drawn face, mutation, mutated, (extra_limb), (ugly), (poorly drawn hands), messy drawing\n"
        "Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 965400086, Size: 512x512, Model hash: 45dee52b"
    )
    prompt, negative, params = parse_infotext(text)
    assert prompt.startswith("girl with an artist's beret,") and prompt.endswith("detailed, intricate")
    assert negative.startswith("ugly, fat,") and negative.endswith("messy drawing")
    assert params == {
        "Steps": "20",
        "Sampler": "Euler a",
        "CFG scale": "7",
        "Seed": "965400086",
        "Size": "512x512",
        "Model hash": "45dee52b",
    }


def test_parse_a1111_with_quoted_values() -> None:
    text = (
        "masterpiece, best quality, 1girl, <lora:add_detail:0.6>\n"
        "Negative prompt: (worst quality:1.4), easynegative\n"
        "Steps: 28, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 3735928559, Size: 512x768, "
        "Model hash: 7f96a1a9ca, Model: anything-v4.5, Denoising strength: 0.5, Clip skip: 2, "
        'Hires upscale: 2, Hires upscaler: Latent, Lora hashes: "add_detail: 7c6bad76eb54", '
        'TI hashes: "easynegative: c74b4e810b03", ADetailer prompt: "a \\"red\\", dress", Version: v1.6.0'
    )
    prompt, negative, params = parse_infotext(text)
    assert prompt == "masterpiece, best quality, 1girl, <lora:add_detail:0.6>"
    assert negative == "(worst quality:1.4), easynegative"
    assert params["Sampler"] == "DPM++ 2M Karras"
    assert params["Lora hashes"] == "add_detail: 7c6bad76eb54"
    assert params["TI hashes"] == "easynegative: c74b4e810b03"
    assert params["ADetailer prompt"] == 'a "red", dress'
    assert params["Version"] == "v1.6.0"
    assert len(params) == 15


def test_parse_a1111_multiline_prompt_and_negative() -> None:
    text = (
        "a photo of a cat\n"
        "  wearing a hat, BREAK\n"
        "in the snow\n"
        "Negative prompt: blurry\n"
        "lowres, bad hands\n"
        "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1, Size: 512x512, "
        "Model: v1-5-pruned-emaonly, Version: v1.10.1"
    )
    prompt, negative, params = parse_infotext(text)
    assert prompt == "a photo of a cat\nwearing a hat, BREAK\nin the snow"  # A1111 strips each line
    assert negative == "blurry\nlowres, bad hands"
    assert params["Schedule type"] == "Karras"
    assert params["Model"] == "v1-5-pruned-emaonly"


def test_parse_a1111_without_negative_prompt() -> None:
    text = (
        "a red apple\nSteps: 50, Sampler: PLMS, CFG scale: 7.5, Seed: 42, Size: 512x512, Model hash: 7460a6fa"
    )
    assert parse_infotext(text) == (
        "a red apple",
        "",
        {
            "Steps": "50",
            "Sampler": "PLMS",
            "CFG scale": "7.5",
            "Seed": "42",
            "Size": "512x512",
            "Model hash": "7460a6fa",
        },
    )


@pytest.mark.parametrize("text", ["a cat, style: anime", "a cat\nstyle: anime, mood: calm"])
def test_parse_text_without_params_line_is_all_prompt(text: str) -> None:
    # Fewer than three `key: value` pairs on the last line: A1111 reads it as part of the prompt.
    assert parse_infotext(text) == (text, "", {})


@pytest.mark.parametrize("prompt", ["plain ascii, with commas", "unicode: 城堡 🌅"])
def test_png_chunk_round_trip(tmp_path, prompt: str) -> None:
    text = format_infotext(prompt, "blurry", PARAMS)
    path = tmp_path / "image.png"
    save_png(Image.new("RGB", (8, 8), (10, 20, 30)), path, text)
    assert read_infotext(path) == text
    with Image.open(path) as image:
        assert image.format == "PNG" and image.getpixel((0, 0)) == (10, 20, 30)


def test_read_infotext_without_chunk(tmp_path) -> None:
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    assert read_infotext(path) is None
