from __future__ import annotations

import json
import re

import numpy as np
import pytest
import sd_parsers
from PIL import Image
from sd_parsers.data import Generators

from client.api import decode_response
from client.infotext import format_infotext, parse_infotext, read_infotext, request_from_infotext, save_png

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


# --- generation arguments from an infotext ------------------------------------------------------------


def test_request_from_infotext() -> None:
    text = format_infotext(
        "a castle, at dusk", "blurry", {**PARAMS, "Size": "640x384", "Denoising strength": 0.45}
    )
    assert request_from_infotext(text) == {
        "prompt": "a castle, at dusk",
        "negative_prompt": "blurry",
        "steps": 20,
        "guidance_scale": 7.5,
        "seed": 123,
        "strength": 0.45,
        "width": 640,
        "height": 384,
        "scheduler": "Euler a",
    }


def test_request_from_infotext_takes_only_what_is_there() -> None:
    # Three params make it a params line; the rest are left to the command line or the server.
    assert request_from_infotext("a cat\nSeed: 1, Model: m, Version: v1.10.1") == {
        "prompt": "a cat",
        "negative_prompt": "",
        "seed": 1,
    }
    assert request_from_infotext("just a prompt") == {"prompt": "just a prompt", "negative_prompt": ""}


@pytest.mark.parametrize(
    ("label", "fill"),
    [
        ("fill", "fill"),
        ("original", "original"),
        ("latent noise", "latent_noise"),
        ("latent nothing", "latent_nothing"),
    ],
)
def test_request_from_a1111_inpainting_infotext(label: str, fill: str) -> None:
    # As A1111's img2img inpaint tab writes it ("Masked content" only for a fill other than its default).
    text = (
        "a red hat\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x512, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.75, Mask blur: 4, "
        f"Inpaint area: Only masked, Masked area padding: 32, Masked content: {label}, Version: v1.10.1"
    )
    request = request_from_infotext(text)
    assert {key: request[key] for key in ("strength", "width", "height", "scheduler")} == {
        "strength": 0.75,
        "width": 512,
        "height": 512,
        "scheduler": "DPM++ 2M Karras",
    }
    assert (
        request["mask_blur"],
        request["inpainting_fill"],
        request["inpaint_full_res"],
        request["inpaint_full_res_padding"],
    ) == (4, fill, True, 32)
    whole = request_from_infotext("p\nSteps: 1, Seed: 2, Mask blur: 0, Inpaint area: Whole picture")
    assert (whole["mask_blur"], whole["inpaint_full_res"]) == (0, False)
    assert "inpainting_fill" not in whole and "inpaint_full_res_padding" not in whole  # the server defaults


@pytest.mark.parametrize(
    ("sampler", "schedule", "scheduler"),
    [
        ("DPM++ 2M", "Karras", "DPM++ 2M Karras"),  # A1111 >= 1.9 writes the schedule apart
        ("Euler a", "Automatic", "Euler a"),
        ("DPM++ 2M Karras", "Karras", "DPM++ 2M Karras"),
        ("DPM++ 2M", "Exponential", "DPM++ 2M Exponential"),  # the server then names what it offers
        ("DDIM", None, "DDIM"),
    ],
)
def test_request_from_infotext_scheduler(sampler: str, schedule: str | None, scheduler: str) -> None:
    params = {"Steps": 20, "Sampler": sampler, "Schedule type": schedule, "CFG scale": 7}
    assert request_from_infotext(format_infotext("p", None, params))["scheduler"] == scheduler


@pytest.mark.parametrize(
    ("key", "value", "complaint"),
    [
        ("Steps", "twenty", "Steps: expected an integer, got 'twenty'"),
        ("Seed", "1.5", "Seed: expected an integer, got '1.5'"),
        ("CFG scale", "high", "CFG scale: expected a number, got 'high'"),
        ("Denoising strength", "", "Denoising strength: expected a number, got ''"),
        ("Size", "512", "Size: expected WIDTHxHEIGHT, got '512'"),
        ("Mask blur", "4.5", "Mask blur: expected an integer, got '4.5'"),
        ("Masked area padding", "wide", "Masked area padding: expected an integer, got 'wide'"),
        (
            "Masked content",
            "lama cleaner",  # an extension's choice
            "Masked content: expected one of fill, original, latent noise, latent nothing, "
            "got 'lama cleaner'",
        ),
        (
            "Inpaint area",
            "Everything",
            "Inpaint area: expected one of Whole picture, Only masked, got 'Everything'",
        ),
        ("Variation seed", "-", "Variation seed: expected an integer, got '-'"),
        ("Variation seed strength", "some", "Variation seed strength: expected a number, got 'some'"),
        ("Hires upscale", "2x", "Hires upscale: expected a number, got '2x'"),
        ("Hires steps", "1.5", "Hires steps: expected an integer, got '1.5'"),
        ("Hires resize", "1024", "Hires resize: expected WIDTHxHEIGHT (with a Size), got '1024'"),
        ("Hires resize", "1024x512", "Hires resize: 1024x512 is not Size 512x512 scaled"),
        ("Hires resize", "0x0", "Hires resize: 0x0 is not Size 512x512 scaled"),
    ],
)
def test_request_from_infotext_refuses_unreadable_values(key: str, value: str, complaint: str) -> None:
    with pytest.raises(ValueError, match=re.escape(complaint)):
        request_from_infotext(format_infotext("p", None, {**PARAMS, key: value}))


