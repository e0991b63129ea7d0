"""build-engines: an SD v1.x checkpoint (diffusers folder or A1111 single file) → ONNX → engines → a Triton
model repository."""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from build_engines import (
    controlnet,
    embeddings,
    inputs,
    lora_branch,
    onnx_export,
    openvino_engine,
    openvino_int8,
    repository,
    tensorrt_engine,
)
from build_engines.digests import digest_folder, file_sha256
from build_engines.repository import PIPELINE_CONTROL, ServingOptions
from build_engines.single_file import SingleFileError
from python_backend import adapters
from python_backend.control import DEFAULT_MAX_UNITS
from python_backend.ort_sessions import LORA_GRAPH
from python_backend.ov_sessions import (
    DEFAULT_COMPILED_LIMIT,
    DYNAMIC,
    INFERENCE_PRECISION,
    IR_PRECISION,
    STATIC,
)
from python_backend.pipeline import PipelineAssets
from python_backend.shapes import (
    CONTROLNET,
    ENGINE_NAMES,
    LORA_LIBRARY,
    PIPELINE,
    TEXT_ENCODER,
    UNET,
    EngineSpec,
    ModelGeometry,
    PipelineManifest,
    Profile,
    controlled_unet_spec,
    controlnet_model,
    controlnet_spec,
    engine_specs,
    stream_model,
    triton_model,
)
from python_backend.trt_sessions import LORA_PLAN
from services.serve import default_cache_dir

