"""`sd-client`: generate images with the Triton `pipeline` model, or list its schedulers.

Exit codes: 0 success, 1 server or I/O failure (including no server at the URL), 2 invalid arguments
(rejected by argparse or by the server).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from client.api import DEFAULT_URLS, GenerationError, GenerationResult, StableDiffusionClient

EXIT_FAILURE = 1
EXIT_INVALID_ARGUMENT = 2  # as argparse uses for bad command lines


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
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="give up on a call after this long (default: no limit)",
    )

    parser = argparse.ArgumentParser(
        prog="sd-client",
        description="Generate images with the Triton pipeline model, or list its schedulers.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser(
        "generate",
        parents=[connection],
        help="generate images and save them as PNGs with A1111 infotext",
        description="Generate images; print the path of each PNG written. Server warnings go to stderr.",
    )
    generate.add_argument("prompt", help="what the images should show")
    generate.add_argument(
        "--negative-prompt", metavar="TEXT", help="what they should not show (default: server default)"
    )
    generate.add_argument("--steps", type=int, metavar="N", help="denoising steps (default: server default)")
    generate.add_argument(
        "--guidance",
        type=float,
        metavar="SCALE",
        help="classifier-free guidance scale (default: server default)",
    )
    generate.add_argument(
        "--seed",
        type=int,
        metavar="N",
        help="seed of the noise, for repeatable results (default: server default, random; -1 is random too)",
    )
    generate.add_argument(
        "--scheduler",
        metavar="NAME",
        help="scheduler name or A1111 sampler label, see `sd-client schedulers` (default: server default)",
    )
    generate.add_argument("--width", type=int, metavar="N", help="in pixels (default: server default)")
    generate.add_argument("--height", type=int, metavar="N", help="in pixels (default: server default)")
    generate.add_argument(
        "--num-images", type=int, metavar="N", help="images in one request (default: server default)"
    )
    generate.add_argument(
        "--out", type=Path, default=Path("outputs"), metavar="DIR", help="where PNGs go (default: ./outputs)"
    )

    commands.add_parser(
        "schedulers",
        parents=[connection],
        help="list the schedulers the server offers",
        description="List scheduler names and A1111 sampler labels; the checkpoint's own is the default.",
    )
    return parser


def format_scheduler_table(schedulers: list[dict[str, Any]]) -> str:
    rows = [("NAME", "A1111", "")] + [
        (s["name"], s.get("a1111", ""), "(default)" if s.get("default") else "") for s in schedulers
    ]
    name_width = max(len(row[0]) for row in rows)
    label_width = max(len(row[1]) for row in rows)
    return "\n".join(f"{n:<{name_width}}  {a:<{label_width}}  {d}".rstrip() for n, a, d in rows)


def _generate(client: StableDiffusionClient, args: argparse.Namespace) -> None:
    result = client.generate(
        args.prompt,
        negative_prompt=args.negative_prompt,
        steps=args.steps,
        guidance_scale=args.guidance,
        seed=args.seed,
        scheduler=args.scheduler,
        width=args.width,
        height=args.height,
        num_images=args.num_images,
    )
    save_and_report(result, args.out)


def save_and_report(result: GenerationResult, out_dir: Path) -> None:
    """Server warnings to stderr; the PNGs to `out_dir`, one path a line on stdout for scripts to read."""
    for warning in result.info.get("warnings", []):
        print(f"warning: {warning}", file=sys.stderr)
    for path in result.save(out_dir):
        print(path)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        with StableDiffusionClient(args.url, protocol=args.protocol, timeout_s=args.timeout) as client:
            if args.command == "generate":
                _generate(client, args)
            else:
                print(format_scheduler_table(client.schedulers()))
    except GenerationError as exc:
        print(f"sd-client: error: {exc}", file=sys.stderr)
        return EXIT_INVALID_ARGUMENT if exc.is_invalid_argument else EXIT_FAILURE
    except OSError as exc:  # writing the PNGs
        print(f"sd-client: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
