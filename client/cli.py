"""`sd-client`: generate images (from text or an image, or inpaint one) with a Triton pipeline model
(`--model`, default `pipeline`), sweep parameters into X/Y/Z grids, list its schedulers, list the
pipeline models (one per checkpoint) the server hosts, or list the LoRA files prompts can name.

Exit codes: 0 success, 1 server or I/O failure (including no server at the URL), 2 invalid arguments
(rejected by argparse, by our checks of input files and axes, or by the server).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from client.api import (
    DEFAULT_URLS,
    HIRES_OPTIONS,
    ControlNetUnit,
    GenerationError,
    GenerationResult,
    StableDiffusionClient,
    save_pngs,
)
from client.grid import PARAMS, Axis, parse_axis, sweep
from client.infotext import read_infotext, request_from_infotext
from python_backend.control import CONTROL_MODES
from python_backend.shapes import PIPELINE

EXIT_FAILURE = 1
EXIT_INVALID_ARGUMENT = 2  # as argparse uses for bad command lines
# Namespace attributes that are StableDiffusionClient.generate arguments, where the command has them.
REQUEST_ARGS = (
    "prompt",
    "negative_prompt",
    "steps",
    "guidance_scale",
    "seed",
    "scheduler",
    "width",
    "height",
    "num_images",
    "strength",
    "resize_mode",
    "mask_blur",
    "inpainting_fill",
    "inpaint_full_res",
    "inpaint_full_res_padding",
    "subseed",
    "subseed_strength",
    "enable_hr",
    *HIRES_OPTIONS,
    "clip_skip",
)


class UsageError(Exception):
    """A command line that parses but can't be run (unreadable input file, clashing axes): exit 2."""