SAMPLES, STEPS = openvino_int8.DEFAULT_SAMPLES, openvino_int8.STEPS
# --prefix: it becomes part of Triton model names and folder names, so nothing a path or URL treats specially.
PREFIX = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="build-engines", description=__doc__)
    parser.add_argument(
        "--checkpoint",
        type=Path,
        required=True,
        help="SD v1.x checkpoint: a diffusers folder, or one .safetensors/.ckpt file as A1111 loads it",
    )
    parser.add_argument(
        "--embeddings",
        type=Path,
        metavar="DIR",
        help="textual-inversion embeddings (A1111's embeddings/ folder: .pt, .bin, .safetensors), each "
        "usable in prompts by its file name",
    )
    parser.add_argument(
        "--lora",
        action="store_true",
        help="also export the text encoder and UNet with LoRA branches, so that prompts can use "
        "<lora:NAME:MULT> (sd-serve --lora-dir) and requests with different LoRAs still share UNet runs; "
        "the UNet keeps its plain graph for runs without LoRA, at the cost of a second copy of its weights "
        "in memory; on the tensorrt target the text encoder and UNet are then hosted by a python model",
    )
    parser.add_argument(
        "--controlnet",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="add an SD v1.x ControlNet (a diffusers ControlNet folder, or one .safetensors/.pth file in the "
        "original layout, e.g. control_v11p_sd15_canny.pth) as engine controlnet_NAME, which "
        "requests name as NAME; repeatable. The UNet then takes the ControlNets' residuals (zeros for "
        "requests without ControlNet, which still share its runs)",
    )
    parser.add_argument(
        "--controlnet-units",
        type=int,
        default=DEFAULT_MAX_UNITS,
        metavar="N",
        help="with --controlnet: the most ControlNet units one request may use (default %(default)s)",
    )
    parser.add_argument(
        "--vae",
        type=Path,
        help="use this VAE instead of the checkpoint's: an A1111 .safetensors/.pt/.ckpt VAE file or a "
        "diffusers AutoencoderKL folder",
    )
    parser.add_argument("--output", type=Path, required=True, help="model repository folder to write")
    parser.add_argument(
        "--target",
        choices=["onnx", "openvino", "tensorrt"],
        default="onnx",
        help="onnx: python-backend models running ONNX Runtime (CPU; works with the pip-installed Triton); "
        "openvino: OpenVINO IR on OpenVINO (CPU), hosted by python-backend models (or --openvino-backend "
        "native); tensorrt: TensorRT plans for Triton's TensorRT backend (needs TensorRT and a GPU)",
    )
    sizes = parser.add_argument_group("profile (what requests the engines accept)")
    sizes.add_argument("--min-size", type=int, default=64, help="smallest image side, pixels (default 64)")
    sizes.add_argument(
        "--opt-size", type=int, default=None, help="typical image side (default: 512 within range)"
    )
    sizes.add_argument("--max-size", type=int, default=1024, help="largest image side, pixels (default 1024)")
    sizes.add_argument(
        "--static", metavar="WxH", help="one fixed image size instead of a range (fastest engines)"
    )
    sizes.add_argument("--max-batch", type=int, default=4, help="most images per request (default 4)")
    sizes.add_argument(
        "--max-prompt-chunks",
        type=int,
        default=3,
        help="longest prompt in 75-token chunks (default 3); each adds 77 tokens to the UNet text input",
    )
    ov = parser.add_argument_group("openvino target")
    ov.add_argument(
        "--precision",
        choices=list(INFERENCE_PRECISION),
        default="fp32",
        help="inference precision of every engine (default fp32; bf16 needs a CPU with AVX512_BF16 or AMX; "
        "int8-hybrid: int8 weights everywhere, int8 activations in the UNet's convolutions and attention, "
        "calibrated on the fp32 pipeline's own UNet inputs, docs/openvino.md; int8-hybrid-bf16: the same IR "
        "with its other ops in bf16, on a CPU with bf16); reduced precisions are judged by the quality "
        "budget (perf/README.md); always set explicitly, as OpenVINO's own default depends on the CPU",
    )
    ov.add_argument(
        "--calibration-samples",
        type=int,
        metavar="N",
        help="int8-hybrid: UNet calls of the fp32 pipeline its activation ranges are calibrated on, at the "
        f"opt size (default {SAMPLES}: about {SAMPLES // STEPS} prompts x {STEPS} steps; each costs about "
        "two fp32 UNet calls of build time)",
    )
    ov.add_argument(
        "--openvino-shapes",
        choices=[STATIC, DYNAMIC],
        default=STATIC,
        help="static (default): each image count and size compiled on first use and cached (fastest: 20%% "
        "faster UNet calls at 512 px); dynamic: each engine compiled once for every shape, one copy of the "
        "weights in memory, for traffic of many sizes (docs/openvino.md)",
    )
    ov.add_argument(
        "--openvino-compiled-shapes",
        type=int,
        default=DEFAULT_COMPILED_LIMIT,
        metavar="N",
        help="static: the compiled shapes each engine keeps in memory, each with its own copy of the weights "
        "(default %(default)s); others are imported again from sd-serve's compile cache when needed",
    )
    ov.add_argument(
        "--openvino-backend",
        choices=["python", "native"],
        default="python",
        help="python (default): our python-backend model runs OpenVINO (batching across requests, LoRA, "
        "every shape option); native: configs for Triton's own openvino backend as NGC images ship it "
        "(no LoRA, no batching across requests, dynamic shapes; see docs/openvino.md)",
    )
    trt = parser.add_argument_group("tensorrt target")
    trt.add_argument(
        "--vae-precision",
        choices=["fp32", "fp16"],
        default="fp32",
        help="VAE engines' precision (default fp32: safe from fp16 overflow, ~3%% of a 50-step image's work)",
    )
    trt.add_argument(
        "--optimization-level", type=int, default=3, choices=range(6), help="builder level (default 3)"
    )
    trt.add_argument(
        "--workspace-gb", type=float, help="builder workspace limit in GiB (default: TensorRT's)"
    )
    trt.add_argument(
        "--timing-cache",
        type=Path,
        default=default_cache_dir() / "tensorrt-timing.cache",
        help="timing cache file, reused by later builds on the same GPU (default: %(default)s)",
    )
    trt.add_argument(
        "--refittable", action="store_true", help="build refittable engines (weights can be swapped)"
    )
    trt.add_argument(
        "--lora-max-rank",
        type=int,
        default=lora_branch.DEFAULT_MAX_RANK,
        help="with --lora: the largest total rank of a request's LoRAs at one layer (the ranks of several "
        "LoRAs add up) that the plans accept (default %(default)s); a larger set is refused",
    )
    serving = parser.add_argument_group("serving")
    serving.add_argument(
        "--max-concurrent-requests",
        type=int,
        help="requests generated at once, their UNet calls batched together (default: --max-batch, so that "
        "that many one-image requests fill the UNet's batch)",
    )
    serving.add_argument(
        "--response-cache",
        action="store_true",
        help="let Triton answer a repeated identical `pipeline` request from its response cache (start the "
        "server with --cache-config local,size=BYTES); requests without a fixed seed are cached too",
    )
    serving.add_argument(
        "--max-queue-size",
        type=int,
        default=ServingOptions.max_queue_size,
        help="requests that may wait for a free worker; more are refused at once with UNAVAILABLE "
        "(0: unbounded; default %(default)s)",
    )
    serving.add_argument(
        "--queue-timeout",
        type=float,
        default=ServingOptions.queue_timeout_s,
        metavar="SECONDS",
        help="a request still waiting for a worker after this long is refused with UNAVAILABLE (0: wait "
        "forever; a request's own shorter timeout wins; default %(default)s)",
    )
    serving.add_argument(
        "--unet-batch-delay",
        type=float,
        default=0.0,
        metavar="MS",
        help="how long a UNet call may wait for calls of other requests to share its run: more throughput "
        "under load for up to this much latency per step (default %(default)s: only calls that queue while "
        "the UNet is busy share a run)",
    )
    parser.add_argument(
        "--model-name",
        help="name reported in info and infotext (default: the checkpoint's folder or file stem)",
    )
    parser.add_argument(
        "--prefix",
        default="",
        metavar="NAME",
        help="name this checkpoint's Triton models NAME_pipeline, NAME_unet, ... so that it shares the "
        "repository with other checkpoints (their models are left as they are); default: no prefix, the "
        "repository's default checkpoint (pipeline, unet, ...)",
    )
    args = parser.parse_args(argv)

    if args.prefix and not PREFIX.fullmatch(args.prefix):
        parser.error(
            "--prefix must be letters, digits, '-' and '_', starting with a letter or digit (it names "
            f"Triton models and folders), got {args.prefix!r}"
        )
    try:
        inputs.check_checkpoint(args.checkpoint)
    except SingleFileError as e:
        parser.error(f"--checkpoint {e}")
    batch = {"max_batch": args.max_batch, "max_prompt_chunks": args.max_prompt_chunks}
    try:
        if args.static:
            match = re.fullmatch(r"(\d+)x(\d+)", args.static)
            if not match:
                parser.error(f"--static must look like 512x768 (width x height), got {args.static!r}")
            args.profile = Profile.static(int(match[1]), int(match[2]), **batch)
        else:
            opt_size = args.opt_size or min(max(512, args.min_size), args.max_size)
            args.profile = Profile.square(args.min_size, opt_size, args.max_size, **batch)
    except ValueError as e:
        parser.error(str(e))
    if args.max_concurrent_requests is None:
        args.max_concurrent_requests = args.max_batch
    if args.max_concurrent_requests < 1:
        parser.error(f"--max-concurrent-requests must be at least 1, got {args.max_concurrent_requests}")
    args.controlnets = {}
    for item in args.controlnet:
        name, sep, path = item.partition("=")
        if not sep or not PREFIX.fullmatch(name) or not path:
            parser.error(
                "--controlnet must be NAME=PATH, NAME letters, digits, '-' and '_' (it names a Triton "
                f"model), got {item!r}"
            )
        if name in args.controlnets:
            parser.error(f"--controlnet: the name {name!r} is given twice")
        args.controlnets[name] = Path(path)
    if not 1 <= args.controlnet_units <= 8:
        parser.error(f"--controlnet-units must be 1 to 8, got {args.controlnet_units}")
    if args.openvino_compiled_shapes < 1:
        parser.error(f"--openvino-compiled-shapes must be at least 1, got {args.openvino_compiled_shapes}")
    if args.target != "openvino" and (args.precision != "fp32" or args.openvino_backend != "python"):
        parser.error("--precision and --openvino-backend are options of --target openvino")
    if IR_PRECISION[args.precision] == openvino_int8.PRECISION:
        if args.controlnets:
            parser.error(
                f"--precision {args.precision} does not take --controlnet: calibrating the UNet of a "
                "ControlNet build would record the ControlNets' residuals of every step (about 70 MB a "
                "sample at 512 px); build it at --precision fp32"
            )
        try:
            openvino_int8.require_nncf()
        except openvino_int8.Int8Unavailable as e:
            parser.error(str(e))
        if args.calibration_samples is None:
            args.calibration_samples = openvino_int8.DEFAULT_SAMPLES
        if args.calibration_samples < 1:
            parser.error(f"--calibration-samples must be at least 1, got {args.calibration_samples}")
    elif args.calibration_samples is not None:
        parser.error("--calibration-samples is an option of --precision int8-hybrid(-bf16)")
    if args.openvino_backend == "native" and args.lora:
        parser.error(
            "--openvino-backend native cannot run LoRA branches (each row's factors are fed by our python "
            "model): leave out --lora or use --openvino-backend python"
        )
    if args.lora_max_rank < 1:
        parser.error(f"--lora-max-rank must be at least 1, got {args.lora_max_rank}")
    if args.max_queue_size < 0:
        parser.error(f"--max-queue-size must be at least 0, got {args.max_queue_size}")
    if not 0 <= args.queue_timeout < float("inf"):
        parser.error(f"--queue-timeout must be a number of seconds >= 0, got {args.queue_timeout}")
    if not 0 <= args.unet_batch_delay <= 1000:
        parser.error(f"--unet-batch-delay must be 0 to 1000 milliseconds, got {args.unet_batch_delay}")
    return args


