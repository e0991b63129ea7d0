"""build-engines: a diffusers SD v1.x checkpoint folder → ONNX engines → a Triton model repository."""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path

from tqdm import tqdm

from build_engines import onnx_export, repository
from python_backend.shapes import PipelineManifest, Profile, engine_specs

CHECKPOINT_PARTS = ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    defaults = Profile()
    parser = argparse.ArgumentParser(prog="build-engines", description=__doc__)
    parser.add_argument(
        "--checkpoint", type=Path, required=True, help="diffusers-format SD v1.x checkpoint folder"
    )
    parser.add_argument("--output", type=Path, required=True, help="model repository folder to write")
    parser.add_argument(
        "--target",
        choices=["onnx"],
        default="onnx",
        help="onnx: python-backend models running ONNX Runtime (CPU; works with the pip-installed Triton)",
    )
    parser.add_argument("--min-size", type=int, default=defaults.min_size, help="smallest image side, pixels")
    parser.add_argument(
        "--opt-size", type=int, default=None, help="typical image side (default: 512 in range)"
    )
    parser.add_argument("--max-size", type=int, default=defaults.max_size, help="largest image side, pixels")
    parser.add_argument("--max-batch", type=int, default=defaults.max_batch, help="most images per request")
    parser.add_argument(
        "--model-name", help="name reported in info and infotext (default: checkpoint folder)"
    )
    args = parser.parse_args(argv)
    missing = [p for p in CHECKPOINT_PARTS if not (args.checkpoint / p).exists()]
    if missing:
        parser.error(f"--checkpoint {args.checkpoint} is not a diffusers checkpoint: no {', '.join(missing)}")
    opt_size = args.opt_size or min(max(defaults.opt_size, args.min_size), args.max_size)
    try:
        args.profile = Profile(
            min_size=args.min_size, opt_size=opt_size, max_size=args.max_size, max_batch=args.max_batch
        )
    except ValueError as e:
        parser.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    checkpoint: Path = args.checkpoint.resolve()
    repo: Path = args.output
    geometry = onnx_export.read_geometry(checkpoint)
    loader = onnx_export.ModuleLoader(checkpoint)
    digests: dict[str, str] = {}

    specs = engine_specs(geometry)
    with tqdm(specs.values(), unit="engine", file=sys.stdout) as bar:
        for spec in bar:
            bar.set_description(f"{spec.name}: export + check")
            component = onnx_export.COMPONENT_OF[spec.name]
            if component not in digests:
                digests[component] = onnx_export.digest_folder(checkpoint / component)
            try:
                module = partial(loader.module, spec.name)
                result = onnx_export.export_engine(spec, module, digests[component], repo / spec.name / "1")
            except onnx_export.ExportError as e:
                print(f"build-engines: {e}", file=sys.stderr)
                return 1
            repository.write_engine_model(repo, spec)
            state = "up to date, kept" if result.reused else "exported"
            bar.write(f"{spec.name}: {state}; ONNX Runtime vs torch max abs diff {result.max_abs_diff:.2e}")

    manifest = PipelineManifest(args.profile, geometry, args.model_name or checkpoint.name)
    repository.write_pipeline_model(repo, checkpoint, manifest)
    print(f"model repository written: {repo}")
    print(f"serve it with: sd-serve --model-repository {repo}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