def build_parser() -> argparse.ArgumentParser:
    connection = argparse.ArgumentParser(add_help=False)
    connection.add_argument(
        "--url",
        metavar="HOST:PORT",
        help=f"Triton server (default: {DEFAULT_URLS['grpc']} for grpc, {DEFAULT_URLS['http']} for http)",
    )
    connection.add_argument(
        "--protocol", choices=sorted(DEFAULT_URLS), default="grpc", help="(default: grpc)"
    )
    connection.add_argument(
        "--model",
        default=PIPELINE,
        metavar="NAME",
        help="the pipeline model, i.e. the checkpoint (`sd-client models` lists them; default: %(default)s)",
    )
    connection.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="give up on a generation after this long; the server, sent the same timeout, stops generating "
        "too (default: no limit)",
    )
    connection.add_argument(
        "--retries",
        type=int,
        default=0,
        metavar="N",
        help="retry a generation the server refused as UNAVAILABLE (overloaded, stopping, an engine "
        "restarting) up to N times, with exponential backoff (default: 0)",
    )

    request = argparse.ArgumentParser(add_help=False)
    request.add_argument(
        "prompt",
        nargs="?",
        help="what the images should show (may be left out with --infotext, which then supplies it)",
    )
    request.add_argument(
        "--negative-prompt", metavar="TEXT", help="what they should not show (default: server default)"
    )
    request.add_argument("--steps", type=int, metavar="N", help="denoising steps (default: server default)")
    request.add_argument(
        "--guidance",
        dest="guidance_scale",
        type=float,
        metavar="SCALE",
        help="classifier-free guidance scale (default: server default)",
    )
    request.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="seed of the noise, for repeatable results (default: server default, random; -1 is random too)",
    )
    request.add_argument(
        "--scheduler",
        metavar="NAME",
        help="scheduler name or A1111 sampler label, see `sd-client schedulers` (default: server default)",
    )
    request.add_argument("--width", type=int, metavar="N", help="in pixels (default: server default)")
    request.add_argument("--height", type=int, metavar="N", help="in pixels (default: server default)")
    request.add_argument(
        "--subseed",
        type=int,
        metavar="N",
        help="variation seed (A1111's): image i's noise moves toward that of N + i; needs --subseed-strength "
        "(default: server default, random; -1 is random too)",
    )
    request.add_argument(
        "--subseed-strength",
        type=float,
        metavar="F",
        help="how far the noise moves toward the variation seed's, 0..1 (default: server default, 0)",
    )
    request.add_argument(
        "--clip-skip",
        type=int,
        metavar="N",
        help="A1111's Clip skip: 1 = CLIP's last layer, 2 = the penultimate (default: server default, 1)",
    )
    request.add_argument(
        "--controlnet",
        dest="controlnet_specs",
        action="append",
        default=[],
        metavar="MODEL:IMAGE[:WEIGHT[:START:END[:MODE]]]",
        help="a ControlNet unit (repeatable): a ControlNet the server was built with (build-engines "
        "--controlnet), a control map image file, its weight (0..2), the share of the steps it acts from and "
        "to (0..1), and its control mode (0 Balanced, 1 My prompt is more important, 2 ControlNet is more "
        "important); with --infotext, settings the PNG records for the same unit fill in the rest",
    )
    request.add_argument(
        "--infotext",
        type=Path,
        metavar="FILE.png",
        help="take prompt, negative prompt, steps, sampler, CFG scale, seed, size, variation seed and "
        "strength (and for generate the hires fix, for img2img and inpaint denoising strength, for inpaint "
        "the mask options) from this PNG's A1111 `parameters` chunk; options given here override them",
    )
    request.add_argument(
        "--progress",
        action="store_true",
        help="show a progress bar streamed from the server (gRPC; Ctrl-C or --timeout cancels it there)",
    )
    request.add_argument(
        "--preview-dir", type=Path, metavar="DIR", help="with --progress: save the server's preview PNGs here"
    )
    request.add_argument(
        "--preview-every",
        type=int,
        default=5,
        metavar="K",
        help="with --preview-dir: a preview every K steps",
    )
    request.add_argument(
        "--out", type=Path, default=Path("outputs"), metavar="DIR", help="where PNGs go (default: ./outputs)"
    )
    batch = argparse.ArgumentParser(add_help=False)
    batch.add_argument(
        "--num-images", type=int, metavar="N", help="images in one request (default: server default)"
    )

    parser = argparse.ArgumentParser(
        prog="sd-client",
        description="Generate images with the Triton pipeline model, sweep parameters into grids, "
        "or list its schedulers.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser(
        "generate",
        parents=[request, batch, connection],
        help="generate images and save them as PNGs with A1111 infotext",
        description="Generate images; print the path of each PNG written. Server warnings go to stderr.",
    )
    _add_hires_options(generate)
    img2img = commands.add_parser(
        "img2img",
        parents=[request, batch, connection],
        help="redraw an image guided by a prompt; save PNGs as generate does",
        description="Generate images from an initial image; print the path of each PNG written.",
    )
    _add_image_options(img2img, required=True)
    inpaint = commands.add_parser(
        "inpaint",
        parents=[request, batch, connection],
        help="redraw the masked part of an image guided by a prompt; save PNGs as generate does",
        description="Inpaint an image: redraw where the mask is white; print the path of each PNG written.",
    )
    _add_image_options(inpaint, required=True)
    _add_mask_options(inpaint)
    grid = commands.add_parser(
        "grid",
        parents=[request, connection],
        help="sweep parameters into an A1111-style X/Y/Z plot",
        description="One request per cell, all with the same seed (the first response's when none is "
        "given); writes one labelled contact sheet PNG per Z value (X across, Y down) as grid-NNNNN.png, "
        "with the first cell's infotext plus the axes, and prints their paths. "
        f"NAME is one of: {', '.join(PARAMS)} (aliases: cfg, sampler, denoising, negative); "
        "hr_scale and denoising_strength need --enable-hr. "
        'values are comma-separated, quoted where they hold a comma: --y scheduler="Euler a",DDIM. '
        "An axis overrides the option of the same parameter.",
    )
    for letter, required in (("x", True), ("y", False), ("z", False)):
        grid.add_argument(
            f"--{letter}",
            type=_axis,
            required=required,
            metavar="NAME=V1,V2,...",
            help={"x": "the columns", "y": "the rows", "z": "one sheet per value"}[letter],
        )
    _add_image_options(grid, required=False)
    _add_hires_options(grid)

    commands.add_parser(
        "schedulers",
        parents=[connection],
        help="list the schedulers the server offers",
        description="List scheduler names and A1111 sampler labels; the checkpoint's own is the default.",
    )
    commands.add_parser(
        "models",
        parents=[connection],
        help="list the pipeline models the server hosts, one per checkpoint",
        description="List each pipeline model (a --model value) with the checkpoint it serves.",
    )
    loras = commands.add_parser(
        "loras",
        parents=[connection],
        help="list the LoRA files prompts can name with <lora:NAME:MULTIPLIER>",
        description="List the LoRA files in the server's LoRA folder (sd-serve --lora-dir): each one's name "
        "(the file stem), its alias (from the file's metadata) and its path. A prompt may use either name.",
    )
    loras.add_argument("--refresh", action="store_true", help="scan the server's LoRA folder again first")
    return parser