def precisions(target: str, vae_precision: str) -> dict[str, str]:
    """Of each engine's ONNX export. TensorRT: fp16 UNet (nearly all the work); the text encoder stays fp32,
    as it is cheap and transformers' CLIP traced in fp16 mixes dtypes around LayerNorm. ONNX Runtime on CPU:
    fp32. OpenVINO: fp32, its precision is the IR's (openvino_engine.convert_engine)."""
    if target in ("onnx", "openvino"):
        return dict.fromkeys(ENGINE_NAMES, "fp32")
    return {
        name: "fp32" if name == TEXT_ENCODER else "fp16" if name == UNET else vae_precision
        for name in ENGINE_NAMES
    }


def openvino_options(args: argparse.Namespace) -> repository.OpenVinoOptions:
    return repository.OpenVinoOptions(
        args.precision, args.openvino_shapes, args.openvino_compiled_shapes, args.openvino_backend == "native"
    )


def vocab_size(checkpoint: Path) -> int:
    return int(json.loads((checkpoint / "text_encoder" / "config.json").read_text())["vocab_size"])


def tokenizer(checkpoint: Path) -> Callable[[str], list[int]]:
    """Text → token ids without BOS/EOS, as A1111 tokenizes an embedding's name."""
    from transformers import CLIPTokenizer

    clip = CLIPTokenizer.from_pretrained(checkpoint / "tokenizer")
    return lambda text: list(clip([text], add_special_tokens=False).input_ids[0])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        with inputs.prepare(args.checkpoint.resolve(), args.vae and args.vae.resolve()) as prepared:
            return build(args, prepared)
    except SingleFileError as e:
        print(f"build-engines: {e}", file=sys.stderr)
        return 1


