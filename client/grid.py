"""X/Y/Z parameter sweeps, as A1111's "X/Y/Z plot" script: one request per cell, a labelled contact sheet
per Z value.

An axis is written `NAME=V1,V2,...`; values are CSV, so one holding a comma is quoted
(`negative_prompt="blurry, lowres",ugly`).
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from client.api import GenerationResult


@dataclass(frozen=True)
class Param:
    name: str  # the StableDiffusionClient.generate argument
    label: str  # A1111's X/Y/Z plot label, used on the sheet and in the infotext
    kind: type[int] | type[float] | type[str]


PARAMS = {
    "steps": Param("steps", "Steps", int),
    "guidance": Param("guidance_scale", "CFG Scale", float),
    "scheduler": Param("scheduler", "Sampler", str),
    "seed": Param("seed", "Seed", int),
    "width": Param("width", "Width", int),
    "height": Param("height", "Height", int),
    "strength": Param("strength", "Denoising", float),
    "negative_prompt": Param("negative_prompt", "Negative prompt", str),
    "subseed_strength": Param("subseed_strength", "Var. strength", float),
    # A1111 has no axis for the scale; this is its infotext key.
    "hr_scale": Param("hr_scale", "Hires upscale", float),
    # The hires fix's: A1111's one "Denoising" axis is img2img's strength in img2img, this in txt2img.
    "denoising_strength": Param("denoising_strength", "Denoising", float),
}
ALIASES = {
    "cfg": "guidance",
    "cfg_scale": "guidance",
    "guidance_scale": "guidance",
    "sampler": "scheduler",
    "denoising": "strength",
    "negative": "negative_prompt",
    "variation_strength": "subseed_strength",
    "hires_upscale": "hr_scale",
}
PAD = 8  # pixels around each label


@dataclass(frozen=True)
class Axis:
    param: Param
    values: tuple[Any, ...]
    texts: tuple[str, ...]  # the values as written, for labels
    spec: str  # the values part as written, for the infotext (as A1111's "X Values")

    def labels(self) -> list[str]:
        return [f"{self.param.label}: {text}" for text in self.texts]


def parse_axis(spec: str) -> Axis:
    """An axis from `NAME=V1,V2,...`; raises ValueError saying what is wrong with it."""
    name, equals, values_text = spec.partition("=")
    key = re.sub(r"[\s-]+", "_", name.strip().lower())
    key = ALIASES.get(key, key)
    if not equals or key not in PARAMS:
        raise ValueError(f"expected NAME=V1,V2,... with NAME one of {', '.join(PARAMS)}; got {spec!r}")
    param = PARAMS[key]
    texts = tuple(text.strip() for text in next(csv.reader([values_text], skipinitialspace=True), []))
    if not texts:
        raise ValueError(f"{key}: no values in {spec!r}")
    values = []
    for text in texts:
        try:
            values.append(param.kind(text))
        except ValueError:
            expected = "an integer" if param.kind is int else "a number"
            raise ValueError(f"{key}: {text!r} is not {expected}") from None
    return Axis(param, tuple(values), texts, values_text)


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float) -> str:
    """`text` broken at spaces into lines no wider than `width` where its words allow."""
    lines = []
    for paragraph in text.split("\n"):
        line = ""
        for word in paragraph.split(" "):
            candidate = f"{line} {word}" if line else word
            if line and font.getlength(candidate) > width:
                lines.append(line)
                line = word
            else:
                line = candidate
        lines.append(line)
    return "\n".join(lines)


def contact_sheet(
    cells: Sequence[Sequence[Image.Image]],
    row_labels: Sequence[str],
    column_labels: Sequence[str],
    title: str = "",
) -> Image.Image:
    """`cells` (rows of images) on white, each centred in its column's widest and its row's tallest image,
    with column labels above, row labels to the left and `title` on top. An all-empty set of labels takes
    no room, so without labels and title the sheet is exactly the images side by side.
    """
    widths = [max(row[j].width for row in cells) for j in range(len(column_labels))]
    heights = [max(image.height for image in row) for row in cells]
    # Pillow's bundled font, sized to the images so labels stay legible from 64 to 1024 pixels.
    font = ImageFont.load_default(size=max(10, min(widths) // 20))
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))

    def size(text: str) -> tuple[int, int]:
        if not text:
            return 0, 0
        _, _, right, bottom = measure.multiline_textbbox((0, 0), text, font=font, align="center")
        return int(right), int(bottom)

    def band(texts: Sequence[str], axis: int) -> int:
        extent = max(size(text)[axis] for text in texts)
        return extent + 2 * PAD if extent else 0

    title_text = _wrap(title, font, sum(widths))
    columns = [
        _wrap(label, font, width - 2 * PAD) for label, width in zip(column_labels, widths, strict=True)
    ]
    rows = [_wrap(label, font, max(widths)) for label in row_labels]
    title_height = band([title_text], 1)
    header = title_height + band(columns, 1)
    left = band(rows, 0)

    sheet = Image.new("RGB", (left + sum(widths), header + sum(heights)), "white")
    draw = ImageDraw.Draw(sheet)

    def write(text: str, x: int, y: int, box_width: int, box_height: int) -> None:
        width, height = size(text)
        position = (x + (box_width - width) // 2, y + (box_height - height) // 2)
        draw.multiline_text(position, text, fill="black", font=font, align="center")

    write(title_text, 0, 0, sheet.width, title_height)
    x = left
    for text, width in zip(columns, widths, strict=True):
        write(text, x, title_height, width, header - title_height)
        x += width
    y = header
    for text, row, height in zip(rows, cells, heights, strict=True):
        write(text, 0, y, left, height)
        x = left
        for image, width in zip(row, widths, strict=True):
            sheet.paste(
                image.convert("RGB"), (x + (width - image.width) // 2, y + (height - image.height) // 2)
            )
            x += width
        y += height
    return sheet


def sweep(
    generate: Callable[..., GenerationResult],
    request: dict[str, Any],
    x: Axis,
    y: Axis | None = None,
    z: Axis | None = None,
) -> list[tuple[Image.Image, str]]:
    """One (contact sheet, infotext) per Z value: `generate(**request)` with each cell's values over it,
    X across, Y down. The infotext is the sheet's first cell's plus A1111's "X Type"/"X Values" params.

    Without a seed (or with -1) and no seed axis, the seed the first response reports is reused for every
    other cell, so that cells differ only in the swept parameters; likewise the first variation seed
    reported, without a subseed.
    """
    axes = {"X": x, "Y": y, "Z": z}
    request = dict(request)
    fix_seed = request.get("seed") in (None, -1) and all(
        a is None or a.param.name != "seed" for a in axes.values()
    )
    fix_subseed = request.get("subseed") in (None, -1)
    axis_params = {}
    for letter, axis in axes.items():
        if axis is not None:
            axis_params[f"{letter} Type"] = axis.param.label
            axis_params[f"{letter} Values"] = axis.spec

    def points(axis: Axis | None) -> list[tuple[str, dict[str, Any]]]:
        if axis is None:
            return [("", {})]
        return [
            (label, {axis.param.name: value}) for label, value in zip(axis.labels(), axis.values, strict=True)
        ]

    rows = points(y)
    sheets = []
    for title, z_values in points(z):
        results: list[list[GenerationResult]] = []
        for _, y_values in rows:
            results.append([])
            for _, x_values in points(x):
                result = generate(**{**request, **z_values, **y_values, **x_values})
                if fix_seed:
                    request["seed"], fix_seed = result.info["seeds"][0], False
                if fix_subseed and "subseeds" in result.info:  # reported where subseed_strength > 0
                    request["subseed"], fix_subseed = result.info["subseeds"][0], False
                results[-1].append(result)
        images = [[result.images[0] for result in row] for row in results]
        sheet = contact_sheet(images, [label for label, _ in rows], x.labels(), title)
        sheets.append((sheet, results[0][0].infotexts(axis_params)[0]))
    return sheets