def _add_image_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument(
        "--image",
        type=Path,
        required=required,
        metavar="FILE",
        help="initial image (PNG, JPEG or WebP)" + ("" if required else "; makes every cell img2img"),
    )
    parser.add_argument(
        "--strength",
        type=float,
        metavar="F",
        help="denoising strength, 0..1: how much of the image is redrawn (default: server default, 0.75)",
    )
    parser.add_argument(
        "--resize-mode",
        metavar="MODE",
        help="how the image is fitted to --width x --height: just_resize, crop_and_resize or "
        "resize_and_fill, or A1111's labels (default: server default, just_resize)",
    )


def _add_hires_options(parser: argparse.ArgumentParser) -> None:
    # None unless given, so that an --infotext's hires fix holds where neither flag is given.
    parser.add_argument(
        "--enable-hr",
        action=argparse.BooleanOptionalAction,
        help="hires fix (A1111's): generate at --width x --height, upscale, then redraw at the larger size; "
        "the options below need it (default: server default, off)",
    )
    parser.add_argument(
        "--hr-scale",
        type=float,
        metavar="F",
        help="upscale factor, 1..4; sides round down to multiples of 8 (default: server default, 2)",
    )
    parser.add_argument(
        "--hr-upscaler",
        metavar="NAME",
        help="Latent (bilinear on the latents) or Lanczos (on the decoded image) (default: server default, "
        "Latent)",
    )
    parser.add_argument(
        "--hr-second-pass-steps",
        type=int,
        metavar="N",
        help="steps of the second pass, 0 for --steps (default: server default, 0)",
    )
    parser.add_argument(
        "--denoising-strength",
        type=float,
        metavar="F",
        help="how much the second pass redraws, 0..1 (default: server default, 0.7)",
    )


def _add_mask_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--mask",
        type=Path,
        required=True,
        metavar="FILE",
        help="where to redraw: white repaints, black keeps (PNG, JPEG or WebP; stretched to the image size)",
    )
    parser.add_argument(
        "--mask-blur",
        type=int,
        metavar="N",
        help="blur radius of the mask's edge in pixels, 0..64 (default: server default, 4)",
    )
    parser.add_argument(
        "--inpainting-fill",
        metavar="MODE",
        help="what the masked area starts from: fill, original, latent_noise or latent_nothing, or A1111's "
        "labels (default: server default, original)",
    )
    # None unless given, so that an --infotext's "Inpaint area" holds where neither flag is given.
    parser.add_argument(
        "--only-masked",
        dest="inpaint_full_res",
        action=argparse.BooleanOptionalAction,
        help='A1111\'s "Inpaint area: Only masked": generate the masked area (plus padding) at --width x '
        "--height and paste it back; the PNGs keep the image's size (default: server default, whole picture)",
    )
    parser.add_argument(
        "--only-masked-padding",
        dest="inpaint_full_res_padding",
        type=int,
        metavar="N",
        help="pixels of context around the masked area with --only-masked, 0..256 "
        "(default: server default, 32)",
    )