def test_request_from_a1111_variation_and_hires_infotext() -> None:
    # As A1111's txt2img writes it: Size is the first pass's, the hires fix's params come last.
    text = (
        "a red hat\n"
        "Steps: 30, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 42, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Variation seed: 3735928559, "
        "Variation seed strength: 0.25, Denoising strength: 0.45, Hires upscale: 1.5, Hires steps: 12, "
        "Hires upscaler: Latent, Version: v1.10.1"
    )
    request = request_from_infotext(text)
    assert {key: request[key] for key in ("seed", "width", "height", "subseed", "subseed_strength")} == {
        "seed": 42,
        "width": 512,
        "height": 768,
        "subseed": 3735928559,
        "subseed_strength": 0.25,
    }
    assert {
        key: request[key] for key in ("enable_hr", "hr_scale", "hr_second_pass_steps", "hr_upscaler")
    } == {
        "enable_hr": True,
        "hr_scale": 1.5,
        "hr_second_pass_steps": 12,
        "hr_upscaler": "Latent",
    }
    assert request["denoising_strength"] == 0.45 and "strength" not in request  # txt2img's: the second pass


@pytest.mark.parametrize(
    ("hires_params", "expected"),
    [
        # No "Hires steps" (A1111's 0, = Steps): the server's default; an upscaler the server lacks is
        # passed on for it to refuse.
        ("Hires upscale: 2, Hires upscaler: R-ESRGAN 4x+", {"hr_scale": 2.0, "hr_upscaler": "R-ESRGAN 4x+"}),
        # A1111's "Resize to" (a 0 side follows the other), as the scale of Size it is.
        ("Hires resize: 1024x1536, Hires upscaler: Lanczos", {"hr_scale": 2.0, "hr_upscaler": "Lanczos"}),
        ("Hires resize: 768x0, Hires upscaler: Latent", {"hr_scale": 1.5, "hr_upscaler": "Latent"}),
        ("Hires resize: 0x1152, Hires steps: 5", {"hr_scale": 1.5, "hr_second_pass_steps": 5}),
    ],
)
def test_request_from_infotext_hires_variants(hires_params: str, expected: dict) -> None:
    request = request_from_infotext(f"p\nSteps: 20, Seed: 1, Size: 512x768, {hires_params}")
    hires = {key: value for key, value in request.items() if key.startswith("hr_")}
    assert request["enable_hr"] is True and hires == expected


def test_request_from_infotext_without_hires_keeps_img2img_strength() -> None:
    request = request_from_infotext("p\nSteps: 20, Seed: 1, Size: 512x512, Denoising strength: 0.4")
    assert request["strength"] == 0.4
    assert not {"enable_hr", "denoising_strength", "subseed", "subseed_strength"} & set(request)


# --- a third-party reader: sd-parsers -----------------------------------------------------------------

# sd-parsers 0.6 is a looser reader than A1111: it splits the prompt at "Negative prompt:" anywhere in a
# line (and raises if there is also a real negative prompt) and splits JSON-quoted param values at their
# commas and colons. The cases stay clear of both; our own parser handles them (see test_round_trip).
SD_PARSERS_CASES = [
    ("a castle, at dusk", "blurry, low quality"),
    ("(masterpiece:1.2), [style: anime], <lora:add_detail:0.6>, weight:0.5", "text: watermark, signature"),
    ('a sign saying "open", "closed"', 'no "quotes", (worst quality:1.4)'),
    ("first line\nsecond line, with comma", "negative line one\nnegative line two: colon"),
    ("城堡, 夕暮れ — café 🌅", "ぼやけた, низкое качество"),
    ("Steps: 1, Sampler: x, CFG scale: 2\nreal prompt", ""),  # a params-like prompt line
    ("a cat", ""),
]