def build(args: argparse.Namespace, prepared: inputs.PreparedCheckpoint) -> int:
    """Build into a stage beside --output and move it in only once everything is built."""
    pipeline = triton_model(args.prefix, PIPELINE)
    engines = [triton_model(args.prefix, engine) for engine in ENGINE_NAMES]
    engines += [controlnet_model(args.prefix, name) for name in args.controlnets]
    models = [*engines, pipeline, stream_model(pipeline), PIPELINE_CONTROL, LORA_LIBRARY]
    stage = repository.Stage(args.output, models)
    try:
        code = build_into(stage.path, args, prepared)
        if code == 0:
            stage.publish()
            print(f"model repository written: {args.output} (pipeline model: {pipeline})")
            print(f"serve it with: sd-serve --model-repository {args.output}")
        return code
    finally:
        stage.remove()


def build_into(repo: Path, args: argparse.Namespace, prepared: inputs.PreparedCheckpoint) -> int:
    checkpoint = prepared.folder
    if args.target == "tensorrt":
        try:
            gpu = tensorrt_engine.check_tensorrt_available()
        except tensorrt_engine.TensorRTUnavailable as e:
            print(f"build-engines: --target tensorrt: {e}", file=sys.stderr)
            return 1
        print(f"building TensorRT engines for {gpu}")
    geometry = onnx_export.read_geometry(checkpoint)
    inversions = []  # read (and refused) before anything is written
    if args.embeddings is not None:
        inversions = embeddings.read_embeddings(args.embeddings, geometry.text_hidden_size)
    vectors = torch.cat([e.vectors for e in inversions]) if inversions else None
    loader = onnx_export.ModuleLoader(checkpoint, vectors)
    # The text encoder's export depends on the embeddings too: they are part of its cache key.
    digests: dict[str, str] = {"text_encoder": digest_folder(checkpoint / "text_encoder")}
    if inversions:
        digests["text_encoder"] += embeddings.digest(inversions)
    precision = precisions(args.target, args.vae_precision)
    options = tensorrt_engine.BuildOptions(
        optimization_level=args.optimization_level,
        workspace_bytes=int(args.workspace_gb * 2**30) if args.workspace_gb else None,
        refittable=args.refittable,
    )

    specs = engine_specs(geometry)
    modules: dict[str, Callable[[], torch.nn.Module]] = {name: partial(loader.module, name) for name in specs}
    for name in specs:
        component = onnx_export.COMPONENT_OF[name]
        if component not in digests:
            digests[component] = digest_folder(checkpoint / component)
        digests[name] = digests[component]
    if args.controlnets:  # the UNet takes their residuals; each is an engine of its own
        specs[UNET] = controlled_unet_spec(geometry)
        modules[UNET] = partial(controlnet.controlled_unet, loader)
        unet_config = json.loads((checkpoint / "unet" / "config.json").read_text())
        for name, path in args.controlnets.items():
            engine = f"{CONTROLNET}_{name}"
            specs[engine] = replace(controlnet_spec(geometry), name=engine)
            if controlnet.is_single_file(path):  # converted only when its export is not kept
                folder = repo / ".controlnets" / name
                modules[engine] = partial(_single_file_controlnet, path, unet_config, folder, geometry)
                digests[engine] = file_sha256(path)
            else:
                modules[engine] = partial(controlnet.load_controlnet, path, geometry)
                digests[engine] = digest_folder(path)
            precision[engine] = precision[UNET]
    lora_targets: dict[str, dict[str, list[int]]] = {}  # --lora: {component: {layer: base weight shape}}
    int8_graphs: list[openvino_int8.Graph] = []  # --precision int8-hybrid(-bf16)
    with tqdm(specs.values(), unit="engine", file=sys.stdout) as bar:
        for spec in bar:
            bar.set_description(f"{spec.name}: {precision[spec.name]} ONNX export + check")
            try:
                out_dir = repository.onnx_dir(repo, spec.name, args.target, args.prefix)
                lora = args.lora and spec.name in lora_branch.ENGINE_OF.values()
                component_name = adapters.COMPONENT_OF[spec.name] if lora else None
                # (ONNX file, engine spec, plan or IR folder) of each graph: the text encoder with --lora has
                # only its branch graph; the UNet keeps its plain graph and has the branch graph beside it.
                graphs: list[tuple[Path, EngineSpec, Path]] = []
                version = repository.engine_dir(repo, spec.name, args.prefix) / "1"
                if not (lora and spec.name == TEXT_ENCODER):
                    exported = onnx_export.export_engine(
                        spec, modules[spec.name], digests[spec.name], out_dir, precision[spec.name]
                    )
                    state = "up to date, kept" if exported.reused else "exported"
                    bar.write(
                        f"{spec.name}: {precision[spec.name]} ONNX {state}; "
                        f"max abs diff vs fp32 torch {exported.max_abs_diff:.2e}"
                    )
                    graphs.append((exported.path, spec, version))
                if lora:
                    branch_dir = out_dir if spec.name == TEXT_ENCODER else out_dir / LORA_GRAPH.parent
                    branch = _export_branch(
                        modules[spec.name](), spec, digests[spec.name], branch_dir, precision[spec.name], bar
                    )
                    lora_targets.update(branch.targets)
                    plan_dir = version if spec.name == TEXT_ENCODER else version / LORA_PLAN.parent
                    graphs.append((branch.path, branch.spec, plan_dir))
                if args.target == "onnx":
                    repository.write_onnx_runtime_model(
                        repo, spec, args.profile, args.prefix, args.unet_batch_delay, component_name
                    )
                    continue
                if args.target == "openvino":
                    for onnx_path, graph_spec, ir_dir in graphs:
                        if IR_PRECISION[args.precision] == openvino_int8.PRECISION:  # once all are exported
                            branches = lora and graph_spec is not spec
                            int8_graphs.append(
                                openvino_int8.Graph(spec.name, onnx_path, graph_spec, ir_dir, branches)
                            )
                            continue
                        bar.set_description(f"{spec.name}: OpenVINO IR")
                        ir = openvino_engine.convert_engine(
                            onnx_path, graph_spec, ir_dir, IR_PRECISION[args.precision]
                        )
                        bar.write(
                            f"{spec.name}: OpenVINO {args.precision} IR "
                            f"{'up to date, kept' if ir.reused else 'converted'}; relative error vs ONNX "
                            f"Runtime {ir.rel_error:.1e}"
                        )
                    repository.write_openvino_model(
                        repo,
                        spec,
                        args.profile,
                        openvino_options(args),
                        args.prefix,
                        args.unet_batch_delay,
                        component_name,
                    )
                    continue
                for onnx_path, graph_spec, plan_dir in graphs:
                    bar.set_description(f"{spec.name}: TensorRT build")
                    rank_axes = lora_branch.rank_axes(graph_spec, args.lora_max_rank)
                    built = tensorrt_engine.build_engine(
                        onnx_path,
                        graph_spec,
                        tensorrt_engine.profile_shapes(graph_spec, args.profile, rank_axes),
                        plan_dir,
                        precision=precision[spec.name],
                        options=options,
                        timing_cache=args.timing_cache,
                    )
                    kind = " with LoRA branches" if rank_axes else ""
                    bar.write(
                        f"{spec.name}: TensorRT plan{kind} {'up to date, kept' if built.reused else 'built'}"
                    )
                repository.write_tensorrt_model(
                    repo, spec, args.profile, args.prefix, args.unet_batch_delay, component_name
                )
            except (
                onnx_export.ExportError,
                openvino_engine.ConversionError,
                tensorrt_engine.EngineBuildError,
                controlnet.ControlNetError,
            ) as e:
                print(f"build-engines: {e}", file=sys.stderr)
                return 1
    shutil.rmtree(repo / ".controlnets", ignore_errors=True)

    device = "cuda" if args.target == "tensorrt" else "cpu"
    manifest = PipelineManifest(
        args.profile,
        geometry,
        args.model_name or prepared.model_name,
        device,
        prepared.model_hash,
        vae_name=prepared.vae_name,
        vae_hash=prepared.vae_hash,
        prefix=args.prefix,
        lora_max_rank=args.lora_max_rank if args.lora and args.target == "tensorrt" else 0,
        controlnets=tuple(args.controlnets),
        controlnet_units=args.controlnet_units if args.controlnets else 0,
    )
    serving = repository.ServingOptions(
        args.max_concurrent_requests, args.max_queue_size, args.queue_timeout, args.response_cache
    )
    token_table = None
    if inversions:
        token_table = embeddings.token_table(inversions, vocab_size(checkpoint), tokenizer(checkpoint))
        print(f"embeddings: {', '.join(e.name for e in inversions)}")
    repository.write_pipeline_model(repo, checkpoint, manifest, serving, token_table, lora_targets or None)
    if int8_graphs:
        return _convert_int8(repo, int8_graphs, args)
    return 0