def _axis(spec: str) -> Axis:
    try:
        return parse_axis(spec)
    except ValueError as exc:  # argparse shows an ArgumentTypeError's own message, after the option's name
        raise argparse.ArgumentTypeError(str(exc)) from None


def request_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """StableDiffusionClient.generate's arguments: the command line's, over those of --infotext's PNG.

    Raises UsageError for an unreadable --infotext, --image or --mask file and for a missing prompt.
    """
    request = {name: getattr(args, name) for name in REQUEST_ARGS if hasattr(args, name)}
    settings: list[dict[str, Any]] = []  # the ControlNet units' the infotext records
    if args.infotext is not None:
        try:
            text = read_infotext(args.infotext)
        except OSError as exc:
            raise UsageError(f"--infotext: cannot read {args.infotext}: {exc}") from None
        if text is None:
            raise UsageError(f"--infotext: {args.infotext} has no `parameters` chunk (A1111 infotext)")
        try:
            recorded = request_from_infotext(text)
        except ValueError as exc:
            raise UsageError(f"--infotext: {args.infotext}: {exc}") from None
        settings = recorded.pop("controlnet_settings", [])
        if getattr(args, "image", None) is None:
            recorded.pop("strength", None)  # an img2img strength, meaningless without an image
        if getattr(args, "image", None) is not None or getattr(args, "enable_hr", None) is False:
            for name in ("enable_hr", *HIRES_OPTIONS):  # the hires fix is text to image only
                recorded.pop(name, None)
        for name, value in recorded.items():
            if name in request and request[name] is None:
                request[name] = value
    if specs := getattr(args, "controlnet_specs", []):
        request["controlnets"] = tuple(
            _controlnet_unit(spec, settings[i] if i < len(settings) else {}) for i, spec in enumerate(specs)
        )
    if request["prompt"] is None:
        raise UsageError("a PROMPT is required (or --infotext FILE.png to take it from)")
    for name in ("image", "mask"):
        if (path := getattr(args, name, None)) is not None:
            try:
                request[name] = path.read_bytes()
            except OSError as exc:
                raise UsageError(f"--{name}: cannot read {path}: {exc.strerror or exc}") from None
    return request


def _controlnet_unit(spec: str, recorded: dict[str, Any]) -> ControlNetUnit:
    """A --controlnet MODEL:IMAGE[:WEIGHT[:START:END[:MODE]]] unit, over the settings an infotext recorded."""
    parts = spec.split(":")
    if not 2 <= len(parts) <= 6 or len(parts) == 4 or not parts[0] or not parts[1]:
        raise UsageError(f"--controlnet: expected MODEL:IMAGE[:WEIGHT[:START:END[:MODE]]], got {spec!r}")
    model, path, *rest = parts
    try:
        image = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"--controlnet: cannot read {path}: {exc.strerror or exc}") from None
    fields: dict[str, Any] = {k: v for k, v in recorded.items() if k != "model"}
    try:
        if rest:
            fields["weight"] = float(rest[0])
        if len(rest) >= 3:
            fields["guidance_start"], fields["guidance_end"] = float(rest[1]), float(rest[2])
    except ValueError:
        raise UsageError(f"--controlnet: WEIGHT, START and END must be numbers, got {spec!r}") from None
    if len(rest) == 4:
        modes = {str(i): mode for i, mode in enumerate(CONTROL_MODES)}
        fields["control_mode"] = modes.get(rest[3], rest[3])
    return ControlNetUnit(model, image, **fields)


def format_model_table(pipelines: dict[str, dict[str, str]]) -> str:
    rows = [("MODEL", "CHECKPOINT", "HASH")] + [
        (name, c.get("model", ""), c.get("model_hash", "")) for name, c in pipelines.items()
    ]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{m:<{widths[0]}}  {c:<{widths[1]}}  {h}".rstrip() for m, c, h in rows)