@pytest.mark.parametrize(("prompt", "negative"), SD_PARSERS_CASES)
@pytest.mark.parametrize(
    "info_extra",
    [
        {},  # generate
        {"strength": float(np.float32(0.6)), "resize_mode": "crop_and_resize"},  # img2img
    ],
    ids=["generate", "img2img"],
)
def test_sd_parsers_reads_our_pngs(tmp_path, prompt: str, negative: str, info_extra: dict) -> None:
    info = {
        "prompt": prompt,
        "negative_prompt": negative,
        "seeds": [3735928559],
        "scheduler": "dpmpp_2m_karras",
        "sampler": "DPM++ 2M Karras",
        "steps": 28,
        "guidance_scale": float(np.float32(6.5)),
        "width": 24,
        "height": 16,
        "model": "stable-diffusion-v1-4",
        **info_extra,
    }
    [path] = decode_response(np.zeros((1, 16, 24, 3), np.uint8), json.dumps(info).encode()).save(tmp_path)

    parsed = sd_parsers.ParserManager().parse(path)
    assert parsed is not None and parsed.generator == Generators.AUTOMATIC1111
    [sampler] = parsed.samplers
    assert (parsed.full_prompt, parsed.full_negative_prompt) == (prompt, negative)
    assert sampler.name == "DPM++ 2M"  # A1111 >= 1.9 style: the schedule apart
    assert sampler.parameters == {
        "steps": "28",
        "cfg_scale": "6.5",
        "seed": "3735928559",
        "scheduler": "Karras",
    }
    assert sampler.model is not None and sampler.model.name == "stable-diffusion-v1-4"
    assert parsed.metadata["Size"] == "24x16"
    assert parsed.metadata.get("Denoising strength") == ("0.6" if info_extra else None)
    # ... and what `--infotext` makes of the same file.
    ours = request_from_infotext(read_infotext(path) or "")
    assert (ours["prompt"], ours["negative_prompt"], ours["scheduler"]) == (
        prompt,
        negative,
        "DPM++ 2M Karras",
    )
    assert (ours["steps"], ours["guidance_scale"], ours["seed"], ours["width"], ours["height"]) == (
        28,
        6.5,
        3735928559,
        24,
        16,
    )
    assert ours.get("strength") == (0.6 if info_extra else None)


INFO_FOR_GRID = {
    "prompt": "a castle, at dusk",
    "negative_prompt": "",
    "seeds": [7],
    "sampler": "Euler a",
    "steps": 10,
    "guidance_scale": 7.0,
    "width": 8,
    "height": 8,
}


def test_sd_parsers_reads_a_grid_infotext(tmp_path) -> None:
    # The axes' values are quoted lists ("X Values": "10,20,30"); sd-parsers splits them at the commas,
    # but what it reads of the first cell stays right.
    result = decode_response(np.zeros((1, 8, 8, 3), np.uint8), json.dumps(INFO_FOR_GRID).encode())
    text = result.infotexts(
        {"X Type": "Steps", "X Values": "10,20,30", "Y Type": "Sampler", "Y Values": "Euler a,DDIM"}
    )[0]
    path = tmp_path / "grid.png"
    save_png(result.images[0], path, text)
    parsed = sd_parsers.ParserManager().parse(path)
    assert parsed is not None and parsed.full_prompt == "a castle, at dusk"
    assert parsed.samplers[0].name == "Euler a" and parsed.samplers[0].parameters["steps"] == "10"
    assert parsed.metadata["X Type"] == "Steps" and parsed.metadata["Size"] == "8x8"


@pytest.mark.parametrize("only_masked", [True, False])
def test_sd_parsers_reads_an_inpainting_infotext(tmp_path, only_masked: bool) -> None:
    # sd-parsers has no inpainting fields of its own: it keeps every param it doesn't know in `metadata`.
    info = {
        **INFO_FOR_GRID,
        "strength": float(np.float32(0.6)),
        "resize_mode": "just_resize",
        "mask_blur": 8,
        "inpainting_fill": "latent_nothing",
        "inpaint_full_res": only_masked,
        "inpaint_full_res_padding": 24,
        "width": 40,  # "only masked": the original image's size
        "height": 24,
    }
    result = decode_response(np.zeros((1, 24, 40, 3), np.uint8), json.dumps(info).encode())
    if only_masked:
        result.generation_size = (16, 8)
    [path] = result.save(tmp_path)

    parsed = sd_parsers.ParserManager().parse(path)
    assert parsed is not None and parsed.generator == Generators.AUTOMATIC1111
    assert parsed.full_prompt == "a castle, at dusk" and parsed.samplers[0].name == "Euler a"
    inpainting = {
        key: parsed.metadata.get(key) for key in ("Mask blur", "Inpaint area", "Masked area padding")
    }
    assert inpainting == (
        {"Mask blur": "8", "Inpaint area": "Only masked", "Masked area padding": "24"}
        if only_masked
        else {"Mask blur": "8", "Inpaint area": None, "Masked area padding": None}
    )
    assert parsed.metadata["Masked content"] == "latent nothing"
    assert parsed.metadata["Denoising strength"] == "0.6"
    assert parsed.metadata["Size"] == ("16x8" if only_masked else "40x24")
    # ... and `--infotext` reads back the request's arguments.
    ours = request_from_infotext(read_infotext(path) or "")
    assert (ours["mask_blur"], ours["inpainting_fill"], ours["strength"]) == (8, "latent_nothing", 0.6)
    assert ours.get("inpaint_full_res") == (True if only_masked else None)
    assert ours.get("inpaint_full_res_padding") == (24 if only_masked else None)
    assert (ours["width"], ours["height"]) == ((16, 8) if only_masked else (40, 24))