def _convert_int8(repo: Path, graphs: list[openvino_int8.Graph], args: argparse.Namespace) -> int:
    """The int8-hybrid IRs, calibrated on the fp32 pipeline: its assets are the pipeline model's, written
    just before."""
    assets = PipelineAssets.load(repo / triton_model(args.prefix, PIPELINE) / "1")
    width, height = (side[1] for side in (args.profile.width, args.profile.height))
    calibration = openvino_int8.Calibration(args.calibration_samples, width, height)
    converter = openvino_int8.Int8Converter(graphs, calibration, assets, repo / ".openvino-fp32")
    for graph in graphs:
        what = "int8 activations and weights" if graph.calibrated else "int8 weights"
        print(f"{graph.engine}: OpenVINO int8-hybrid IR ({what})", flush=True)
        try:
            ir = converter.convert(graph)
        except openvino_engine.ConversionError as e:
            print(f"build-engines: {e}", file=sys.stderr)
            return 1
        state = "up to date, kept" if ir.reused else "converted"
        error = f"relative error vs ONNX Runtime {ir.rel_error:.1e}"
        print(f"{graph.engine}: OpenVINO int8-hybrid IR {state}; {error}")
    return 0


def _single_file_controlnet(
    path: Path, unet_config: dict[str, Any], folder: Path, geometry: ModelGeometry
) -> torch.nn.Module:
    """The ControlNet file `path` (original layout), converted into `folder` and loaded."""
    return controlnet.load_controlnet(controlnet.convert_single_file(path, unet_config, folder), geometry)


@dataclass(frozen=True)
class ExportedBranch:
    path: Path  # the ONNX file
    spec: EngineSpec  # the engine's spec plus the branch inputs
    targets: dict[str, dict[str, list[int]]]  # {component: {layer path: base weight shape}}


def _export_branch(
    module: torch.nn.Module, spec: EngineSpec, digest: str, out_dir: Path, precision: str, bar: Any
) -> ExportedBranch:
    """Export the engine `spec` (its torch `module`) with LoRA branches into out_dir."""
    component = adapters.COMPONENT_OF[spec.name]
    model = lora_branch.BranchedModel(module, component)
    exported = lora_branch.export_branch(model, spec, digest, out_dir, precision)
    state = "up to date, kept" if exported.reused else "exported"
    bar.write(
        f"{spec.name}: {precision} ONNX with LoRA branches {state}; max abs diff vs fp32 torch "
        f"{exported.max_abs_diff:.2e}"
    )
    targets = {component: {t.path: list(t.weight_shape) for t in model.targets}}
    return ExportedBranch(exported.path, lora_branch.branch_spec(spec, model.targets), targets)


if __name__ == "__main__":
    sys.exit(main())