def format_lora_table(loras: list[dict[str, Any]]) -> str:
    rows = [("NAME", "ALIAS", "PATH")] + [(e["name"], e["alias"], e["path"]) for e in loras]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return "\n".join(f"{n:<{widths[0]}}  {a:<{widths[1]}}  {p}".rstrip() for n, a, p in rows)


def format_scheduler_table(schedulers: list[dict[str, Any]]) -> str:
    rows = [("NAME", "A1111", "")] + [
        (s["name"], s.get("a1111", ""), "(default)" if s.get("default") else "") for s in schedulers
    ]
    name_width = max(len(row[0]) for row in rows)
    label_width = max(len(row[1]) for row in rows)
    return "\n".join(f"{n:<{name_width}}  {a:<{label_width}}  {d}".rstrip() for n, a, d in rows)


def _grid(client: StableDiffusionClient, args: argparse.Namespace, request: dict[str, Any]) -> None:
    swept: dict[str, str] = {}
    for flag, axis in (("--x", args.x), ("--y", args.y), ("--z", args.z)):
        if axis is not None:
            if axis.param.name in swept:
                raise UsageError(f"{flag}: {axis.param.label} is already swept by {swept[axis.param.name]}")
            swept[axis.param.name] = flag
    warned: set[str] = set()

    def generate(**kwargs: Any) -> GenerationResult:
        result = client.generate(**kwargs)
        for warning in result.info.get("warnings", []):
            if warning not in warned:  # every cell tends to repeat them
                warned.add(warning)
                print(f"warning: {warning}", file=sys.stderr)
        return result

    sheets = sweep(generate, request, args.x, args.y, args.z)
    for path in save_pngs(args.out, ((sheet, infotext, "") for sheet, infotext in sheets), prefix="grid-"):
        print(path)


def _generate(
    client: StableDiffusionClient, request: dict[str, Any], args: argparse.Namespace
) -> GenerationResult:
    """One request; with --progress streamed, a bar on stderr and previews saved as they come."""
    if not args.progress:
        return client.generate(**request)
    from tqdm import tqdm

    if args.preview_dir is not None:
        args.preview_dir.mkdir(parents=True, exist_ok=True)
    with tqdm(unit="step", file=sys.stderr, desc="denoising") as bar:

        def on_progress(status: dict[str, Any], preview: bytes | None) -> None:
            bar.total = status["total"]
            bar.update(status["step"] - bar.n)
            if preview is not None and args.preview_dir is not None:
                (args.preview_dir / f"step-{status['step']:04d}.png").write_bytes(preview)

        every = args.preview_every if args.preview_dir is not None else 0
        return client.generate(**request, on_progress=on_progress, preview_every=every)


def save_and_report(result: GenerationResult, out_dir: Path) -> None:
    """Server warnings to stderr; the PNGs to `out_dir`, one path a line on stdout for scripts to read."""
    for warning in result.info.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    for path in result.save(out_dir):
        print(path)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        request = request_kwargs(args) if args.command not in ("schedulers", "models", "loras") else {}
        with StableDiffusionClient(
            args.url, args.protocol, args.model, timeout_s=args.timeout, retries=args.retries
        ) as client:
            if args.command == "schedulers":
                print(format_scheduler_table(client.schedulers()))
            elif args.command == "models":
                print(format_model_table(client.pipelines()))
            elif args.command == "loras":
                print(format_lora_table(client.loras(args.refresh)))
            elif args.command == "grid":
                _grid(client, args, request)
            else:
                save_and_report(_generate(client, request, args), args.out)
    except UsageError as exc:
        print(f"sd-client: error: {exc}", file=sys.stderr)
        return EXIT_INVALID_ARGUMENT
    except GenerationError as exc:
        print(f"sd-client: error: {exc}", file=sys.stderr)
        return EXIT_INVALID_ARGUMENT if exc.is_invalid_argument else EXIT_FAILURE
    except OSError as exc:  # writing the PNGs
        print(f"sd-client: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