def test_sd_parsers_reads_a_variation_and_hires_infotext(tmp_path) -> None:
    # sd-parsers reads Seed, Steps, CFG scale and the sampler; it keeps the variation and hires params in
    # `metadata`, as A1111 writes them.
    info = {
        **INFO_FOR_GRID,
        "width": 32,  # the upscaled images
        "height": 16,
        "subseeds": [99],
        "subseed_strength": float(np.float32(0.3)),
        "hr_scale": 2.0,
        "hr_upscaler": "Latent",
        "hr_second_pass_steps": 4,
        "denoising_strength": float(np.float32(0.7)),
        "first_pass_width": 16,
        "first_pass_height": 8,
    }
    [path] = decode_response(np.zeros((1, 16, 32, 3), np.uint8), json.dumps(info).encode()).save(tmp_path)

    parsed = sd_parsers.ParserManager().parse(path)
    assert parsed is not None and parsed.generator == Generators.AUTOMATIC1111
    [sampler] = parsed.samplers
    assert sampler.name == "Euler a"
    assert sampler.parameters == {"steps": "10", "cfg_scale": "7.0", "seed": "7"}
    keys = ("Size", "Variation seed", "Variation seed strength", "Denoising strength", "Hires upscale")
    assert {key: parsed.metadata[key] for key in (*keys, "Hires steps", "Hires upscaler")} == {
        "Size": "16x8",  # the first pass's, as A1111's
        "Variation seed": "99",
        "Variation seed strength": "0.3",
        "Denoising strength": "0.7",
        "Hires upscale": "2",
        "Hires steps": "4",
        "Hires upscaler": "Latent",
    }
    # ... and `--infotext` reads back the request's arguments.
    ours = request_from_infotext(read_infotext(path) or "")
    assert {key: value for key, value in ours.items() if key not in ("prompt", "negative_prompt")} == {
        "steps": 10,
        "guidance_scale": 7.0,
        "seed": 7,
        "width": 16,
        "height": 8,
        "scheduler": "Euler a",
        "subseed": 99,
        "subseed_strength": 0.3,
        "enable_hr": True,
        "hr_scale": 2.0,
        "hr_second_pass_steps": 4,
        "hr_upscaler": "Latent",
        "denoising_strength": 0.7,
    }


def test_clip_skip_and_model_hash_are_written_and_read_back():
    from client.api import decode_response
    from client.infotext import parse_infotext, request_from_infotext

    info = {
        "prompt": "a cat",
        "seeds": [3],
        "steps": 4,
        "sampler": "Euler a",
        "guidance_scale": 7.0,
        "width": 64,
        "height": 64,
        "model": "tiny",
        "model_hash": "0123456789",
        "clip_skip": 2,
    }
    result = decode_response(np.zeros((1, 64, 64, 3), np.uint8), json.dumps(info).encode())
    [text] = result.infotexts()
    _, _, params = parse_infotext(text)
    assert params["Clip skip"] == "2" and params["Model hash"] == "0123456789"
    assert request_from_infotext(text)["clip_skip"] == 2


def test_karras_schedules_are_written_as_a1111_schedule_type():
    from client.api import decode_response
    from client.infotext import parse_infotext, request_from_infotext

    info = {"prompt": "a cat", "seeds": [3], "steps": 4, "sampler": "DPM++ 2M Karras", "guidance_scale": 7.0}
    [text] = decode_response(np.zeros((1, 8, 8, 3), np.uint8), json.dumps(info).encode()).infotexts()
    _, _, params = parse_infotext(text)
    assert (params["Sampler"], params["Schedule type"]) == ("DPM++ 2M", "Karras")
    assert request_from_infotext(text)["scheduler"] == "DPM++ 2M Karras"
